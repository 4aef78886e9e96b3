"""Lower and compile time of the trainer's steps, per model, with the persistent cache off.

    .venv/bin/python tools/compile_time.py --out compile_time.json
    .venv/bin/python tools/compile_time.py --models efficientnet_b3@300 --variants plain,scan --steps 3

For each model ("arch@side") and variant ("plain": the usual module; "scan": built with
`scan_blocks=True`, `mskjax.train.classifier.step_model`, the state in the unscanned layout as the
trainer keeps it; "scan_state": the same module with the state, optimizer included, in the stacked
layout; "ravel": the usual module with the optimizer run on two concatenated vectors, `ravelled_sgd`),
one fresh worker process (so no compile
cache in memory carries over) builds the classifier trainer's own steps
(`mskjax.train.classifier.make_train_step` / `make_eval_step`: forward + backward + the trainer's
optimizer, here SGD momentum 0.9 with its weight decay and gradient clipping, BatchNorm in train
mode, dropout and stochastic depth on; the state in the unscanned layout, as the trainer keeps it)
and times, separately, `jax.jit(step).lower(*abstract args)` and `.compile()`. The persistent
compilation cache is disabled in the worker. Batch `--batch` (8), one input channel (the
trainer's default), augmentation off unless `--augment`. `--steps N` also runs the compiled train
step N times on zeros and reports the median wall time of a step (after one untimed call).

`--sam` adds SAM encoders' forward (`embed_images`): vit_b at 512, vit_tiny at 256, and LiteMedSAM's
TinyViT at 256, batch 1. `--sam-train` adds the SAM trainer's own steps for those three segmenters
(`mskjax.train.sam.make_train_step`: image encoder and mask decoder trained, AdamW, `--batch` images
with `data.max_prompts` boxes each; and its `make_predict` evaluation step). `--pipeline` adds the
pipeline's two executables (`mskjax.Pipeline`: SAM's encoder compiled apart with the encoder
options, then the step: a ResNet50 @ 224 classifier, Grad-CAM, peak box, the segmenter's decoder),
batch `--batch`, for ViT-B @ 512 and LiteMedSAM; variables are zeros (compile time does not depend
on values).

`--option-sets 'base:;o1:xla_backend_optimization_level=1'` compiles every cell once per named set
of XLA compiler options (passed to `.compile()`, the same as XLA_FLAGS for that executable).
"kernels" counts the top-level fusions of the optimised HLO: XLA:CPU emits and code-generates each
as its own kernel.

Prints a table; `--out` writes JSON with the machine, date, jax version and the load average
before and after every worker.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

DEFAULT_MODELS = "resnet18@224,resnet50@224,efficientnet_b0@224,efficientnet_b3@224,efficientnet_b3@300"
SAM_MODELS = ("sam_vit_b@512", "sam_vit_tiny@256", "lite_medsam@256")
# The SAM trainer's step (encoder and decoder trained, as configs/sam_*.py) and the pipeline's two
# executables (SAM's encoder apart, then the step), for `--sam-train` / `--pipeline`.
SAM_TRAIN_MODELS = ("sam_vit_tiny@256", "sam_vit_b@512", "lite_medsam@256")
PIPELINE_MODELS = ("resnet50@224+sam_vit_b@512", "resnet50@224+lite_medsam@256")


def loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# Worker: one model, one variant, in its own process

def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _kernels(compiled) -> int | None:
    """Top-level fusions in the optimised HLO of the entry computation and the loops it calls: on
    XLA:CPU each is emitted and code-generated as its own kernel, which is where compile time goes."""
    try:
        text = compiled.as_text()
    except Exception:  # noqa: BLE001 - some backends give no text; the count is informative only
        return None
    return sum(1 for ln in text.splitlines() if re.search(r"=\s*\S+\s+fusion\(", ln))


def _lower_compile(fn, args, donate=(), options: dict | None = None) -> tuple[dict, object]:
    import jax
    lowered, t_lower = _timed(lambda: jax.jit(fn, donate_argnums=donate).lower(*args))
    n_hlo = len(lowered.as_text().splitlines())
    compiled, t_compile = _timed(lambda: lowered.compile(options or None))
    return {"lower_s": round(t_lower, 3), "compile_s": round(t_compile, 3), "stablehlo_lines": n_hlo,
            "kernels": _kernels(compiled)}, compiled


# The "ravel" variant: the trainer's SGD (weight decay on kernels, momentum, global-norm clipping)
# on two concatenated vectors instead of leaf by leaf. Leaf by leaf, an optimizer step costs XLA:CPU
# three or four kernels per parameter leaf (the norm's square and sum, the momentum, the update):
# 1,220 of EfficientNet-B3's 3,769. This variant measures what removing them buys in compile time.

GROUPS = ("decay", "no_decay")


def to_groups(tree, marks: list[bool]) -> dict:
    """Leaves marked True ("decay"), then the others, each flattened and concatenated in tree order."""
    import jax
    import jax.numpy as jnp
    leaves = jax.tree.leaves(tree)
    out = {}
    for group, want in zip(GROUPS, (True, False)):
        parts = [leaf.reshape(-1) for leaf, m in zip(leaves, marks) if m == want]
        out[group] = jnp.concatenate(parts) if parts else jnp.zeros((0,), jnp.float32)
    return out


def from_groups(groups: dict, like, marks: list[bool]):
    """Inverse of `to_groups`: the two vectors sliced back into `like`'s structure and shapes."""
    import jax
    leaves, treedef = jax.tree.flatten(like)
    offsets = dict.fromkeys(GROUPS, 0)
    out = []
    for leaf, m in zip(leaves, marks):
        group = GROUPS[0] if m else GROUPS[1]
        start, offsets[group] = offsets[group], offsets[group] + leaf.size
        out.append(groups[group][start:offsets[group]].reshape(leaf.shape).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out)


