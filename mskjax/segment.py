"""`python -m mskjax.segment`: the pipeline over images or a dataset, with figures and a report.

    python -m mskjax.segment --classifier runs/synthetic/best --sam runs/sam/best \
        (--images PATH... | --dataset mura:DIR[:SPLIT] | fracatlas:DIR[:SPLIT] | synthetic:DIR[:SPLIT]) \
        --out OUT [--cam grad_cam] [--boxes peak|threshold] [--threshold 0.5] [--batch 8] [--limit N]

Writes to OUT:
  overlays/NAME.png   the report's figure per image (gray radiograph, CAM heatmap, boxes, mask,
                      ground truth when known), rescaled for display (long side 512..1024 px)
  masks/NAME.png      the predicted mask at the image's original size (0/255; empty when the
                      image was judged normal)
  thumbs/NAME.png     thumbnails for index.html
  predictions.csv     one row per image: image- and study-level decisions, boxes (original
                      pixels), mask area, Dice/IoU against the ground truth where it exists
  metrics.json        classification (image and study level, per body part, bootstrap CIs),
                      localisation (pointing game, box IoU), segmentation (Dice/IoU with CAM
                      boxes and with ground-truth boxes), unreadable inputs, settings
  index.html          the same tables and every thumbnail (plain HTML)

--sam takes any SAM checkpoint (kind "sam"): a trained or converted SAM, or LiteMedSAM
(`python -m mskjax.convert --source litemedsam --out ckpt/lite_medsam`), which brings its own input
recipe (256 px, INTER_AREA, min-max).

Dataset splits default to the held-out one: synthetic "test", MURA "valid", FracAtlas "valid".
For --images, a file's study is its folder (MURA keeps a study's views in one folder) and there
are no labels, so only the decisions are reported. Unreadable files are listed and counted, never
fatal. Exit status: 0 done, 2 bad arguments or checkpoints.
"""
from __future__ import annotations

import argparse
import dataclasses
import html
import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from mskjax import checkpoint, compile_cache, metrics, plots, viz
from mskjax.cam import FLIPS, METHODS
from mskjax.inputs import InputError, items_from_dataset, items_from_paths
from mskjax.pipeline import BOX_METHODS, CHOICES, GATES, MAP_POINTS, MULTIMASK, Pipeline, PipelineConfig, PipelineError, Unreadable, default_cam, default_map_flips, describe, study_probabilities
from mskjax.weights.mapping import CheckpointMismatch

TRUTHS = ("lesion", "evidence")
POINTING_TOLERANCES = (0.0, 15.0)  # original pixels (Zhang et al.'s 15 px and the exact hit)

# ---------------------------------------------------------------------------------------------
# Measurements

def _mean_entry(values: list[float]) -> dict:
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()) if v.size else float("nan"), "n": int(v.size)}


def image_measures(r) -> dict:
    """Per-image localisation / segmentation numbers against whatever ground truth r has."""
    out: dict = {"mask_area": int(r.mask.sum()), "has_gt_mask": r.gt_mask is not None}
    gt = r.gt_mask
    if gt is not None and gt.any():
        hits = metrics.pointing_hits_at(r.peak, gt, POINTING_TOLERANCES)
        out["pointing_hit"], out["pointing_hit_15px"] = bool(hits[0]), bool(hits[1])
        out["pointing_chance"] = float(metrics.pointing_chance(gt, POINTING_TOLERANCES[0]))
        out["pointing_chance_15px"] = float(metrics.pointing_chance(gt, POINTING_TOLERANCES[1]))
        out["dice"] = float(metrics.dice(r.mask, gt))
        out["iou"] = float(metrics.iou(r.mask, gt))
        if r.gt_box_mask is not None:
            out["dice_gt_box"] = float(metrics.dice(r.gt_box_mask, gt))
            out["iou_gt_box"] = float(metrics.iou(r.gt_box_mask, gt))
    if r.item.gt_boxes:
        gtb = np.asarray(r.item.gt_boxes, np.float64).reshape(-1, 4)
        out["box_iou"] = float(np.max(metrics.pairwise_box_iou(r.boxes, gtb))) if len(r.boxes) else 0.0
    return out


