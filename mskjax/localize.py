"""Localization scored against ground truth: every CAM method of a classifier checkpoint on the
abnormal images of a labelled dataset, with thresholds chosen on one split and reported on another.

    python -m mskjax.localize --classifier runs/synthetic/best --dataset synthetic:data/syn \
        --tune valid --report test --out runs/loc_synthetic [--methods all|grad_cam,eigen_cam,...] \
        [--layer NAME] [--score-cam-limit 32] [--score-cam-channels N] [--faithfulness-limit 32] \
        [--faithfulness-steps 20] [--pointing-tolerance 0,15] [--box-fraction 0.5] [--limit N] [--batch 16] \
        [--truth lesion|evidence] [--subtract-normal-mean]
    python -m mskjax.localize --classifier runs/fracatlas_r18/best --dataset fracatlas:../shared/data/fracatlas \
        --tune tune --report valid --out runs/loc_fracatlas

FracAtlas and MURA have official train and valid splits only. `tune` is the validation split that
`mskjax.train` carves from train (default `data.valid_fraction`, seed 0): images the classifier
did not train on, so thresholds chosen there are honest; `valid` (the official one, the trainer's
"test") is then reported. `--tune train` also works but chooses thresholds on training images.

Methods: every `mskjax.cam` method and `occlusion` (`mskjax.cam.occlusion`); `--layer a+b` fuses the
stages' maps (`mskjax.cam.fused_maps`). `--truth evidence` scores against the synthetic world's
evidence masks (the pixels that change when the abnormality is removed) instead of the lesion
masks; `--subtract-normal-mean` subtracts from each gradient method's raw map its mean over up to
BASELINE_IMAGES normal images of the tune split (the positional pattern the network puts on every
image).

Writes OUT/localization.json (every number, the thresholds, counts, unreadable inputs, settings)
and OUT/localization.md (one markdown table per split: method x metric), and prints the tables.
Exit status: 0 done, 2 bad arguments, dataset or checkpoint.

Which images. Per split, the images labelled abnormal that have a ground-truth mask (synthetic:
masks/ and boxes.json; FracAtlas: the fracture masks and COCO boxes). Normal images, and abnormal
ones without a mask, are counted and left out. A file that cannot be decoded, a mask that cannot be
read or whose size differs from its image, ground-truth boxes outside the image, and an empty mask
are listed with the reason and skipped, never fatal.

Frames. The CAM is computed at model-input size (the checkpoint's `data.mode` and input size, as
`mskjax.pipeline` does: the abnormal logit as the target, zero on letterbox padding), then carried
to the **original image frame** (`mskjax.geometry.map_to_original`: crop the padding, bilinear
resize) and min-max normalised per image there (`metrics.normalize_maps`). Every map metric
(pointing game, PxAP, Dice, MaxBoxAccV2) compares that map with the ground-truth mask / boxes in
the original frame, where the annotations were drawn. The `peak` and `threshold` boxes are made
exactly as the pipeline makes them, on the input-frame map (`boxes.peak_boxes`: the report's 50x50
box at 224 px, scaled to the input size; `boxes.threshold_boxes(fraction, k=1)`: the top component
by CAM mass), then moved to the original frame (`geometry.boxes_to_original`, clipped) and scored
there. Deletion/insertion runs in the input frame (the model's own input).

Metrics, per method and split (n = images counted, stated per metric):
* pointing game: hit when the map's peak (`boxes.peak_point` on the input-frame map: the pixel of
  the first maximum's plateau nearest its centroid, so an upsampled edge cell is not pinned to the
  border; carried to the original frame) lies within `tolerance` original-image pixels (peak pixel centre to
  nearest mask-pixel centre) of the mask; reported for each tolerance (default 0 and 15 px) with
  its chance level (`metrics.pointing_chance`: the share of the image within the tolerance of the
  mask, averaged over images);
* PxAP: wsolevaluation's binned pixel AP over all pixels of all images, thresholds
  `PXAP_THRESHOLDS` (0, 0.001, ..., 0.999, 1), score >= t (equals `metrics.pxap(...,
  thresholds=PXAP_THRESHOLDS)` on the pooled maps; accumulated per image so memory stays flat);
* Dice of the thresholded map (map >= t): t chosen on the tune split to maximise the mean Dice
  over `DICE_THRESHOLDS` (0, 0.01, ..., 1), then applied unchanged to the report split;
* MaxBoxAccV2 (IoU deltas 0.3/0.5/0.7): for each delta, the CAM threshold (foreground map > t,
  `BOX_THRESHOLDS` 0, 0.01, ..., 0.99, boxes around every 8-connected component) that maximises
  box accuracy on the tune split, applied to the report split; the value is the mean over deltas.
  The report split's own best ("oracle") is in the JSON as a reference, never in the table;
* box IoU of the peak box and of the top threshold box: best IoU over the image's ground-truth
  boxes (mean, and the share with IoU >= 0.5); nothing is tuned;
* deletion / insertion AUC (`metrics.deletion_insertion_auc`, 20 steps by default, black baseline in [0, 1]
  pixel space, P(abnormal)) on the first `faithfulness_limit` images of each split.

Numbers for the tune split use its own thresholds (in-sample, optimistic); the report split's use
the tune split's thresholds. Score-CAM (one masked forward per channel) runs on the first
`score_cam_limit` images of each split only, and the output says so; its n is its own.

The core (`measure_image`, `measure_maps`, `choose_thresholds`, `score_split`, `pxap_from_counts`,
`metrics.host_best_box_iou_curve`, `metrics.host_component_boxes`) is pure numpy on per-image arrays, so tests feed it
hand-made maps; `run` and `main` do the I/O and the model.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mskjax import boxes as boxlib
from mskjax import cam as camlib
from mskjax import geometry as geo
from mskjax import compile_cache, metrics, plots
from mskjax.cam import METHODS, CamError
from mskjax.checkpoint import load_classifier
from mskjax.classifier import GrayAsRGB, abnormal_class, normalization_from_metadata, prepare_images, probabilities
from mskjax.data.images import decode_image
from mskjax.data.preprocess import preprocess
from mskjax.inputs import InputError, items_from_dataset, parse_dataset
from mskjax.pipeline import content_bounds, content_mask, read_mask
from mskjax.weights.mapping import CheckpointMismatch


PXAP_THRESHOLDS = np.append(np.arange(0, 1, 0.001), [1.0])   # wsolevaluation's mask thresholds
DICE_THRESHOLDS = PXAP_THRESHOLDS[::10]                       # 0, 0.01, ..., 0.99, 1.0 (101)
_DICE_INDEX = np.arange(0, len(PXAP_THRESHOLDS), 10)
BOX_THRESHOLDS = np.arange(0, 1, 0.01)                        # wsolevaluation's cam_curve_interval
IOU_DELTAS = (0.3, 0.5, 0.7)
DEFAULT_TOLERANCES = (0.0, 15.0)
DEFAULT_BOX_FRACTION = 0.5
FAITHFULNESS_STEPS = 20
TRUTHS = ("lesion", "evidence")
# mskjax.cam's methods, and occlusion sensitivity (`mskjax.cam.occlusion`: 16 px blurred patches, stride 8).
LOCALIZE_METHODS = METHODS + ("occlusion",)
BASELINE_IMAGES = 64  # normal tuning images averaged for --subtract-normal-mean


class LocalizeError(ValueError):
    """A localization run that cannot be done as asked (bad method list, split, layer)."""


@dataclasses.dataclass
class ImageMeasures:
    """What one map says about one image, in the frame of its mask (original image).

    hits: (len(tolerances),) bool pointing-game hits; chance: (len(tolerances),) float64, the hit
    rate of a peak drawn uniformly over this image (`metrics.pointing_chance`). tp_ge / n_ge: (len(PXAP_THRESHOLDS),) int64
    counts of mask pixels / all pixels whose normalised score >= each threshold; mask_pixels: mask
    size. box_curve: (len(BOX_THRESHOLDS),) best component-box IoU per CAM threshold, or None when
    the image has no ground-truth box. peak_iou / threshold_iou: best IoU of the peak box / top
    threshold box with the ground-truth boxes (None without boxes). deletion / insertion: AUCs or
    None when not measured.
    """

    hits: np.ndarray
    chance: np.ndarray
    tp_ge: np.ndarray
    n_ge: np.ndarray
    mask_pixels: int
    box_curve: np.ndarray | None = None
    peak_iou: float | None = None
    threshold_iou: float | None = None
    deletion: float | None = None
    insertion: float | None = None


def _ge_counts(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """counts[j] = #(scores >= thresholds[j]); thresholds ascending, scores >= thresholds[0]."""
    idx = np.searchsorted(thresholds, scores.ravel(), side="right") - 1
    hist = np.bincount(idx[idx >= 0], minlength=len(thresholds))
    return np.cumsum(hist[::-1])[::-1].astype(np.int64)