def ravelled_sgd(lr, weight_decay: float, momentum: float, grad_clip: float):
    """`mskjax.train.optim.make_optimizer("sgd", ...)` on the two vectors of `to_groups`: the same
    arithmetic per element (the global norm summed in another order), its state two vectors. Has the
    `apply_gradients` method `mskjax.train.optim.apply_gradients` defers to, so the trainer's own
    `make_train_step` takes its step on the vectors and slices the new parameters out once."""
    import types

    import jax
    import jax.numpy as jnp

    from mskjax.train import optim
    inner = optim.make_optimizer("sgd", lr, weight_decay, momentum, grad_clip,
                                 mask={"decay": True, "no_decay": False})

    def marks(params):
        return jax.tree.leaves(optim.decay_mask(params))

    def init(params):
        return inner.init(to_groups(params, marks(params)))

    def apply_gradients(grads, state, params):
        m = marks(params)
        g, p = to_groups(grads, m), to_groups(params, m)
        u, state = inner.update(g, state, p)
        new = {k: p[k] + u[k] for k in GROUPS}
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in g.values()))
        return from_groups(new, params, m), state, norm

    return types.SimpleNamespace(init=init, apply_gradients=apply_gradients)


def classifier_worker(arch: str, side: int, variant: str, batch: int, modes: list[str], steps: int,
                      augment: bool, depthwise: str = "", options: dict | None = None) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from functools import partial

    from mskjax.data import augment as aug
    from mskjax.train import classifier, optim
    from mskjax.train.config import augment_config, base_config

    config = base_config()
    config.model.arch = arch
    config.model.scan_blocks = variant in ("scan", "scan_state")
    config.data.image_size = side
    config.train.optimizer = "sgd"
    config.train.batch_size = batch
    if arch.startswith("efficientnet"):
        config.model.depthwise_impl = depthwise
    model = classifier.create(arch, num_classes=config.model.num_classes, **classifier.model_variant(config))
    run_model = classifier.step_model(config)
    norm = classifier.normalization(config)
    lr = optim.schedule(config.train.learning_rate, 1000, 100)
    if variant == "ravel":
        tx = ravelled_sgd(lr, config.train.weight_decay, config.train.momentum, config.train.grad_clip)
    else:
        tx = optim.make_optimizer("sgd", lr, config.train.weight_decay, config.train.momentum, config.train.grad_clip)
    c = config.model.in_channels

    state_model = run_model if variant == "scan_state" else model

    def init_state():
        v = classifier.init_variables(state_model, config, jax.random.PRNGKey(0))
        return {"step": jnp.zeros((), jnp.int32), "params": v["params"], "batch_stats": v.get("batch_stats", {}),
                "opt_state": tx.init(v["params"]), "rng": jax.random.PRNGKey(1)}

    state_abs = jax.eval_shape(init_state)
    batch_abs = {"image": jax.ShapeDtypeStruct((batch, side, side, 1), jnp.float32),
                 "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
                 "valid": jax.ShapeDtypeStruct((batch,), jnp.bool_)}
    out: dict = {"params": int(sum(np.prod(a.shape) for a in jax.tree.leaves(state_abs["params"]))),
                 "in_channels": c}
    if "train" in modes:
        augment_fn = partial(aug.augment, config=augment_config(config.data)) if augment else None
        step = classifier.make_train_step(run_model, tx, config, norm, 1.0, 1.0, augment_fn,
                                          convert_layout=variant != "scan_state")
        out["train"], compiled = _lower_compile(step, (state_abs, batch_abs), donate=(0,), options=options)
        if steps > 0:
            state = jax.jit(init_state)()
            rng = np.random.default_rng(0)
            data = {"image": jnp.asarray(rng.random((batch, side, side, 1), np.float32)),
                    "label": jnp.asarray(rng.integers(0, 2, batch).astype(np.int32)),
                    "valid": jnp.ones((batch,), jnp.bool_)}
            state, m = compiled(state, data)  # untimed first call
            jax.block_until_ready(m)
            times = []
            for _ in range(steps):
                t = time.perf_counter()
                state, m = compiled(state, data)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t)
            out["train"]["step_s"] = round(statistics.median(times), 3)
            out["train"]["step_times_s"] = [round(t, 3) for t in times]
            out["train"]["loss"] = float(m["loss"])
    if "eval" in modes:
        variables_abs = {"params": state_abs["params"], "batch_stats": state_abs["batch_stats"]}
        step = classifier.make_eval_step(run_model, config, norm)
        out["eval"], _ = _lower_compile(step, (variables_abs, batch_abs["image"]), options=options)
    return out


