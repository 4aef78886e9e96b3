"""Pointing game of a classifier's maps for several map settings, against lesion and evidence masks
(issue 18, part 3: PipelineConfig.map_flips and the map's stage).

For one split with masks, the pipeline's map half (`mskjax.pipeline.make_map_half`: the map, its
peak by `boxes.peak_point`, mapped to the original frame) runs once per setting, and each abnormal
image's peak is scored as `mskjax.segment` scores it (`metrics.pointing_hits_at`, 0 and 15
original pixels) against its lesion mask and, where the data has them, its evidence mask. Settings
are METHOD:LAYER:FLIPS, e.g. layer_cam:layer2:hv. Prints one row per setting and writes JSON.

    python tools/map_pointing.py --classifier runs/demo/classifier/best \\
        --dataset synthetic:runs/demo/data:valid --json docs/x.json \\
        --settings layer_cam:layer2:none,layer_cam:layer2:h,layer_cam:layer2:hv
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


def parse_setting(text: str) -> PipelineConfig:
    """METHOD:LAYER:FLIPS (LAYER may join stages with '+', or be empty for the last map)."""
    parts = text.split(":")
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"setting {text!r} is not METHOD:LAYER:FLIPS")
    method, layer, flips = parts
    return PipelineConfig(cam=method, cam_layer=layer or None, map_flips=flips, threshold=0.0)


def peaks_original(half, variables, images, size, mode, batch: int = 16) -> np.ndarray:
    """(N, 2) float64 (x, y) map peaks in each image's original frame."""
    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        x, g, hw, valid = classifier_inputs(chunk, size, mode, batch)
        got = half(variables, {"images": x, "geometry": g, "original_hw": hw, "valid": valid,
                               "threshold": np.float32(0.0)})
        out.append(np.asarray(geo.points_to_original(np.asarray(got["peak_input"], np.float64), g))[:len(chunk)])
    return np.concatenate(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--dataset", required=True, help="mskjax.segment's --dataset spec (a split with masks)")
    ap.add_argument("--settings", default="layer_cam:layer2:none,layer_cam:layer2:h,layer_cam:layer2:hv")
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    settings = [parse_setting(s) for s in args.settings.split(",")]
    items = abnormal_items_with_masks(args.dataset)
    model, variables, meta = checkpoint.load_classifier(args.classifier)
    size, mode, channels, norm = classifier_input_settings(meta)
    images = [decode_image(it.path).image for it in items]
    truths = {"lesion": [read_mask(it.mask_path, im.shape) for it, im in zip(items, images)]}
    if all(it.evidence_path for it in items):
        truths["evidence"] = [read_mask(it.evidence_path, im.shape) for it, im in zip(items, images)]
    rows = {}
    print(f"{len(items)} abnormal images with masks; pointing at {POINTING_TOLERANCES} px (chance in brackets)")
    for name, config in zip(args.settings.split(","), settings):
        half = jax.jit(make_map_half(model, config, norm, channels, 256))
        peaks = peaks_original(half, variables, images, size, mode)
        row = {}
        for truth, masks in truths.items():
            hits = np.asarray([metrics.pointing_hits_at(p, m, POINTING_TOLERANCES) for p, m in zip(peaks, masks)], float)
            chance = np.asarray([[float(np.ravel(metrics.pointing_chance(m, t))[0]) for t in POINTING_TOLERANCES]
                                 for m in masks])
            row[truth] = {"hits": hits.mean(axis=0).round(4).tolist(), "chance": chance.mean(axis=0).round(4).tolist()}
        rows[name] = row
        print(f"{name:32s} " + "  ".join(f"{t} {r['hits'][0]:.3f} / {r['hits'][1]:.3f} "
                                         f"({r['chance'][0]:.3f} / {r['chance'][1]:.3f})" for t, r in row.items()),
              flush=True)
    write_record(args, t0, n=len(items), tolerances_px=list(POINTING_TOLERANCES), pointing=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