def _best_iou(box, gt_boxes) -> float | None:
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if not len(gt):
        return None
    if box is None:
        return 0.0
    return float(np.max(metrics.pairwise_box_iou(np.asarray(box, np.float64).reshape(1, 4), gt)))


def measure_image(score_map: np.ndarray, mask: np.ndarray, gt_boxes=(), *, peak_box=None, threshold_box=None,
                  peak_xy=None, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
                  normalize: bool = True) -> ImageMeasures:
    """Everything threshold-free about one map, plus the curves thresholds are chosen from.

    Args:
      score_map: (H, W) float map in the mask's frame.
      mask: (H, W) bool ground truth (must have a positive pixel).
      gt_boxes: (G, 4) ground-truth boxes (x0, y0, x1, y1), same frame; may be empty.
      peak_box, threshold_box: (4,) predicted boxes in that frame (None: no box was found).
      peak_xy: (2,) the map's peak (x, y) in that frame, found where the map was made (input frame)
        and carried here; None: `boxes.peak_point` of score_map itself.
      tolerances: pointing-game tolerances in pixels.
      normalize: min-max normalise the map first (`metrics.normalize_maps`).
    """
    m = np.asarray(score_map, np.float64)
    g = np.asarray(mask).astype(bool)
    if m.shape != g.shape or m.ndim != 2:
        raise ValueError(f"map and mask must both be (H, W); got {m.shape} and {g.shape}")
    if not g.any():
        raise ValueError("the ground-truth mask is empty")
    if normalize:
        m = np.asarray(metrics.normalize_maps(m[None]))[0]
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    if peak_xy is None:
        peak_xy = np.asarray(boxlib.peak_point(np.asarray(score_map, np.float32)))
    return ImageMeasures(
        hits=metrics.pointing_hits_at(peak_xy, g, tolerances),
        chance=np.array([metrics.pointing_chance(g, t) for t in tolerances], np.float64),
        tp_ge=_ge_counts(m[g], PXAP_THRESHOLDS), n_ge=_ge_counts(m, PXAP_THRESHOLDS), mask_pixels=int(g.sum()),
        box_curve=metrics.host_best_box_iou_curve(m, gt) if len(gt) else None,
        peak_iou=_best_iou(peak_box, gt), threshold_iou=_best_iou(threshold_box, gt))


def measure_maps(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray], gt_boxes: Sequence | None = None,
                 peak_boxes: Sequence | None = None, threshold_boxes: Sequence | None = None,
                 tolerances: Sequence[float] = DEFAULT_TOLERANCES) -> list[ImageMeasures]:
    """`measure_image` over lists of per-image maps/masks (sizes may differ between images)."""
    n = len(maps)
    if len(masks) != n:
        raise ValueError(f"{n} maps but {len(masks)} masks")
    gt_boxes = gt_boxes if gt_boxes is not None else [()] * n
    peak_boxes = peak_boxes if peak_boxes is not None else [None] * n
    threshold_boxes = threshold_boxes if threshold_boxes is not None else [None] * n
    return [measure_image(maps[i], masks[i], gt_boxes[i], peak_box=peak_boxes[i], threshold_box=threshold_boxes[i],
                          tolerances=tolerances) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Thresholds and split scores (pure)

def pxap_from_counts(tp_ge: np.ndarray, n_ge: np.ndarray) -> float:
    """Binned PxAP from pooled counts over PXAP_THRESHOLDS (ascending): for t in decreasing order,
    AP = sum (R_t - R_prev) P_t, skipping thresholds with no predicted pixel (`metrics.pxap`'s rule)."""
    tp = np.asarray(tp_ge, np.float64)[::-1]
    n = np.asarray(n_ge, np.float64)[::-1]
    positives = tp.max() if tp.size else 0.0
    if not positives > 0:
        return float("nan")
    recall = tp / positives
    precision = np.where(n > 0, tp / np.where(n > 0, n, 1), 0.0)
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(np.where(n > 0, d_recall * precision, 0.0)))