def summarise(results, measures: list[dict], threshold: float, bootstrap: int) -> dict:
    """Classification (when every image has a label), localisation and segmentation summaries."""
    out: dict = {}
    labels = [r.item.label for r in results]
    if results and all(lab is not None for lab in labels):
        parts = [r.item.body_part or "all" for r in results]
        out["classification"] = metrics.classification_report(
            np.array([r.probability for r in results]), np.array(labels), np.array([r.item.study for r in results]),
            np.array(parts), threshold=threshold, n_bootstrap=bootstrap, seed=0)
    else:
        out["classification"] = None
        out["classification_note"] = "no labels for these inputs" if results else "no readable images"
    box_ious = [m["box_iou"] for m in measures if "box_iou" in m]

    def pointing(suffix: str, note: str) -> dict:
        hits = [m["pointing_hit" + suffix] for m in measures if "pointing_hit" + suffix in m]
        chance = [m["pointing_chance" + suffix] for m in measures if "pointing_chance" + suffix in m]
        return {"accuracy": float(np.mean(hits)) if hits else float("nan"), "hits": int(np.sum(hits)),
                "n": len(hits), "chance": float(np.mean(chance)) if chance else float("nan"), "note": note}

    out["localization"] = {
        "pointing_game": pointing("", "CAM peak (boxes.peak_point) inside the ground-truth mask (0 px); chance = "
                                      "mean mask area fraction"),
        "pointing_game_15px": pointing("_15px", "CAM peak within 15 px of the ground-truth mask; chance = mean "
                                                "fraction of the image within 15 px of the mask"),
        "box_iou": {**_mean_entry(box_ious),
                    "hit_rate_iou_0.5": float(np.mean(np.asarray(box_ious) >= 0.5)) if box_ious else float("nan"),
                    "note": "best IoU of the predicted boxes with the ground-truth boxes; 0 when none predicted"},
    }
    normals = [r for r in results if r.item.label == 0]
    out["segmentation"] = {
        "dice_cam_boxes": {**_mean_entry([m["dice"] for m in measures if "dice" in m]),
                           "note": "pipeline masks (empty when judged normal) vs ground-truth masks"},
        "iou_cam_boxes": _mean_entry([m["iou"] for m in measures if "iou" in m]),
        "dice_cam_boxes_detected": {**_mean_entry([m["dice"] for r, m in zip(results, measures)
                                                   if "dice" in m and r.predicted]),
                                    "note": "as dice_cam_boxes, only images judged abnormal"},
        "dice_gt_boxes": {**_mean_entry([m["dice_gt_box"] for m in measures if "dice_gt_box" in m]),
                          "note": "SAM prompted with the ground-truth boxes"},
        "iou_gt_boxes": _mean_entry([m["iou_gt_box"] for m in measures if "iou_gt_box" in m]),
        "normal_images_with_mask": {"count": int(sum(m["mask_area"] > 0 for r, m in zip(results, measures)
                                                     if r.item.label == 0)), "n": len(normals)},
    }
    return out


# ---------------------------------------------------------------------------------------------
# Writing

def output_name(index: int, path: str) -> str:
    """'0007_XR_HAND_patient00012_study1_positive_image2' — unique (index) and readable."""
    p = Path(path)
    parts = [*p.parent.parts[-3:], p.stem]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(parts)).strip("_")[-80:]
    return f"{index:04d}_{name}"


def _fmt_boxes(boxes: np.ndarray) -> str:
    return ";".join(" ".join(f"{v:.1f}" for v in b) for b in np.asarray(boxes).reshape(-1, 4))


def _progress(done: int, total: int, t0: float) -> None:
    width = 30
    frac = done / max(total, 1)
    rate = done / max(time.time() - t0, 1e-9)
    bar = "#" * int(width * frac) + "." * (width - int(width * frac))
    end = "\n" if done >= total else ""
    print(f"\r[{bar}] {done}/{total} images  {rate:.1f} img/s", end=end, file=sys.stderr, flush=True)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _clean(o):
    """nan/inf -> None, so metrics.json is strict JSON."""
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, (float, np.floating)) and not math.isfinite(float(o)):
        return None
    return o


