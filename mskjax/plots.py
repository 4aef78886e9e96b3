"""Figures of a classifier's results: ROC curves with the operating point, training curves, a
reliability diagram. PNG files drawn with matplotlib, which is optional
(`pip install 'mskjax[plots]'`); the rest of the package does not need it.

Each function takes plain arrays, writes one PNG and returns the numbers it drew (the ROC's fpr /
tpr / thresholds and its AUROC, the bins of the reliability diagram, the curves' steps and values),
so that what a figure shows can be checked against the tables (`mskjax.metrics`).

Figures are drawn on `matplotlib.figure.Figure` objects (the Agg renderer, no pyplot state): safe
on a machine without a display and in threads.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from mskjax import metrics

try:  # optional: pip install 'mskjax[plots]'; without it the functions below raise ImportError
    from matplotlib.figure import Figure
    _MISSING = None
except ImportError as e:  # optional package
    Figure = None
    _MISSING = f"matplotlib is not installed ({e}); pip install 'mskjax[plots]'"


def unavailable() -> str | None:
    """None when plots can be drawn; else why not (matplotlib missing)."""
    return _MISSING


def _figure(*args, **kwargs):
    if Figure is None:
        raise ImportError(_MISSING)
    return Figure(*args, **kwargs)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# Numbers

def _labels_scores(labels, scores):
    """(labels, scores) as float64, checked as every metric checks them (`mskjax.metrics`)."""
    y = metrics._binary_labels(labels)
    return y, metrics._scores(scores, len(y), "scores")


roc_curve = metrics.roc_curve  # (fpr, tpr, thresholds) as scikit-learn's, drop_intermediate=False


def area(fpr, tpr) -> float:
    """The trapezoid area under (fpr, tpr): the AUROC (ties scored one half, as `metrics.auroc`)."""
    fpr, tpr = np.asarray(fpr, np.float64), np.asarray(tpr, np.float64)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def operating_point(labels, scores, threshold: float) -> dict:
    """Sensitivity (tpr) and 1 - specificity (fpr) of "abnormal when score >= threshold"."""
    y, s = _labels_scores(labels, scores)
    pred = s >= threshold
    pos, neg = y == 1, y == 0
    return {"threshold": float(threshold),
            "tpr": float(pred[pos].mean()) if pos.any() else float("nan"),
            "fpr": float(pred[neg].mean()) if neg.any() else float("nan")}


def reliability_bins(labels, probs, n_bins: int = 10) -> dict:
    """Calibration in equal-width bins of predicted probability: bin i holds [edges[i],
    edges[i + 1]) (the last one includes 1). Returns {"edges", "counts", "mean_predicted",
    "observed" (fraction abnormal; nan in an empty bin), "ece" (expected calibration error: the
    count-weighted mean |observed - mean_predicted|), "n"}."""
    y, p = _labels_scores(labels, probs)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    edges = np.arange(n_bins + 1) / n_bins  # i / n exactly: 0.3 is the first value of bin 3 of 10
    idx = np.clip(np.searchsorted(edges[1:-1], p, side="right"), 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(idx, weights=p, minlength=n_bins) / counts
        observed = np.bincount(idx, weights=y, minlength=n_bins) / counts
    filled = counts > 0
    ece = float(np.sum(counts[filled] * np.abs(observed[filled] - mean_p[filled])) / max(len(p), 1))
    return {"edges": edges, "counts": counts, "mean_predicted": mean_p, "observed": observed,
            "ece": ece, "n": int(len(p))}


def read_metrics_log(path) -> dict[str, dict[str, np.ndarray]]:
    """WORKDIR/metrics.jsonl (mskjax.train.loop) -> {name: {"step", "value"}}, steps increasing.
    A resumed run logs some steps again: the last line for a step wins."""
    series: dict[str, dict[int, float]] = {}
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = int(row.pop("step"))
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(k, {})[step] = float(v)
    return {k: {"step": np.array(sorted(d), np.int64), "value": np.array([d[s] for s in sorted(d)], np.float64)}
            for k, d in series.items()}


# ---------------------------------------------------------------------------------------------
# Figures

def plot_roc(curves: Mapping[str, tuple[Sequence, Sequence]], path, threshold: float | None = None,
             title: str = "ROC") -> dict:
    """ROC curves of {name: (labels, scores)} on one figure, each with its operating point at
    `threshold` marked (None: no mark). A group with one class only is listed, not drawn.

    Returns {name: {"fpr", "tpr", "thresholds", "auroc", "n", "n_positive", "operating_point"}}
    ({"n", "n_positive", "undefined": reason} for a group without a curve)."""
    fig = _figure(figsize=(6.4, 6.0))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.6")
    out = {}
    for i, (name, (labels, scores)) in enumerate(curves.items()):
        y, s = _labels_scores(labels, scores)
        entry = {"n": int(len(y)), "n_positive": int(y.sum())}
        try:
            fpr, tpr, thr = roc_curve(y, s)
        except ValueError as e:
            entry["undefined"] = str(e)
            out[name] = entry
            ax.plot([], [], ls="none", label=f"{name}: n={len(y)}, one class only")
            continue
        entry.update(fpr=fpr, tpr=tpr, thresholds=thr, auroc=area(fpr, tpr))
        color = f"C{i % 10}"
        lw = 2.2 if i == 0 else 1.3
        ax.plot(fpr, tpr, color=color, lw=lw, drawstyle="default",
                label=f"{name}: AUROC {entry['auroc']:.3f} (n={len(y)}, {int(y.sum())} abnormal)")
        if threshold is not None:
            op = operating_point(y, s, threshold)
            entry["operating_point"] = op
            ax.plot([op["fpr"]], [op["tpr"]], marker="o", ms=7 if i == 0 else 5, color=color,
                    markeredgecolor="black", ls="none")
        out[name] = entry
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    if threshold is not None:
        title += f"\n(dots: operating point, abnormal when p >= {threshold:.3g})"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return out


def plot_training_curves(metrics_file, path, title: str = "training",
                         best_step: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Training loss, and the validation metrics (valid/*: AUROC, kappa, Dice...) against the step,
    from a trainer's metrics.jsonl; `best_step` (the exported checkpoint's) marked by a vertical
    line. Returns the series drawn ({name: {"step", "value"}})."""
    series = read_metrics_log(metrics_file)
    fig = _figure(figsize=(11, 4.2))
    ax_loss, ax_valid = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    drawn = {}
    if "train/loss" in series:
        d = series["train/loss"]
        ax_loss.plot(d["step"], d["value"], lw=1, color="C0")
        drawn["train/loss"] = d
    else:
        ax_loss.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=ax_loss.transAxes)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(f"{title}: training loss", fontsize=10)
    ax_loss.grid(alpha=0.3)
    valid = sorted(k for k in series if k.startswith("valid/"))
    for i, k in enumerate(valid):
        d = series[k]
        ax_valid.plot(d["step"], d["value"], marker="o", ms=3, lw=1.2, color=f"C{i % 10}",
                      label=k[len("valid/"):])
        drawn[k] = d
    if best_step is not None and best_step >= 0:
        for a in (ax_loss, ax_valid):
            a.axvline(best_step, ls=":", color="0.3", lw=1, label=f"best checkpoint (step {best_step})")
    if valid:
        ax_valid.legend(fontsize=8)
    else:
        ax_valid.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=ax_valid.transAxes)
    ax_valid.set_xlabel("step")
    ax_valid.set_title(f"{title}: validation", fontsize=10)
    ax_valid.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)
    return drawn