def _dice_curves(measures: Sequence[ImageMeasures]) -> np.ndarray:
    """(N, len(DICE_THRESHOLDS)) Dice of (map >= t) per image."""
    if not measures:
        return np.zeros((0, len(DICE_THRESHOLDS)))
    tp = np.stack([m.tp_ge[_DICE_INDEX] for m in measures]).astype(np.float64)
    pred = np.stack([m.n_ge[_DICE_INDEX] for m in measures]).astype(np.float64)
    gt = np.array([m.mask_pixels for m in measures], np.float64)[:, None]
    return np.where(pred + gt > 0, 2 * tp / np.maximum(pred + gt, 1), 1.0)


def _box_curves(measures: Sequence[ImageMeasures]) -> np.ndarray:
    curves = [m.box_curve for m in measures if m.box_curve is not None]
    return np.stack(curves) if curves else np.zeros((0, len(BOX_THRESHOLDS)))


def pixel_pr_curve(tp_ge: np.ndarray, n_ge: np.ndarray) -> dict:
    """The precision-recall points PxAP sums over (`pxap_from_counts`), thresholds descending, only
    those with a predicted pixel: {"threshold", "precision", "recall"} arrays."""
    tp = np.asarray(tp_ge, np.float64)[::-1]
    n = np.asarray(n_ge, np.float64)[::-1]
    t = np.asarray(PXAP_THRESHOLDS, np.float64)[::-1]
    positives = tp.max() if tp.size else 0.0
    keep = n > 0
    recall = tp / positives if positives > 0 else np.full_like(tp, np.nan)
    return {"threshold": t[keep], "precision": tp[keep] / n[keep], "recall": recall[keep]}


