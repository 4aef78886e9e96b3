"""How much a choice among the map's peaks could give: each peak's own mask scored (issue 18 probe).

For one split with lesion masks, the pipeline (`mskjax.pipeline.Pipeline`, the demo's settings by
default: layer2 LayerCAM, flip-averaged map, 64 px box, SAM's mirrored view averaged in) prompts
SAM at the map's --peaks separated peaks (PipelineConfig(peaks=K, choose="union")), every abnormal
image whatever the classifier says (threshold 0). Each peak's mask alone is mapped back to the
original frame by `Pipeline.finish` (the other peaks' boxes marked invalid) and scored by Dice
against the lesion mask. Prints and writes JSON: the mean Dice of the first peak's mask (the
pipeline's default), of each later peak's, and of the best per image (an oracle: the ceiling of
any choice rule), with the number of images whose best mask is not the first's.

    python tools/peak_oracle.py --classifier runs/demo5/classifier/best --sam runs/demo5/sam/best \\
        --dataset synthetic:runs/demo5/data:valid --embedding-cache runs/emb_demo4 --json docs/x.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax import metrics  # noqa: E402
from mskjax.pipeline import Pipeline, PipelineConfig, read_item  # noqa: E402
from probe_record import abnormal_items_with_masks, write_record  # noqa: E402  (tools/)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--sam", required=True)
    ap.add_argument("--dataset", required=True, help="mskjax.segment's --dataset spec (a split with masks)")
    ap.add_argument("--peaks", type=int, default=2)
    ap.add_argument("--peak-separation", type=float, default=0.1875)
    ap.add_argument("--cam", default="layer_cam")
    ap.add_argument("--cam-layer", default="layer2")
    ap.add_argument("--map-flips", default="hv")
    ap.add_argument("--box-side", type=float, default=64.0)
    ap.add_argument("--no-mirror-average", dest="mirror_average", action="store_false")
    ap.add_argument("--embedding-cache", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    config = PipelineConfig(cam=args.cam, cam_layer=args.cam_layer or None, map_flips=args.map_flips,
                            box_side=args.box_side, mirror_average=args.mirror_average, threshold=0.0,
                            peaks=args.peaks, peak_separation=args.peak_separation, choose="union")
    pipe = Pipeline.from_directories(args.classifier, args.sam, config, embedding_cache=args.embedding_cache)
    items = abnormal_items_with_masks(args.dataset)
    dice = np.full((len(items), args.peaks), np.nan)
    for start in range(0, len(items), 8):
        chunk = items[start:start + 8]
        read = [read_item(it) for it in chunk]
        batch = pipe.prepare([im for im, _ in read], 8)
        out = pipe.step(batch)
        for i, (it, (im, gt)) in enumerate(zip(chunk, read)):
            for k in range(args.peaks):
                if not out["box_valid"][i, k]:
                    continue  # no pixel far enough from the earlier peaks
                one = dict(out, box_valid=out["box_valid"] & (np.arange(args.peaks) == k)[None])
                dice[start + i, k] = metrics.dice(pipe.finish(batch, one, i, im, it, gt).mask, gt)
    best = np.nanmax(dice, axis=1)
    rec = {"n": len(items), "peaks": args.peaks,
           "mean_dice_by_peak": [round(float(np.nanmean(dice[:, k])), 4) for k in range(args.peaks)],
           "images_with_peak": [int(np.isfinite(dice[:, k]).sum()) for k in range(args.peaks)],
           "mean_dice_best_peak": round(float(best.mean()), 4),
           "images_best_not_first": int((np.nanargmax(dice, axis=1) != 0).sum()),
           "note": "every abnormal image prompted (threshold 0); the best peak per image is an oracle"}
    print(f"{rec['n']} abnormal images; mean Dice by peak {rec['mean_dice_by_peak']} (images with that peak "
          f"{rec['images_with_peak']}); best per image {rec['mean_dice_best_peak']} "
          f"({rec['images_best_not_first']} images where it is not the first)")
    write_record(args, t0, **rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
