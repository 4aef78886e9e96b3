"""How far can the box's size alone take map-derived prompts? (issue 18, part 4)

For one split with lesion masks, the pipeline runs once per peak-box side (`--sides`, classifier
input pixels; the map, its peak and everything else as `mskjax.segment --box-side S --refine R`),
and each abnormal image's Dice against its lesion mask is kept per side. Then one mask per image
is picked among the sides by

* agreement: the mask with the highest mean IoU with the other sides' masks (a stability rule:
  no ground truth used);
* SAM's predicted IoU (the last pass's);
* the best side for that image (an oracle, not a method: what any rule choosing among these sides
  could reach at most).

Images the classifier calls normal keep an empty mask (Dice 0), as `mskjax.segment` counts.
Prints one table and writes JSON.

    python tools/box_sizes.py --classifier runs/demo/classifier/best --sam runs/demo/sam/best \\
        --dataset synthetic:runs/demo/data:valid --sides 24,32,48,64,80,96 --json docs/x.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax import metrics  # noqa: E402
from mskjax.pipeline import Pipeline, PipelineConfig  # noqa: E402
from probe_record import abnormal_items_with_masks, write_record  # noqa: E402  (tools/)


def agreement_choice(masks: list[np.ndarray]) -> int:
    """Index of the mask with the highest mean IoU with the others (ties: the first); empty masks
    agree with nothing."""
    n = len(masks)
    scores = []
    for i in range(n):
        others = [metrics.iou(masks[i], masks[j]) if masks[i].any() and masks[j].any() else 0.0
                  for j in range(n) if j != i]
        scores.append(float(np.mean(others)) if others else 0.0)
    return int(np.argmax(scores))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--sam", required=True)
    ap.add_argument("--dataset", required=True, help="as mskjax.segment's --dataset (needs lesion masks)")
    ap.add_argument("--cam", default="layer_cam")
    ap.add_argument("--cam-layer", default="layer2")
    ap.add_argument("--sides", default="24,32,48,64,80,96")
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.time()
    sides = [float(v) for v in args.sides.split(",")]
    items = abnormal_items_with_masks(args.dataset)
    runs = []
    for side in sides:
        cfg = PipelineConfig(cam=args.cam, cam_layer=args.cam_layer, box_side=side, refine=args.refine,
                             threshold=args.threshold)
        pipe = Pipeline.from_directories(args.classifier, args.sam, cfg)
        runs.append(list(pipe.run(items, batch_size=8)))
    n = len(items)
    dice = np.array([[float(metrics.dice(run[i].mask, run[i].gt_mask)) for run in runs] for i in range(n)])
    pred_iou = np.array([[float(run[i].mask_iou.max()) if len(run[i].mask_iou) else -np.inf for run in runs]
                         for i in range(n)])
    agree = [agreement_choice([run[i].mask for run in runs]) for i in range(n)]
    rows = {f"side {s:g} px": float(dice[:, j].mean()) for j, s in enumerate(sides)}
    rows["agreement among the sides"] = float(np.mean([dice[i, agree[i]] for i in range(n)]))
    rows["highest predicted IoU"] = float(np.mean([dice[i, int(np.argmax(pred_iou[i]))] for i in range(n)]))
    rows["best side per image (oracle)"] = float(dice.max(axis=1).mean())
    hit = np.array([bool(metrics.pointing_hits_at(runs[0][i].peak, runs[0][i].gt_mask, (15.0,))[0])
                    for i in range(n)])
    print(f"{n} abnormal images of {args.dataset}; Dice against the lesion masks (0 where judged normal), "
          f"refine {args.refine}:")
    for k, v in rows.items():
        print(f"  {k:32s} {v:.3f}")
    print(f"  oracle on the {hit.sum()} images whose peak is within 15 px of the lesion: "
          f"{dice[hit].max(axis=1).mean():.3f}; on the other {(~hit).sum()}: {dice[~hit].max(axis=1).mean():.3f}")
    write_record(args, t0, images=n, dice=rows, peak_within_15px=int(hit.sum()),
                 oracle_peak_within_15px=float(dice[hit].max(axis=1).mean()),
                 oracle_peak_elsewhere=float(dice[~hit].max(axis=1).mean()),
                 per_image_dice=np.round(dice, 4).tolist(), agreement_choice=agree,
                 paths=[it.path for it in items])
    return 0


if __name__ == "__main__":
    sys.exit(main())
