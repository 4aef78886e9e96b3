"""Maps -> boxes: the report's peak box, thresholded connected components, Otsu's threshold.

All functions take maps of shape (B, H, W) (a single (H, W) map is accepted and the batch axis is
dropped again on return), are pure jax.numpy, and are jit-able with static shapes: the number of
boxes is fixed (`k`) and padded entries carry `valid = False`.

Boxes are (x0, y0, x1, y1) float32 in the **map's frame** (for a CAM drawn at model-input size,
the model-input frame; move them with `mskjax.geometry`), continuous pixels: pixel (row i, col j)
covers [j, j + 1) x [i, i + 1).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The report's box: 50 x 50 pixels on a 224 x 224 model input.
REPORT_BOX_SIDE = 50.0
REPORT_INPUT_SIDE = 224.0


class PeakBoxes(NamedTuple):
    """boxes (B, 4) float32; peaks (B, 2) float32 (x, y) pixel centre of the maximum; scores (B,)
    the map's maximum."""

    boxes: jax.Array
    peaks: jax.Array
    scores: jax.Array


class ThresholdBoxes(NamedTuple):
    """boxes (B, K, 4) float32 (zeros where invalid); scores (B, K) float32 (0 where invalid);
    valid (B, K) bool. Sorted by score, best first."""

    boxes: jax.Array
    scores: jax.Array
    valid: jax.Array


def _batched(maps):
    maps = jnp.asarray(maps)
    if maps.ndim == 2:
        return maps[None], True
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, H, W) or (H, W); got shape {maps.shape}")
    return maps, False


def _unbatch(tree, single: bool):
    return jax.tree.map(lambda x: x[0], tree) if single else tree


