"""Benchmark: JPEG files -> device-ready, augmented 224 px batches. mskjax Loader vs torch DataLoader vs Grain.

    .venv/bin/python tools/bench_loader.py --out /tmp/bench_loader.json [--md /tmp/bench_loader.md]

What each contender does (same files, same order of work, one run):

* **mskjax** (what `mskjax.train.classifier` does): `Loader(..., sharding=...)` decodes (EXIF,
  gray, float32), resizes with Pillow's antialiased bilinear filter, rounds to uint8, batches and
  places the batch on the device (`jax.make_array_from_process_local_data`); augmentation
  (`mskjax.data.augment.augment`, default `AugmentConfig`: flip, rotation +-10 deg, scale 0.9-1.1 in one
  bilinear warp, then gamma / contrast / brightness) runs **on the device** inside the train step.
  Here the device is the CPU, so the augmentation competes for the same cores; on a GPU it would not.
  Rows: "host" (loader + device placement, no augmentation: the host's share of the work) and
  "+ device augment" (the jitted augmentation on each batch too, blocked until ready).
* **torch**: a `torch.utils.data.DataLoader` over a Dataset that decodes with Pillow (EXIF transpose,
  gray), resizes to 224 x 224 (torchvision v2 `Resize`, antialiased bilinear), converts to float,
  and augments **per image on the host** with torchvision transforms v2 (`RandomHorizontalFlip(0.5)`,
  `RandomAffine(10 deg, scale 0.9-1.1, bilinear)`) plus gamma / contrast / brightness drawn like
  `AugmentConfig` (v2 has no additive brightness or random gamma transform; those three are a small
  module here). `num_workers` processes, like the Loader's `--workers` threads.
* **grain**: `grain.MapDataset.source(records).shuffle(seed).map(decode + preprocess + uint8)`
  `.to_iter_dataset(ReadOptions(num_threads=W)).batch(B)`, then the same device placement and device
  augmentation as mskjax (so the comparison isolates the loader). Skipped with a reason when grain
  is not importable (`pip install grain`, the "bench" extra).

Every contender is run with W workers (threads for mskjax/grain, processes for torch) and with 0
(everything in the consuming thread: the per-core rate). Files are read once beforehand so the page
cache serves all contenders equally. The contenders run round robin (one full pass each per round,
`--repeats` rounds), so load from other jobs falls on all of them alike; each figure is the best round. Also reported: an epoch served from the Loader's in-memory cache (what every epoch after the
first costs with the trainer's default cache=True), and a plain single-thread Pillow loop (no
augmentation) as a floor.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from mskjax.data import augment as aug  # noqa: E402
from mskjax.data.images import decode_image  # noqa: E402
from mskjax.data.loader import Loader  # noqa: E402
from mskjax.data.preprocess import preprocess  # noqa: E402
from mskjax.data.records import Record  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "fracatlas" / "images"
GPU_TARGET_IMG_S = 5322.0  # ResNet50 @ 224 bf16 training step on one H200 (docs/GPU_RESULTS.md)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def pil_loop(paths: list[str], size: int, batch: int) -> int:
    """The floor: decode, gray, resize, batch, in one thread, no augmentation."""
    n = 0
    for start in range(0, len(paths), batch):
        images = []
        for p in paths[start:start + batch]:
            with Image.open(p) as im:
                small = im.convert("L").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(small, dtype=np.float32) / 255.0)
        n += np.stack(images)[..., None].shape[0]
    return n


# ------------------------------------------------------------------------------------------------
# mskjax


def make_device_augment(cfg: aug.AugmentConfig):
    """The trainer's augmentation: a jitted `augment` with a per-step key (fold_in of the step)."""
    base = jax.random.PRNGKey(0)

    @jax.jit
    def run(images, step):
        return aug.augment(jax.random.fold_in(base, step), images, cfg)
    return run


