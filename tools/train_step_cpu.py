"""A classifier's training step on CPU against torchvision's, interleaved in one process.

    .venv/bin/python tools/train_step_cpu.py --out docs/train_step_cpu.json
    .venv/bin/python tools/train_step_cpu.py --models resnet50@224 --rounds 7 --batch 8

For each model ("arch@side", float32, batch `--batch`, 3-channel random images, 2 classes) it
builds, in this one process, and times round-robin (one call of each per round, `--rounds` rounds
after one warm-up call each, so load changes hit every variant alike; each round starts one variant
later than the one before, so that the cost of following another framework's call is shared):

- mskjax "full step": forward in train mode (BatchNorm batch statistics, dropout / stochastic
  depth on), softmax cross-entropy, backward, SGD momentum 0.9 (optax), the new batch statistics
  returned; one `jax.jit` per compiler-option set;
- mskjax "forward + backward": the same loss and gradients, without the optimizer;
- each of those compiled with XLA's default options ("ynnpack") and with the classifier trainer's
  CPU options ("eigen", `mskjax.passes.classifier_compiler_options`, `config.model.cpu_convolutions`);
- `--before`: also the model as it was before 2026-12-07 (BatchNorm differentiated by autodiff from
  its two-pass formula, the stem's max pool by `reduce_window`'s own derivative), with both option
  sets: the A/B of that change, in the same rounds;
- torchvision's model (same architecture, its own random init) in NCHW and channels_last, "full
  step" (zero_grad, forward, cross-entropy, backward, SGD momentum 0.9 step) and "forward +
  backward" (zero_grad, forward, cross-entropy, backward), on `--threads` threads (default: all
  cores, as JAX uses).

Prints a table of median seconds per call and each mskjax row's ratio against torch (torch seconds /
mskjax seconds: > 1 means mskjax is faster) for both torch layouts; `--out` writes JSON with the
machine, date, versions, the load average before and after, and every round's time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compile_time import cpu_name, loadavg  # noqa: E402 - the tools' own helpers, after the path

TORCHVISION = {"resnet18": "resnet18", "resnet50": "resnet50", "efficientnet_b0": "efficientnet_b0",
               "efficientnet_b3": "efficientnet_b3"}


def before_layers():
    """Context manager: the ResNet stem's max pool and training-mode BatchNorm as they were before
    2026-12-07 (`reduce_window`'s own derivative; autodiff of the two-pass formula)."""
    import contextlib

    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from mskjax.models import layers, resnet

    def old_max_pool(x, window, stride, padding):
        return nn.max_pool(x, (window, window), (stride, stride), padding=((padding, padding), (padding, padding)))

    def old_batch_norm_train(x, scale, bias, epsilon):
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(xf, axes)
        var = jnp.mean(jnp.square(xf - mean), axes)
        mul = scale * jax.lax.rsqrt(var + epsilon)
        return xf * mul + (bias - mean * mul), mean, var

    @contextlib.contextmanager
    def swapped():
        saved = layers.batch_norm_train, resnet.max_pool
        layers.batch_norm_train, resnet.max_pool = old_batch_norm_train, old_max_pool
        try:
            yield
        finally:
            layers.batch_norm_train, resnet.max_pool = saved
    return swapped


def jax_calls(arch: str, size: int, batch: int, before: bool, parts: list, options: list) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from mskjax.models import create
    from mskjax.passes import classifier_compiler_options

    model = create(arch, num_classes=2)
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.rand(batch, size, size, 3).astype(np.float32))
    y = jnp.asarray(rng.randint(0, 2, batch).astype(np.int32))
    v = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
    tx = optax.sgd(0.01, momentum=0.9)
    opt = tx.init(v["params"])
    key = jax.random.PRNGKey(1)

    def step_fns():
        # New function objects for every form: jax.jit caches a trace per Python function, and the
        # "before" form must be traced again with its layers swapped in.
        def loss_fn(params, batch_stats, key):
            logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                      mutable=["batch_stats"], rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd["batch_stats"]

        def fwd_bwd(params, batch_stats, key):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, key)
            return loss, stats, grads

        def full_step(params, batch_stats, opt, key):
            loss, stats, grads = fwd_bwd(params, batch_stats, key)
            updates, opt = tx.update(grads, opt, params)
            return optax.apply_updates(params, updates), stats, opt, loss
        return full_step, fwd_bwd

    option_sets = {k: o for k, o in (("ynnpack", {}), ("eigen", classifier_compiler_options("eigen"))) if k in options}
    forms = [("", None)] + ([(" [before]", before_layers())] if before else [])
    calls, compile_s, losses, hlo_lines = {}, {}, {}, {}
    for suffix, ctx in forms:
        for oname, opts in option_sets.items():
            full_step, fwd_bwd = step_fns()
            # The dropout key is an argument, not a constant XLA could fold into the step.
            for what, fn, args in (("full step", full_step, (v["params"], v["batch_stats"], opt, key)),
                                   ("forward + backward", fwd_bwd, (v["params"], v["batch_stats"], key))):
                if what not in parts:
                    continue
                name = f"mskjax {what}, {oname}{suffix}"
                t = time.perf_counter()
                if ctx is None:
                    lowered = jax.jit(fn).lower(*args)
                else:
                    with ctx():
                        lowered = jax.jit(fn).lower(*args)
                hlo_lines[name] = len(lowered.as_text().splitlines())
                compiled = lowered.compile(opts) if opts else lowered.compile()
                compile_s[name] = time.perf_counter() - t
                calls[name] = (lambda c=compiled, a=args: c(*a))
                out = jax.block_until_ready(calls[name]())
                losses[name] = float(out[-1] if what == "full step" else out[0])
    return {"calls": calls, "compile_s": compile_s, "loss": losses, "hlo_lines": hlo_lines}


