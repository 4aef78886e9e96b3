"""Benchmark mskjax.cam against pytorch-grad-cam on the same CPU, in the same run.

    .venv/bin/python tools/bench_cam.py --batch 8 --size 224 --methods grad_cam,hires_cam --out cam.json

Both sides get the same random weights (torchvision model with randomised BatchNorm statistics,
imported with `mskjax.weights.from_state_dict`), the same inputs and targets, and the same layer
(resnet50: layer4; EfficientNet: the last features block, our "top"). JAX is timed as
compile (lower + compile, once) and steady state (median of --repeats jitted calls, after one
warm-up); pytorch-grad-cam as the median of --repeats calls after one warm-up, with
torch.set_num_threads(--torch-threads). Prints maps per second for each side and the ratio
(JAX / torch), plus the max |difference| between the two sides' maps as a sanity check, and
writes everything (with the machine's load average, which skews shared-machine numbers) to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

TORCH_CLASSES = {
    "grad_cam": "GradCAM", "grad_cam_plus_plus": "GradCAMPlusPlus", "hires_cam": "HiResCAM",
    "xgrad_cam": "XGradCAM", "layer_cam": "LayerCAM", "eigen_cam": "EigenCAM", "score_cam": "ScoreCAM",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", help="torchvision architecture (resnet*, efficientnet_b*)")
    p.add_argument("--batch", type=int, default=8, help="images per call (the brief's figure is 32)")
    p.add_argument("--size", type=int, default=224, help="square input side, pixels")
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--methods", default="grad_cam", help=f"comma-separated, from {list(TORCH_CLASSES)}")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per side (median reported)")
    p.add_argument("--torch-threads", type=int, default=2)
    p.add_argument("--score-cam-chunk", type=int, default=32, help="channels per masked forward (score_cam)")
    p.add_argument("--score-cam-images", type=int, default=1,
                   help="score_cam runs on the first N images only (B x C masked forwards: 2,048 per "
                        "image for resnet50)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in TORCH_CLASSES]
    if unknown:
        p.error(f"unknown method(s) {unknown}: expected some of {list(TORCH_CLASSES)}")
    if args.batch < 1 or args.size < 32 or args.repeats < 1:
        p.error("--batch >= 1, --size >= 32 and --repeats >= 1 are required")
    return args


def randomised_torch_model(arch: str, num_classes: int):
    import torch
    import torchvision
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0.0, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
    return model.eval()


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from mskjax import cam as C
    from mskjax.models import create
    from mskjax.weights import from_state_dict, variant_for

    torch.set_num_threads(args.torch_threads)
    tmodel = randomised_torch_model(args.arch, args.num_classes)
    variables = from_state_dict("torchvision", args.arch, tmodel.state_dict())
    model = create(args.arch, num_classes=args.num_classes, **variant_for("torchvision", args.arch))
    layer = list(model.segments)[-1]
    tlayer = tmodel.layer4 if args.arch.startswith("resnet") else tmodel.features[-1]

    rng = np.random.RandomState(0)
    x = rng.randn(args.batch, 3, args.size, args.size).astype(np.float32)
    targets = (np.arange(args.batch) % args.num_classes).astype(np.int32)
    xt, xj, tj = torch.from_numpy(x), jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(targets)
    ttargets = [ClassifierOutputTarget(int(t)) for t in targets]

    results = {
        "arch": args.arch, "layer": layer, "batch": args.batch, "size": args.size,
        "num_classes": args.num_classes, "repeats": args.repeats, "torch_threads": args.torch_threads,
        "jax": jax.__version__, "torch": torch.__version__, "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "load_average_before": os.getloadavg(), "methods": {},
    }
    print(f"{args.arch} layer={layer} batch={args.batch} size={args.size} backend={jax.default_backend()} "
          f"torch_threads={args.torch_threads} load={os.getloadavg()[0]:.1f}", flush=True)
    for method in args.methods:
        opts, xj_m, tj_m, xt_m, tt_m = {}, xj, tj, xt, ttargets
        if method == "score_cam":
            n = min(args.score_cam_images, args.batch)
            opts = {"chunk_size": args.score_cam_chunk}
            xj_m, tj_m, xt_m, tt_m = xj[:n], tj[:n], xt[:n], ttargets[:n]
        n_maps = xj_m.shape[0]
        fn = C.make_cam_fn(method, model, layer, **opts)
        t0 = time.perf_counter()
        compiled = fn.lower(variables, xj_m, tj_m).compile()
        compile_s = time.perf_counter() - t0
        ours = np.asarray(compiled(variables, xj_m, tj_m))  # warm-up
        jax_times = timed(lambda: jax.block_until_ready(compiled(variables, xj_m, tj_m)), args.repeats)

        cls = getattr(pytorch_grad_cam, TORCH_CLASSES[method])
        with cls(model=tmodel, target_layers=[tlayer]) as ref_cam:
            if method == "score_cam":
                ref_cam.batch_size = args.score_cam_chunk
            ref = ref_cam(input_tensor=xt_m, targets=tt_m)  # warm-up
            torch_times = timed(lambda: ref_cam(input_tensor=xt_m, targets=tt_m), args.repeats)

        jax_s, torch_s = statistics.median(jax_times), statistics.median(torch_times)
        diff = float(np.abs(ours - ref).max())
        # eigen_cam: the reference's principal-component sign is arbitrary (see mskjax.cam), so
        # this sanity number can be large there without either side being wrong.
        row = {
            "jax_compile_s": compile_s, "jax_step_s": jax_s, "jax_step_all_s": jax_times,
            "maps": n_maps, "jax_maps_per_s": n_maps / jax_s, "torch_step_s": torch_s, "torch_step_all_s": torch_times,
            "torch_maps_per_s": n_maps / torch_s, "ratio_jax_over_torch": torch_s / jax_s,
            "max_abs_diff_vs_torch": diff,
        }
        results["methods"][method] = row
        print(f"{method:>20}: jax compile {compile_s:6.2f} s | jax {row['jax_maps_per_s']:8.2f} maps/s "
              f"({jax_s:.3f} s/batch) | torch {row['torch_maps_per_s']:8.2f} maps/s ({torch_s:.3f} s/batch) "
              f"| ratio {row['ratio_jax_over_torch']:.2f}x | max|diff| {diff:.1e}", flush=True)
    results["load_average_after"] = os.getloadavg()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
