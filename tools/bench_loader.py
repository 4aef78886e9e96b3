"""Benchmark: mskjax Loader images/s (decode + resize + batch) against a plain Pillow loop, same run.

    .venv/bin/python tools/bench_loader.py --out /tmp/bench_loader.json

Reference: for each file, ``Image.open -> convert("L") -> resize((S, S), BILINEAR) -> float32 / 255``,
stacked into batches, in one thread; it does the least work a loader must do. The Loader does
more per image (checks the file structure before decoding, applies EXIF orientation, keeps
16-bit precision, records the geometry, rounds to uint8 for its cache) and spreads decoding over
`--workers` threads. Both read the same files, which are read once beforehand so the OS page cache
serves both equally. Each timing is the best of `--repeats`. Also reported: an epoch served from the
Loader's in-memory cache (what every epoch after the first costs with cache=True).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax.data.loader import Loader  # noqa: E402
from mskjax.data.records import Record  # noqa: E402

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "fracatlas" / "images"


def pil_loop(paths: list[str], size: int, batch: int) -> int:
    """The reference: decode, gray, resize, batch. Returns the number of images produced."""
    n = 0
    for start in range(0, len(paths), batch):
        images = []
        for p in paths[start:start + batch]:
            with Image.open(p) as im:
                small = im.convert("L").resize((size, size), Image.BILINEAR)
            images.append(np.asarray(small, dtype=np.float32) / 255.0)
        n += np.stack(images)[..., None].shape[0]
    return n


def loader_epoch(loader: Loader) -> int:
    n = 0
    for b in loader:
        n += int(b["valid"].sum())
    return n


def best_rate(fn, count: int, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        got = fn()
        times.append(time.perf_counter() - t0)
        if got != count:
            raise RuntimeError(f"expected {count} images, got {got}")
    return count / min(times), times


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of JPEG/PNG files")
    ap.add_argument("--count", type=int, default=256, help="first N files (sorted by name)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--mode", default="resize", choices=("resize", "letterbox"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    folder = Path(args.images).resolve()
    paths = sorted(str(p) for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:args.count]
    if not paths:
        raise SystemExit(f"no images found in {folder}")
    count = len(paths)
    for p in paths:  # warm the page cache for both contenders
        Path(p).read_bytes()
    records = [Record(path=p, label=0, study=str(i), patient=str(i), body_part="unknown", view=0, split="bench")
               for i, p in enumerate(paths)]

    def fresh_loader(cache: bool) -> Loader:
        return Loader(records, global_batch_size=args.batch, image_size=args.size, mode=args.mode,
                      shuffle=False, num_epochs=1, drop_remainder=False, process_index=0, process_count=1,
                      workers=args.workers, prefetch=args.prefetch, cache=cache)

    pil_rate, pil_times = best_rate(lambda: pil_loop(paths, args.size, args.batch), count, args.repeats)
    loader_rate, loader_times = best_rate(lambda: loader_epoch(fresh_loader(False)), count, args.repeats)
    cached = fresh_loader(True)
    loader_epoch(cached)
    cached_rate, cached_times = best_rate(lambda: (cached.restore({"epoch": 0, "step": 0, "seed": 0}),
                                                   loader_epoch(cached))[1], count, args.repeats)
    if cached.skipped or fresh_loader(False).skipped:
        print("skipped:", cached.skipped)

    result = {
        "images": count, "folder": str(folder), "size": args.size, "batch": args.batch, "mode": args.mode,
        "workers": args.workers, "prefetch": args.prefetch, "repeats": args.repeats,
        "cpu_count": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
        "pil_loop_images_per_s": pil_rate, "loader_images_per_s": loader_rate,
        "loader_cached_epoch_images_per_s": cached_rate,
        "ratio_loader_over_pil": loader_rate / pil_rate,
        "ratio_cached_over_pil": cached_rate / pil_rate,
        "seconds": {"pil": pil_times, "loader": loader_times, "loader_cached": cached_times},
    }
    print(f"{count} images from {folder} -> {args.size}x{args.size} ({args.mode}), batch {args.batch}")
    print(f"  plain PIL loop (1 thread):       {pil_rate:8.1f} images/s")
    print(f"  Loader ({args.workers} workers, no cache):    {loader_rate:8.1f} images/s   "
          f"ratio {loader_rate / pil_rate:.2f}x")
    print(f"  Loader, epoch from its cache:    {cached_rate:8.1f} images/s   ratio {cached_rate / pil_rate:.2f}x")
    print(f"  (cpu_count {os.cpu_count()}, 1-min load average {os.getloadavg()[0]:.1f})")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
