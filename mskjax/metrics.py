"""Measurements: classification (image and study level, with bootstrap CIs), localisation /
segmentation against masks and boxes, and faithfulness of saliency maps.

Conventions
-----------
* Labels are binary {0, 1}; 1 = abnormal. A probability p predicts abnormal when p >= threshold.
* Classification metrics are numpy float64 (exact, for reports); they accept optional
  non-negative `sample_weight`s (used by the study bootstrap) and agree with scikit-learn's
  weighted definitions.
* Localisation metrics on masks/maps work on numpy or JAX arrays of shape (..., H, W) / (B, H, W);
  maps and masks must be in the same frame (e.g. map_to_original first).
* Boxes are (x0, y0, x1, y1) continuous pixels (pixel i covers [i, i + 1)), so a box's area is
  (x1 - x0) * (y1 - y0) with no "+1".
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from mskjax.boxes import component_boxes, connected_components, plateau_peak_pixel

# --------------------------------------------------------------------------------------------
# Classification
# --------------------------------------------------------------------------------------------


def _binary_labels(labels, name="labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {y.shape}")
    if not np.isin(y, (0, 1)).all():
        bad = np.unique(y[~np.isin(y, (0, 1))])[:5]
        raise ValueError(f"{name} must be binary 0/1; found {bad.tolist()}")
    return y.astype(np.float64)


def _scores(scores, n, name="probs") -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like the labels; got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains non-finite values at {np.flatnonzero(~np.isfinite(s))[:5].tolist()}")
    return s


def _weights(sample_weight, n) -> np.ndarray:
    """(1, n) or (R, n) float64 weights; None -> ones."""
    if sample_weight is None:
        return np.ones((1, n))
    w = np.asarray(sample_weight, dtype=np.float64)
    w2 = w.reshape(-1, n) if w.ndim <= 2 and w.shape[-1] == n else None
    if w2 is None or (w2 < 0).any():
        raise ValueError(f"sample_weight must be non-negative of shape ({n},) or (R, {n}); got {w.shape}")
    return w2


def _confusion(y, pred, w):
    """Weighted (tn, fp, fn, tp), each (R,), for weights w (R, n)."""
    tp = w @ (y * pred)
    fp = w @ ((1 - y) * pred)
    fn = w @ (y * (1 - pred))
    tn = w @ ((1 - y) * (1 - pred))
    return tn, fp, fn, tp


def _div(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def _kappa_from_confusion(tn, fp, fn, tp):
    n = tn + fp + fn + tp
    po = _div(tp + tn, n)
    # chance agreement: P(true=1)P(pred=1) + P(true=0)P(pred=0)
    pe = _div((tp + fn) * (tp + fp) + (tn + fp) * (tn + fn), n * n)
    return _div(po - pe, 1 - pe)


def _auroc_rows(y, s, w):
    """AUROC for each weight row w (R, n): P(s_pos > s_neg) + 0.5 P(s_pos == s_neg), nan when a
    class has zero weight. Tied scores are one ROC point, as sklearn's roc_auc_score."""
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    y_sorted = y[order]
    ws = w[:, order]
    # group boundaries of tied scores (ascending)
    new_group = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.r_[starts[1:], len(s)] - 1
    neg = ws * (1 - y_sorted)
    cum_neg = np.cumsum(neg, axis=1)
    below = np.where(starts > 0, cum_neg[:, np.maximum(starts - 1, 0)], 0.0)  # (R, G)
    in_group = cum_neg[:, ends] - below
    credit = below + 0.5 * in_group  # negatives a positive in this group beats
    pos = ws * y_sorted
    num = np.sum(pos * credit[:, group], axis=1)
    return _div(num, pos.sum(1) * neg.sum(1))


def _single(x, sample_weight):
    x = np.asarray(x)
    return float(x[0]) if sample_weight is None or np.ndim(sample_weight) == 1 else x


def accuracy(labels, probs, threshold: float = 0.5, sample_weight=None):
    """Fraction of predictions (probs >= threshold) equal to the label (weighted if given)."""
    y = _binary_labels(labels)
    pred = (_scores(probs, len(y)) >= threshold).astype(np.float64)
    w = _weights(sample_weight, len(y))
    return _single(_div(w @ (pred == y), w.sum(1)), sample_weight)


def sensitivity(labels, probs, threshold: float = 0.5, sample_weight=None):
    """Recall of abnormal: TP / (TP + FN); nan when there are no positives."""
    y = _binary_labels(labels)
    pred = (_scores(probs, len(y)) >= threshold).astype(np.float64)
    tn, fp, fn, tp = _confusion(y, pred, _weights(sample_weight, len(y)))
    return _single(_div(tp, tp + fn), sample_weight)


