"""Where a map's missed peaks go: is the map's second local maximum on the lesion? (issue 18 probe)

For one split with lesion masks, the pipeline's map half (`mskjax.pipeline.make_map_half`, the map
of PipelineConfig(cam, cam_layer, map_flips)) gives each abnormal image's map and its peak (the
pipeline's peak rule). The second peak is the map's highest value at least --radius pixels (the
classifier's input frame) from the first. Both are mapped to the original frame and scored as
`mskjax.segment` scores the peak (`metrics.pointing_hits_at`, 0 and 15 px). Prints and writes JSON:
the share of images whose first, second, or either peak hits, and the second peak's height over the
first's where the first hits and where it misses.

    python tools/second_peak.py --classifier runs/demo5/classifier/best \\
        --dataset synthetic:runs/demo5/data:valid --radius 24 --json docs/x.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax import checkpoint, metrics  # noqa: E402
from mskjax import geometry as geo  # noqa: E402
from mskjax.data.images import decode_image  # noqa: E402
from mskjax.pipeline import (PipelineConfig, classifier_input_settings, classifier_inputs,  # noqa: E402
                             make_map_half, read_mask)
from mskjax.segment import POINTING_TOLERANCES  # noqa: E402
from probe_record import abnormal_items_with_masks, write_record  # noqa: E402  (tools/)


def second_peaks(maps: np.ndarray, first: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """maps (B, S, S), first (B, 2) (x, y) pixel-centre coordinates of the input frame -> the
    highest pixel centre at least `radius` from `first` (B, 2) and its value (B,)."""
    b, h, w = maps.shape
    ys, xs = np.mgrid[:h, :w] + 0.5
    far = (xs[None] - first[:, 0, None, None]) ** 2 + (ys[None] - first[:, 1, None, None]) ** 2 >= radius ** 2
    masked = np.where(far, maps, -np.inf).reshape(b, -1)
    k = np.argmax(masked, axis=1)
    return np.stack([xs.ravel()[k], ys.ravel()[k]], axis=1), masked[np.arange(b), k]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--dataset", required=True, help="mskjax.segment's --dataset spec (a split with masks)")
    ap.add_argument("--cam", default="layer_cam")
    ap.add_argument("--cam-layer", default="layer2")
    ap.add_argument("--map-flips", default="hv")
    ap.add_argument("--radius", type=float, default=24.0, help="classifier-input pixels between the two peaks")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    items = abnormal_items_with_masks(args.dataset)
    model, variables, meta = checkpoint.load_classifier(args.classifier)
    size, mode, channels, norm = classifier_input_settings(meta)
    config = PipelineConfig(cam=args.cam, cam_layer=args.cam_layer or None, map_flips=args.map_flips, threshold=0.0)
    half = jax.jit(make_map_half(model, config, norm, channels, 256))
    hits, ratios = [], []
    for start in range(0, len(items), 16):
        chunk = items[start:start + 16]
        images = [decode_image(it.path).image for it in chunk]
        x, g, hw, valid = classifier_inputs(images, size, mode, 16)
        out = half(variables, {"images": x, "geometry": g, "original_hw": hw, "valid": valid,
                               "threshold": np.float32(0.0)})
        maps, first = np.asarray(out["cam"]), np.asarray(out["peak_input"], np.float64)
        second, value = second_peaks(maps, first, args.radius)
        in_original = [np.asarray(geo.points_to_original(p, g)) for p in (first, second)]  # (B, 2) each
        for i, (it, im) in enumerate(zip(chunk, images)):
            mask = read_mask(it.mask_path, im.shape)
            hits.append([metrics.pointing_hits_at(p[i], mask, POINTING_TOLERANCES) for p in in_original])
            ratios.append(float(value[i] / max(float(maps[i].max()), 1e-12)))
    h = np.asarray(hits, float)  # (N, 2 peaks, tolerances)
    r = np.asarray(ratios)
    miss = h[:, 0, -1] == 0
    rec = {"n": len(items), "tolerances_px": list(POINTING_TOLERANCES),
           "first": h[:, 0].mean(axis=0).round(4).tolist(), "second": h[:, 1].mean(axis=0).round(4).tolist(),
           "either": h.max(axis=1).mean(axis=0).round(4).tolist(),
           "first_misses_at_15px": int(miss.sum()), "second_hits_where_first_misses": int(h[miss, 1, -1].sum()),
           "second_over_first_median": {"first_misses": round(float(np.median(r[miss])), 3) if miss.any() else None,
                                        "first_hits": round(float(np.median(r[~miss])), 3) if (~miss).any() else None}}
    print(f"{rec['n']} abnormal images; hits at {POINTING_TOLERANCES} px: first {rec['first']}, second "
          f"{rec['second']}, either {rec['either']}; the first misses {rec['first_misses_at_15px']} at 15 px, the "
          f"second hits {rec['second_hits_where_first_misses']} of them; second/first median "
          f"{rec['second_over_first_median']}")
    write_record(args, t0, **rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
