"""How an original image became a model input, and moving boxes, points and maps between frames.

Frames
------
* **original**: pixels of the image as decoded from disk, shape (H0, W0).
* **input**: pixels of the array a model sees, shape (H, W): the original resized by (sy, sx)
  and placed at offset (top, left) inside an (H, W) canvas (the rest is padding).

Coordinates are continuous pixels: pixel i covers [i, i + 1), so its centre is i + 0.5 and the
whole image spans [0, W0] x [0, H0]. A point maps as

    x_in = x_orig * sx + left,        y_in = y_orig * sy + top

and boxes are (x0, y0, x1, y1) in the same continuous coordinates (half-open pixel extents: a box
covering exactly pixel (row 3, col 5) is (5, 3, 6, 4)).

The scale is the *effective* one: when a resize rounds the new size to whole pixels (as SAM's
`ResizeLongestSide` does), sy = new_h / H0 exactly, so the image content fills rows
[top, top + new_h) of the input with no fractional pixel left over.

Every function accepts a single geometry (scalar fields) or a batch of per-image geometries
(fields of shape (B,)) and works on numpy arrays (returns numpy) or JAX arrays (returns JAX arrays,
jit-able, vectorised; nothing loops over the batch in Python).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = Any  # numpy or JAX array


class InvalidBoxError(ValueError):
    """A box that cannot describe a region of an image (inverted, empty, non-finite, outside)."""


def _xp(*xs):
    """numpy when every argument is numpy/Python, jax.numpy when any is a JAX array or tracer."""
    for x in xs:
        if isinstance(x, jax.Array):
            return jnp
        if isinstance(x, Geometry) and any(isinstance(f, jax.Array) for f in x._data()):
            return jnp
    return np


@dataclasses.dataclass(frozen=True, eq=False)
class Geometry:
    """Resize + pad from an original image (H0, W0) to a model input (input_h, input_w).

    Data fields are scalars for one image or arrays of shape (B,) for a batch of images, each with
    its own geometry. `input_h` / `input_w` are static Python ints (one input size per batch).
    A pytree: it passes through `jax.jit` / `jax.vmap` with the data fields as leaves.

    Attributes:
      scale_y, scale_x: effective scales sy = content_h / H0 and sx = content_w / W0.
      top, left: offset of the image content inside the input canvas, input pixels.
      original_h, original_w: size of the original image, pixels.
      input_h, input_w: size of the model input (static).
    """

    scale_y: Array
    scale_x: Array
    top: Array
    left: Array
    original_h: Array
    original_w: Array
    input_h: int
    input_w: int

    def _data(self):
        return (self.scale_y, self.scale_x, self.top, self.left, self.original_h, self.original_w)

    @property
    def content_hw(self) -> tuple[Array, Array]:
        """(content_h, content_w): size of the resized image inside the input, whole pixels."""
        xp = _xp(self)
        h = xp.floor(xp.asarray(self.original_h) * xp.asarray(self.scale_y) + 0.5)
        w = xp.floor(xp.asarray(self.original_w) * xp.asarray(self.scale_x) + 0.5)
        return h, w


jax.tree_util.register_dataclass(
    Geometry,
    data_fields=["scale_y", "scale_x", "top", "left", "original_h", "original_w"],
    meta_fields=["input_h", "input_w"],
)


def _hw_pair(original_hw, xp):
    """(H0, W0) from a pair or from an array of shape (B, 2); returns float arrays."""
    hw = xp.asarray(original_hw, dtype=xp.float32 if xp is jnp else np.float64)
    if hw.shape[-1:] != (2,) or hw.ndim > 2:
        raise ValueError(f"original_hw must be (H, W) or an array of shape (B, 2); got shape {hw.shape}")
    return hw[..., 0], hw[..., 1]


def _check_positive(h, w, what):
    if isinstance(h, np.ndarray) and (np.any(~(h > 0)) or np.any(~(w > 0))):
        raise ValueError(f"{what} must be positive; got heights {h} and widths {w}")


def resize_geometry(original_hw, target_hw: tuple[int, int]) -> Geometry:
    """Plain resize of the whole image to target_hw (aspect ratio not kept; no padding).

    This is what the course report did (every radiograph squashed to 224 x 224).

    Args:
      original_hw: (H0, W0) or an array (B, 2) of per-image sizes.
      target_hw: (H, W) of the model input, Python ints.
    """
    xp = _xp(original_hw)
    h0, w0 = _hw_pair(original_hw, xp)
    _check_positive(h0, w0, "original_hw")
    th, tw = int(target_hw[0]), int(target_hw[1])
    zero = xp.zeros_like(h0)
    return Geometry(scale_y=th / h0, scale_x=tw / w0, top=zero, left=zero,
                    original_h=h0, original_w=w0, input_h=th, input_w=tw)


def letterbox_geometry(original_hw, target_side: int, align: str = "center") -> Geometry:
    """Aspect-preserving resize so the longer side is `target_side`, then pad to a square.

    New size: (floor(H0 * s + 0.5), floor(W0 * s + 0.5)) with s = target_side / max(H0, W0),
    the rounding SAM's `ResizeLongestSide.get_preprocess_shape` uses. The effective scales are
    new_h / H0 and new_w / W0 (they differ from s by the rounding).

    Args:
      original_hw: (H0, W0) or an array (B, 2).
      target_side: side of the square model input (e.g. 1024 for SAM), Python int.
      align: "center" puts the image in the middle (top = (side - new_h) // 2, likewise left);
        "topleft" puts it at (0, 0) and pads bottom/right, as SAM does.
    """
    if align not in ("center", "topleft"):
        raise ValueError(f"align must be 'center' or 'topleft'; got {align!r}")
    xp = _xp(original_hw)
    h0, w0 = _hw_pair(original_hw, xp)
    _check_positive(h0, w0, "original_hw")
    side = int(target_side)
    s = side / xp.maximum(h0, w0)
    new_h = xp.floor(h0 * s + 0.5)
    new_w = xp.floor(w0 * s + 0.5)
    if align == "center":
        top = xp.floor((side - new_h) / 2)
        left = xp.floor((side - new_w) / 2)
    else:
        top = xp.zeros_like(h0)
        left = xp.zeros_like(w0)
    return Geometry(scale_y=new_h / h0, scale_x=new_w / w0, top=top, left=left,
                    original_h=h0, original_w=w0, input_h=side, input_w=side)


def stack_geometries(geoms: Sequence[Geometry]) -> Geometry:
    """Stack per-image geometries (scalar fields, same input size) into one batched Geometry."""
    if not geoms:
        raise ValueError("stack_geometries needs at least one geometry")
    sizes = {(g.input_h, g.input_w) for g in geoms}
    if len(sizes) != 1:
        raise ValueError(f"geometries disagree on the input size: {sorted(sizes)}")
    xp = _xp(*geoms)
    fields = [xp.stack([xp.asarray(g._data()[i]) for g in geoms]) for i in range(6)]
    return Geometry(*fields, input_h=geoms[0].input_h, input_w=geoms[0].input_w)


def _expand(field, xp, ndim: int):
    """Reshape a scalar or (B,) field so it broadcasts over coordinate arrays with `ndim` dims."""
    f = xp.asarray(field)
    return f.reshape(f.shape + (1,) * (ndim - f.ndim))


def points_to_input(points: Array, geom: Geometry) -> Array:
    """Points (..., 2) as (x, y) in the original frame -> input frame. Leading dim B if batched."""
    xp = _xp(points, geom)
    p = xp.asarray(points)
    n = p.ndim - 1
    x = p[..., 0] * _expand(geom.scale_x, xp, n) + _expand(geom.left, xp, n)
    y = p[..., 1] * _expand(geom.scale_y, xp, n) + _expand(geom.top, xp, n)
    return xp.stack([x, y], axis=-1)


def points_to_original(points: Array, geom: Geometry) -> Array:
    """Points (..., 2) as (x, y) in the input frame -> original frame (inverse of points_to_input)."""
    xp = _xp(points, geom)
    p = xp.asarray(points)
    n = p.ndim - 1
    x = (p[..., 0] - _expand(geom.left, xp, n)) / _expand(geom.scale_x, xp, n)
    y = (p[..., 1] - _expand(geom.top, xp, n)) / _expand(geom.scale_y, xp, n)
    return xp.stack([x, y], axis=-1)


def boxes_to_input(boxes: Array, geom: Geometry) -> Array:
    """Boxes (..., 4) as (x0, y0, x1, y1) in the original frame -> input frame."""
    xp = _xp(boxes, geom)
    b = xp.asarray(boxes)
    corners = b.reshape(b.shape[:-1] + (2, 2))  # (..., corner, xy)
    n = b.ndim - 1
    sx, sy = _expand(geom.scale_x, xp, n)[..., None], _expand(geom.scale_y, xp, n)[..., None]
    left, top = _expand(geom.left, xp, n)[..., None], _expand(geom.top, xp, n)[..., None]
    out = xp.stack([corners[..., 0] * sx + left, corners[..., 1] * sy + top], axis=-1)
    return out.reshape(b.shape)


def boxes_to_original(boxes: Array, geom: Geometry) -> Array:
    """Boxes (..., 4) as (x0, y0, x1, y1) in the input frame -> original frame.

    Boxes reaching into the padding come back partly outside the original image; `clip_boxes`
    them with the original size if needed.
    """
    xp = _xp(boxes, geom)
    b = xp.asarray(boxes)
    corners = b.reshape(b.shape[:-1] + (2, 2))
    n = b.ndim - 1
    sx, sy = _expand(geom.scale_x, xp, n)[..., None], _expand(geom.scale_y, xp, n)[..., None]
    left, top = _expand(geom.left, xp, n)[..., None], _expand(geom.top, xp, n)[..., None]
    out = xp.stack([(corners[..., 0] - left) / sx, (corners[..., 1] - top) / sy], axis=-1)
    return out.reshape(b.shape)


def _bilinear_matrix(xp, out_size: int, in_size: int, scale, offset, content):
    """Rows of weights sampling an input axis at the output pixel centres (bilinear, no antialias).

    scale/offset/content: arrays of shape (B,) or (). Returns (..., out_size, in_size).
    Output pixel o (centre o + 0.5 in the original frame) reads input index
    (o + 0.5) * scale + offset - 0.5, clamped to the content [offset, offset + content - 1]:
    the same as cropping the content and calling torch's `F.interpolate(mode="bilinear",
    align_corners=False)` on it (which clamps at the crop edges).
    """
    scale = xp.asarray(scale)[..., None]
    offset = xp.asarray(offset)[..., None]
    content = xp.asarray(content)[..., None]
    o = xp.arange(out_size)
    src = (o + 0.5) * scale + offset - 0.5
    src = xp.clip(src, offset, offset + content - 1)
    i0 = xp.floor(src)
    frac = src - i0
    i1 = xp.minimum(i0 + 1, offset + content - 1)
    idx = xp.arange(in_size)
    w = (idx == i0[..., None]) * (1 - frac)[..., None] + (idx == i1[..., None]) * frac[..., None]
    return w


def map_to_original(maps: Array, geom: Geometry, original_hw: tuple[int, int] | None = None) -> Array:
    """Resize input-frame maps back to the original frame: crop the padding, then bilinear resize.

    Args:
      maps: (H, W) for one image or (B, H, W) with a batched geometry, in the input frame
        (H, W) == (geom.input_h, geom.input_w). Float.
      geom: the geometry that made the input.
      original_hw: output size (H0, W0) as Python ints (static under jit). Optional when the
        geometry is concrete and all its images share one original size; when both are given and
        the geometry is concrete they must agree.

    Returns:
      (H0, W0) or (B, H0, W0) maps in the original frame, float32 (float64 for float64 numpy).

    Interpolation: bilinear at pixel centres (half-pixel convention), edge-clamped at the content
    border, **no antialiasing** — identical to torch `F.interpolate(bilinear, align_corners=False,
    antialias=False)` on the cropped content, which is what SAM's `postprocess_masks` uses. The
    usual case is upsampling (a 224 or 1024 map to a larger radiograph), where antialiasing does
    nothing; when the original is smaller than the content the map is subsampled without
    smoothing (CAMs are already smooth, and this keeps parity with SAM).
    """
    xp = _xp(maps, geom)
    m = xp.asarray(maps)
    if m.ndim not in (2, 3):
        raise ValueError(f"maps must be (H, W) or (B, H, W); got shape {m.shape}")
    if m.shape[-2:] != (geom.input_h, geom.input_w):
        raise ValueError(f"maps are {m.shape[-2:]} but the geometry's input is "
                         f"{(geom.input_h, geom.input_w)}")
    batched_geom = np.ndim(geom.scale_y) == 1
    if batched_geom and m.ndim != 3:
        raise ValueError("a batched geometry needs maps of shape (B, H, W)")
    concrete = xp is np or not any(isinstance(f, jax.core.Tracer) for f in geom._data())
    if concrete:
        sizes = {(float(h), float(w)) for h, w in zip(np.ravel(np.asarray(geom.original_h)),
                                                       np.ravel(np.asarray(geom.original_w)))}
        if original_hw is None:
            if len(sizes) != 1:
                raise ValueError(f"images have different original sizes {sorted(sizes)}: map them "
                                 "one at a time or pass original_hw")
            original_hw = next(iter(sizes))
        elif sizes != {(float(original_hw[0]), float(original_hw[1]))}:
            raise ValueError(f"original_hw={tuple(original_hw)} disagrees with the geometry's "
                             f"original sizes {sorted(sizes)}")
    elif original_hw is None:
        raise ValueError("original_hw is required when the geometry is traced (under jit)")
    h0, w0 = int(original_hw[0]), int(original_hw[1])
    dtype = m.dtype if xp.issubdtype(m.dtype, xp.floating) else xp.float32
    m = m.astype(dtype)
    content_h, content_w = geom.content_hw
    ry = _bilinear_matrix(xp, h0, geom.input_h, geom.scale_y, geom.top, content_h).astype(dtype)
    rx = _bilinear_matrix(xp, w0, geom.input_w, geom.scale_x, geom.left, content_w).astype(dtype)
    if xp is jnp:
        hi = jax.lax.Precision.HIGHEST  # exact float32 sums on TPU/GPU as well
        return jnp.einsum("...oh,...hw,...pw->...op", ry, m, rx, precision=hi)
    return np.einsum("...oh,...hw,...pw->...op", ry, m, rx, optimize=True)


def clip_boxes(boxes: Array, hw) -> Array:
    """Clip boxes (..., 4) to the image [0, W] x [0, H].

    hw: (H, W) for every box, or an array (B, 2) of per-image sizes matching boxes' first dim
    (boxes (B, 4) or (B, K, 4)).
    """
    xp = _xp(boxes, hw)
    b = xp.asarray(boxes)
    size = xp.asarray(hw, dtype=b.dtype if xp.issubdtype(b.dtype, xp.floating) else None)
    n = b.ndim - 1
    if size.ndim == 1:
        h, w = size[0], size[1]
    else:
        h, w = _expand(size[..., 0], xp, n), _expand(size[..., 1], xp, n)
    x0 = xp.clip(b[..., 0], 0, w)
    y0 = xp.clip(b[..., 1], 0, h)
    x1 = xp.clip(b[..., 2], 0, w)
    y1 = xp.clip(b[..., 3], 0, h)
    return xp.stack([x0, y0, x1, y1], axis=-1)


def validate_boxes(boxes, hw, valid=None, name: str = "boxes") -> np.ndarray:
    """Check boxes eagerly (numpy; not for use under jit) and return them as float64 (..., 4).

    Raises InvalidBoxError naming the first bad box (its index) and why: non-finite coordinates,
    inverted (x1 < x0 or y1 < y0), zero area (x1 == x0 or y1 == y0), or entirely outside the
    image [0, W] x [0, H] (no overlap of positive area). Boxes partly outside are accepted (clip
    them with `clip_boxes`).

    Args:
      boxes: (..., 4) array-like.
      hw: (H, W) for all boxes, or (B, 2) per image matching boxes' first dim.
      valid: optional bool mask of shape boxes.shape[:-1]; padded entries (False) are not checked.
      name: what to call the boxes in the message (e.g. a file name).
    """
    b = np.asarray(boxes, dtype=np.float64)
    if b.shape[-1:] != (4,):
        raise InvalidBoxError(f"{name}: boxes must have a last dimension of 4; got shape {b.shape}")
    size = np.asarray(hw, dtype=np.float64)
    if size.ndim == 1:
        h = np.broadcast_to(size[0], b.shape[:-1])
        w = np.broadcast_to(size[1], b.shape[:-1])
    else:
        h = np.broadcast_to(_expand(size[..., 0], np, b.ndim - 1), b.shape[:-1])
        w = np.broadcast_to(_expand(size[..., 1], np, b.ndim - 1), b.shape[:-1])
    check = np.ones(b.shape[:-1], bool) if valid is None else np.asarray(valid, bool)
    x0, y0, x1, y1 = (b[..., i] for i in range(4))
    problems = [
        (~np.isfinite(b).all(-1), "has a non-finite coordinate"),
        ((x1 < x0) | (y1 < y0), "is inverted (x1 < x0 or y1 < y0)"),
        ((x1 == x0) | (y1 == y0), "has zero area"),
        ((x1 <= 0) | (y1 <= 0) | (x0 >= w) | (y0 >= h), "lies entirely outside the image"),
    ]
    for bad, why in problems:
        bad = bad & check
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            where = idx[0] if len(idx) == 1 else idx
            raise InvalidBoxError(
                f"{name}: box {where} = {b[idx].tolist()} {why} "
                f"(image H x W = {h[idx]:g} x {w[idx]:g})")
    return b