def specificity(labels, probs, threshold: float = 0.5, sample_weight=None):
    """Recall of normal: TN / (TN + FP); nan when there are no negatives."""
    y = _binary_labels(labels)
    pred = (_scores(probs, len(y)) >= threshold).astype(np.float64)
    tn, fp, fn, tp = _confusion(y, pred, _weights(sample_weight, len(y)))
    return _single(_div(tn, tn + fp), sample_weight)


def cohen_kappa(labels, probs, threshold: float = 0.5, sample_weight=None):
    """Cohen's kappa between labels and predictions (probs >= threshold), as sklearn's
    cohen_kappa_score (unweighted categories): (p_o - p_e) / (1 - p_e); nan when p_e == 1."""
    y = _binary_labels(labels)
    pred = (_scores(probs, len(y)) >= threshold).astype(np.float64)
    return _single(_kappa_from_confusion(*_confusion(y, pred, _weights(sample_weight, len(y)))),
                   sample_weight)


def auroc(labels, scores, sample_weight=None):
    """Area under the ROC curve; ties handled as sklearn's roc_auc_score (mid-rank / trapezoid).

    Raises ValueError when only one class is present (AUROC is undefined).
    """
    y = _binary_labels(labels)
    s = _scores(scores, len(y), "scores")
    w = _weights(sample_weight, len(y))
    if not ((w @ y) > 0).all() or not ((w @ (1 - y)) > 0).all():
        raise ValueError("AUROC is undefined: only one class present in labels")
    return _single(_auroc_rows(y, s, w), sample_weight)


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, highest first, as scikit-learn's
    `roc_curve(..., drop_intermediate=False)`: a point (fpr, tpr) is "abnormal when score >=
    threshold"; the first point is (0, 0) at threshold inf. ValueError with one class only."""
    y = _binary_labels(labels)
    s = _scores(scores, len(y), "scores")
    n_pos, n_neg = y.sum(), (1 - y).sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError("the ROC curve is undefined: only one class present in labels")
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s_sorted) - 1]  # last index of each distinct score
    tps = np.cumsum(y_sorted)[last]
    fps = np.cumsum(1 - y_sorted)[last]
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos], np.r_[np.inf, s_sorted[last]]


def youden_threshold(labels, scores) -> float:
    """The operating point that maximises Youden's J = sensitivity + specificity - 1 over the
    thresholds `scores >= t`, t among the distinct scores; the highest such t on ties. For
    choosing a decision threshold on a tuning split (then applied, unchanged, to another). nan when
    `labels` has one class only."""
    y = _binary_labels(labels)
    if y.sum() == 0 or y.sum() == len(y):
        return float("nan")
    fpr, tpr, thr = roc_curve(y, scores)
    return float(thr[1:][int(np.argmax((tpr - fpr)[1:]))])


def average_precision(labels, scores, sample_weight=None) -> float:
    """Average precision, sklearn's definition: sum_n (R_n - R_{n-1}) P_n over the distinct score
    thresholds in decreasing order (no interpolation). Raises ValueError with no positives."""
    y = _binary_labels(labels)
    s = _scores(scores, len(y), "scores")
    w = _weights(sample_weight, len(y))[0]
    if not (w @ y) > 0:
        raise ValueError("average precision is undefined: no positive labels")
    return _average_precision_sorted(s, y, w)


def _average_precision_sorted(s, y, w) -> float:
    order = np.argsort(-s, kind="stable")
    s, y, w = s[order], y[order], w[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each distinct threshold
    tps = np.cumsum(w * y)[last]
    fps = np.cumsum(w * (1 - y))[last]
    precision = _div(tps, tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * np.nan_to_num(precision)))


def _plain(x):
    """numpy scalar -> Python value, for readable error messages."""
    return x.item() if isinstance(x, np.generic) else x


class StudyAggregate(NamedTuple):
    """Per-study values, studies in sorted id order.

    study_ids (S,); probs (S,) float64 mean image probability; labels (S,) int; n_images (S,);
    image_study (N,) index of each image's study in study_ids.
    """

    study_ids: np.ndarray
    probs: np.ndarray
    labels: np.ndarray
    n_images: np.ndarray
    image_study: np.ndarray


def study_aggregate(probs, study_ids, labels) -> StudyAggregate:
    """MURA protocol: a study's probability is the mean of its images' probabilities, and its
    label is the label its images share. Images of one study with different labels is an error
    (ValueError naming the study)."""
    ids = np.asarray(study_ids)
    y = _binary_labels(labels)
    p = _scores(probs, len(y))
    if ids.shape != y.shape:
        raise ValueError(f"study_ids shape {ids.shape} differs from labels shape {y.shape}")
    uniq, inv = np.unique(ids, return_inverse=True)
    n = np.bincount(inv, minlength=len(uniq))
    pos = np.bincount(inv, weights=y, minlength=len(uniq))
    mixed = (pos > 0) & (pos < n)
    if mixed.any():
        i = int(np.flatnonzero(mixed)[0])
        raise ValueError(f"study {_plain(uniq[i])!r} has images with different labels "
                         f"({int(pos[i])} abnormal of {int(n[i])}); the label belongs to the study")
    mean_p = np.bincount(inv, weights=p, minlength=len(uniq)) / n
    return StudyAggregate(uniq, mean_p, (pos > 0).astype(np.int64), n, inv)


