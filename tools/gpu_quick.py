"""A short GPU check for a lent accelerator: correctness and speed against PyTorch in one run.

    OUT=/tmp/out python tools/gpu_quick.py [--deadline 200]

Sections run in priority order and each is skipped when the deadline would be passed, so a short
lease still yields figures: (1) torchvision parity of ResNet50 at 224 in float32 on the GPU,
(2) ResNet50 @ 224 bf16 training step vs torch AMP bf16 eager (channels_last), (3) SAM ViT-B encoder at 1024 vs
segment_anything when importable, (4) EfficientNet-B3 @ 300 like (2). Writes
$OUT/gpu_quick.json after every section.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

T0 = time.time()
RESULT: dict = {"env": {}}


def save():
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "gpu_quick.json"), "w") as f:
        json.dump(RESULT, f, indent=2)


def left(deadline):
    return deadline - (time.time() - T0)


def timed(fn, n):
    fn()  # warm
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


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
    compiled = jstep.lower(state, x, y).compile()
    compile_s = time.time() - t
    flops = None
    try:
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        flops = float(ca.get("flops", 0.0)) or None
    except Exception:
        pass
    holder = [state]

    def run():
        holder[0], l = compiled(holder[0], x, y)
        l.block_until_ready()
    dt = timed(run, steps)
    return {"img_s": batch / dt, "step_ms": dt * 1e3, "compile_s": compile_s, "flops_per_step": flops,
            "tflops": (flops / dt / 1e12) if flops else None}


def torch_train(arch, side, batch, steps):
    dev = "cuda"
    m = getattr(torchvision.models, arch)(num_classes=1000).to(dev).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, side, side, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=dev)

    def run():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
    run()
    return {"img_s": batch / timed(run, steps)}  # steady state after one warm-up step


def section_parity():
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
    x = np.random.RandomState(0).randn(4, 3, 224, 224).astype(np.float32)
    with torch.no_grad():
        ref = tm(torch.from_numpy(x)).numpy()  # CPU float32 reference
    with jax.default_matmul_precision("highest"):
        out = np.asarray(jax.jit(model.apply)(v, jnp.asarray(x.transpose(0, 2, 3, 1))))
    err = float(np.abs(out - ref).max())
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    return {"max_abs_diff": err, "tolerance": tol, "pass": err <= tol}


def section_sam(steps=5):
    from mskjax.models.sam import build_sam, init_sam_variables
    from mskjax import sam as msam
    model = build_sam("vit_b", img_size=1024)
    v = init_sam_variables(model, jax.random.PRNGKey(0))
    x = jnp.asarray(np.random.RandomState(0).randn(1, 1024, 1024, 3), jnp.float32)
    f = jax.jit(lambda v, x: msam.embed(model, v, x))
    t = time.time()
    f(v, x).block_until_ready()
    comp = time.time() - t
    res = {"jax_encoder_ms": timed(lambda: f(v, x).block_until_ready(), steps) * 1e3, "jax_compile_s": comp}
    try:
        from segment_anything import sam_model_registry
        ts = sam_model_registry["vit_b"]().cuda().eval()
        xt = torch.randn(1, 3, 1024, 1024, device="cuda")

        def run():
            with torch.inference_mode():
                ts.image_encoder(xt)
            torch.cuda.synchronize()
        run()
        res["torch_encoder_ms"] = timed(run, steps) * 1e3
        res["ratio_torch_over_jax"] = res["torch_encoder_ms"] / res["jax_encoder_ms"]
    except ImportError as e:
        res["torch"] = f"segment_anything not importable: {e}"
    return res


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--deadline", type=float, default=200.0, help="seconds from start")
    a = p.parse_args()
    RESULT["env"] = {"jax": jax.__version__, "torch": torch.__version__, "devices": [str(d) for d in jax.devices()],
                     "torch_gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                     "python": platform.python_version()}
    print(RESULT["env"], flush=True)
    save()
    plan = [
        ("parity_resnet50_fp32", 30, section_parity),
        ("resnet50_224_bf16_b128", 60, lambda: {"jax": jax_train("resnet50", 224, 128, 10),
                                                "torch_amp": torch_train("resnet50", 224, 128, 10)}),
        ("sam_vit_b_encoder_1024", 40, section_sam),
        ("efficientnet_b3_300_bf16_b64", 70, lambda: {"jax": jax_train("efficientnet_b3", 300, 64, 10),
                                                      "torch_amp": torch_train("efficientnet_b3", 300, 64, 10)}),
    ]
    for name, need, fn in plan:
        if left(a.deadline) < need:
            RESULT[name] = {"skipped": f"{left(a.deadline):.0f} s left, needs ~{need} s"}
        else:
            t = time.time()
            try:
                RESULT[name] = fn()
            except Exception as e:  # report and go on: each section is independent
                RESULT[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            RESULT[name]["section_s"] = time.time() - t
            r = RESULT[name]
            if "jax" in r and "torch_amp" in r and "img_s" in r.get("jax", {}):
                r["ratio_jax_over_torch"] = r["jax"]["img_s"] / r["torch_amp"]["img_s"]
        print(name, json.dumps(RESULT[name]), flush=True)
        save()


if __name__ == "__main__":
    main()