def run(pipe, items, out_dir: str | os.PathLike, *, batch_size: int = 8, bootstrap: int = 200,
        reader_skips=(), description: str = "", progress: bool = True) -> dict:
    """Runs `pipe` over `items` and writes every output into out_dir; returns metrics.json's dict."""
    out = Path(out_dir)
    for sub in ("overlays", "masks", "thumbs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    unreadable: list = [Unreadable(w, r) for w, r in reader_skips]
    t0 = time.time()
    results, measures, names = [], [], []
    cb = (lambda d, t: _progress(d, t, t0)) if progress else None
    for r in pipe.run(items, batch_size=batch_size, unreadable=unreadable, progress=cb):
        name = output_name(len(results), r.item.path)
        m = image_measures(r)
        label = "abnormal" if r.predicted else "normal"
        if pipe.config.gate == "study":  # the decision that gave it masks is its study's
            label += " (its study's mean)"
        lines = [f"p(abnormal) = {r.probability:.3f}  ->  {label}"]
        if r.item.label is not None:
            lines[0] += f"   (truth: {'abnormal' if r.item.label else 'normal'})"
        extra = [f"{k.replace('_', ' ')} {m[k]:.2f}" for k in ("dice", "dice_gt_box", "box_iou") if k in m]
        if extra:
            lines.append("   ".join(extra))
        fig = viz.overlay(r.image, r.cam, r.boxes, r.mask if r.predicted else None, gt_mask=r.gt_mask,
                          gt_boxes=np.asarray(r.item.gt_boxes).reshape(-1, 4) if r.item.gt_boxes else None,
                          caption="\n".join(lines))
        viz.save_png(out / "overlays" / f"{name}.png", fig)
        viz.save_png(out / "thumbs" / f"{name}.png", viz.thumbnail(fig))
        viz.save_png(out / "masks" / f"{name}.png", r.mask)
        results.append(r)
        measures.append(m)
        names.append(name)
        # Keep memory flat over long runs: the summary needs only the numbers in `m`.
        r.image = r.cam = r.mask = r.gt_mask = r.gt_box_mask = None

    # Study-level decisions: mean of the study's image probabilities.
    thr = pipe.config.threshold
    study_p = study_probabilities([r.item.study for r in results], [r.probability for r in results])

    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "path", "study", "label", "probability", "predicted", "study_probability",
                    "study_predicted", "boxes", "box_scores", "mask_area", "dice", "iou", "dice_gt_box",
                    "iou_gt_box", "box_iou", "pointing_hit", "pointing_hit_15px", "peak_x", "peak_y"])
        for name, r, m in zip(names, results, measures):
            sp = study_p[r.item.study]
            w.writerow([name, r.item.path, r.item.study, "" if r.item.label is None else r.item.label,
                        f"{r.probability:.6f}", int(r.predicted), f"{sp:.6f}", int(sp >= thr), _fmt_boxes(r.boxes),
                        " ".join(f"{s:.4f}" for s in r.box_scores), m["mask_area"],
                        *(("" if k not in m else f"{m[k]:.6f}") for k in ("dice", "iou", "dice_gt_box", "iou_gt_box",
                                                                            "box_iou")),
                        *("" if k not in m else int(m[k]) for k in ("pointing_hit", "pointing_hit_15px")),
                        *(("", "") if r.peak is None else (f"{r.peak[0]:.2f}", f"{r.peak[1]:.2f}"))])

    summary = summarise(results, measures, thr, bootstrap)
    report = {
        "inputs": description, "settings": describe(pipe),
        "counts": {"inputs": len(items), "processed": len(results), "unreadable": len(unreadable),
                   "predicted_abnormal_images": int(sum(r.predicted for r in results)),
                   "studies": len(study_p), "predicted_abnormal_studies": int(sum(p >= thr for p in study_p.values()))},
        **summary,
        "unreadable": [{"path": u.path, "reason": u.reason} for u in unreadable],
        "seconds": round(time.time() - t0, 2),
    }
    (out / "metrics.json").write_text(json.dumps(_clean(report), indent=2, default=_json_default) + "\n")
    _write_html(out, report, results, measures, names, study_p, thr)
    return report