def argmax_2d(maps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(row, col) int32 of each map's maximum, maps (B, H, W).

    Ties go to the first maximum in row-major order (smallest row, then smallest column), as
    `jnp.argmax` on the flattened map returns the first occurrence. NaN counts as the maximum.
    """
    b, h, w = maps.shape
    flat = jnp.argmax(maps.reshape(b, h * w), axis=-1).astype(jnp.int32)
    return flat // w, flat % w


@functools.partial(jax.jit, static_argnames=("box_side", "input_side", "border"))
def peak_boxes(maps, box_side: float | None = None, input_side: float | None = None,
               border: str = "clip") -> PeakBoxes:
    """The report's localisation: a square box centred on the map's maximum.

    Args:
      maps: (B, H, W) float, in the model-input frame (or any frame; boxes come back in it).
      box_side: side of the box in map pixels. Default: 50 * input_side / 224, the report's 50 x 50
        box at a 224 px model input, scaled to other sizes.
      input_side: side of the model input the map is drawn at; default the map's longer side
        max(H, W). Only used to derive the default box_side.
      border: "clip" (default) cuts a box that sticks out of the image at the border, so boxes near
        an edge are smaller than box_side; "shift" slides it inside to keep its full size (still
        clipped when box_side exceeds the image).

    The centre is the maximum pixel's centre (col + 0.5, row + 0.5); ties go to the first maximum
    in row-major order (see `argmax_2d`).

    Returns:
      PeakBoxes(boxes (B, 4), peaks (B, 2) as (x, y), scores (B,)).
    """
    if border not in ("clip", "shift"):
        raise ValueError(f"border must be 'clip' or 'shift'; got {border!r}")
    maps, single = _batched(maps)
    b, h, w = maps.shape
    if input_side is None:
        input_side = max(h, w)
    if box_side is None:
        box_side = REPORT_BOX_SIDE * float(input_side) / REPORT_INPUT_SIDE
    if not box_side > 0:
        raise ValueError(f"box_side must be positive; got {box_side}")
    row, col = argmax_2d(maps)
    cx = col.astype(jnp.float32) + 0.5
    cy = row.astype(jnp.float32) + 0.5
    half = jnp.float32(box_side) / 2
    x0, x1, y0, y1 = cx - half, cx + half, cy - half, cy + half
    if border == "shift":
        # Move the box inside first (right/bottom overshoot, then left/top), then clip.
        dx = jnp.minimum(0.0, w - x1)
        dy = jnp.minimum(0.0, h - y1)
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        dx = jnp.maximum(0.0, -x0)
        dy = jnp.maximum(0.0, -y0)
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    boxes = jnp.stack([jnp.clip(x0, 0, w), jnp.clip(y0, 0, h),
                       jnp.clip(x1, 0, w), jnp.clip(y1, 0, h)], axis=-1)
    scores = maps.reshape(b, h * w)[jnp.arange(b), row * w + col]
    out = PeakBoxes(boxes.astype(jnp.float32), jnp.stack([cx, cy], -1), scores)
    return _unbatch(out, single)


@jax.jit
def connected_components(mask) -> jax.Array:
    """8-connected component labels of boolean masks (B, H, W) -> int32 (B, H, W).

    Each foreground pixel gets the flat row-major index (row * W + col) of its component's first
    pixel; background pixels get -1. Runs under jit with static shapes: label propagation in a
    `lax.while_loop` (each foreground pixel takes the minimum label in its 3x3 neighbourhood, then
    pointer jumping label <- label[label] twice to shorten long chains) until nothing changes.
    Equivalent to `scipy.ndimage.label(mask, structure=np.ones((3, 3)))` up to renumbering.
    """
    mask, single = _batched(jnp.asarray(mask, bool))
    b, h, w = mask.shape
    n = h * w
    big = np.int32(n)  # larger than any label; background value during propagation
    init = jnp.where(mask, jnp.arange(n, dtype=jnp.int32).reshape(h, w), big)

    def step(labels):
        nb = jax.lax.reduce_window(labels, big, jax.lax.min, (1, 3, 3), (1, 1, 1), "SAME")
        labels = jnp.where(mask, nb, big)
        flat = labels.reshape(b, n)
        for _ in range(2):  # pointer jumping: follow each label to its own label
            jumped = jnp.take_along_axis(flat, jnp.minimum(flat, n - 1), axis=1)
            flat = jnp.where(flat < n, jumped, big)
        return flat.reshape(b, h, w)

    def cond(state):
        return state[1]

    def body(state):
        labels, _ = state
        new = step(labels)
        return new, jnp.any(new != labels)

    labels, _ = jax.lax.while_loop(cond, body, (init, jnp.bool_(True)))
    labels = jnp.where(mask, labels, -1)
    return labels[0] if single else labels


@functools.partial(jax.jit, static_argnames=("score",))
def component_boxes(labels, values=None, score: str = "sum"):
    """Bounding box and score of every component of `connected_components` labels.

    Args:
      labels: (B, H, W) int32 from `connected_components`.
      values: (B, H, W) map to score components with (default: ones, i.e. area).
      score: "sum" (the map's mass inside the component) or "max" (its peak value).

    Returns:
      boxes (B, H*W, 4) float32, scores (B, H*W), valid (B, H*W) bool, indexed by the component's
      label (its first pixel's flat index); entries that are no component's label are invalid.
    """
    if score not in ("sum", "max"):
        raise ValueError(f"score must be 'sum' or 'max'; got {score!r}")
    labels, single = _batched(labels)
    b, h, w = labels.shape
    n = h * w
    if values is None:
        values = jnp.ones(labels.shape, jnp.float32)
    values = jnp.asarray(values).reshape(b, n)
    flat = labels.reshape(b, n)
    seg = jnp.where(flat >= 0, flat, n)  # background -> id n, dropped by num_segments=n
    idx = jnp.arange(n, dtype=jnp.int32)
    cols, rows = idx % w, idx // w

    def one(seg_i, values_i):
        x0 = jax.ops.segment_min(cols, seg_i, num_segments=n)
        x1 = jax.ops.segment_max(cols, seg_i, num_segments=n) + 1
        y0 = jax.ops.segment_min(rows, seg_i, num_segments=n)
        y1 = jax.ops.segment_max(rows, seg_i, num_segments=n) + 1
        if score == "sum":
            s = jax.ops.segment_sum(values_i, seg_i, num_segments=n)
        else:
            s = jax.ops.segment_max(values_i, seg_i, num_segments=n)
        return jnp.stack([x0, y0, x1, y1], -1), s

    boxes, scores = jax.vmap(one)(seg, values)
    valid = flat == idx[None]  # a label is the index of its component's first pixel
    boxes = jnp.where(valid[..., None], boxes, 0).astype(jnp.float32)
    scores = jnp.where(valid, scores, 0)
    out = (boxes, scores, valid)
    return _unbatch(out, single)


@functools.partial(jax.jit, static_argnames=("bins",))
def otsu_threshold(maps, bins: int = 256) -> jax.Array:
    """Otsu's threshold of each map (B, H, W) -> (B,), jit-able.

    Histogram of `bins` equal bins over [min, max] of the map (the last bin closed, as
    np.histogram); the threshold is the centre of the bin that ends the lower class when the
    between-class variance w0 * w1 * (mu0 - mu1)^2 is largest (first such bin on ties) — the same
    rule as scikit-image's `threshold_otsu`. Foreground is then `map > threshold`. A constant map
    returns its value (so nothing is foreground).
    """
    maps, single = _batched(maps)
    b = maps.shape[0]
    x = maps.reshape(b, -1).astype(jnp.float32)
    lo = jnp.min(x, axis=1, keepdims=True)
    hi = jnp.max(x, axis=1, keepdims=True)
    span = hi - lo
    safe = jnp.where(span > 0, span, 1.0)
    idx = jnp.clip(jnp.floor((x - lo) / safe * bins), 0, bins - 1).astype(jnp.int32)
    hist = jax.vmap(lambda i: jnp.bincount(i, length=bins))(idx).astype(jnp.float32)
    centers = lo + (jnp.arange(bins, dtype=jnp.float32) + 0.5) * span / bins  # (B, bins)
    w0 = jnp.cumsum(hist, axis=1)
    w1 = jnp.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
    m0 = jnp.cumsum(hist * centers, axis=1) / jnp.maximum(w0, 1e-12)
    m1 = (jnp.cumsum((hist * centers)[:, ::-1], axis=1) / jnp.maximum(w1[:, ::-1], 1e-12))[:, ::-1]
    between = w0[:, :-1] * w1[:, 1:] * (m0[:, :-1] - m1[:, 1:]) ** 2
    best = jnp.argmax(between, axis=1)
    thr = jnp.take_along_axis(centers, best[:, None], axis=1)[:, 0]
    thr = jnp.where(span[:, 0] > 0, thr, lo[:, 0])
    return thr[0] if single else thr


@functools.partial(jax.jit, static_argnames=("method", "k", "score"))
def threshold_boxes(maps, fraction: float = 0.5, method: str = "fraction", k: int = 4,
                    score: str = "sum") -> ThresholdBoxes:
    """Boxes around the connected components of a thresholded map, the best `k` of them.

    Args:
      maps: (B, H, W) float.
      fraction: with method="fraction", foreground is map >= fraction * max(map) (per map).
      method: "fraction" or "otsu" (foreground is map > otsu_threshold(map)).
      k: number of boxes returned per map (static); fewer components are padded with
        valid = False.
      score: how a component is ranked: "sum" (default: the map's mass in it) or "max".

    Components are 8-connected. Ties in score go to the component whose first pixel comes first
    in row-major order. A non-finite max makes nothing foreground.

    Returns:
      ThresholdBoxes(boxes (B, k, 4), scores (B, k), valid (B, k)) in the map's frame.
    """
    if method not in ("fraction", "otsu"):
        raise ValueError(f"method must be 'fraction' or 'otsu'; got {method!r}")
    maps, single = _batched(maps)
    b, h, w = maps.shape
    n = h * w
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and H*W={n}; got {k}")
    if method == "fraction":
        thr = fraction * jnp.max(maps, axis=(1, 2))
        fg = maps >= thr[:, None, None]
    else:
        fg = maps > otsu_threshold(maps)[:, None, None]
    labels = connected_components(fg)
    boxes, scores, valid = component_boxes(labels, maps, score=score)
    key = jnp.where(valid, -scores.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(key, axis=1, stable=True)[:, :k]
    out = ThresholdBoxes(jnp.take_along_axis(boxes, order[..., None], axis=1),
                         jnp.take_along_axis(scores, order, axis=1),
                         jnp.take_along_axis(valid, order, axis=1))
    return _unbatch(out, single)