def _group_per_study(values, agg: StudyAggregate, what: str):
    """One value per study from per-image values; error if a study's images disagree."""
    v = np.asarray(values)
    first = np.zeros(len(agg.study_ids), dtype=np.int64)
    first[agg.image_study[::-1]] = np.arange(len(v))[::-1]
    per_study = v[first]
    bad = per_study[agg.image_study] != v
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"study {_plain(agg.study_ids[agg.image_study[i]])!r} has images with "
                         f"different {what}: {_plain(per_study[agg.image_study[i]])!r} and "
                         f"{_plain(v[i])!r}")
    return per_study


def _metric_entry(value, draws, ci):
    draws = np.asarray(draws, dtype=np.float64)
    ok = np.isfinite(draws)
    lo = hi = float("nan")
    if ok.any():
        lo, hi = np.percentile(draws[ok], [100 * (1 - ci) / 2, 100 * (1 + ci) / 2])
    return {"value": float(value), "ci_low": float(lo), "ci_high": float(hi),
            "n_valid_bootstrap": int(ok.sum())}


def _group_report(p_img, y_img, study_of_img, p_st, y_st, threshold, n_boot, rng, ci):
    """Point estimates (weights of ones) and bootstrap draws (study counts as weights)."""
    s = len(p_st)
    counts = np.ones((1, s))
    if n_boot > 0:
        draws = rng.integers(0, s, size=(n_boot, s))
        boot = np.zeros((n_boot, s))
        np.add.at(boot, (np.arange(n_boot)[:, None], draws), 1.0)
        counts = np.concatenate([counts, boot], axis=0)
    w_img = counts[:, study_of_img]
    pred_img = (p_img >= threshold).astype(np.float64)
    pred_st = (p_st >= threshold).astype(np.float64)
    tn, fp, fn, tp = _confusion(y_st, pred_st, counts)
    values = {
        "image": {
            "accuracy": _div(w_img @ (pred_img == y_img), w_img.sum(1)),
            "auroc": _auroc_rows(y_img, p_img, w_img),
        },
        "study": {
            "accuracy": _div(tp + tn, tp + tn + fp + fn),
            "sensitivity": _div(tp, tp + fn),
            "specificity": _div(tn, tn + fp),
            "kappa": _kappa_from_confusion(tn, fp, fn, tp),
            "auroc": _auroc_rows(y_st, p_st, counts),
        },
    }
    out = {"n_images": int(len(p_img)), "n_studies": int(s),
           "n_abnormal_studies": int(y_st.sum())}
    for level, metrics in values.items():
        out[level] = {name: _metric_entry(v[0], v[1:], ci) for name, v in metrics.items()}
    return out