def _write_html(out: Path, report: dict, results, measures, names, study_p, thr) -> None:
    sections = []
    c = report["counts"]
    sections.append(("Run", viz.html_table(["", "value"], [
        ("inputs", report["inputs"] or "files"), ("images given", c["inputs"]), ("processed", c["processed"]),
        ("unreadable / skipped", c["unreadable"]), ("judged abnormal (images)", c["predicted_abnormal_images"]),
        ("studies", c["studies"]), ("judged abnormal (studies)", c["predicted_abnormal_studies"]),
        ("threshold", thr), ("CAM", report["settings"]["pipeline"]["cam"]),
        ("boxes", report["settings"]["pipeline"]["boxes"])])))
    cls = report.get("classification")
    if cls:
        rows = []
        for group, g in [("overall", cls["overall"])] + sorted(cls["by_body_part"].items()):
            for level in ("image", "study"):
                for name, e in g[level].items():
                    rows.append((group, level, name, e["value"], e["ci_low"], e["ci_high"]))
        sections.append(("Classification (95% bootstrap CIs over studies)",
                         viz.html_table(["group", "level", "metric", "value", "CI low", "CI high"], rows)))
        # The figures of the same arrays as the table (summarise): ROC curves and calibration.
        why = plots.unavailable()
        if why:
            figures = f"<p class='note'>plots skipped: {html.escape(why)}</p>"
        else:
            drawn = plots.classification_plots(
                out / "plots", "images", np.array([r.probability for r in results]),
                np.array([r.item.label for r in results]), np.array([r.item.study for r in results]),
                np.array([r.item.body_part or "all" for r in results]), threshold=thr)
            figures = viz.html_figures([(Path(f).relative_to(out).as_posix(), cap) for f, cap in zip(drawn["files"], (
                "image-level ROC, overall and per body part (dot: the threshold)",
                "study-level ROC (a study's probability: its images' mean)",
                "image-level reliability diagram"))])
        sections.append(("Classification plots", figures))
    else:
        sections.append(("Classification", f"<p class='note'>{report.get('classification_note', '')}</p>"))
    loc, seg = report["localization"], report["segmentation"]
    sections.append(("Localisation", viz.html_table(["metric", "value", "n", "note"], [
        ("pointing game (0 px)", loc["pointing_game"]["accuracy"], loc["pointing_game"]["n"], loc["pointing_game"]["note"]),
        ("pointing game chance (0 px)", loc["pointing_game"]["chance"], loc["pointing_game"]["n"], ""),
        ("pointing game (15 px)", loc["pointing_game_15px"]["accuracy"], loc["pointing_game_15px"]["n"],
         loc["pointing_game_15px"]["note"]),
        ("pointing game chance (15 px)", loc["pointing_game_15px"]["chance"], loc["pointing_game_15px"]["n"], ""),
        ("box IoU (mean best)", loc["box_iou"]["mean"], loc["box_iou"]["n"], loc["box_iou"]["note"]),
        ("box hit rate (IoU >= 0.5)", loc["box_iou"]["hit_rate_iou_0.5"], loc["box_iou"]["n"], "")])))
    sections.append(("Segmentation", viz.html_table(["metric", "mean", "n", "note"], [
        ("Dice, CAM boxes", seg["dice_cam_boxes"]["mean"], seg["dice_cam_boxes"]["n"], seg["dice_cam_boxes"]["note"]),
        ("IoU, CAM boxes", seg["iou_cam_boxes"]["mean"], seg["iou_cam_boxes"]["n"], ""),
        ("Dice, CAM boxes (judged abnormal)", seg["dice_cam_boxes_detected"]["mean"], seg["dice_cam_boxes_detected"]["n"],
         seg["dice_cam_boxes_detected"]["note"]),
        ("Dice, ground-truth boxes", seg["dice_gt_boxes"]["mean"], seg["dice_gt_boxes"]["n"], seg["dice_gt_boxes"]["note"]),
        ("IoU, ground-truth boxes", seg["iou_gt_boxes"]["mean"], seg["iou_gt_boxes"]["n"], ""),
        ("normal images given a mask", f"{seg['normal_images_with_mask']['count']} of {seg['normal_images_with_mask']['n']}",
         seg["normal_images_with_mask"]["n"], "a count, not a mean")])))
    if report["unreadable"]:
        sections.append((f"Unreadable or skipped inputs ({len(report['unreadable'])})",
                         viz.html_table(["path", "reason"], [(u["path"], u["reason"]) for u in report["unreadable"]])))
    cards = []
    order, key = gallery_order(results, measures)
    sections.append(("Gallery", f"<p class='note'>Images below sorted by {key}.</p>"))
    for i in order:
        name, r, m = names[i], results[i], measures[i]
        lines = [f"p = {r.probability:.3f} ({'abnormal' if r.predicted else 'normal'})",
                 f"study p = {study_p[r.item.study]:.3f}"]
        if r.item.label is not None:
            lines.append(f"truth: {'abnormal' if r.item.label else 'normal'}")
        if "dice" in m:
            lines.append(f"Dice {m['dice']:.2f}" + (f", GT-box Dice {m['dice_gt_box']:.2f}" if "dice_gt_box" in m else ""))
        cards.append({"thumb": f"thumbs/{name}.png", "link": f"overlays/{name}.png", "title": r.item.path,
                      "lines": lines, "abnormal": r.predicted})
    has_gt = any(m["has_gt_mask"] for m in measures)
    viz.write_report(out / "index.html", "mskjax segmentation report", sections, cards,
                     legend=viz.legend_items(True, has_gt),
                     subtitle=f"classifier {report['settings']['classifier'].get('arch')} -> "
                              f"{report['settings']['pipeline']['cam']} -> {report['settings']['pipeline']['boxes']} boxes -> "
                              f"SAM {report['settings']['sam'].get('arch')}")