def curve_data(measures: Sequence[ImageMeasures]) -> dict:
    """What MaxBoxAccV2 and PxAP are read from, for plots: {"box_accuracy": {delta: (len(BOX_THRESHOLDS),)
    share of images whose best box has IoU >= delta at each CAM threshold}, "box_thresholds",
    "pixel_pr": `pixel_pr_curve` of the pooled counts}."""
    curves = _box_curves(measures)
    n = len(measures)
    tp = np.sum([m.tp_ge for m in measures], axis=0) if n else np.zeros(len(PXAP_THRESHOLDS))
    ng = np.sum([m.n_ge for m in measures], axis=0) if n else np.zeros(len(PXAP_THRESHOLDS))
    return {"box_thresholds": np.asarray(BOX_THRESHOLDS, np.float64),
            "box_accuracy": {float(d): (curves >= d).mean(0) if len(curves) else np.full(len(BOX_THRESHOLDS), np.nan)
                             for d in IOU_DELTAS},
            "pixel_pr": pixel_pr_curve(tp, ng)}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Thresholds chosen on a tuning split: dice (on the normalised map, map >= t) and box
    {delta: CAM threshold (map > t)}; None where the tuning split had nothing to choose from."""

    dice: float | None
    box: dict

    def as_json(self) -> dict:
        return {"dice": self.dice, "max_box_acc_v2": {str(k): v for k, v in self.box.items()}}


def choose_thresholds(measures: Sequence[ImageMeasures], iou_deltas: Sequence[float] = IOU_DELTAS) -> Thresholds:
    """Thresholds maximising mean Dice and, per IoU delta, box accuracy on these (tuning) images.
    Ties go to the lowest threshold."""
    dice = _dice_curves(measures)
    t_dice = float(DICE_THRESHOLDS[int(np.argmax(dice.mean(0)))]) if len(dice) else None
    curves = _box_curves(measures)
    box = {}
    for d in iou_deltas:
        box[float(d)] = float(BOX_THRESHOLDS[int(np.argmax((curves >= d).mean(0)))]) if len(curves) else None
    return Thresholds(t_dice, box)


def _index_of(grid: np.ndarray, value: float) -> int:
    i = int(np.argmin(np.abs(grid - value)))
    if not abs(grid[i] - value) < 1e-9:
        raise LocalizeError(f"threshold {value} is not on the grid {grid[0]}..{grid[-1]}")
    return i


def _mean(values) -> dict:
    v = np.asarray([x for x in values if x is not None], np.float64)
    return {"mean": float(v.mean()) if v.size else float("nan"), "n": int(v.size)}


def score_split(measures: Sequence[ImageMeasures], thresholds: Thresholds,
                tolerances: Sequence[float] = DEFAULT_TOLERANCES) -> dict:
    """Every metric of one method on one split, with Dice and MaxBoxAccV2 at the given thresholds
    (chosen elsewhere: `choose_thresholds` on the tuning split). See the module docstring."""
    n = len(measures)
    out: dict[str, Any] = {"n_images": n}
    hits = np.stack([m.hits for m in measures]) if n else np.zeros((0, len(tolerances)), bool)
    chance = np.stack([m.chance for m in measures]) if n else np.zeros((0, len(tolerances)))
    out["pointing_game"] = {
        f"{float(t):g}px": {"hit_rate": float(hits[:, i].mean()) if n else float("nan"),
                            "hits": int(hits[:, i].sum()), "n": n, "tolerance_px": float(t),
                            "chance": float(chance[:, i].mean()) if n else float("nan")}
        for i, t in enumerate(tolerances)}
    tp = np.sum([m.tp_ge for m in measures], axis=0) if n else np.zeros(len(PXAP_THRESHOLDS))
    ng = np.sum([m.n_ge for m in measures], axis=0) if n else np.zeros(len(PXAP_THRESHOLDS))
    out["pxap"] = {"value": pxap_from_counts(tp, ng) if n else float("nan"), "n": n}
    dice = _dice_curves(measures)
    if thresholds.dice is not None and n:
        col = dice[:, _index_of(DICE_THRESHOLDS, thresholds.dice)]
        out["dice"] = {"mean": float(col.mean()), "n": n, "threshold": thresholds.dice}
    else:
        out["dice"] = {"mean": float("nan"), "n": n, "threshold": thresholds.dice}
    curves = _box_curves(measures)
    per, oracle = {}, {}
    for d, t in thresholds.box.items():
        if t is None or not len(curves):
            per[str(d)] = {"accuracy": float("nan"), "threshold": t}
            oracle[str(d)] = float("nan")
            continue
        acc = (curves >= d).mean(0)
        per[str(d)] = {"accuracy": float(acc[_index_of(BOX_THRESHOLDS, t)]), "threshold": t}
        oracle[str(d)] = float(acc.max())
    out["max_box_acc_v2"] = {
        "value": float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan"),
        "per_iou": per, "n": int(len(curves)),
        "oracle_value": float(np.mean(list(oracle.values()))) if oracle else float("nan"),
        "oracle_note": "best thresholds of this split itself (optimistic; not comparable across splits)"}
    for key, attr in (("peak_box_iou", "peak_iou"), ("threshold_box_iou", "threshold_iou")):
        v = [getattr(m, attr) for m in measures if getattr(m, attr) is not None]
        out[key] = {**_mean(v), "hit_rate_iou_0.5": float(np.mean(np.asarray(v) >= 0.5)) if v else float("nan")}
    out["deletion_auc"] = _mean([m.deletion for m in measures])
    out["insertion_auc"] = _mean([m.insertion for m in measures])
    return out


# ---------------------------------------------------------------------------------------------
# Reports

_COLUMNS = ("n", "pointing", "PxAP", "Dice", "MaxBoxAccV2", "peak box IoU", "thr box IoU", "deletion AUC",
            "insertion AUC")


def _f(x, digits=3) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def markdown_table(results: dict, split: str, role: str) -> str:
    """One markdown table, method x metric, for one split's results {method: score_split(...)}."""
    if not results:
        return f"### {role} split `{split}`\n\n(no method scored)\n"
    first = next(iter(results.values()))
    tols = list(first["pointing_game"])
    head = ["method", "n"] + [f"pointing ({t}; chance)" for t in tols] + [
        "PxAP", "Dice (t)", "MaxBoxAccV2 (0.3/0.5/0.7)", "peak box IoU", "thr box IoU", "deletion AUC (n)",
        "insertion AUC (n)"]
    lines = [f"### {role} split `{split}`", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, r in results.items():
        mb = r["max_box_acc_v2"]
        per = "/".join(_f(v["accuracy"], 2) for v in mb["per_iou"].values())
        row = [method, str(r["n_images"])] + [
        f"{_f(r['pointing_game'][t]['hit_rate'])} ({_f(r['pointing_game'][t].get('chance'))})" for t in tols] + [
            _f(r["pxap"]["value"]), f"{_f(r['dice']['mean'])} ({_f(r['dice']['threshold'], 2)})",
            f"{_f(mb['value'])} ({per})", _f(r["peak_box_iou"]["mean"]), _f(r["threshold_box_iou"]["mean"]),
            f"{_f(r['deletion_auc']['mean'])} ({r['deletion_auc']['n']})",
            f"{_f(r['insertion_auc']['mean'])} ({r['insertion_auc']['n']})"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: dict) -> str:
    s = report["settings"]
    c = report["counts"]
    lines = [
        "# Localization against ground truth", "",
        f"- classifier: `{report['classifier'].get('directory')}` ({report['classifier'].get('arch')}, input "
        f"{report['classifier'].get('input_size')} px, {report['classifier'].get('mode')})",
        f"- dataset: {report['dataset']}; scored against the {report.get('truth', 'lesion')} masks",
        f"- thresholds chosen on split `{report['tune_split']}`; reported split `{report['report_split']}` uses them "
        "unchanged (the tune split's own numbers are in-sample)",
        f"- images: abnormal with a ground-truth mask; tune n={c['tune']['scored']}, "
        f"report n={c['report']['scored']}; unreadable or skipped: {c['tune']['unreadable'] + c['report']['unreadable']}",
        f"- frame: {s['frame']}",
        f"- pointing game tolerances (original pixels): {s['pointing_tolerances_px']}; PxAP binned over "
        f"{s['pxap_thresholds']} thresholds; Dice threshold grid step 0.01; MaxBoxAccV2 CAM thresholds 0..0.99 step 0.01",
        f"- boxes: peak = {s['peak_box']}; threshold = {s['threshold_box']}",
        f"- deletion/insertion: first {s['faithfulness_limit']} images per split, {s['faithfulness_steps']} steps, "
        "black baseline",
    ]
    lines += [f"- note: {n}" for n in report["notes"]]
    lines.append("")
    lines.append(markdown_table(report["results"]["report"], report["report_split"], "Report"))
    lines.append(markdown_table(report["results"]["tune"], report["tune_split"], "Tune (in-sample)"))
    if report["unreadable"]:
        lines.append(f"### Unreadable or skipped inputs ({len(report['unreadable'])})\n")
        lines += [f"- `{u['path']}` ({u['split']}): {u['reason']}" for u in report["unreadable"]]
        lines.append("")
    return "\n".join(lines)


def _clean(o):
    """nan/inf -> None and numpy scalars -> Python, so the JSON is strict."""
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (np.integer, np.bool_)):
        return o.item()
    if isinstance(o, (float, np.floating)):
        return float(o) if math.isfinite(float(o)) else None
    if isinstance(o, np.ndarray):
        return _clean(o.tolist())
    return o


# ---------------------------------------------------------------------------------------------
# The model side: CAMs, boxes and faithfulness for batches of one checkpoint