def classification_report(probs, labels, study_ids, body_parts=None, threshold: float = 0.5,
                          n_bootstrap: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Image- and study-level classification metrics, overall and per body part, with bootstrap CIs.

    Args:
      probs: (N,) image probabilities of abnormal.
      labels: (N,) image labels 0/1 (each study's images must agree).
      study_ids: (N,) study identifiers (any hashable numpy-sortable values, e.g. study paths).
      body_parts: optional (N,) body part per image (e.g. "XR_WRIST"); each study has one.
      threshold: abnormal when probability >= threshold (images and study means alike).
      n_bootstrap: number of bootstrap resamples (0 disables CIs).
      seed: seeds numpy's default_rng; the same seed gives the same CIs.
      ci: coverage of the percentile interval (0.95 -> 2.5th and 97.5th percentiles).

    Bootstrap: resample *studies* with replacement (the unit of the MURA protocol) within each
    group (overall, or one body part); an image's weight is its study's draw count, so image- and
    study-level metrics come from the same resamples. Resamples where a metric is undefined (one
    class for AUROC/sensitivity/specificity) are left out of its interval; `n_valid_bootstrap`
    says how many remained.

    Returns:
      {"threshold", "youden_threshold" (study level, overall: the threshold to carry from a tuning
      split to another), "bootstrap": {"n", "seed", "ci"}, "overall": G, "by_body_part": {part: G}},
      G = {"n_images", "n_studies", "n_abnormal_studies",
           "image": {"accuracy", "auroc"},
           "study": {"accuracy", "sensitivity", "specificity", "kappa", "auroc"}},
      each metric {"value", "ci_low", "ci_high", "n_valid_bootstrap"}; undefined values are nan.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1); got {ci}")
    agg = study_aggregate(probs, study_ids, labels)
    y_img = _binary_labels(labels)
    p_img = _scores(probs, len(y_img))
    y_st = agg.labels.astype(np.float64)
    groups = {"overall": np.ones(len(agg.study_ids), bool)}
    parts = None
    if body_parts is not None:
        bp = np.asarray(body_parts)
        if bp.shape != y_img.shape:
            raise ValueError(f"body_parts shape {bp.shape} differs from labels shape {y_img.shape}")
        parts = _group_per_study(bp, agg, "body parts")
        for part in np.unique(parts):
            groups[str(part)] = parts == part
    report = {"threshold": float(threshold),
              "youden_threshold": youden_threshold(y_st, agg.probs),
              "bootstrap": {"n": int(n_bootstrap), "seed": int(seed), "ci": float(ci)},
              "by_body_part": {}}
    for g, (name, keep) in enumerate(groups.items()):
        rng = np.random.default_rng([int(seed), g])
        st_idx = np.flatnonzero(keep)
        remap = -np.ones(len(keep), np.int64)
        remap[st_idx] = np.arange(len(st_idx))
        img_keep = keep[agg.image_study]
        r = _group_report(p_img[img_keep], y_img[img_keep], remap[agg.image_study[img_keep]],
                          agg.probs[st_idx], y_st[st_idx], threshold, int(n_bootstrap), rng, ci)
        if name == "overall":
            report["overall"] = r
        else:
            report["by_body_part"][name] = r
    return report


def auroc_by_type(probs, labels, study_ids, types) -> dict:
    """AUROC of each abnormality type against the normal cases, at image and study level.

    types: (N,) per image, an iterable of the abnormality types it shows (e.g. a record's
    box_types; empty for normal images). An abnormal study belongs to every type any of its images
    shows. For type T, the positives are the abnormal images (studies) showing T and the negatives
    all normal images (studies); abnormal cases of other types are left out. Study probabilities
    are the mean of the study's images (the MURA protocol), as in classification_report.

    Returns {T: {"n_images", "image_auroc", "n_studies", "study_auroc"}} for the types present,
    sorted; n_* count T's abnormal cases; an AUROC is nan where there are no normal cases.
    """
    agg = study_aggregate(probs, study_ids, labels)
    y_img = _binary_labels(labels)
    p_img = _scores(probs, len(y_img))
    types = [frozenset(t) for t in types]
    if len(types) != len(y_img):
        raise ValueError(f"types has {len(types)} entries for {len(y_img)} images")
    study_types = [set() for _ in agg.study_ids]
    for i, t in enumerate(types):
        study_types[agg.image_study[i]] |= t

    def score(y, p):
        return auroc(y, p) if 0 < y.sum() < len(y) else float("nan")

    out = {}
    for name in sorted(set().union(*types)):
        img = np.array([y == 0 or name in t for y, t in zip(y_img, types)], bool)
        st = np.array([y == 0 or name in t for y, t in zip(agg.labels, study_types)], bool)
        out[str(name)] = {"n_images": int(y_img[img].sum()), "image_auroc": score(y_img[img], p_img[img]),
                          "n_studies": int(agg.labels[st].sum()), "study_auroc": score(agg.labels[st], agg.probs[st])}
    return out


# --------------------------------------------------------------------------------------------
# Localisation and segmentation
# --------------------------------------------------------------------------------------------


def _xp(*xs):
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def dice(pred_mask, gt_mask, empty_value: float = 1.0):
    """Dice 2|A n B| / (|A| + |B|) per image over the last two axes: (..., H, W) -> (...).

    Masks are booleans (non-zero = inside). When both masks are empty the result is
    `empty_value` (default 1.0: correctly predicting nothing is a perfect match).
    """
    xp = _xp(pred_mask, gt_mask)
    a = xp.asarray(pred_mask).astype(bool)
    b = xp.asarray(gt_mask).astype(bool)
    inter = xp.sum(a & b, axis=(-2, -1)).astype(xp.float32 if xp is jnp else np.float64)
    total = xp.sum(a, axis=(-2, -1)) + xp.sum(b, axis=(-2, -1))
    return xp.where(total > 0, 2 * inter / xp.maximum(total, 1), empty_value)


def iou(pred_mask, gt_mask, empty_value: float = 1.0):
    """Intersection over union per image over the last two axes: (..., H, W) -> (...).

    Both empty -> `empty_value` (default 1.0), as for `dice`.
    """
    xp = _xp(pred_mask, gt_mask)
    a = xp.asarray(pred_mask).astype(bool)
    b = xp.asarray(gt_mask).astype(bool)
    inter = xp.sum(a & b, axis=(-2, -1)).astype(xp.float32 if xp is jnp else np.float64)
    union = xp.sum(a | b, axis=(-2, -1))
    return xp.where(union > 0, inter / xp.maximum(union, 1), empty_value)


def box_iou(a, b):
    """IoU of boxes (..., 4) with boxes (..., 4), elementwise with broadcasting -> (...).

    Areas are (x1 - x0) * (y1 - y0); a pair whose union has no area gets 0.
    """
    xp = _xp(a, b)
    a = xp.asarray(a)
    b = xp.asarray(b)
    iw = xp.maximum(0, xp.minimum(a[..., 2], b[..., 2]) - xp.maximum(a[..., 0], b[..., 0]))
    ih = xp.maximum(0, xp.minimum(a[..., 3], b[..., 3]) - xp.maximum(a[..., 1], b[..., 1]))
    inter = iw * ih
    area_a = xp.maximum(0, a[..., 2] - a[..., 0]) * xp.maximum(0, a[..., 3] - a[..., 1])
    area_b = xp.maximum(0, b[..., 2] - b[..., 0]) * xp.maximum(0, b[..., 3] - b[..., 1])
    union = area_a + area_b - inter
    return xp.where(union > 0, inter / xp.where(union > 0, union, 1), 0.0)


def pairwise_box_iou(a, b):
    """IoU of every box in a (..., N, 4) with every box in b (..., M, 4) -> (..., N, M)."""
    xp = _xp(a, b)
    return box_iou(xp.asarray(a)[..., :, None, :], xp.asarray(b)[..., None, :, :])


class PointingGame(NamedTuple):
    """hits (B,) bool; evaluable (B,) bool (the mask is non-empty). Accuracy is
    hits[evaluable].mean(); images with an empty mask are not counted."""

    hits: jax.Array
    evaluable: jax.Array


def pointing_game(maps, gt_masks, tolerance_px: float = 0.0) -> PointingGame:
    """Pointing game: is the map's maximum on the target?

    The peak is `mskjax.boxes.plateau_peak_pixel`: the pixel nearest the centroid of the plateau of
    the first maximum (so an upsampled CAM's plateau that reaches the border is not pinned to the
    border). A hit when the Euclidean distance from the peak pixel's centre to the nearest mask
    pixel's centre is <= tolerance_px; with 0 the peak must be a mask pixel. (Zhang et al.'s pointing game uses
    15 px, i.e. the mask dilated by a disc of that radius.)

    Args:
      maps: (B, H, W) float; gt_masks: (B, H, W) bool, same frame.
    """
    maps = jnp.asarray(maps)
    masks = jnp.asarray(gt_masks).astype(bool)
    if maps.shape != masks.shape or maps.ndim != 3:
        raise ValueError(f"maps and gt_masks must both be (B, H, W); got {maps.shape} and {masks.shape}")
    b, h, w = maps.shape
    row, col = plateau_peak_pixel(maps)
    rr = jnp.arange(h, dtype=jnp.float32)[:, None]
    cc = jnp.arange(w, dtype=jnp.float32)[None, :]
    d2 = (rr[None] - row[:, None, None]) ** 2 + (cc[None] - col[:, None, None]) ** 2
    d2 = jnp.where(masks, d2, jnp.inf)
    hits = jnp.min(d2, axis=(1, 2)) <= jnp.float32(tolerance_px) ** 2
    return PointingGame(hits, jnp.any(masks, axis=(1, 2)))


def pointing_hits_at(peak_xy, mask: np.ndarray, tolerances: Sequence[float]) -> np.ndarray:
    """(len(tolerances),) bool: is the peak within each tolerance of the mask? The peak (x, y) is a
    continuous point in the mask's frame (from `boxes.peak_point`, carried there by the
    geometry); its pixel (floor) is tested as `pointing_game` tests the peak pixel: centre
    to nearest mask-pixel centre <= tolerance (0: the peak pixel is a mask pixel)."""
    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    x, y = (float(v) for v in np.asarray(peak_xy, np.float64).reshape(2))
    rr, cc = np.nonzero(mask)
    if not len(rr) or not (np.isfinite(x) and np.isfinite(y)):
        return np.zeros(len(tolerances), bool)
    r = min(max(int(np.floor(y)), 0), h - 1)
    c = min(max(int(np.floor(x)), 0), w - 1)
    d2 = float(np.min((rr - r) ** 2 + (cc - c) ** 2))
    return np.array([d2 <= float(t) ** 2 for t in tolerances], bool)


def pointing_chance(gt_masks, tolerance_px: float = 0.0) -> np.ndarray:
    """(B,) float64: the pointing game's chance level per image: the hit rate of a peak drawn
    uniformly over the image, i.e. the fraction of pixels whose centre lies within tolerance_px of
    a mask pixel's centre (the mask dilated by a disc). Host-side (numpy/scipy); gt_masks (B, H, W)
    or (H, W) bool."""
    masks = np.asarray(gt_masks).astype(bool)
    single = masks.ndim == 2
    masks = masks[None] if single else masks
    out = np.zeros(len(masks), np.float64)
    for i, m in enumerate(masks):
        if not m.any():
            continue
        near = m if tolerance_px <= 0 else ndimage.distance_transform_edt(~m) <= tolerance_px
        out[i] = float(near.mean())
    return out[0] if single else out


def normalize_maps(maps):
    """Min-max normalise each map (B, H, W) to [0, 1]; constant or non-finite maps become zeros
    (wsolevaluation's normalize_scoremap convention)."""
    xp = _xp(maps)
    m = xp.asarray(maps).astype(xp.float32 if xp is jnp else np.float64)
    lo = xp.min(m, axis=(-2, -1), keepdims=True)
    hi = xp.max(m, axis=(-2, -1), keepdims=True)
    finite = xp.all(xp.isfinite(m), axis=(-2, -1), keepdims=True)
    ok = finite & (hi > lo)
    return xp.where(ok, (m - lo) / xp.where(ok, hi - lo, 1), 0.0)


def pxap(maps, gt_masks, thresholds=None, normalize: bool = True, valid=None) -> float:
    """Pixel average precision (wsolevaluation's PxAP), in [0, 1].

    All pixels of all (valid) images are pooled; a pixel is a positive when it is in the mask and
    its score is the (per-image min-max normalised, if `normalize`) map value.

    thresholds=None: exact AP over every distinct score (= sklearn's average_precision_score on
      the pooled pixels).
    thresholds=array: the binned AP of wsolevaluation: for t in decreasing order, a pixel is
      predicted positive when score >= t; AP = sum (R_t - R_prev) * P_t from R = 0, skipping
      thresholds with no predicted positive. wsolevaluation's own list is
      np.append(np.arange(0, 1, 0.001), [1.0]) (its extra 2.0 and 3.0 bins are always empty).

    Args:
      maps: (B, H, W) float; gt_masks: (B, H, W) bool; valid: optional (B,) images to include.
    Raises ValueError when no pooled pixel is positive.
    """
    m = np.asarray(normalize_maps(np.asarray(maps, np.float64)) if normalize else maps, np.float64)
    g = np.asarray(gt_masks).astype(bool)
    if m.shape != g.shape or m.ndim != 3:
        raise ValueError(f"maps and gt_masks must both be (B, H, W); got {m.shape} and {g.shape}")
    if valid is not None:
        keep = np.asarray(valid, bool)
        m, g = m[keep], g[keep]
    s = m.ravel()
    y = g.ravel().astype(np.float64)
    if not y.any():
        raise ValueError("PxAP is undefined: no positive pixel in the ground-truth masks")
    if thresholds is None:
        return _average_precision_sorted(s, y, np.ones_like(s))
    t = np.sort(np.asarray(thresholds, np.float64))[::-1]
    order = np.sort(s)
    # number of pixels with score >= t, for positives and for all
    pos_sorted = np.sort(s[y > 0])
    n_ge = len(order) - np.searchsorted(order, t, side="left")
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, t, side="left")
    recall = tp / len(pos_sorted)
    precision = _div(tp.astype(np.float64), n_ge.astype(np.float64))
    d_recall = np.diff(np.r_[0.0, recall])
    return float(np.sum(np.where(n_ge > 0, d_recall * np.nan_to_num(precision), 0.0)))