def torch_calls(arch: str, size: int, batch: int, threads: int, parts: list) -> dict:
    import numpy as np
    import torch
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.rand(batch, 3, size, size).astype(np.float32))
    y = torch.from_numpy(rng.randint(0, 2, batch).astype(np.int64))
    calls = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = getattr(torchvision.models, TORCHVISION[arch])(num_classes=2).to(memory_format=fmt).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        xf = x.to(memory_format=fmt)

        def fwd_bwd(model=model, xf=xf):
            model.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xf), y)
            loss.backward()
            return loss

        def full(model=model, xf=xf, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xf), y)
            loss.backward()
            opt.step()
            return loss
        if "full step" in parts:
            calls[f"torch full step, {layout}"] = full
        if "forward + backward" in parts:
            calls[f"torch forward + backward, {layout}"] = fwd_bwd
    return calls


def measure(arch: str, size: int, args) -> dict:
    import jax
    j = jax_calls(arch, size, args.batch, args.before, args.part_list, args.option_list)
    calls = dict(j["calls"])
    if not args.no_torch:
        calls.update(torch_calls(arch, size, args.batch, args.threads or os.cpu_count(), args.part_list))
    times = {k: [] for k in calls}
    for fn in calls.values():
        jax.block_until_ready(fn())  # warm-up (jax's first call already ran; torch's allocator)
    names = list(calls)
    for r in range(args.rounds):
        # Each round starts one variant later: whichever call follows the other framework's pays
        # for touching its memory afresh (page faults: 2-3 s per EfficientNet-B3 step on this
        # VM), and the rotation spreads that over every variant instead of always the first.
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            jax.block_until_ready(calls[k]())
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": f"{arch}@{size}", "median_s": med, "rounds_s": times, "compile_s": j["compile_s"],
            "jax_loss": j["loss"], "hlo_lines": j["hlo_lines"]}


def table(r: dict) -> str:
    med = r["median_s"]
    lines = [f"{r['model']} | median s | vs torch NCHW | vs torch channels_last",
             "---|---|---|---"]
    for k, s in med.items():
        row = f"{k} | {s:.3f}"
        if k.startswith("mskjax"):
            what = "full step" if "full step" in k else "forward + backward"
            for layout in ("NCHW", "channels_last"):
                t = med.get(f"torch {what}, {layout}")
                row += f" | {t / s:.2f}x" if t else " | -"
        else:
            row += " | | "
        lines.append(row)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet50@224,efficientnet_b3@300",
                    help=f"comma-separated arch@side, arch in {sorted(TORCHVISION)}")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--before", action="store_true",
                    help="also the BatchNorm / max pool of before 2026-12-07 (an A/B in the same rounds)")
    ap.add_argument("--parts", default="full,fwd_bwd",
                    help="full (the whole step) and/or fwd_bwd (forward + backward, no optimizer)")
    ap.add_argument("--options", default="ynnpack,eigen", help="XLA:CPU option sets: ynnpack and/or eigen")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    names = {"full": "full step", "fwd_bwd": "forward + backward"}
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(names):
        ap.error(f"--parts: expected some of {sorted(names)}, got {args.parts!r}")
    args.part_list = [names[p] for p in parts]
    args.option_list = [o.strip() for o in args.options.split(",") if o.strip()]
    if not args.option_list or set(args.option_list) - {"ynnpack", "eigen"}:
        ap.error(f"--options: expected ynnpack and/or eigen, got {args.options!r}")
    models = []
    for m in [m for m in args.models.split(",") if m.strip()]:
        arch, _, side = m.strip().partition("@")
        if arch not in TORCHVISION or not side.isdigit():
            ap.error(f"--models: {m!r} is not arch@side with arch in {sorted(TORCHVISION)}")
        models.append((arch, int(side)))
    import jax
    import torch
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "batch": args.batch, "rounds": args.rounds,
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "load_before": loadavg()}
    print(f"# {meta['machine']} | load {meta['load_before']} | jax {meta['jax']} | torch {meta['torch']}", flush=True)
    results = []
    for arch, size in models:
        r = measure(arch, size, args)
        results.append(r)
        print(table(r), "\n", flush=True)
    meta["load_after"] = loadavg()
    print(f"# load after {meta['load_after']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