def plot_reliability(labels, probs, path, n_bins: int = 10, title: str = "reliability") -> dict:
    """Reliability diagram: observed fraction abnormal against mean predicted probability in
    `n_bins` equal-width bins, and below it the number of predictions in each bin.
    Returns `reliability_bins`."""
    b = reliability_bins(labels, probs, n_bins)
    edges, counts = b["edges"], b["counts"]
    centers, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    filled = counts > 0
    fig = _figure(figsize=(6.0, 7.0))
    ax = fig.add_axes((0.13, 0.36, 0.82, 0.57))
    ax_n = fig.add_axes((0.13, 0.08, 0.82, 0.2), sharex=ax)
    ax.plot([0, 1], [0, 1], ls="--", lw=0.8, color="0.5", label="perfect calibration")
    ax.bar(centers[filled], b["observed"][filled], width=width[filled], edgecolor="black", color="C0", alpha=0.6,
           label="observed fraction abnormal")
    ax.plot(b["mean_predicted"][filled], b["observed"][filled], marker="o", color="C3", lw=1,
            label="(mean predicted, observed)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("observed fraction abnormal")
    ax.set_title(f"{title}\n{b['n']} predictions, ECE {b['ece']:.3f}", fontsize=10)
    ax.legend(loc="upper left", fontsize=7)
    ax.grid(alpha=0.3)
    ax_n.bar(centers, counts, width=width, edgecolor="black", color="0.6")
    for c, n in zip(centers[filled], counts[filled]):
        ax_n.text(c, n, str(int(n)), ha="center", va="bottom", fontsize=7)
    ax_n.set_ylim(0, counts.max() * 1.25 if counts.max() > 0 else 1)
    ax_n.set_xlabel("predicted probability of abnormal")
    ax_n.set_ylabel("count")
    _save(fig, path)
    return b


def plot_localization_curves(data: Mapping, path, title: str = "localization", chosen: Mapping | None = None) -> dict:
    """The curves behind MaxBoxAccV2 and PxAP (`mskjax.localize.curve_data`): box accuracy at IoU
    0.3 / 0.5 / 0.7 against the CAM threshold (the thresholds chosen on the tuning split marked,
    `chosen` {delta: threshold}), and the pixel precision-recall curve with its area (PxAP).
    Returns {"box_accuracy": {delta: array}, "pxap": float} as drawn."""
    fig = _figure(figsize=(11.0, 4.6))
    ax, ax_pr = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    t = np.asarray(data["box_thresholds"], np.float64)
    for i, (d, acc) in enumerate(sorted(data["box_accuracy"].items())):
        acc = np.asarray(acc, np.float64)
        ax.plot(t, acc, color=f"C{i}", label=f"IoU >= {d:g} (best {np.nanmax(acc) if np.isfinite(acc).any() else float('nan'):.3f})")
        c = (chosen or {}).get(d, (chosen or {}).get(str(d)))
        if c is not None:
            ax.plot([c], [acc[int(np.argmin(np.abs(t - c)))]], marker="o", color=f"C{i}", markeredgecolor="black")
    ax.set_xlabel("CAM threshold (fraction of the map's range)")
    ax.set_ylabel("share of images with a box at that IoU")
    ax.set_ylim(-0.01, 1.01)
    ax.set_title("box accuracy (MaxBoxAccV2's curves; dots: thresholds from tune)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    pr = data["pixel_pr"]
    recall, precision = np.asarray(pr["recall"], np.float64), np.asarray(pr["precision"], np.float64)
    pxap = float(np.sum(np.diff(np.r_[0.0, recall]) * precision)) if len(recall) else float("nan")
    ax_pr.plot(recall, precision, color="C3", drawstyle="steps-post", label=f"PxAP {pxap:.3f}")
    ax_pr.set_xlabel("pixel recall")
    ax_pr.set_ylabel("pixel precision")
    ax_pr.set_xlim(-0.01, 1.01)
    ax_pr.set_ylim(-0.01, 1.01)
    ax_pr.set_title("pixel precision-recall (PxAP)", fontsize=9)
    ax_pr.legend(fontsize=7)
    ax_pr.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    return {"box_accuracy": {d: np.asarray(a) for d, a in data["box_accuracy"].items()}, "pxap": pxap}


# ---------------------------------------------------------------------------------------------
# A split's figures

def classification_plots(directory, split: str, probs, labels, study_ids, body_parts=None,
                         threshold: float = 0.5) -> dict:
    """A split's figures from its images' probabilities, labels, studies and body parts (the
    arrays `metrics.classification_report` takes, so the curves' areas are the table's AUROCs):

      roc_{split}_image.png   image-level ROC, overall and per body part;
      roc_{split}_study.png   study-level ROC (a study's probability: its images' mean);
      reliability_{split}_image.png  image-level reliability diagram.

    Returns {"roc_image", "roc_study", "reliability_image", "files"} (each figure's numbers)."""
    directory = Path(directory)
    p = np.asarray(probs, np.float64)
    y = np.asarray(labels)
    agg = metrics.study_aggregate(p, study_ids, y)
    img = {"overall": (y, p)}
    st = {"overall": (agg.labels, agg.probs)}
    if body_parts is not None:
        bp = np.asarray(body_parts).astype(str)
        bp_st = np.empty(len(agg.study_ids), dtype=bp.dtype)
        bp_st[agg.image_study] = bp
        for part in np.unique(bp):
            img[part] = (y[bp == part], p[bp == part])
            st[part] = (agg.labels[bp_st == part], agg.probs[bp_st == part])
    files = [directory / f"roc_{split}_image.png", directory / f"roc_{split}_study.png",
             directory / f"reliability_{split}_image.png"]
    out = {"roc_image": plot_roc(img, files[0], threshold, f"{split}: image-level ROC"),
           "roc_study": plot_roc(st, files[1], threshold, f"{split}: study-level ROC (mean of a study's images)"),
           "reliability_image": plot_reliability(y, p, files[2], title=f"{split}: image-level reliability")}
    out["files"] = [str(f) for f in files]
    return out


def summary(plotted: dict) -> dict:
    """`classification_plots`' return without the per-point arrays, for a JSON file: each curve's
    AUROC, size and operating point, and the reliability bins."""
    def roc(d):
        return {k: {f: v[f] for f in ("auroc", "n", "n_positive", "operating_point", "undefined") if f in v}
                for k, v in d.items()}

    def plain(x):
        if isinstance(x, np.ndarray):
            return [None if isinstance(v, float) and math.isnan(v) else v for v in x.tolist()]
        return x

    out = {"roc_image": roc(plotted["roc_image"]), "roc_study": roc(plotted["roc_study"]),
           "reliability_image": {k: plain(v) for k, v in plotted["reliability_image"].items()},
           "files": plotted["files"]}
    return out