def sam_worker(name: str, side: int, options: dict | None = None) -> dict:
    import jax
    import jax.numpy as jnp

    from mskjax.models.sam import build_lite_medsam, build_sam, segmenter_variable_shapes

    if name == "lite_medsam":
        model = build_lite_medsam()
    else:
        model = build_sam(name[len("sam_"):], side)
    variables_abs = segmenter_variable_shapes(model)
    images = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)

    def embed(variables, images):
        return model.apply(variables, images, method="embed_images")

    res, _ = _lower_compile(embed, (variables_abs, images), options=options)
    return {"embed": res}


def _zeros_like_shapes(shapes):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def _segmenter(name: str, side: int):
    from mskjax.models.sam import build_lite_medsam, build_sam
    return build_lite_medsam() if name == "lite_medsam" else build_sam(name[len("sam_"):], side)


def sam_train_worker(name: str, side: int, batch: int, options: dict | None = None) -> dict:
    """The SAM trainer's train step and evaluation (predict) step, as `mskjax.train.sam` jits them
    (its default options), for one segmenter."""
    import jax
    import jax.numpy as jnp

    from mskjax.models.sam import segmenter_variable_shapes
    from mskjax.train import optim
    from mskjax.train import sam as sam_train
    from mskjax.train.config import sam_base_config

    config = sam_base_config()
    config.model.arch = "lite_medsam" if name == "lite_medsam" else name[len("sam_"):]
    config.model.img_size = side
    config.train.batch_size = batch
    model = _segmenter(name, side)
    tx = optim.make_optimizer(config.train.optimizer, optim.schedule(config.train.learning_rate, 1000, 0),
                              config.train.weight_decay, config.train.momentum, config.train.grad_clip)
    parts = sam_train.trainable_parts(config)

    def init_state():
        variables = _zeros_like_shapes(segmenter_variable_shapes(model))
        trainable, frozen = sam_train.split_variables(variables, parts)
        return {"step": jnp.zeros((), jnp.int32), "params": trainable, "frozen": frozen,
                "opt_state": tx.init(trainable), "rng": jax.random.PRNGKey(0)}

    state_abs = jax.eval_shape(init_state)
    p = config.data.max_prompts
    sds = jax.ShapeDtypeStruct
    batch_abs = {"images": sds((batch, side, side), jnp.uint8), "input_sizes": sds((batch, 2), jnp.int32),
                 "boxes": sds((batch, p, 4), jnp.float32), "masks": sds((batch, p, side, side), jnp.uint8),
                 "valid": sds((batch, p), jnp.bool_)}
    out = {"parts": list(parts), "prompts_per_image": p}
    out["train"], _ = _lower_compile(sam_train.make_train_step(model, tx, config), (state_abs, batch_abs),
                                     donate=(0,), options=options)
    variables_abs = segmenter_variable_shapes(model)
    predict = sam_train.make_predict(model, sam_train.uses_box_mask_prompt(config))
    out["eval"], _ = _lower_compile(predict, (variables_abs, batch_abs["images"], batch_abs["input_sizes"],
                                              batch_abs["boxes"]), options=options)
    return out