class CamRunner:
    """A classifier checkpoint's CAM maps, boxes and deletion/insertion on batches of images.

    Built from (model, variables, metadata) as `mskjax.checkpoint.load_classifier` returns them.
    Inputs are made like the pipeline's: `preprocess(image, size, data.mode)`, normalised with the
    checkpoint's statistics; one-channel models are shown to `mskjax.cam` through the pipeline's
    gray-as-RGB adapter; the target is the abnormal logit. Shapes are static (batch padded).
    """

    def __init__(self, model, variables, meta: dict, methods: Sequence[str], layer: str | None = None,
                 batch_size: int = 16, box_fraction: float = DEFAULT_BOX_FRACTION, score_cam_chunk: int | None = None,
                 score_cam_channels: int | None = None, faithfulness_steps: int = FAITHFULNESS_STEPS,
                 map_flips: str = "none"):
        self.meta = dict(meta)
        if map_flips not in camlib.FLIPS:
            raise LocalizeError(f"unknown map_flips {map_flips!r}: expected one of {list(camlib.FLIPS)}")
        self.map_flips = map_flips
        data = self.meta.get("data", {})
        self.size = int(data.get("image_size", self.meta["input_size"]))
        self.mode = data.get("mode", "resize")
        self.channels = int(self.meta.get("in_channels", 3))
        norm = self.meta.get("normalization") or {}
        if [float(v) for v in norm.get("input_range", [0.0, 1.0])] != [0.0, 1.0]:
            raise LocalizeError(f"classifier expects inputs in {norm.get('input_range')}; this tool feeds [0, 1] images")
        normalization = normalization_from_metadata(norm)
        self.batch_size = int(batch_size)
        self.methods = tuple(methods)
        self.faithfulness_steps = int(faithfulness_steps)
        names = list(model.segments)
        fused = tuple(layer.split("+")) if layer and "+" in layer else ()
        if fused and (any(l not in names for l in fused) or {"cam", "score_cam"} & set(self.methods)):
            raise LocalizeError(f"--layer {layer}: a fusion names stages of {names} joined by '+', and 'cam' / "
                                "'score_cam' cannot take part")
        if not fused and layer not in (None, "features") and layer not in names:
            raise LocalizeError(f"unknown layer {layer!r}: expected one of {names} (or stages joined by '+')")
        if "cam" in self.methods and layer not in (None, "features", names[-1]):
            raise LocalizeError(f"method 'cam' needs the last stage {names[-1]!r}; got --layer {layer}")
        self.variables = jax.tree.map(jnp.asarray, variables)
        channels = self.channels
        cam_model = model if channels == 3 else GrayAsRGB(model, channels)
        target = abnormal_class(model.num_classes)
        side = float(self.size)
        gradient_methods = tuple(m for m in self.methods if m not in ("score_cam", "occlusion"))
        self.gradient_methods = gradient_methods
        self.baseline = None  # {method: (h, w) raw map} subtracted before post-processing (set_baseline)
        chunk = score_cam_chunk or max(1, 128 // self.batch_size)

        def inputs(raw):
            x = prepare_images(raw, normalization, channels)
            return x if channels == 3 else jnp.repeat(x[..., :1], 3, axis=-1)

        def with_boxes(maps, geom):
            # One peak rule (`boxes.plateau_peak`) for the box and the pointing game, on the
            # input-frame map; boxes slide inside the image content, never into letterbox padding.
            pk = boxlib.peak_boxes(maps, input_side=side, bounds=content_bounds(geom))
            tb = boxlib.threshold_boxes(maps, fraction=box_fraction, k=1)
            return {"maps": maps, "peak": pk.boxes, "peak_xy": boxlib.peak_point(maps), "threshold": tb.boxes[:, 0],
                    "threshold_valid": tb.valid[:, 0]}

        def gradient_step(variables, raw, geom, baseline):
            x3 = inputs(raw)
            targets = jnp.full((raw.shape[0],), target, jnp.int32)

            def maps_of(x):
                if fused:
                    return camlib.fused_maps(cam_model, variables, x, targets, fused, methods=gradient_methods)
                return camlib.cam_maps(cam_model, variables, x, targets, layer, methods=gradient_methods,
                                       baseline=baseline)
            # with map_flips, the mean over mirrored views (as PipelineConfig.map_flips)
            maps = camlib.flip_mean(maps_of, x3, map_flips, content_mask(geom))
            return {m: with_boxes(v, geom) for m, v in maps.items()}

        def raw_step(variables, raw):
            if fused:
                raise LocalizeError("--subtract-normal-mean works on one stage's raw map, not a fusion")
            x3 = inputs(raw)
            targets = jnp.full((raw.shape[0],), target, jnp.int32)
            return camlib.cam_maps(cam_model, variables, x3, targets, layer, methods=gradient_methods, raw=True)

        def occlusion_step(variables, raw, geom):
            x = prepare_images(raw, normalization, channels)
            targets = jnp.full((raw.shape[0],), target, jnp.int32)
            maps = camlib.occlusion(model, variables, x, targets)
            return with_boxes(maps * content_mask(geom), geom)

        def score_step(variables, raw, geom):
            x3 = inputs(raw)
            targets = jnp.full((raw.shape[0],), target, jnp.int32)
            maps = camlib.score_cam(cam_model, variables, x3, targets, layer, chunk_size=chunk,
                                    max_channels=score_cam_channels)
            return with_boxes(maps * content_mask(geom), geom)

        def predict(variables, raw):
            logits = model.apply(variables, prepare_images(raw, normalization, channels), train=False)
            return probabilities(logits.astype(jnp.float32))

        self._gradient = jax.jit(gradient_step) if gradient_methods else None
        self._raw = jax.jit(raw_step) if gradient_methods else None
        self._occlusion = jax.jit(occlusion_step) if "occlusion" in self.methods else None
        self._score = jax.jit(score_step)
        self._predict = jax.jit(predict)

    def prepare(self, images: Sequence[np.ndarray]):
        """Decoded (H0, W0) images -> (raw (B, S, S, 1) float32 in [0, 1], batched Geometry, per-image
        geometries), padded to the batch size."""
        b, s = self.batch_size, self.size
        raw = np.zeros((b, s, s, 1), np.float32)
        geoms = []
        for i, im in enumerate(images):
            raw[i], g = preprocess(im, s, self.mode, channels=1)
            geoms.append(g)
        pad = geo.Geometry(1.0, 1.0, 0.0, 0.0, 1.0, 1.0, input_h=s, input_w=s)
        return raw, geo.stack_geometries(geoms + [pad] * (b - len(images))), geoms

    def maps(self, raw, geom, score_cam: bool) -> dict:
        """{method: {"maps" (B, S, S), "peak" (B, 4), "threshold" (B, 4), "threshold_valid" (B,)}}, numpy,
        input frame. Score-CAM only when asked."""
        out = {}
        if self._gradient is not None:
            out.update(jax.tree.map(np.asarray, self._gradient(self.variables, raw, geom, self.baseline)))
        if self._occlusion is not None:
            out["occlusion"] = jax.tree.map(np.asarray, self._occlusion(self.variables, raw, geom))
        if score_cam and "score_cam" in self.methods:
            out["score_cam"] = jax.tree.map(np.asarray, self._score(self.variables, raw, geom))
        return out

    def set_baseline(self, images: Sequence[np.ndarray]) -> int:
        """Sets the baseline every gradient method's raw map is reduced by: the mean raw map (at the
        CAM stage's resolution) over `images` (decoded (H0, W0) normal images of the tuning split),
        i.e. the pattern the network puts on every image (where the frame is). Returns the count."""
        if self.map_flips != "none":
            raise LocalizeError("--subtract-normal-mean and --map-flips both remove the frame's pattern, from maps of "
                                "unflipped and flipped inputs: use one")
        if self._raw is None or not len(images):
            return 0
        sums = None
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            raw, _, _ = self.prepare(chunk)
            maps = jax.tree.map(np.asarray, self._raw(self.variables, raw))
            part = {m: v[:len(chunk)].sum(0) for m, v in maps.items()}
            sums = part if sums is None else {m: sums[m] + part[m] for m in sums}
        self.baseline = {m: (v / len(images)).astype(np.float32) for m, v in sums.items()}
        return len(images)

    def faithfulness(self, raw, maps) -> tuple[np.ndarray, np.ndarray]:
        """(deletion AUC (B,), insertion AUC (B,)) of input-frame maps, black baseline."""
        r = metrics.deletion_insertion_auc(lambda x: self._predict(self.variables, x), raw, maps,
                                           steps=self.faithfulness_steps, baseline=0.0)
        return np.asarray(r.deletion_auc), np.asarray(r.insertion_auc)


# ---------------------------------------------------------------------------------------------
# Running over a dataset split

def eligible_items(items, limit: int | None = None) -> tuple[list, dict]:
    """Abnormal items with a ground-truth mask (first `limit`), and counts of the rest."""
    keep = [it for it in items if it.label == 1 and it.mask_path]
    counts = {"items": len(items), "normal": sum(it.label == 0 for it in items),
              "unlabelled": sum(it.label is None for it in items),
              "abnormal_without_mask": sum(it.label == 1 and not it.mask_path for it in items),
              "eligible": len(keep)}
    if limit is not None:
        keep = keep[:limit]
    counts["selected"] = len(keep)
    return keep, counts


def measure_split(runner: CamRunner, items, *, score_cam_limit: int, faithfulness_limit: int,
                  tolerances: Sequence[float] = DEFAULT_TOLERANCES, unreadable: list | None = None,
                  split: str = "", progress: bool = False, workers: int | None = None) -> dict[str, list[ImageMeasures]]:
    """{method: [ImageMeasures]} over `items`; unreadable/skipped inputs appended to `unreadable` as
    {"path", "split", "reason"}. The per-image measurements (numpy, mostly outside the GIL) run on
    `workers` threads (default: the CPU count, at most 8); results keep the item order."""
    skipped = unreadable if unreadable is not None else []
    out: dict[str, list[ImageMeasures]] = {m: [] for m in runner.methods}
    pending: list = []
    done = {"images": 0, "score_cam": 0}
    t0 = time.time()
    pool = cf.ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1))

    def one(args):
        r, i, geom_i, image, mask, gt = args
        h0, w0 = image.shape
        orig = np.asarray(geo.map_to_original(r["maps"][i].astype(np.float64), geom_i, (h0, w0)), np.float64)
        peak = geo.clip_boxes(geo.boxes_to_original(r["peak"][i].astype(np.float64), geom_i), (h0, w0))
        thr = None
        if r["threshold_valid"][i]:
            thr = geo.clip_boxes(geo.boxes_to_original(r["threshold"][i].astype(np.float64), geom_i), (h0, w0))
        peak_xy = geo.points_to_original(r["peak_xy"][i].astype(np.float64), geom_i)
        return measure_image(orig, mask, gt, peak_box=peak, threshold_box=thr, peak_xy=peak_xy, tolerances=tolerances)

    def flush():
        raw, geom, geoms = runner.prepare([p[1] for p in pending])
        start = done["images"]
        want_score = "score_cam" in runner.methods and done["score_cam"] < score_cam_limit
        maps = runner.maps(raw, geom, want_score)
        n = len(pending)
        for method, r in maps.items():
            count = n if method != "score_cam" else min(n, score_cam_limit - done["score_cam"])
            first = start if method != "score_cam" else done["score_cam"]
            faith = None
            if first < faithfulness_limit:
                faith = runner.faithfulness(raw, r["maps"])
            jobs = [(r, i, geoms[i], pending[i][1], pending[i][2], pending[i][3]) for i in range(count)]
            for i, m in enumerate(pool.map(one, jobs)):
                if faith is not None and first + i < faithfulness_limit:
                    m.deletion, m.insertion = float(faith[0][i]), float(faith[1][i])
                out[method].append(m)
        done["images"] += n
        if want_score:
            done["score_cam"] += min(n, score_cam_limit - done["score_cam"])
        pending.clear()
        if progress:
            rate = done["images"] / max(time.time() - t0, 1e-9)
            print(f"\r{split}: {done['images']}/{len(items)} images  {rate:.1f} img/s", end="", file=sys.stderr, flush=True)

    try:
        for it in items:
            try:
                image = decode_image(it.path).image
                try:
                    mask = read_mask(it.mask_path, image.shape)
                except OSError as e:  # Pillow's messages do not name the file
                    raise OSError(f"cannot read mask {it.mask_path}: {e}") from e
                if not mask.any():
                    raise ValueError(f"ground-truth mask {it.mask_path} is empty")
                gt = np.zeros((0, 4))
                if it.gt_boxes:
                    gt = geo.clip_boxes(geo.validate_boxes(np.asarray(it.gt_boxes, np.float64).reshape(-1, 4), image.shape,
                                                           name=f"ground-truth boxes of {it.path}"), image.shape)
            except (OSError, ValueError) as e:  # missing/corrupt image or mask, size mismatch, bad boxes
                skipped.append({"path": it.path, "split": split, "reason": f"{type(e).__name__}: {e}"})
                continue
            pending.append((it, image, mask, gt))
            if len(pending) == runner.batch_size:
                flush()
        if pending:
            flush()
    finally:
        pool.shutdown()
    if progress:
        print(file=sys.stderr)
    return out


