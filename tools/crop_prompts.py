"""Does SAM segment better when it sees a zoomed crop around its prompt? (issue 18, part 4: crops)

For one split of a dataset with lesion masks, the pipeline runs as `mskjax.segment` does (the
map's peak box, `--box-side` at the classifier input) with no refine pass; then the tight box of
SAM's first mask is used once more as a prompt, either

* in the whole image (the pipeline's `--refine 1`, the reference), or
* in a crop: a window of `factor` times the box's long side (at least `--min-crop` original
  pixels), centred on the box and slid inside the image, cut from the original radiograph and
  given to SAM as an image of its own (SAM's own resize: the crop fills SAM's input, so a small
  lesion covers more of its patches); the box in the crop's frame; the mask pasted back.

The same is done with the ground-truth boxes (one crop per box, masks united), to see what a crop
does to the segmenter when the box is right. Per image Dice against the lesion mask in the original
frame; images the classifier calls normal keep an empty mask (Dice 0), as `mskjax.segment` counts.
Prints one table and writes JSON.

    python tools/crop_prompts.py --classifier runs/demo/classifier/best --sam runs/demo/sam/best \
        --dataset synthetic:runs/demo/data:valid --factors 1.5,2,3 --json docs/x.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mskjax import metrics  # noqa: E402
from mskjax import sam as samfn  # noqa: E402
from mskjax.pipeline import Pipeline, PipelineConfig  # noqa: E402
from probe_record import abnormal_items_with_masks, write_record  # noqa: E402  (tools/)


def crop_window(box: np.ndarray, factor: float, min_side: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) integer crop in the original frame: a square of side
    max(factor * long side of box, min_side), centred on the box, slid inside the image (each side
    at most the image's own)."""
    h, w = hw
    side = max(factor * max(box[2] - box[0], box[3] - box[1]), min_side)
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    out = []
    for c, n in ((cx, w), (cy, h)):
        s = min(int(np.ceil(side)), n)
        lo = int(np.clip(np.round(c - s / 2.0), 0, n - s))
        out.append((lo, lo + s))
    return out[0][0], out[1][0], out[0][1], out[1][1]


class CropSegmenter:
    """SAM on crops: `masks(images_u8, boxes)` with one (x0, y0, x1, y1) box per entry in the
    original frame and the crop window per entry; returns one bool mask per entry, original frame."""

    def __init__(self, pipe: Pipeline, batch: int = 8):
        self.pipe, self.batch = pipe, batch
        model, box_mask = pipe.sam_model, pipe.box_mask_prompt
        self._embed = jax.jit(lambda v, x: samfn.embed(model, v, x))
        pts = lbl = None
        if pipe.point_trained:  # a SAM trained with peak points gets the padding point beside a tight box
            pts, lbl = samfn.padding_point_prompts((batch, 1))
        self._decode = jax.jit(lambda v, e, b: samfn.decode_boxes(model, v, e, b, box_mask, pts, lbl))

    def masks(self, image_u8: list[np.ndarray], boxes: list[np.ndarray], windows: list[tuple]) -> list[np.ndarray]:
        t = self.pipe.sam_img_size
        out = []
        for start in range(0, len(boxes), self.batch):
            sl = slice(start, start + self.batch)
            crops = [im[y0:y1, x0:x1] for im, (x0, y0, x1, y1) in zip(image_u8[sl], windows[sl])]
            prep = samfn.preprocess(crops, t, self.pipe.sam_preprocessing)
            n = len(crops)
            x = np.zeros((self.batch, t, t, 3), np.float32)
            x[:n] = prep.images
            bx = np.zeros((self.batch, 1, 4), np.float32)
            for i, (b, (x0, y0, _, _)) in enumerate(zip(boxes[sl], windows[sl])):
                local = np.asarray(b, np.float64) - np.array([x0, y0, x0, y0])
                bx[i, 0] = samfn.transform_boxes(local[None], prep.original_sizes[i], t)[0]
            low = np.asarray(self._decode(self.pipe.sam_variables, self._embed(self.pipe.sam_variables, x), bx))
            for i, (im, (x0, y0, x1, y1)) in enumerate(zip(image_u8[sl], windows[sl])):
                m = samfn.postprocess_host(low[i], prep.input_sizes[i], prep.original_sizes[i], t)[0]
                full = np.zeros(im.shape, bool)
                full[y0:y1, x0:x1] = m
                out.append(full)
        return out