def pipeline_worker(spec_model: str, batch: int) -> dict:
    """`mskjax.Pipeline`'s two executables as it compiles them: the encoder apart (the encoder
    options) and the step taking its embeddings (Grad-CAM, peak box, decoder); ResNet50 @ 224."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mskjax.classifier import IMAGENET_NORMALIZATION
    from mskjax.models import create
    from mskjax.models.sam import segmenter_variable_shapes
    from mskjax.pipeline import Pipeline, PipelineConfig

    classifier_spec, segmenter_spec = spec_model.split("+")
    arch, size = classifier_spec.split("@")
    seg_name, seg_side = segmenter_spec.split("@")
    size = int(size)
    model = create(arch, num_classes=1)
    cvars = _zeros_like_shapes(jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
    meta = {"in_channels": 3, "input_size": size, "data": {"image_size": size, "mode": "resize"},
            "normalization": dict(IMAGENET_NORMALIZATION)}
    sam = _segmenter(seg_name, int(seg_side))
    svars = _zeros_like_shapes(segmenter_variable_shapes(sam))
    pipe = Pipeline(model, cvars, meta, sam, svars, {}, PipelineConfig(cam="grad_cam", boxes="peak", threshold=0.0))
    rng = np.random.default_rng(0)
    prepared = pipe.prepare([rng.random((512, 512), np.float32) for _ in range(batch)], batch)
    args = {k: v for k, v in prepared.items() if k not in ("sam_input_sizes", "sam_canvases", "sam_images")}
    out = {}
    embed_lowered, t_lower = _timed(lambda: pipe._embed.lower(pipe.sam_variables, prepared["sam_images"]))
    embed_compiled, t_compile = _timed(embed_lowered.compile)
    out["embed"] = {"lower_s": round(t_lower, 3), "compile_s": round(t_compile, 3),
                    "stablehlo_lines": len(embed_lowered.as_text().splitlines()), "kernels": _kernels(embed_compiled)}
    emb = jax.eval_shape(pipe._embed, pipe.sam_variables, prepared["sam_images"])
    step_args = {**args, "sam_embeddings": jax.ShapeDtypeStruct(emb.shape, emb.dtype)}
    step_lowered, t_lower = _timed(lambda: pipe._step.lower(pipe.classifier_variables, pipe.sam_variables, step_args))
    step_compiled, t_compile = _timed(step_lowered.compile)
    out["step"] = {"lower_s": round(t_lower, 3), "compile_s": round(t_compile, 3),
                   "stablehlo_lines": len(step_lowered.as_text().splitlines()), "kernels": _kernels(step_compiled)}
    return out


def worker_main(spec: dict) -> None:
    import jax
    jax.config.update("jax_enable_compilation_cache", False)
    name, side = spec["model"].split("@", 1)
    t0 = time.perf_counter()
    if spec["kind"] == "sam":
        res = sam_worker(name, int(side), spec.get("options"))
    elif spec["kind"] == "sam_train":
        res = sam_train_worker(name, int(side), spec["batch"], spec.get("options"))
    elif spec["kind"] == "pipeline":
        res = pipeline_worker(spec["model"], spec["batch"])
    else:
        res = classifier_worker(name, int(side), spec["variant"], spec["batch"], spec["modes"], spec["steps"],
                                spec["augment"], spec.get("depthwise", ""), spec.get("options"))
    res["worker_s"] = round(time.perf_counter() - t0, 2)
    res["jax"] = jax.__version__
    res["backend"] = jax.default_backend()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------------------------------------
# Driver

def run_worker(spec: dict, timeout: float) -> dict:
    before = loadavg()
    env = dict(os.environ, MSKJAX_CACHE_DIR="off")
    t = time.time()
    try:
        p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                           timeout=timeout, env=env)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not lines:
            res = {"error": (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]}
        else:
            res = json.loads(lines[-1][len("RESULT "):])
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {timeout:.0f} s"}
    res.update(spec)
    res["load_before"], res["load_after"] = before, loadavg()
    res["wall_s"] = round(time.time() - t, 1)
    return res


def parse_option_sets(text: str) -> list[tuple[str, dict]]:
    """"name:flag=value,flag=value;name2:..." -> [(name, {flag: value})]; "base:" is no options;
    "name:@classifier" / "name:@encoder" are `mskjax.passes.CPU_CLASSIFIER_OPTIONS` /
    `CPU_ENCODER_OPTIONS` (the trainer's and the pipeline encoder's options on CPU).
    Values "true"/"false" become booleans and integers ints (XLA's debug-option types)."""
    from mskjax.passes import CPU_CLASSIFIER_OPTIONS, CPU_ENCODER_OPTIONS
    named = {"@classifier": CPU_CLASSIFIER_OPTIONS, "@encoder": CPU_ENCODER_OPTIONS}
    sets = []
    for part in [p for p in text.split(";") if p.strip()]:
        name, sep, body = part.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"option set {part!r}: expected name:flag=value,...")
        if body.strip() in named:
            sets.append((name.strip(), dict(named[body.strip()])))
            continue
        opts = {}
        for item in [i for i in body.split(",") if i.strip()]:
            key, eq, value = item.partition("=")
            if not eq:
                raise ValueError(f"option set {name!r}: {item!r} is not flag=value")
            v: object = value.strip()
            if v in ("true", "false"):
                v = v == "true"
            elif v.lstrip("-").isdigit():
                v = int(v)
            opts[key.strip()] = v
        sets.append((name.strip(), opts))
    return sets