def resolve_methods(spec: str, layer: str | None, model=None) -> tuple[list[str], list[str]]:
    """'all' or a comma list -> (methods, notes). 'all' drops 'cam' when --layer is not the last stage."""
    notes = []
    if spec.strip() == "all":
        methods = list(LOCALIZE_METHODS)
        if model is not None and layer not in (None, "features", list(model.segments)[-1]):
            methods.remove("cam")
            notes.append(f"'cam' left out: it needs the last stage, --layer is {layer}")
        return methods, notes
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOCALIZE_METHODS]
    if unknown or not methods:
        raise LocalizeError(f"unknown method(s) {unknown or spec!r}: expected 'all' or a comma list of "
                            f"{list(LOCALIZE_METHODS)}")
    return list(dict.fromkeys(methods)), notes


def run(classifier_dir: str, dataset: str, tune_split: str, report_split: str, out_dir: str, *,
        methods: str = "all", layer: str | None = None, score_cam_limit: int = 32, faithfulness_limit: int = 32,
        limit: int | None = None, batch_size: int = 16, tolerances: Sequence[float] = DEFAULT_TOLERANCES,
        box_fraction: float = DEFAULT_BOX_FRACTION, score_cam_channels: int | None = None,
        faithfulness_steps: int = FAITHFULNESS_STEPS, progress: bool = True, truth: str = "lesion",
        subtract_normal_mean: bool = False, map_flips: str = "none") -> dict:
    """The whole run; writes OUT/localization.json and OUT/localization.md and returns the JSON dict.

    truth: "lesion" scores against each abnormality's own mask; "evidence" against its evidence
    mask (the pixels that change when the abnormality is removed; synthetic data only).
    subtract_normal_mean: every gradient method's raw map minus its mean over up to BASELINE_IMAGES
    normal images of the tune split (`CamRunner.set_baseline`).
    map_flips: gradient methods' maps as the mean over the input and its flips ("h", "hv";
    `mskjax.cam.flip_mean`, the pipeline's PipelineConfig.map_flips); occlusion and Score-CAM
    are not flipped."""
    if truth not in TRUTHS:
        raise LocalizeError(f"unknown truth {truth!r}: expected one of {list(TRUTHS)}")
    if tune_split == report_split:
        raise LocalizeError(f"--tune and --report must differ (thresholds are never chosen on the split reported); "
                            f"both are {tune_split!r}")
    kind, root, _ = parse_dataset(dataset)
    model, variables, meta = load_classifier(classifier_dir)
    method_list, notes = resolve_methods(methods, layer, model)
    runner = CamRunner(model, variables, meta, method_list, layer, batch_size, box_fraction,
                       score_cam_channels=score_cam_channels, faithfulness_steps=faithfulness_steps,
                       map_flips=map_flips)
    if map_flips != "none":
        notes.append(f"gradient methods' maps: the mean over the input and its flips ({map_flips}; "
                     "mskjax.cam.flip_mean); occlusion and score_cam unflipped")
    if "score_cam" in method_list:
        notes.append(f"score_cam scored on the first {score_cam_limit} images of each split only "
                     f"(--score-cam-limit); its n differs from the other methods'")
        if score_cam_channels is not None:
            notes.append(f"score_cam approximated: only the {score_cam_channels} channels of highest mean activation "
                         "per image are scored (--score-cam-channels; pytorch-grad-cam scores all)")
    t0 = time.time()
    unreadable: list[dict] = []
    counts, per_split, descriptions = {}, {}, {}
    for role, split in (("tune", tune_split), ("report", report_split)):
        items, reader_skips, desc = items_from_dataset(f"{kind}:{root}:{split}")
        if role == "tune" and subtract_normal_mean:
            normals = []
            for it in items:
                if it.label == 0 and len(normals) < BASELINE_IMAGES:
                    try:
                        normals.append(decode_image(it.path).image)
                    except (OSError, ValueError):
                        continue  # an unreadable normal image is simply not averaged
            used = runner.set_baseline(normals)
            notes.append(f"gradient methods' raw maps minus their mean over {used} normal images of split {split!r}")
        if truth == "evidence":
            if not any(it.evidence_path for it in items):
                raise LocalizeError(f"--truth evidence: split {split!r} of {kind} at {root} has no evidence masks "
                                    "(only the synthetic world writes them: evidence/ beside masks/)")
            items = [dataclasses.replace(it, mask_path=it.evidence_path) for it in items]
        descriptions[role] = desc
        unreadable += [{"path": w, "split": split, "reason": r} for w, r in reader_skips]
        if not items:
            raise LocalizeError(f"split {split!r} of {kind} at {root} has no images")
        chosen, c = eligible_items(items, limit)
        if not chosen:
            notes.append(f"split {split!r} has no abnormal image with a ground-truth mask: nothing to score")
        before = len(unreadable)
        per_split[role] = measure_split(runner, chosen, score_cam_limit=score_cam_limit,
                                        faithfulness_limit=faithfulness_limit, tolerances=tolerances,
                                        unreadable=unreadable, split=split, progress=progress)
        c["reader_skips"] = len(reader_skips)
        c["unreadable"] = len(unreadable) - before + len(reader_skips)
        c["scored"] = max((len(v) for m, v in per_split[role].items() if m != "score_cam"),
                          default=len(per_split[role].get("score_cam", [])))
        counts[role] = c
    thresholds = {m: choose_thresholds(per_split["tune"][m]) for m in method_list}
    results = {role: {m: score_split(per_split[role][m], thresholds[m], tolerances) for m in method_list}
               for role in ("tune", "report")}
    report = {
        "dataset": f"{kind} at {root}", "tune_split": tune_split, "report_split": report_split,
        "inputs": descriptions,
        "classifier": {"directory": str(classifier_dir), "arch": meta.get("arch"), "input_size": runner.size,
                       "mode": runner.mode, "in_channels": runner.channels, "num_classes": meta.get("num_classes"),
                       "target": "abnormal logit"},
        "methods": method_list, "layer": layer or "last stage", "truth": truth,
        "subtract_normal_mean": subtract_normal_mean, "map_flips": map_flips,
        "settings": {
            "frame": "CAM at model-input size, carried to the original image frame (crop padding, bilinear) and "
                     "min-max normalised per image; map metrics vs ground truth there; boxes made on the "
                     "input-frame map as the pipeline does, moved to the original frame and scored there",
            "pointing_tolerances_px": [float(t) for t in tolerances],
            "pxap_thresholds": len(PXAP_THRESHOLDS), "dice_thresholds": DICE_THRESHOLDS,
            "box_thresholds": BOX_THRESHOLDS, "iou_deltas": list(IOU_DELTAS),
            "peak_box": f"{50 * runner.size / 224:g} px square at the input's {runner.size} px (50 px at 224), "
                        "centred on the CAM peak (boxes.plateau_peak), slid inside the image content",
            "pointing_peak": "boxes.peak_point of the input-frame map, carried to the original frame",
            "threshold_box": f"top component of CAM >= {box_fraction} x max by CAM mass",
            "score_cam_limit": score_cam_limit, "score_cam_channels": score_cam_channels or "all",
            "faithfulness_limit": faithfulness_limit, "faithfulness_steps": faithfulness_steps, "limit": limit, "batch_size": batch_size},
        "thresholds_from_tune": {m: t.as_json() for m, t in thresholds.items()},
        "counts": counts, "results": results, "notes": notes, "unreadable": unreadable,
        "seconds": round(time.time() - t0, 2),
    }
    report = _clean(report)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "localization.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "localization.md").write_text(markdown_report(report))
    why = plots.unavailable()
    if why:
        print(f"plots skipped: {why}", file=sys.stderr)
    else:
        for m in method_list:
            plots.plot_localization_curves(curve_data(per_split["report"][m]), out / "plots" / f"{m}.png",
                                           title=f"{m} on {report_split} ({truth} masks)",
                                           chosen=thresholds[m].box)
    return report