def dice_of_thresholded_map(maps, gt_masks, thresholds=0.5, normalize: bool = True):
    """Dice between (map >= t) and the mask, per image, for each threshold t.

    Args:
      maps: (B, H, W); gt_masks: (B, H, W) bool; thresholds: scalar or (T,) values applied to the
        (per-image min-max normalised, if `normalize`) map.
    Returns: (B,) for a scalar threshold, (T, B) for a sequence. Empty/empty gives 1.0 (see dice).
    """
    xp = _xp(maps, gt_masks)
    m = normalize_maps(maps) if normalize else xp.asarray(maps)
    t = xp.asarray(thresholds)
    pred = m[None] >= t.reshape(-1, 1, 1, 1)
    d = dice(pred, xp.asarray(gt_masks)[None])
    return d[0] if t.ndim == 0 else d


def best_box_iou_curve(maps, gt_boxes, gt_valid, thresholds):
    """(T, B) float32: for each CAM threshold t, the best IoU between any box of an 8-connected
    component of (maps > t) and any valid GT box (0 when there is none). jit-able.

    maps (B, H, W) (already normalised if wanted); gt_boxes (B, G, 4); gt_valid (B, G) bool;
    thresholds (T,). Keep these per batch to compute MaxBoxAccV2 over a whole dataset
    (hit = IoU >= delta; accuracy = mean over images with a GT box; max over t).
    """

    def at(thr):
        labels = connected_components(maps > thr)
        boxes, _, valid = component_boxes(labels)
        ious = pairwise_box_iou(boxes, gt_boxes)  # (B, HW, G)
        ious = jnp.where(valid[:, :, None] & gt_valid[:, None, :], ious, 0.0)
        return jnp.max(ious, axis=(1, 2))

    return jax.lax.map(at, thresholds)


