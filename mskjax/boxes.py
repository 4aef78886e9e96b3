"""Maps -> peaks and boxes: the report's peak box, thresholded connected components, Otsu's threshold.

Peaks. One rule everywhere (`plateau_peak`): the centroid of the plateau of maximum values that
contains the first maximum, NaN ignored — never the first maximum pixel itself, which on the
plateau an upsampled CAM has at an edge cell lies on the image border. For a raw (low-resolution)
CAM, `raw_map_peaks` / `peak_boxes_from_raw` put the peak at the peak cell's centre in the image
frame, which is exact; `plateau_peak` / `peak_boxes` on the upsampled map are within a quarter
cell of it.

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
    """boxes (B, 4) float32; peaks (B, 2) float32 (x, y), the map's peak (`plateau_peak` /
    `raw_map_peaks`); scores (B,) the map's maximum (NaN ignored; NaN for an all-NaN map)."""

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

    Not a peak rule: on a plateau (an upsampled CAM whose maximum is in an edge cell is one that
    reaches the image border) the first maximum is the plateau's top-left pixel. For peaks use
    `plateau_peak` / `plateau_peak_pixel` (maps at image resolution) or `raw_map_peaks` (raw CAMs).
    """
    b, h, w = maps.shape
    flat = jnp.argmax(maps.reshape(b, h * w), axis=-1).astype(jnp.int32)
    return flat // w, flat % w


# --------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------

class _Plateau(NamedTuple):
    plateau: jax.Array  # (B, h, w) bool: the connected tie set containing the first maximum
    first: jax.Array    # (B,) int32 flat index of the first maximum (NaN skipped; 0 if all NaN)
    score: jax.Array    # (B,) the maximum (NaN ignored; NaN when every value is NaN)
    count: jax.Array    # (B,) int32 plateau size (0 when every value is NaN)
    values: jax.Array   # (B, h, w) the maps with NaN replaced by -inf


def _plateau(maps) -> _Plateau:
    """The peak plateau of maps (B, h, w): see `plateau_peak`."""
    if not jnp.issubdtype(maps.dtype, jnp.floating):
        maps = maps.astype(jnp.float32)
    b, h, w = maps.shape
    nan = jnp.isnan(maps)
    m = jnp.where(nan, jnp.array(-jnp.inf, maps.dtype), maps)
    first = jnp.argmax(m.reshape(b, h * w), axis=1).astype(jnp.int32)
    score = jnp.take_along_axis(m.reshape(b, h * w), first[:, None], axis=1)[:, 0]
    tie = (m == score[:, None, None]) & ~nan
    # The first maximum is the first pixel (row-major) of its component, so its label is `first`.
    plateau = connected_components(tie) == first[:, None, None]
    count = jnp.sum(plateau, axis=(1, 2), dtype=jnp.int32)
    score = jnp.where(count > 0, score, jnp.array(jnp.nan, maps.dtype))
    return _Plateau(plateau, first, score, count, m)


def _centroid(p: _Plateau) -> jax.Array:
    """(B, 2) float32 (x, y) centroid of the plateau's pixel centres in its own pixel frame;
    NaN where the plateau is empty (all-NaN map)."""
    _, h, w = p.plateau.shape
    per_col = jnp.sum(p.plateau, axis=1, dtype=jnp.int32).astype(jnp.float32)  # (B, w), exact
    per_row = jnp.sum(p.plateau, axis=2, dtype=jnp.int32).astype(jnp.float32)  # (B, h)
    n = p.count.astype(jnp.float32)
    safe = jnp.maximum(n, 1.0)
    cx = per_col @ (jnp.arange(w, dtype=jnp.float32) + 0.5) / safe
    cy = per_row @ (jnp.arange(h, dtype=jnp.float32) + 0.5) / safe
    xy = jnp.stack([cx, cy], axis=-1)
    return jnp.where((p.count > 0)[:, None], xy, jnp.nan)


def _subcell_offset(p: _Plateau) -> jax.Array:
    """(B, 2) float32 (dx, dy) in cells: vertex of the parabola through the peak cell and its two
    neighbours, separately along x and along y (1-D three-point fits). Zero along an axis where
    the peak is not a single cell (plateau), the cell is on the border on that axis, or a
    neighbour is NaN/-inf. |offset| < 0.5 whenever it applies (the peak is a strict maximum)."""
    b, h, w = p.values.shape
    m = p.values.astype(jnp.float32).reshape(b, h * w)
    r, c = p.first // w, p.first % w
    single = p.count == 1

    def val(rr, cc):
        idx = jnp.clip(rr, 0, h - 1) * w + jnp.clip(cc, 0, w - 1)
        return jnp.take_along_axis(m, idx[:, None], axis=1)[:, 0]

    centre = val(r, c)

    def offset(lo, hi, inside):
        denom = lo - 2.0 * centre + hi
        ok = single & inside & jnp.isfinite(lo) & jnp.isfinite(hi) & (denom < 0)
        d = 0.5 * (lo - hi) / jnp.where(ok, denom, -1.0)
        return jnp.where(ok, jnp.clip(d, -0.5, 0.5), 0.0)

    dx = offset(val(r, c - 1), val(r, c + 1), (c > 0) & (c < w - 1))
    dy = offset(val(r - 1, c), val(r + 1, c), (r > 0) & (r < h - 1))
    return jnp.stack([dx, dy], axis=-1)


@jax.jit
def plateau_peak(maps) -> jax.Array:
    """The peak of each map (B, H, W) -> (B, 2) float32 (x, y) in the map's own pixel frame.

    The rule (the one rule for peaks: boxes, pointing game): take the first maximum in row-major
    order (NaN skipped), then the **plateau** containing it — the 8-connected set of pixels whose
    value equals the maximum exactly (`connected_components`) — and return the centroid of the
    plateau's pixel centres (col + 0.5, row + 0.5). A unique maximum is its pixel centre. Other
    pixels that reach the maximum but do not touch this plateau are ignored. The centroid of a
    non-convex plateau may lie off it; `plateau_peak_pixel` gives the plateau pixel nearest to it.

    NaN: NaN values are ignored (never the peak, never part of a plateau); an all-NaN map gives
    (NaN, NaN). -inf / +inf are ordinary values (an all -inf map is one plateau: its centre).
    Integer maps are compared exactly (converted to float32).

    Upsampled CAMs: `mskjax.cam.postprocess` resizes a raw (h, w) map bilinearly with edge
    clamping, so a maximum in an edge cell becomes a plateau from the cell centre to the image
    border. Its centroid is then about a quarter cell (H / h / 4 pixels) from the cell centre
    toward the border — far better than the first maximum (on the border itself), but not the
    cell centre. When the raw map is at hand use `raw_map_peaks` / `peak_boxes_from_raw`, which
    give the cell centre exactly.
    """
    maps, single = _batched(maps)
    out = _centroid(_plateau(maps))
    return out[0] if single else out


@jax.jit
def plateau_peak_pixel(maps) -> tuple[jax.Array, jax.Array]:
    """(row, col) int32 of the plateau pixel nearest to `plateau_peak` (ties: first in row-major
    order), maps (B, H, W) — a drop-in replacement for `argmax_2d` where one pixel is needed
    (pointing game). It is always a maximum pixel (unlike the pixel containing the centroid, which
    for a non-convex plateau may not be). An all-NaN map gives (0, 0), as `argmax_2d` does."""
    maps, single = _batched(maps)
    b, h, w = maps.shape
    p = _plateau(maps)
    xy = _centroid(p)
    cols = jnp.arange(w, dtype=jnp.float32)[None, None, :] + 0.5
    rows = jnp.arange(h, dtype=jnp.float32)[None, :, None] + 0.5
    d2 = (cols - xy[:, 0, None, None]) ** 2 + (rows - xy[:, 1, None, None]) ** 2
    d2 = jnp.where(p.plateau, d2, jnp.inf)
    flat = jnp.argmin(d2.reshape(b, h * w), axis=1).astype(jnp.int32)
    flat = jnp.where(p.count > 0, flat, 0)
    row, col = flat // w, flat % w
    return (row[0], col[0]) if single else (row, col)


@jax.jit
def peak_point(maps) -> jax.Array:
    """(B, 2) float32 (x, y): the centre of `plateau_peak_pixel` (a pixel of the first maximum's
    plateau, the one nearest its centroid), maps (B, H, W) or (H, W). The point the pointing game
    tests: always on a maximum, even where a non-convex plateau's centroid is not."""
    row, col = plateau_peak_pixel(maps)
    return jnp.stack([col.astype(jnp.float32) + 0.5, row.astype(jnp.float32) + 0.5], axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def separated_peaks(maps, k: int, radius: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The map's k highest peaks, each at least `radius` pixels from the ones before it.

    maps (B, H, W) float (or (H, W)), one map per image in its own pixel frame. The first peak is
    `plateau_peak` (the one rule: the first maximum's plateau centroid); each later one is the
    centre (col + 0.5, row + 0.5) of the highest pixel (first in row-major order on ties; NaN and
    -inf pixels are never candidates) whose centre lies at least `radius` from every earlier peak:
    the map's next separate candidate for where the abnormality is.

    Returns (peaks (B, k, 2) float32 (x, y), values (B, k) float32 the map there (the maximum for
    the first), valid (B, k) bool: False where no finite pixel is far enough (the peak is then
    (NaN, NaN), its value NaN)).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    maps, single = _batched(maps)
    b, h, w = maps.shape
    p = _plateau(maps)
    first = _centroid(p)
    peaks, values, valid = [first], [p.score.astype(jnp.float32)], [p.count > 0]
    xs = jnp.arange(w, dtype=jnp.float32)[None, None, :] + 0.5
    ys = jnp.arange(h, dtype=jnp.float32)[None, :, None] + 0.5
    flat = p.values.reshape(b, h * w)
    far = jnp.isfinite(flat) | (flat == jnp.inf)  # NaN already -inf in p.values: never a candidate
    r2 = jnp.float32(radius) ** 2
    for _ in range(k - 1):
        last = peaks[-1]
        d2 = (xs - last[:, 0, None, None]) ** 2 + (ys - last[:, 1, None, None]) ** 2
        # A missing earlier peak (NaN) excludes nothing more: NaN >= r2 is False, so guard it.
        far = far & ((d2 >= r2) | jnp.isnan(d2)).reshape(b, h * w)
        masked = jnp.where(far, flat, -jnp.inf)
        i = jnp.argmax(masked, axis=1)
        ok = jnp.take_along_axis(far, i[:, None], axis=1)[:, 0]
        xy = jnp.stack([(i % w).astype(jnp.float32) + 0.5, (i // w).astype(jnp.float32) + 0.5], axis=-1)
        peaks.append(jnp.where(ok[:, None], xy, jnp.nan))
        values.append(jnp.where(ok, jnp.take_along_axis(flat, i[:, None], axis=1)[:, 0], jnp.nan).astype(jnp.float32))
        valid.append(ok)
    out = (jnp.stack(peaks, axis=1).astype(jnp.float32), jnp.stack(values, axis=1), jnp.stack(valid, axis=1))
    return _unbatch(out, single)


@functools.partial(jax.jit, static_argnames=("n", "grid"))
def lowest_points(maps, boxes, n: int, grid: int = 5, allowed=None) -> tuple[jax.Array, jax.Array]:
    """The n places inside each box where the map is lowest: SAM's negative points from a map.

    maps (B, H, W) float, one map per image in its own pixel frame; boxes (B, K, 4) float
    (x0, y0, x1, y1) in the same frame (continuous pixels); allowed (B, H, W) bool or None: the
    pixels a point may fall on (e.g. image content, not letterbox padding). Candidates are the
    centres of a grid x grid tiling of each box, each read at the pixel holding it (clipped to the
    map); NaN and disallowed candidates are never chosen.

    Returns points (B, K, n, 2) float32 (x, y) in the map's frame, lowest first (the first in
    row-major grid order on ties), and valid (B, K, n) bool: False where fewer than n candidates
    are allowed (the point is then (NaN, NaN)).
    """
    if n < 1 or grid < 1 or n > grid * grid:
        raise ValueError(f"need 1 <= n <= grid * grid; got n={n}, grid={grid}")
    maps = jnp.asarray(maps)
    b, h, w = maps.shape
    boxes = jnp.asarray(boxes, jnp.float32)
    t = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid  # cell centres as fractions of the side
    xs = boxes[..., 0, None] + t * (boxes[..., 2, None] - boxes[..., 0, None])  # (B, K, g)
    ys = boxes[..., 1, None] + t * (boxes[..., 3, None] - boxes[..., 1, None])
    gx = jnp.broadcast_to(xs[..., None, :], xs.shape[:2] + (grid, grid)).reshape(xs.shape[:2] + (grid * grid,))
    gy = jnp.broadcast_to(ys[..., :, None], ys.shape[:2] + (grid, grid)).reshape(ys.shape[:2] + (grid * grid,))
    col = jnp.clip(jnp.floor(gx), 0, w - 1).astype(jnp.int32)
    row = jnp.clip(jnp.floor(gy), 0, h - 1).astype(jnp.int32)
    flat_idx = (row * w + col).reshape(b, -1)
    values = jnp.take_along_axis(maps.reshape(b, h * w), flat_idx, axis=1).reshape(gx.shape).astype(jnp.float32)
    ok = ~jnp.isnan(values)
    if allowed is not None:
        ok = ok & jnp.take_along_axis(jnp.asarray(allowed, bool).reshape(b, h * w), flat_idx, axis=1).reshape(gx.shape)
    # top_k keeps the first of equal keys: ties go to the earlier grid cell.
    key = jnp.where(ok, -values, -jnp.inf)
    _, order = jax.lax.top_k(key, n)  # (B, K, n)
    valid = jnp.take_along_axis(ok, order, axis=-1)
    pts = jnp.stack([jnp.take_along_axis(gx, order, axis=-1), jnp.take_along_axis(gy, order, axis=-1)], axis=-1)
    return jnp.where(valid[..., None], pts, jnp.nan).astype(jnp.float32), valid


def _frame_scale(raw_hw, out_hw):
    h, w = raw_hw
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if oh < 1 or ow < 1:
        raise ValueError(f"out_hw must be positive (H, W); got {tuple(out_hw)}")
    return jnp.array([ow / w, oh / h], jnp.float32)


@functools.partial(jax.jit, static_argnames=("out_hw", "subcell"))
def raw_map_peaks(raw_maps, out_hw: tuple[int, int], subcell: bool = False) -> jax.Array:
    """The peak of each raw (low-resolution) map (B, h, w), in the frame of the (H, W) image it is
    drawn over -> (B, 2) float32 (x, y).

    A raw CAM cell (row i, col j) covers the image region [j W/w, (j+1) W/w) x [i H/h, (i+1) H/h)
    (the half-pixel convention of `mskjax.cam.resize_maps`, where cell centres land at
    (j + 0.5) W/w), so the peak is the peak cell's centre x = (col + 0.5) W / w,
    y = (row + 0.5) H / h. Plateaus (tied cells) and NaN as `plateau_peak`: the centroid of the
    8-connected set of cells equal to the maximum that contains the first maximum (row-major),
    NaN cells ignored, (NaN, NaN) for an all-NaN map. Cells to exclude (e.g. those outside the
    image content of a letterboxed input) can be set to NaN.

    Which map: `postprocess` applies ReLU and min-max scaling before resizing; both are monotone,
    so passing the raw map or relu(raw) gives the same peak unless every cell is <= 0 (then
    relu(raw) is one plateau whose centroid is the image centre, and the raw map keeps its own
    maximum).

    Args:
      raw_maps: (B, h, w) (or (h, w)) float, e.g. `mskjax.cam.raw_map` output.
      out_hw: (H, W) static ints, the image frame (the model input).
      subcell: refine a single-cell peak by the vertex of a parabola through it and its two
        neighbours along each axis (less than half a cell; none on an axis where the peak cell is
        at the border). Off by default: CAM cells are coarse and their values are not samples of a
        smooth function, so the refinement is a guess.
    """
    raw_maps, single = _batched(raw_maps)
    _, h, w = raw_maps.shape
    p = _plateau(raw_maps)
    xy = _centroid(p)
    if subcell:
        xy = xy + _subcell_offset(p)
    out = xy * _frame_scale((h, w), out_hw)
    return out[0] if single else out


def box_side_for(box_side: float | None, input_side: float) -> float:
    """The side `peak_boxes` gives its box: box_side, or by default the report's 50 px at a 224 px
    input scaled to input_side."""
    return _default_side(box_side, input_side, (input_side, input_side))


def _default_side(box_side, input_side, hw):
    if input_side is None:
        input_side = max(hw)
    if box_side is None:
        box_side = REPORT_BOX_SIDE * float(input_side) / REPORT_INPUT_SIDE
    if not box_side > 0:
        raise ValueError(f"box_side must be positive; got {box_side}")
    return float(box_side)


def _check_border(border):
    if border not in ("clip", "shift"):
        raise ValueError(f"border must be 'clip' or 'shift'; got {border!r}")


def _box_around(peaks, box_side: float, hw, border: str, bounds=None) -> jax.Array:
    """(B, 4) square boxes of side box_side centred on peaks (B, 2), kept inside `bounds`
    ((4,) or (B, 4) x0, y0, x1, y1; default the whole (H, W) image) by `border`."""
    b = peaks.shape[0]
    h, w = hw
    if bounds is None:
        bounds = jnp.array([0.0, 0.0, float(w), float(h)], jnp.float32)
    bounds = jnp.broadcast_to(jnp.asarray(bounds, jnp.float32), (b, 4))
    bx0, by0, bx1, by1 = (bounds[:, i] for i in range(4))
    cx, cy = peaks[:, 0], peaks[:, 1]
    half = jnp.float32(box_side) / 2
    x0, x1, y0, y1 = cx - half, cx + half, cy - half, cy + half
    if border == "shift":
        # Move the box inside first (right/bottom overshoot, then left/top), then clip.
        dx = jnp.minimum(0.0, bx1 - x1)
        dy = jnp.minimum(0.0, by1 - y1)
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
        dx = jnp.maximum(0.0, bx0 - x0)
        dy = jnp.maximum(0.0, by0 - y0)
        x0, x1, y0, y1 = x0 + dx, x1 + dx, y0 + dy, y1 + dy
    boxes = jnp.stack([jnp.clip(x0, bx0, bx1), jnp.clip(y0, by0, by1),
                       jnp.clip(x1, bx0, bx1), jnp.clip(y1, by0, by1)], axis=-1)
    return boxes.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("box_side", "hw", "border"))
def boxes_around(points, box_side: float, hw: tuple[int, int], border: str = "shift", bounds=None) -> jax.Array:
    """Square boxes of side box_side centred on points (B, K, 2) (x, y) in an (H, W) = hw frame ->
    (B, K, 4) float32 (x0, y0, x1, y1), kept inside `bounds` ((4,) or (B, 4); default the whole
    frame) as `peak_boxes` keeps its box (border "shift" or "clip"). NaN points give NaN boxes."""
    _check_border(border)
    points = jnp.asarray(points, jnp.float32)
    b, k = points.shape[:2]
    if bounds is not None:
        bounds = jnp.repeat(jnp.broadcast_to(jnp.asarray(bounds, jnp.float32), (b, 4)), k, axis=0)
    return _box_around(points.reshape(b * k, 2), float(box_side), hw, border, bounds).reshape(b, k, 4)


@functools.partial(jax.jit, static_argnames=("box_side", "input_side", "border"))
def peak_boxes(maps, box_side: float | None = None, input_side: float | None = None,
               border: str = "shift", bounds=None) -> PeakBoxes:
    """The report's localisation: a square box centred on the map's peak.

    Args:
      maps: (B, H, W) float, in the model-input frame (or any frame; boxes come back in it).
      box_side: side of the box in map pixels. Default: 50 * input_side / 224, the report's 50 x 50
        box at a 224 px model input, scaled to other sizes.
      input_side: side of the model input the map is drawn at; default the map's longer side
        max(H, W). Only used to derive the default box_side.
      border: "shift" (default) slides a box that sticks out of the image inside, so every box
        keeps its full size (clipped only when box_side exceeds the image); "clip" cuts it at the
        border (boxes near an edge are then smaller than box_side).
      bounds: optional (4,) or (B, 4) float (x0, y0, x1, y1) region the box must stay inside
        instead of the whole image, e.g. the image content of a letterboxed input. Traced.

    The centre is `plateau_peak`: the centroid of the plateau of maximum pixels containing the
    first maximum (a unique maximum: its pixel centre (col + 0.5, row + 0.5)); NaN ignored. An
    all-NaN map gives NaN peak, box and score. For an upsampled CAM prefer `peak_boxes_from_raw`
    (see `plateau_peak` on the quarter-cell offset at edge cells).

    Returns:
      PeakBoxes(boxes (B, 4), peaks (B, 2) as (x, y), scores (B,)).
    """
    _check_border(border)
    maps, single = _batched(maps)
    _, h, w = maps.shape
    side = _default_side(box_side, input_side, (h, w))
    p = _plateau(maps)
    peaks = _centroid(p)
    out = PeakBoxes(_box_around(peaks, side, (h, w), border, bounds), peaks, p.score)
    return _unbatch(out, single)


@functools.partial(jax.jit, static_argnames=("out_hw", "box_side", "input_side", "border", "subcell"))
def peak_boxes_from_raw(raw_maps, out_hw: tuple[int, int], box_side: float | None = None,
                        input_side: float | None = None, border: str = "shift", bounds=None,
                        subcell: bool = False) -> PeakBoxes:
    """`peak_boxes` from the raw (low-resolution) CAM (B, h, w), boxes in the (H, W) = out_hw
    frame: centred on `raw_map_peaks` (the peak cell's centre, exactly), not on a peak of the
    upsampled map (which at an edge cell is off by a quarter cell, see `plateau_peak`).

    box_side / input_side / border / bounds as `peak_boxes`, in out_hw pixels (default box side:
    50 * max(H, W) / 224). scores: the raw map's maximum (NaN ignored), in the raw map's units —
    not the post-processed [0, 1] value. subcell: as `raw_map_peaks`.
    """
    _check_border(border)
    raw_maps, single = _batched(raw_maps)
    _, h, w = raw_maps.shape
    oh, ow = int(out_hw[0]), int(out_hw[1])
    side = _default_side(box_side, input_side, (oh, ow))
    p = _plateau(raw_maps)
    xy = _centroid(p)
    if subcell:
        xy = xy + _subcell_offset(p)
    peaks = xy * _frame_scale((h, w), out_hw)
    out = PeakBoxes(_box_around(peaks, side, (oh, ow), border, bounds), peaks, p.score)
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