# ---------------------------------------------------------------------------------------------
# CLI

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mskjax.localize", description=" ".join(__doc__.split("\n\n")[0].split()),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", required=True, help="classifier checkpoint directory (e.g. WORKDIR/best)")
    ap.add_argument("--dataset", required=True, metavar="KIND:DIR", help="synthetic:DIR | fracatlas:DIR | mura:DIR")
    ap.add_argument("--tune", required=True, metavar="SPLIT", help="split the thresholds are chosen on")
    ap.add_argument("--report", required=True, metavar="SPLIT", help="split reported with the tune thresholds")
    ap.add_argument("--out", required=True)
    ap.add_argument("--methods", default="all", help="'all' or a comma list of mskjax.cam.METHODS")
    ap.add_argument("--layer", default=None, help="stage for the CAMs (default: the last feature map); stages joined "
                    "by '+' (layer3+layer4) fuse their maps (mskjax.cam.fused_maps)")
    ap.add_argument("--score-cam-limit", type=int, default=32, help="Score-CAM on the first N images per split")
    ap.add_argument("--faithfulness-limit", type=int, default=32,
                    help="deletion/insertion AUC on the first N images per split (0: none)")
    ap.add_argument("--score-cam-channels", type=int, default=None,
                    help="score only the N most active channels per image (an approximation; default all)")
    ap.add_argument("--faithfulness-steps", type=int, default=FAITHFULNESS_STEPS,
                    help="deletion/insertion steps (forward passes per curve - 1)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N eligible images per split")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--pointing-tolerance", default="0,15", help="comma list of tolerances in original pixels")
    ap.add_argument("--box-fraction", type=float, default=DEFAULT_BOX_FRACTION,
                    help="threshold box: components of CAM >= fraction x max")
    ap.add_argument("--truth", default="lesion", choices=TRUTHS,
                    help="lesion (default): each abnormality's own mask; evidence: the pixels that change when it is "
                         "removed (synthetic data only)")
    ap.add_argument("--subtract-normal-mean", action="store_true",
                    help="subtract from each gradient method's raw map its mean over normal images of the tune split")
    ap.add_argument("--map-flips", choices=list(camlib.FLIPS), default="none",
                    help="gradient methods' maps as the mean over the input and its flips (h: left-right; hv: also "
                         "up-down and both), each flipped back, as segment --map-flips")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    compile_cache.enable()  # the per-user compilation cache (mskjax.compile_cache)
    positive = ("batch", "limit", "score_cam_channels", "faithfulness_steps")
    for name in positive + ("score_cam_limit", "faithfulness_limit"):
        v = getattr(a, name)
        if v is not None and v < (1 if name in positive else 0):
            ap.error(f"--{name.replace('_', '-')} must be >= {1 if name in positive else 0}")
    try:
        tolerances = tuple(float(t) for t in a.pointing_tolerance.split(",") if t.strip())
    except ValueError:
        ap.error(f"--pointing-tolerance must be comma-separated numbers; got {a.pointing_tolerance!r}")
    if not tolerances or any(t < 0 for t in tolerances):
        ap.error("--pointing-tolerance needs non-negative values")
    if not 0.0 < a.box_fraction <= 1.0:
        ap.error("--box-fraction must be in (0, 1]")
    try:
        report = run(a.classifier, a.dataset, a.tune, a.report, a.out, methods=a.methods, layer=a.layer,
                     score_cam_limit=a.score_cam_limit, faithfulness_limit=a.faithfulness_limit, limit=a.limit,
                     batch_size=a.batch, tolerances=tolerances, box_fraction=a.box_fraction,
                     score_cam_channels=a.score_cam_channels, faithfulness_steps=a.faithfulness_steps,
                     progress=not a.no_progress, truth=a.truth,
                     subtract_normal_mean=a.subtract_normal_mean, map_flips=a.map_flips)
    except (LocalizeError, InputError, CamError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(report["results"]["report"], report["report_split"], "Report"))
    print(markdown_table(report["results"]["tune"], report["tune_split"], "Tune (in-sample)"))
    for n in report["notes"]:
        print(f"note: {n}")
    print(f"{len(report['unreadable'])} unreadable or skipped; wrote {Path(a.out) / 'localization.json'} "
          f"and {Path(a.out) / 'localization.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