def gallery_order(results, measures) -> tuple[list[int], str]:
    """The report's gallery order: by Dice of the pipeline's mask, lowest first (the failures to look
    at; images without a ground-truth mask after, by probability), when any image has a ground-truth
    mask; otherwise by probability of abnormal, highest first. Ties keep the input order.
    Returns (indices, what the order is)."""
    if any("dice" in m for m in measures):
        order = sorted(range(len(results)), key=lambda i: (0, measures[i]["dice"]) if "dice" in measures[i]
                       else (1, -results[i].probability))
        return order, "Dice of the pipeline's mask against the ground truth, lowest first (then the rest by probability)"
    return sorted(range(len(results)), key=lambda i: -results[i].probability), "probability of abnormal, highest first"


# ---------------------------------------------------------------------------------------------
# CLI

def parse_scales(text: str) -> tuple[float, ...]:
    """'1,0.5,0.33' -> (1.0, 0.5, 0.33); InputError naming the option when it is not a number list."""
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--choice-scales {text!r}: expected a comma list of numbers in (0, 1]") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mskjax.segment", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", required=True, help="classifier checkpoint directory (e.g. WORKDIR/best)")
    ap.add_argument("--sam", required=True, help="SAM checkpoint directory (kind 'sam': SAM or LiteMedSAM)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="PATH", help="image files or folders")
    src.add_argument("--dataset", metavar="KIND:DIR[:SPLIT]", help="mura:DIR | fracatlas:DIR | synthetic:DIR")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--cam", default=None, choices=list(METHODS),
                    help="CAM method (default: the map the classifier was trained to localize with, from its "
                         "checkpoint's 'localization' metadata; else grad_cam)")
    ap.add_argument("--cam-layer", default=None, help="stage for the CAM (default: as --cam, else the last feature "
                    "map); stages joined by '+' (layer2+layer3) fuse their maps")
    ap.add_argument("--boxes", default="peak", choices=list(BOX_METHODS))
    ap.add_argument("--max-boxes", type=int, default=3, help="boxes per image with --boxes threshold")
    ap.add_argument("--box-side", type=float, default=None,
                    help="--boxes peak: the square's side in classifier-input pixels (default: the report's "
                         "50 px at 224, scaled to the input size)")
    ap.add_argument("--box-fraction", type=float, default=0.5,
                    help="--boxes threshold: components of the map >= this fraction of its maximum (default 0.5)")
    ap.add_argument("--subtract-baseline", action="store_true",
                    help="subtract the classifier checkpoint's stored normal-mean map (mskjax.train "
                         "eval.subtract_normal_mean) from the map before its peak is taken")
    ap.add_argument("--no-peak-point", dest="peak_point", action="store_false",
                    help="with a SAM trained with peak points (configs/sam_synthetic_map_points.py), leave the "
                         "map's peak out of its prompt (a padding point instead)")
    ap.add_argument("--multimask", choices=list(MULTIMASK), default="single",
                    help="SAM's single-mask output (default), or its three masks and the one with the highest "
                         "predicted IoU (best_iou) or the highest mean map inside it (map; not with --mirror-average)")
    ap.add_argument("--box-margin", type=float, default=0.0,
                    help="grow every box SAM is prompted with by this many original pixels per side, clipped to the "
                         "image (default 0; 4 suits configs/litemedsam_fracatlas.py's decoder, chosen on its tuning split)")
    ap.add_argument("--refine", type=int, default=0,
                    help="extra SAM passes, each prompted with the tight box of the previous pass's mask (default 0)")
    ap.add_argument("--choose", choices=list(CHOICES), default="first",
                    help="'deletion': also prompt SAM with sub-boxes of the map's box and keep the mask whose removal "
                         "lowers the classifier's probability most (less an area penalty); --boxes peak only. With "
                         "--peaks > 1, which peak's mask: union (all), iou (SAM's predicted IoU), confidence (SAM's "
                         "mean probability inside its mask), map (the map's mean inside the mask)")
    ap.add_argument("--peaks", type=int, default=1,
                    help="prompt SAM at the map's N highest peaks, each at least --peak-separation from the others "
                         "(--boxes peak; N > 1 needs a --choose among peaks)")
    ap.add_argument("--peak-separation", type=float, default=0.1875,
                    help="with --peaks > 1: least distance between peaks, a fraction of the classifier's input side "
                         "(default 0.1875: 24 px at 128)")
    ap.add_argument("--choice-scales", default="1,0.5,0.33",
                    help="with --choose deletion: sub-box sides as fractions of the map's box, comma list")
    ap.add_argument("--choice-area-penalty", type=float, default=1.0,
                    help="with --choose deletion: subtracted times the mask's share of the classifier input")
    ap.add_argument("--map-mask-prompt", type=float, default=0.0, metavar="T",
                    help="for a SAM trained with box mask prompts: the map box's mask prompt keeps only the cells "
                         "where the map is >= T times its maximum (0: off)")
    ap.add_argument("--no-map-prompt", dest="map_prompt", action="store_false",
                    help="for a SAM trained on the classifier's maps (data.map_prompts): give the map's box the plain "
                         "box mask instead of the map inside it")
    ap.add_argument("--map-flips", choices=list(FLIPS), default=None,
                    help="the map as the mean of the classifier's maps of the image and its flips (h: left-right; hv: "
                         "left-right, up-down and both), each flipped back: cancels a map's position-dependent pattern "
                         "(default: without --cam, the flips the classifier's training run localized with; else none)")
    ap.add_argument("--mirror-average", action="store_true",
                    help="SAM also segments each image mirrored left-right (input and prompts), and the two views' "
                         "logits are averaged (test-time augmentation; twice SAM's encoder work; no --refine)")
    ap.add_argument("--probability-flips", choices=list(FLIPS), default="none",
                    help="the probability as the mean of the classifier's probabilities of the image and its flips "
                         "(h: left-right; hv: left-right, up-down and both; chosen apart from --map-flips; "
                         "test-time augmentation, one forward pass per view)")
    ap.add_argument("--map-points", choices=list(MAP_POINTS), default="none",
                    help="point prompts from the map beside its box, for a SAM trained without points of its own: "
                         "the peak as a positive point, --negative-points negatives where the map is lowest inside "
                         "the box, or both (--boxes peak)")
    ap.add_argument("--negative-points", type=int, default=2, help="negatives per box with --map-points (1..25)")
    ap.add_argument("--threshold", type=float, default=0.5, help="abnormal when probability >= threshold")
    ap.add_argument("--gate", choices=list(GATES), default="image",
                    help="which images get masks: those whose own probability >= --threshold (image), or every image "
                         "of a study whose mean probability >= --threshold (study: MURA labels studies)")
    ap.add_argument("--embedding-cache", default=None, metavar="DIR",
                    help="read SAM's image embeddings from DIR and write the missing ones (mskjax.embedding_cache; "
                         "the trainer's train.embedding_cache_dir), so a second run skips the image encoder")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None, help="only the first N inputs")
    ap.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for CIs (0: none)")
    ap.add_argument("--truth", default="lesion", choices=TRUTHS,
                    help="ground truth to score against: lesion (default) masks, or evidence masks (the pixels that "
                         "change when the abnormality is removed; synthetic data only)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    compile_cache.enable()  # the per-user compilation cache (mskjax.compile_cache)
    if args.batch < 1:
        ap.error("--batch must be >= 1")
    if args.limit is not None and args.limit < 1:
        ap.error("--limit must be >= 1")
    try:
        if args.images:
            (items, skips), desc = items_from_paths(args.images), ""
        else:
            items, skips, desc = items_from_dataset(args.dataset)
            if args.truth == "evidence":
                if not any(it.evidence_path for it in items):
                    raise InputError(f"--truth evidence: {args.dataset} has no evidence masks (only the synthetic "
                                     "world writes them)")
                items = [dataclasses.replace(it, mask_path=it.evidence_path) for it in items]
                desc += ", scored against evidence masks"
        if args.limit is not None:
            items = items[:args.limit]
        if not items:
            raise InputError("no input images found" + "".join(f"\n  {w}: {r}" for w, r in skips))
        # A missing or broken classifier directory is reported by the pipeline's loader below.
        meta = checkpoint.read_metadata(args.classifier) if args.cam is None and Path(args.classifier).is_dir() else {}
        cam, cam_layer = default_cam(meta, args.cam, args.cam_layer)
        map_flips = default_map_flips(meta, args.cam, args.map_flips)
        config = PipelineConfig(cam=cam, cam_layer=cam_layer, boxes=args.boxes, threshold=args.threshold,
                                max_boxes=args.max_boxes, box_fraction=args.box_fraction,
                                box_side=args.box_side, refine=args.refine,
                                subtract_baseline=args.subtract_baseline, peak_point=args.peak_point,
                                multimask=args.multimask, box_margin=args.box_margin, choose=args.choose,
                                peaks=args.peaks, peak_separation=args.peak_separation,
                                gate=args.gate,
                                choice_scales=parse_scales(args.choice_scales),
                                choice_area_penalty=args.choice_area_penalty,
                                map_mask_prompt=args.map_mask_prompt, map_prompt=args.map_prompt,
                                map_flips=map_flips, mirror_average=args.mirror_average,
                                probability_flips=args.probability_flips, map_points=args.map_points,
                                negative_points=args.negative_points)
        pipe = Pipeline.from_directories(args.classifier, args.sam, config, embedding_cache=args.embedding_cache)
    except (InputError, PipelineError, CheckpointMismatch, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = run(pipe, items, args.out, batch_size=args.batch, bootstrap=args.bootstrap, reader_skips=skips,
                 description=desc, progress=not args.no_progress)
    c = report["counts"]
    print(f"{c['processed']} images ({c['unreadable']} unreadable or skipped), "
          f"{c['predicted_abnormal_images']} judged abnormal; report: {Path(args.out) / 'index.html'}")
    cls = report.get("classification")
    if cls:
        s = cls["overall"]["study"]
        print(f"study AUROC {s['auroc']['value']:.4f}  kappa {s['kappa']['value']:.4f}")
    if pipe.embeddings is not None:
        print(f"SAM embeddings: {pipe.embeddings.hits} read from {pipe.embeddings.folder}, "
              f"{pipe.embeddings.misses} computed and written")
    seg, loc = report["segmentation"], report["localization"]
    pg, pg15 = loc["pointing_game"], loc["pointing_game_15px"]
    print(f"pointing game {pg['accuracy']:.4f} (chance {pg['chance']:.4f}) / 15 px {pg15['accuracy']:.4f} "
          f"(chance {pg15['chance']:.4f}) (n={pg['n']})  "
          f"Dice GT boxes {seg['dice_gt_boxes']['mean']:.4f} (n={seg['dice_gt_boxes']['n']})  "
          f"Dice CAM boxes {seg['dice_cam_boxes']['mean']:.4f} (n={seg['dice_cam_boxes']['n']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