def mskjax_epoch(loader: Loader, augment_fn=None) -> int:
    n = 0
    for step, b in enumerate(loader):
        img = b["image"]
        if augment_fn is not None:
            img = augment_fn(img, step)
        jax.block_until_ready((img, b["label"], b["valid"]))
        n += int(np.asarray(b["valid"]).sum())
    return n


# ------------------------------------------------------------------------------------------------
# torch


def torch_loader(paths: list[str], size: int, batch: int, workers: int, seed: int):
    import torch
    from torchvision.transforms import v2

    class Photometric(torch.nn.Module):
        """Gamma (log-uniform 0.8-1.25), contrast (0.9-1.1 about the image mean), brightness (+-0.1,
        additive), each with probability 0.5, then clip: `AugmentConfig`'s defaults."""

        def forward(self, x):
            if torch.rand(()) < 0.5:
                x = x.clamp(0, 1) ** math.exp(float(torch.empty(()).uniform_(math.log(0.8), math.log(1.25))))
            if torch.rand(()) < 0.5:
                m = x.mean()
                x = m + float(torch.empty(()).uniform_(0.9, 1.1)) * (x - m)
            if torch.rand(()) < 0.5:
                x = x + float(torch.empty(()).uniform_(-0.1, 0.1))
            return x.clamp(0, 1)

    transform = v2.Compose([
        v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomAffine(degrees=10.0, scale=(0.9, 1.1), interpolation=v2.InterpolationMode.BILINEAR),
        Photometric(),
    ])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as im:
                gray = ImageOps.exif_transpose(im).convert("L")
            return transform(gray), 0

    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(Files(), batch_size=batch, shuffle=True, num_workers=workers,
                                       generator=g, persistent_workers=workers > 0, drop_last=False)


def torch_epoch(dl) -> int:
    n = 0
    for x, y in dl:
        n += x.shape[0]
    return n


# ------------------------------------------------------------------------------------------------
# grain


def grain_dataset(records, size: int, seed: int):
    import grain

    def load(rec):
        decoded = decode_image(rec.path)
        image, _ = preprocess(decoded.image, size, "resize", channels=1)
        return {"image": np.round(image[..., 0] * 255.0).astype(np.uint8), "label": np.int32(rec.label)}

    return grain.MapDataset.source(records).shuffle(seed=seed).map(load)


def grain_epoch(ds, batch: int, workers: int, sharding, augment_fn=None) -> int:
    import grain
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(2 * batch, 1))
                            ).batch(batch, drop_remainder=False)
    n = 0
    for step, b in enumerate(it):
        img = b["image"][..., None].astype(np.float32) / np.float32(255.0)
        img = jax.make_array_from_process_local_data(sharding, img, img.shape)
        label = jax.make_array_from_process_local_data(sharding, b["label"], b["label"].shape)
        if augment_fn is not None:
            img = augment_fn(img, step)
        jax.block_until_ready((img, label))
        n += img.shape[0]
    return n


def grain_resume_check(ds, batch: int, workers: int) -> dict:
    """Does a grain iterator restored from get_state() yield the batch the original yields next?"""
    import grain
    batch = max(1, min(batch, len(ds) // 4))  # three batches and a spare
    make = lambda: iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=workers)).batch(batch))  # noqa: E731
    it = make()
    next(it), next(it)
    state = it.get_state()
    expected = next(it)
    it2 = make()
    it2.set_state(state)
    got = next(it2)
    return {"state": json.loads(json.dumps(state, default=str)),
            "identical_batch_after_restore": bool(np.array_equal(expected["image"], got["image"]))}