_best_iou_jit = jax.jit(best_box_iou_curve)


# ---------------------------------------------------------------------------------------------
# The same box curves on the host (numpy): the jitted `best_box_iou_curve` above is exact but far
# too slow on CPU at radiograph size, so these do the same computation on row runs, one image at a time

def host_component_boxes(foreground: np.ndarray) -> np.ndarray:
    """(n, 4) float64 boxes (x0, y0, x1, y1) of the 8-connected components of a bool (H, W) mask,
    continuous pixels (a component spanning columns 3..5 has x0 = 3, x1 = 6); order unspecified.

    Works on horizontal runs: runs in adjacent rows touch (8-connectivity) when each starts at or
    before the other's exclusive end; run labels are merged by min-label propagation with pointer
    jumping until nothing changes. Same components as `mskjax.boxes.connected_components`.
    """
    fg = np.asarray(foreground, bool)
    if fg.ndim != 2:
        raise ValueError(f"foreground must be (H, W); got shape {fg.shape}")
    h, w = fg.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = fg
    d = np.diff(padded, axis=1)  # d[:, k] = fg[:, k] - fg[:, k - 1]
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive ends, paired with starts (row-major order)
    n = len(starts)
    if n == 0:
        return np.zeros((0, 4), np.float64)
    stride = w + 1
    start_key = rows * stride + starts
    end_key = rows * stride + ends
    nxt = (rows + 1) * stride
    lo = np.searchsorted(end_key, nxt + starts, side="left")   # next-row runs ending at/after my start
    hi = np.searchsorted(start_key, nxt + ends, side="right")  # ... and starting at/before my end
    counts = np.maximum(hi - lo, 0)
    src = np.repeat(np.arange(n), counts)
    dst = np.repeat(lo, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
    label = np.arange(n)
    while src.size:
        new = label.copy()
        np.minimum.at(new, src, label[dst])
        np.minimum.at(new, dst, label[src])
        for _ in range(2):
            new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    _, comp = np.unique(label, return_inverse=True)
    k = int(comp.max()) + 1
    x0 = np.full(k, w, np.int64)
    y0 = np.full(k, h, np.int64)
    x1 = np.zeros(k, np.int64)
    y1 = np.zeros(k, np.int64)
    np.minimum.at(x0, comp, starts)
    np.maximum.at(x1, comp, ends)
    np.minimum.at(y0, comp, rows)
    np.maximum.at(y1, comp, rows + 1)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float64)