def tight_box(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", required=True)
    ap.add_argument("--sam", required=True)
    ap.add_argument("--dataset", required=True, help="as mskjax.segment's --dataset (needs lesion masks)")
    ap.add_argument("--cam", default="layer_cam")
    ap.add_argument("--cam-layer", default="layer2")
    ap.add_argument("--box-side", type=float, default=64.0)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--factors", default="1.5,2,3", help="crop side / box long side, comma list")
    ap.add_argument("--min-crop", type=float, default=32.0, help="smallest crop side, original pixels")
    ap.add_argument("--limit", type=int, default=None, help="first N abnormal images")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.time()
    factors = [float(v) for v in args.factors.split(",")]
    items = abnormal_items_with_masks(args.dataset)
    items = items[:args.limit] if args.limit else items
    results = {}
    for refine in (0, 1):
        cfg = PipelineConfig(cam=args.cam, cam_layer=args.cam_layer, box_side=args.box_side, refine=refine,
                             threshold=args.threshold)
        pipe = Pipeline.from_directories(args.classifier, args.sam, cfg)
        results[refine] = list(pipe.run(items, batch_size=8))
    first, refined = results[0], results[1]
    seg = CropSegmenter(pipe)
    u8 = [np.clip(np.round(r.image * 255.0), 0, 255).astype(np.uint8) for r in first]
    dice: dict[str, list[float]] = {
        "first pass, map box (refine 0)": [metrics.dice(r.mask, r.gt_mask) for r in first],
        "refine 1 in the whole image (the pipeline)": [metrics.dice(r.mask, r.gt_mask) for r in refined],
        "ground-truth boxes, whole image": [metrics.dice(r.gt_box_mask, r.gt_mask) if r.gt_box_mask is not None
                                            else 0.0 for r in first],
    }
    # The first mask's tight box, where the classifier called the image abnormal and SAM found something.
    tb = [tight_box(r.mask) if r.predicted else None for r in first]
    have = [i for i, b in enumerate(tb) if b is not None]
    for f in factors:
        wins = [crop_window(tb[i], f, args.min_crop, first[i].image.shape) for i in have]
        got = seg.masks([u8[i] for i in have], [tb[i] for i in have], wins)
        per = [0.0] * len(first)
        for i, m in zip(have, got):
            per[i] = metrics.dice(m, first[i].gt_mask)
        dice[f"refine 1 in a crop, {f:g} x the box"] = per
        # ground-truth boxes in crops of the same factor (segmenter only)
        ent = [(i, np.asarray(b, np.float64)) for i, r in enumerate(first) for b in r.item.gt_boxes]
        wins = [crop_window(b, f, args.min_crop, first[i].image.shape) for i, b in ent]
        got = seg.masks([u8[i] for i, _ in ent], [b for _, b in ent], wins)
        union = [np.zeros(r.image.shape, bool) for r in first]
        for (i, _), m in zip(ent, got):
            union[i] |= m
        dice[f"ground-truth boxes in a crop, {f:g} x the box"] = [metrics.dice(u, r.gt_mask)
                                                                  for u, r in zip(union, first)]
    table = {k: {"mean": float(np.mean(np.asarray(v, np.float64))), "n": len(v)} for k, v in dice.items()}
    print(f"{len(first)} abnormal images of {args.dataset}, {len(have)} with a first mask; "
          f"Dice against the lesion masks (0 where judged normal):")
    for k, v in table.items():
        print(f"  {k:55s} {v['mean']:.3f}")
    write_record(args, t0, images=len(first), with_first_mask=len(have), dice=table,
                 per_image={k: [round(float(x), 4) for x in v] for k, v in dice.items()},
                 paths=[r.item.path for r in first])
    return 0


if __name__ == "__main__":
    sys.exit(main())