# ------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEG/PNG files (read in place)")
    ap.add_argument("--count", type=int, default=512, help="first N files (sorted by name)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="Loader / grain threads, torch worker processes")
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma-separated contenders to skip: torch,grain")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--md", default=None, help="write the table as markdown here")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    folder = Path(args.images).resolve()
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    if not paths:
        raise SystemExit(f"no images found in {folder}")
    count = len(paths)
    for p in paths:  # warm the page cache for every contender
        Path(p).read_bytes()
    records = [Record(path=p, label=0, study=str(i), patient=str(i), body_part="unknown", view=0, split="bench")
               for i, p in enumerate(paths)]
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    augment_fn = make_device_augment(aug.AugmentConfig())
    cores = os.cpu_count() or 1
    load_before = loadavg()
    W = args.workers

    def loader(workers: int, cache: bool = False) -> Loader:
        return Loader(records, global_batch_size=args.batch, image_size=args.size, mode="resize", shuffle=True,
                      seed=0, num_epochs=1, drop_remainder=False, sharding=sharding, workers=workers,
                      prefetch=args.prefetch, cache=cache)

    plan: list[tuple] = []  # (contender, work, workers, fn, note)

    def add(name, work, workers, fn, note=""):
        plan.append((name, work, workers, fn, note))

    print(f"{count} images from {folder} -> {args.size}x{args.size}, batch {args.batch}, {cores} cores, "
          f"loadavg {load_before}", flush=True)
    # Compile the augmentation (once per shape) before any timing; the last batch may be smaller.
    for b in {args.batch, count % args.batch or args.batch}:
        z = np.zeros((b, args.size, args.size, 1), np.float32)  # placed as the loader places batches
        jax.block_until_ready(augment_fn(jax.make_array_from_process_local_data(sharding, z, z.shape), 0))

    add("pil", "decode+resize, no augment (floor)", 0, lambda: pil_loop(paths, args.size, args.batch))
    for w in (0, W):
        add("mskjax", "decode+resize -> device (host share)", w, lambda w=w: mskjax_epoch(loader(w)))
        add("mskjax", "decode+resize -> device + device augment", w,
            lambda w=w: mskjax_epoch(loader(w), augment_fn),
            note="augmentation on the CPU device, sharing the cores")
    cached = loader(W, cache=True)
    mskjax_epoch(cached)
    add("mskjax", "cached epoch -> device + device augment", W,
        lambda: (cached.restore({"epoch": 0, "step": 0, "seed": 0}), mskjax_epoch(cached, augment_fn))[1],
        note="epochs after the first with the trainer's default cache=True")

    skipped: dict[str, str] = {}
    if "torch" in skip:
        skipped["torch"] = "--skip"
    else:
        try:
            import torch
            torch.set_num_threads(1)  # the consuming process; workers use 1 thread each by default
            for w in (0, W):
                dl = torch_loader(paths, args.size, args.batch, w, seed=0)
                add("torch", "decode+resize+host augment (v2)", w, lambda dl=dl: torch_epoch(dl),
                    note="persistent workers (started in the first pass)" if w else "")
        except ImportError as e:
            skipped["torch"] = f"not importable: {e}"
    grain_info: dict = {}
    ds = None
    if "grain" in skip:
        skipped["grain"] = "--skip"
    else:
        try:
            import grain
            grain_info["version"] = getattr(grain, "__version__", None) or _dist_version("grain")
            ds = grain_dataset(records, args.size, seed=0)
            for w in (0, W):
                add("grain", "decode+resize -> device (host share)", w,
                    lambda w=w: grain_epoch(ds, args.batch, w, sharding))
                add("grain", "decode+resize -> device + device augment", w,
                    lambda w=w: grain_epoch(ds, args.batch, w, sharding, augment_fn),
                    note="augmentation on the CPU device, sharing the cores")
        except ImportError as e:
            skipped["grain"] = f"not importable: {e}"

    # Round robin: every contender once per round, so a change in the machine's load (shared
    # machine) falls on all of them alike. Each figure is the best round.
    times: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    loads: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    for rnd in range(args.repeats):
        for i, (name, work, workers, fn, _) in enumerate(plan):
            loads[i].append(loadavg()[0])
            t0 = time.perf_counter()
            got = fn()
            times[i].append(time.perf_counter() - t0)
            if got != count:
                raise RuntimeError(f"{name} {work}: expected {count} images, got {got}")
            print(f"  round {rnd} {name:<7} {work:<44} w={workers}  {count / times[i][-1]:8.1f} img/s"
                  f"  load {loads[i][-1]:.2f}", flush=True)
    rows: list[dict] = []
    for i, (name, work, workers, _, note) in enumerate(plan):
        rate = count / min(times[i])
        rows.append({"contender": name, "work": work, "workers": workers, "images_per_s": rate,
                     "images_per_s_median": count / float(np.median(times[i])),
                     # per core: with 0 workers everything runs in one thread, so the rate is the per-core
                     # rate; with W workers the rate is divided by the cores it could use here.
                     "images_per_s_per_core": rate if workers == 0 else rate / min(cores, workers + 1),
                     "seconds": times[i], "load_1min_each_round": loads[i],
                     "load_1min_before": loads[i][int(np.argmin(times[i]))], "note": note})
    if ds is not None:
        grain_info["resume"] = grain_resume_check(ds, args.batch, W)

    z = np.zeros((args.batch, args.size, args.size, 1), np.float32)
    aug_only = jax.make_array_from_process_local_data(sharding, z, z.shape)
    t0 = time.perf_counter()
    reps = max(1, count // args.batch)
    for i in range(reps):
        jax.block_until_ready(augment_fn(aug_only, i))
    augment_rate = reps * args.batch / (time.perf_counter() - t0)
    print(f"  device augment alone on CPU: {augment_rate:.1f} img/s", flush=True)

    def rate(name, work, w):
        for r in rows:
            if r["contender"] == name and r["work"].startswith(work) and r["workers"] == w:
                return r["images_per_s"]
        return None

    host1 = rate("mskjax", "decode+resize -> device (host", 0)
    torch1 = rate("torch", "decode", 0)
    estimate = {
        "target_images_per_s": GPU_TARGET_IMG_S,
        "note": "estimate: target / single-thread rate measured here; assumes cores like this machine's, "
                "FracAtlas-sized JPEGs (~512 px), linear scaling over cores, augmentation on the GPU for mskjax",
        "mskjax_cores_uncached": GPU_TARGET_IMG_S / host1 if host1 else None,
        "torch_cores_host_augment": GPU_TARGET_IMG_S / torch1 if torch1 else None,
    }
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python tools/bench_loader.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": count, "folder": str(folder), "size": args.size, "batch": args.batch, "workers": W,
        "prefetch": args.prefetch, "repeats": args.repeats, "cpu_count": cores, "cpu": _cpu_model(),
        "loadavg_before": load_before, "loadavg_after": loadavg(), "python": platform.python_version(),
        "versions": {m: _dist_version(m) for m in ("jax", "jaxlib", "torch", "torchvision", "grain", "pillow")},
        "augment_config": str(aug.AugmentConfig()), "device_augment_alone_images_per_s": augment_rate,
        "rows": rows, "skipped": skipped, "grain": grain_info, "gpu_input_estimate": estimate,
    }
    table = markdown(result)
    print(table)
    for k, v in skipped.items():
        print(f"skipped {k}: {v}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if args.md:
        Path(args.md).write_text(table)
    return result


def markdown(result: dict) -> str:
    lines = ["| contender | work | workers | images/s (best round) | median round | best per core | 1-min load (best round) |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['contender']} | {r['work']} | {r['workers']} | {r['images_per_s']:.1f} | "
                     f"{r['images_per_s_median']:.1f} | "
                     f"{r['images_per_s_per_core']:.1f} | {r['load_1min_before']:.2f} |")
    e = result["gpu_input_estimate"]
    lines.append("")
    lines.append(f"Device augmentation alone on this CPU: {result['device_augment_alone_images_per_s']:.1f} img/s.")
    for key, label in (("mskjax_cores_uncached", "mskjax (host share, uncached)"),
                       ("torch_cores_host_augment", "torch DataLoader (host augment)")):
        if e.get(key):
            lines.append(f"Estimate: {label} needs ~{e[key]:.0f} cores of this kind for {e['target_images_per_s']:.0f} img/s.")
    return "\n".join(lines) + "\n"


def _dist_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


if __name__ == "__main__":
    main()