def host_best_box_iou_curve(score_map: np.ndarray, gt_boxes: np.ndarray, thresholds=np.arange(0, 1, 0.01)) -> np.ndarray:
    """(T,) float64: for each CAM threshold t, the best IoU between a box around any 8-connected
    component of (score_map > t) and any ground-truth box (0 when no component). One image of
    `metrics.best_box_iou_curve` (same strict threshold, same continuous boxes)."""
    m = np.asarray(score_map)
    gt = np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    out = np.zeros(len(thresholds), np.float64)
    if not len(gt):
        return out
    top = m.max() if m.size else -np.inf
    for i, t in enumerate(np.asarray(thresholds, np.float64)):
        if not top > t:
            break  # nothing above t, nor above any larger t
        boxes = host_component_boxes(m > t)
        out[i] = float(np.max(pairwise_box_iou(boxes, gt))) if len(boxes) else 0.0
    return out


# ---------------------------------------------------------------------------------------------
# Per-image measurements (pure)


def max_box_acc_v2(maps, gt_boxes, gt_valid=None, thresholds=None,
                   iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7), normalize: bool = True) -> dict:
    """MaxBoxAccV2 (Choe et al., wsolevaluation), box accuracy at the best CAM threshold.

    Exactly what is computed: each map is min-max normalised (if `normalize`); for every CAM
    threshold t, foreground is map > t (strict, like cv2.THRESH_BINARY), and a box is taken around
    *every* 8-connected foreground component. An image is a hit at (t, delta) when the best IoU
    between any of its component boxes and any of its valid GT boxes is >= delta. BoxAcc(t, delta)
    = hits / images; the result for delta is max over t; MaxBoxAccV2 is the mean over the deltas.

    Differences from wsolevaluation, by design: no uint8 quantisation of the map; boxes use the
    continuous pixel convention (a component spanning columns 3..5 gives x0=3, x1=6), so IoU has no
    "+1" and no clipping of x1 to W-1; components come from 8-connected labelling, not
    cv2.findContours (whose RETR_TREE also returns hole outlines, which this does not).
    Images with no valid GT box are not counted.

    Args:
      maps: (B, H, W) float in the same frame as the boxes.
      gt_boxes: (B, G, 4) GT boxes (x0, y0, x1, y1); gt_valid: (B, G) bool (default all valid).
      thresholds: CAM thresholds, default np.arange(0, 1, 0.01) (wsolevaluation's box curve).
      iou_thresholds: IoU criteria delta.

    Returns:
      {"max_box_acc_v2": mean over deltas, "per_iou": {delta: {"accuracy", "threshold"}},
       "thresholds": (T,), "accuracy_curve": (len(deltas), T), "n_images": counted images}.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W); got {maps.shape}")
    gt_boxes = jnp.asarray(gt_boxes, jnp.float32)
    if gt_boxes.ndim != 3 or gt_boxes.shape[0] != maps.shape[0] or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must be (B, G, 4) with B={maps.shape[0]}; got {gt_boxes.shape}")
    gv = jnp.ones(gt_boxes.shape[:2], bool) if gt_valid is None else jnp.asarray(gt_valid, bool)
    t = np.arange(0, 1, 0.01) if thresholds is None else np.asarray(thresholds, np.float64)
    m = normalize_maps(maps) if normalize else maps
    best = np.asarray(_best_iou_jit(m, gt_boxes, gv, jnp.asarray(t, jnp.float32)))  # (T, B)
    counted = np.asarray(jnp.any(gv, axis=1))
    n = int(counted.sum())
    if n == 0:
        raise ValueError("MaxBoxAccV2 is undefined: no image has a valid GT box")
    curve = np.stack([(best[:, counted] >= d).sum(1) / n for d in iou_thresholds])
    per = {float(d): {"accuracy": float(curve[i].max()), "threshold": float(t[np.argmax(curve[i])])}
           for i, d in enumerate(iou_thresholds)}
    return {"max_box_acc_v2": float(np.mean([v["accuracy"] for v in per.values()])),
            "per_iou": per, "thresholds": t, "accuracy_curve": curve, "n_images": n}


# --------------------------------------------------------------------------------------------
# Faithfulness
# --------------------------------------------------------------------------------------------


class DeletionInsertion(NamedTuple):
    """deletion_auc, insertion_auc: (B,); deletion_curve, insertion_curve: (B, steps + 1)
    probabilities after removing / revealing the first k/steps of the pixels, k = 0..steps."""

    deletion_auc: jax.Array
    insertion_auc: jax.Array
    deletion_curve: jax.Array
    insertion_curve: jax.Array


@jax.jit
def _pixel_ranks(maps):
    b, h, w = maps.shape
    order = jnp.argsort(-maps.reshape(b, h * w), axis=1, stable=True)
    ranks = jnp.zeros_like(order).at[jnp.arange(b)[:, None], order].set(
        jnp.arange(h * w, dtype=order.dtype)[None])
    return ranks.reshape(b, h, w)


@jax.jit
def _blend(images, baseline, ranks, count, delete):
    first = (ranks < count)[..., None]  # the `count` most salient pixels
    show_image = jnp.where(delete, ~first, first)
    return jnp.where(show_image, images, baseline)


def deletion_insertion_auc(predict_fn: Callable, images, maps, steps: int = 20,
                           baseline=0.0) -> DeletionInsertion:
    """Deletion and insertion curves (Petsiuk et al., RISE) and their areas.

    Pixels are ordered by decreasing map value (ties: row-major order). Deletion replaces the
    first round-down(k * H * W / steps) pixels with `baseline`; insertion starts from the baseline
    and puts those pixels back; k = 0..steps. Each step is one call of `predict_fn` on a full
    batch (B, H, W, C) -> (B,) probabilities of the class explained, so shapes never change.
    AUC is the trapezoidal area over the fraction of pixels in [0, 1]. Lower deletion AUC and
    higher insertion AUC mean a more faithful map.

    Args:
      predict_fn: images (B, H, W, C) -> (B,) probability.
      images: (B, H, W, C); maps: (B, H, W) at image size, same frame.
      steps: number of steps (static); the curves have steps + 1 points.
      baseline: scalar or array broadcastable to images (RISE used zeros for deletion and a
        blurred image for insertion; pass such an image to use it for both).
    """
    images = jnp.asarray(images)
    maps = jnp.asarray(maps)
    if images.ndim != 4 or maps.shape != images.shape[:3]:
        raise ValueError(f"images must be (B, H, W, C) and maps (B, H, W) of the same size; "
                         f"got {images.shape} and {maps.shape}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}")
    b, h, w, _ = images.shape
    base = jnp.broadcast_to(jnp.asarray(baseline, images.dtype), images.shape)
    ranks = _pixel_ranks(maps)
    deletion, insertion = [], []
    for k in range(steps + 1):
        count = jnp.int32((k * h * w) // steps)
        deletion.append(jnp.asarray(predict_fn(_blend(images, base, ranks, count, True))))
        insertion.append(jnp.asarray(predict_fn(_blend(images, base, ranks, count, False))))
    dc = jnp.stack(deletion, axis=1).reshape(b, steps + 1)
    ic = jnp.stack(insertion, axis=1).reshape(b, steps + 1)

    def area(c):
        return jnp.mean((c[:, 1:] + c[:, :-1]) / 2, axis=1)

    return DeletionInsertion(area(dc), area(ic), dc, ic)
