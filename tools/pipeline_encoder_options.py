"""The pipeline's step with SAM's encoder compiled inside it (before 2026-12-06) or apart, with and
without `mskjax.passes.encoder_compiler_options` (issue 21, part 2).

For each segmenter (`--segmenters`: vit_b at `--sam-size`, random weights; lite_medsam, its packaged
weights), builds `mskjax.pipeline.Pipeline` around a random-weight ResNet50 @ 224 (Grad-CAM, peak
box, threshold 0 so every image gets its mask, as tools/benchmark.py's pipeline does) and times, in
one process, round-robin (one call of each per round after a warm-up, median over `--rounds`), on one
prepared batch of `--batch` random 512 px images:

* `one executable`: `make_step(..., embedded=False)` jitted whole, default XLA options (the pipeline
  before the change);
* `encoder apart, default options`: the encoder jitted alone with default options, then the step
  taking its embeddings;
* `encoder apart, encoder options` (the pipeline now: `Pipeline.step`).

Each variant's outputs are compared with the first's (max abs difference of probability, CAM, mask
logits and boxes). Host preparation is not timed in these (the same for all). With `--torch`, two
more calls join the same rounds: `Pipeline.prepare + step` (the pipeline now, host preparation
included, as tools/benchmark.py times it) and the PyTorch stack on the same images
(`benchmark.torch_pipeline_call`, on `--threads` threads), so their ratio comes from one process,
interleaved. JSON out.

    .venv/bin/python tools/pipeline_encoder_options.py --rounds 3 [--torch] --out docs/x.json
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchmark  # noqa: E402  (tools/benchmark.py: the shared images and the torch pipeline)

from mskjax import sam as samfn  # noqa: E402
from mskjax.classifier import IMAGENET_NORMALIZATION  # noqa: E402
from mskjax.models import create  # noqa: E402
from mskjax.passes import encoder_compiler_options  # noqa: E402
from mskjax.pipeline import Pipeline, PipelineConfig, make_step  # noqa: E402


def _machine() -> dict:
    return {"cpu": benchmark.cpu_model(), "cores": benchmark.cores(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend()}


def _segmenter(name: str, sam_size: int):
    if name == "lite_medsam":
        from mskjax.models.sam import build_lite_medsam
        from mskjax.weights.litemedsam import load_litemedsam
        return build_lite_medsam(), load_litemedsam()[0]
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    sam = build_sam(name, img_size=sam_size)
    return sam, init_sam_variables(sam, jax.random.PRNGKey(1))


def measure(name: str, sam_size: int, batch: int, rounds: int, with_torch: bool = False, threads: int = 2) -> dict:
    size = 224
    model = create("resnet50", num_classes=1)
    cvars = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    meta = {"in_channels": 3, "input_size": size, "data": {"image_size": size, "mode": "resize"},
            "normalization": {"input_range": [0.0, 1.0], **{k: list(v) for k, v in IMAGENET_NORMALIZATION.items()}}}
    sam, svars = _segmenter(name, sam_size)
    config = PipelineConfig(cam="grad_cam", boxes="peak", threshold=0.0)
    pipe = Pipeline(model, cvars, meta, sam, svars, {}, config)
    images = benchmark._pipeline_images(batch)  # the images tools/benchmark.py's pipelines use
    batch_in = pipe.prepare(images, batch)
    args = {k: v for k, v in batch_in.items() if k not in ("sam_input_sizes", "sam_canvases")}
    embedded_args = {k: v for k, v in args.items() if k != "sam_images"}
    cv, sv = pipe.classifier_variables, pipe.sam_variables
    common = dict(box_mask=False, baseline=None, point_trained=False)
    whole = jax.jit(make_step(model, sam, config, pipe.normalization, pipe.channels, embedded=False, **common))
    embed_default = jax.jit(functools.partial(samfn.embed, sam))

    calls = {
        "one executable": lambda: whole(cv, sv, args),
        "encoder apart, default options": lambda: pipe._step(
            cv, sv, {**embedded_args, "sam_embeddings": embed_default(sv, args["sam_images"])}),
        "encoder apart, encoder options": lambda: pipe._step(
            cv, sv, {**embedded_args, "sam_embeddings": pipe._embed(sv, args["sam_images"])}),
    }
    outs = {k: jax.tree.map(np.asarray, f()) for k, f in calls.items()}  # also the warm-up
    close = None
    if with_torch:
        import torch
        torch.set_num_threads(threads)
        calls["Pipeline.prepare + step"] = lambda: pipe.step(pipe.prepare(images, batch))
        torch_fn, close = benchmark.torch_pipeline_call(
            torch, False, {"arch": "resnet50", "size": size, "batch": batch, "sam_size": sam_size,
                           "pipeline_sam": name})
        calls["PyTorch stack"] = torch_fn
        calls["Pipeline.prepare + step"]()
        torch_fn()  # warm-up
    first = outs["one executable"]
    diffs = {k: {n: float(np.abs(o[n].astype(np.float64) - first[n]).max())
                 for n in ("probability", "cam", "mask_logits", "boxes")} for k, o in outs.items()}
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, f in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(f())  # torch's call returns numpy: already done
            times[k].append(time.perf_counter() - t)
    if close is not None:
        close()
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"segmenter": name, "sam_size": sam.config.img_size, "batch": batch,
            "encoder_options": encoder_compiler_options(), "seconds": times, "median_s": med,
            "speedup_vs_one_executable": {k: med["one executable"] / v for k, v in med.items()},
            "max_abs_diff_vs_one_executable": diffs,
            **({"mskjax_vs_torch": med["PyTorch stack"] / med["Pipeline.prepare + step"]} if with_torch else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segmenters", default="vit_b,lite_medsam")
    ap.add_argument("--sam-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--torch", action="store_true", help="also the PyTorch stack, interleaved")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["python", *sys.argv]), "machine": _machine(), "load_before": benchmark.load_average()}
    results = []
    for name in [s for s in args.segmenters.split(",") if s]:
        r = measure(name, args.sam_size, args.batch, args.rounds, args.torch, args.threads)
        results.append(r)
        for k, v in r["median_s"].items():
            diff = r["max_abs_diff_vs_one_executable"].get(k)
            print(f"{name}: {k:32s} {v:6.2f} s per batch of {args.batch}  {r['speedup_vs_one_executable'][k]:.2f}x"
                  + (f"  max|mask logit diff| {diff['mask_logits']:.1e}" if diff else ""), flush=True)
        if "mskjax_vs_torch" in r:
            print(f"{name}: mskjax (prepare + step) vs the PyTorch stack, same rounds: {r['mskjax_vs_torch']:.2f}x")
    meta["load_after"] = benchmark.load_average()
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