def _label(r: dict) -> str:
    return r.get("variant", "-") + (f" / {r['options_name']}" if r.get("options_name") else "")


def table(results: list[dict]) -> str:
    lines = ["| model | variant | step | lower s | compile s | lower+compile s | StableHLO lines | kernels | step s | load before / after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = f"{r['load_before'][0]:.2f} / {r['load_after'][0]:.2f}" if r.get("load_before") and r.get("load_after") else "?"
        if "error" in r:
            lines.append(f"| {r['model']} | {_label(r)} | error: {r['error']} | | | | | | | {load} |")
            continue
        for step in ("train", "eval", "embed", "step"):
            if step in r:
                s = r[step]
                lines.append(f"| {r['model']} | {_label(r)} | {step} | {s['lower_s']:.2f} | {s['compile_s']:.2f} | "
                             f"{s['lower_s'] + s['compile_s']:.2f} | {s['stablehlo_lines']} | {s.get('kernels', '')} | "
                             f"{s.get('step_s', '')} | {load} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated arch@side (classifier registry names)")
    ap.add_argument("--variants", default="plain,scan",
                    help="plain (usual modules), scan (scan_blocks=True, state unscanned: the trainer's option), "
                         "scan_state (scan_blocks=True with the state and optimizer in the stacked layout), "
                         "ravel (the optimizer on two concatenated vectors)")
    ap.add_argument("--modes", default="train,eval")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=0, help="also time N train steps (median)")
    ap.add_argument("--augment", action="store_true", help="include the trainer's augmentation in the train step")
    ap.add_argument("--depthwise", default="", help="EfficientNet depthwise_impl: '' (per backend), grouped, shifted")
    ap.add_argument("--sam", action="store_true", help=f"also SAM encoders: {', '.join(SAM_MODELS)}")
    ap.add_argument("--sam-train", action="store_true",
                    help=f"also the SAM trainer's train and eval steps: {', '.join(SAM_TRAIN_MODELS)}")
    ap.add_argument("--pipeline", action="store_true",
                    help=f"also the pipeline's encoder and step: {', '.join(PIPELINE_MODELS)}")
    ap.add_argument("--no-classifiers", action="store_true", help="skip the --models classifier cells")
    ap.add_argument("--option-sets", default="",
                    help="XLA compiler option sets to compare, each its own worker: "
                         "'base:;o1:xla_backend_optimization_level=1,xla_llvm_disable_expensive_passes=true'")
    ap.add_argument("--repeats", type=int, default=1, help="workers per (model, variant); variants interleaved")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    ap.add_argument("--out", help="write JSON here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker_main(json.loads(args.worker))
        return 0

    import jax
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "jax": jax.__version__, "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
            "batch": args.batch, "load_before": loadavg()}
    try:
        # Without --option-sets: what the classifier trainer compiles with on CPU by default.
        option_sets = parse_option_sets(args.option_sets or "eigen:@classifier")
    except ValueError as e:
        ap.error(str(e))
    specs = []
    for _ in range(args.repeats):
        for m in [] if args.no_classifiers else [m for m in args.models.split(",") if m]:
            for v in [v for v in args.variants.split(",") if v]:
                if v not in ("plain", "scan", "scan_state", "ravel"):
                    ap.error(f"unknown variant {v!r}")
                for oname, opts in option_sets:
                    specs.append({"kind": "classifier", "model": m, "variant": v, "batch": args.batch,
                                  "modes": args.modes.split(","), "steps": args.steps, "augment": args.augment,
                                  "depthwise": args.depthwise, "options_name": oname, "options": opts})
        if args.sam:
            specs += [{"kind": "sam", "model": m, "options_name": oname, "options": opts}
                      for m in SAM_MODELS for oname, opts in option_sets]
        if args.sam_train:  # the SAM trainer compiles with XLA's defaults
            specs += [{"kind": "sam_train", "model": m, "batch": args.batch, "modes": ["train", "eval"]}
                      for m in SAM_TRAIN_MODELS]
        if args.pipeline:  # the pipeline's own options (encoder options for its encoder)
            specs += [{"kind": "pipeline", "model": m, "batch": args.batch} for m in PIPELINE_MODELS]
    results = []
    for spec in specs:
        r = run_worker(spec, args.timeout)
        results.append(r)
        print(table([r]).splitlines()[-1] if "error" not in r else r, flush=True)
    meta["load_after"] = loadavg()
    print()
    print(table(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
            f.write("\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
