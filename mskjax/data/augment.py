"""Random augmentation of image batches on the device: pure `jax.random` functions, jit-able.

Every function takes a PRNG key and a batch (B, H, W, C) of float images in [0, 1] (before
normalisation) and draws **independent parameters per image** from that key. Shapes are static;
nothing loops over the batch in Python.

Geometric transforms (flip, rotation, scale, translation) are composed into **one** affine map per
image and applied with a single bilinear resample (`warp_affine`), so the image is interpolated once
however many of them fire. Coordinates are continuous pixels (pixel i covers [i, i+1), centre
i + 0.5); the transform is about the image centre (W/2, H/2). Samples outside the image read **0**
(zero padding, like torch ``grid_sample(padding_mode="zeros", align_corners=False)``, which the
tests compare against). A flip alone, or the identity, moves pixel centres onto pixel centres and is
exact.

Photometric transforms (gamma, contrast, brightness, in that order) act per pixel and the result is
clipped to [0, 1].

The public functions are already jitted (configs and sizes are static arguments); they also work
inside a caller's jit. Usage::

    images = augment(key, images, AugmentConfig())   # defaults below
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from mskjax.fill import fill_masked

__all__ = [
    "AugmentConfig",
    "augment",
    "sample_affine",
    "warp_affine",
    "random_flip",
    "random_affine",
    "random_photometric",
    "adjust_gamma",
    "adjust_contrast",
    "adjust_brightness",
    "ellipse_masks",
    "random_fill",
]


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the augmentations (frozen and hashable: a static jit argument).

    Each `*_prob` is the per-image probability that the transform fires; when it does, its
    parameter is drawn uniformly from the range (gamma: log-uniformly, so 0.8 and 1.25 are equally
    likely).

    Attributes:
      flip_prob: horizontal (left-right) flip.
      rotate_prob, max_rotate_deg: rotation by U(-max, +max) degrees about the image centre.
      scale_prob, scale_range: zoom by s ~ U(lo, hi); s > 1 enlarges the content (a centred crop),
        s < 1 shrinks it (zero border).
      translate_prob, max_translate: shift by U(-t, t) * size along each axis (a crop offset).
      gamma_prob, gamma_range: x -> x ** g.
      contrast_prob, contrast_range: x -> mean + f * (x - mean), mean over the image's pixels.
      brightness_prob, max_brightness: x -> x + U(-b, b).
      fill_prob, fill_size_range: one ellipse at a uniform position, semi-axes U(lo, hi) * size
        each, at a uniform angle, filled in from its surroundings (`mskjax.fill.fill_masked`),
        after the geometric transforms and before the photometric ones; the label is kept, so the
        classifier learns that a filled-in patch is not evidence (what
        `mskjax.deletion_choice` relies on). Off by default.
    """

    flip_prob: float = 0.5
    rotate_prob: float = 1.0
    max_rotate_deg: float = 10.0
    scale_prob: float = 1.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate_prob: float = 0.0
    max_translate: float = 0.0
    gamma_prob: float = 0.5
    gamma_range: tuple[float, float] = (0.8, 1.25)
    contrast_prob: float = 0.5
    contrast_range: tuple[float, float] = (0.9, 1.1)
    brightness_prob: float = 0.5
    max_brightness: float = 0.1
    fill_prob: float = 0.0
    fill_size_range: tuple[float, float] = (0.03, 0.15)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_range"):
                v = tuple(float(x) for x in v)
                if len(v) != 2 or not all(math.isfinite(x) for x in v) or v[0] > v[1]:
                    raise ValueError(f"AugmentConfig.{f.name} must be (lo, hi) with lo <= hi; got {v}")
                object.__setattr__(self, f.name, v)
            else:
                v = float(v)
                if not math.isfinite(v) or v < 0:
                    raise ValueError(f"AugmentConfig.{f.name} must be a finite number >= 0; got {v}")
                if f.name.endswith("_prob") and v > 1:
                    raise ValueError(f"AugmentConfig.{f.name} is a probability; got {v}")
                object.__setattr__(self, f.name, v)
        if self.scale_range[0] <= 0:
            raise ValueError(f"AugmentConfig.scale_range must be positive; got {self.scale_range}")
        if self.fill_size_range[0] <= 0:
            raise ValueError(f"AugmentConfig.fill_size_range must be positive; got {self.fill_size_range}")
        if self.gamma_range[0] <= 0:
            raise ValueError(f"AugmentConfig.gamma_range must be positive; got {self.gamma_range}")

    @classmethod
    def identity(cls) -> "AugmentConfig":
        """A config under which `augment` returns its input unchanged."""
        return cls(flip_prob=0.0, rotate_prob=0.0, scale_prob=0.0, translate_prob=0.0,
                   gamma_prob=0.0, contrast_prob=0.0, brightness_prob=0.0)

    @property
    def geometric(self) -> bool:
        """Whether any geometric transform can fire (else the resample is skipped)."""
        return (self.flip_prob > 0 or (self.rotate_prob > 0 and self.max_rotate_deg > 0)
                or (self.scale_prob > 0 and self.scale_range != (1.0, 1.0))
                or (self.translate_prob > 0 and self.max_translate > 0))


def _check_batch(images) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images of shape (B, H, W, C); got {images.shape}")


def _fires(key, batch: int, prob: float):
    """(B,) bool: which images get a transform that fires with probability `prob`."""
    return jax.random.uniform(key, (batch,)) < prob


@functools.partial(jax.jit, static_argnames=("batch", "height", "width", "config"))
def sample_affine(key, batch: int, height: int, width: int, config: AugmentConfig):
    """Per-image affine maps from output to input pixel coordinates, drawn from `config`.

    Returns:
      (B, 2, 3) float32 matrices M: [x_in, y_in] = M[:, :2] @ [x_out, y_out] + M[:, 2], continuous
      pixel coordinates (pixel centres at i + 0.5) of the input and output images (same size).
      The forward transform (input -> output content) is: flip, then scale s and rotate by
      theta counter-clockwise on screen (y points down), then translate; M is its inverse.
    """
    kf, kr, kr2, ks, ks2, kt, kt2 = jax.random.split(key, 7)
    flip = _fires(kf, batch, config.flip_prob)
    theta = jnp.where(_fires(kr2, batch, config.rotate_prob),
                      jax.random.uniform(kr, (batch,), minval=-1.0, maxval=1.0)
                      * (config.max_rotate_deg * math.pi / 180.0), 0.0)
    lo, hi = config.scale_range
    scale = jnp.where(_fires(ks2, batch, config.scale_prob),
                      jax.random.uniform(ks, (batch,), minval=lo, maxval=hi), 1.0)
    shift = jnp.where(_fires(kt2, batch, config.translate_prob)[:, None],
                      jax.random.uniform(kt, (batch, 2), minval=-1.0, maxval=1.0)
                      * config.max_translate * jnp.array([width, height], jnp.float32), 0.0)
    return _inverse_affine(flip, theta, scale, shift, height, width)


def _inverse_affine(flip, theta, scale, shift, height: int, width: int):
    """Output->input matrices (B, 2, 3) for: flip, rotate by theta and scale about the centre, shift.

    Forward on centred coords p = u - c:  q = s * R(theta) @ F @ p + shift,  R counter-clockwise on
    screen (y down): R = [[cos, sin], [-sin, cos]].  Inverse: p = F @ R(-theta) @ (q - shift) / s.
    """
    cx, cy = width / 2.0, height / 2.0
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    inv_s = 1.0 / scale
    fx = jnp.where(flip, -1.0, 1.0)
    # A = F @ R(theta)^T / s, with R^T = [[cos, -sin], [sin, cos]].
    a00, a01 = fx * cos * inv_s, -fx * sin * inv_s
    a10, a11 = sin * inv_s, cos * inv_s
    a = jnp.stack([jnp.stack([a00, a01], -1), jnp.stack([a10, a11], -1)], -2)  # (B, 2, 2)
    c = jnp.array([cx, cy], jnp.float32)
    # u_in = c + A @ (u_out - c - shift)  =>  offset = c - A @ (c + shift)
    offset = c - jnp.einsum("bij,bj->bi", a, c + shift)
    return jnp.concatenate([a, offset[..., None]], axis=-1).astype(jnp.float32)


@jax.jit
def warp_affine(images, matrices):
    """Resample each image at affine-mapped positions: bilinear, zero outside the image.

    Args:
      images: (B, H, W, C) float.
      matrices: (B, 2, 3) output->input maps in continuous pixel coordinates (see `sample_affine`).

    Returns:
      (B, H, W, C), images.dtype. Output pixel (i, j) reads the input at continuous point
      M @ (j + 0.5, i + 0.5, 1), i.e. at index coordinates that point - 0.5; each of the four
      bilinear neighbours outside the image contributes 0.
    """
    _check_batch(images)
    b, h, w, c = images.shape
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                          jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
    pts = jnp.stack([xs.ravel(), ys.ravel(), jnp.ones(h * w, jnp.float32)], 0)  # (3, HW)
    src = jnp.einsum("bij,jn->bin", matrices.astype(jnp.float32), pts,
                     precision=jax.lax.Precision.HIGHEST) - 0.5  # (B, 2, HW) index coords
    x, y = src[:, 0], src[:, 1]
    x0, y0 = jnp.floor(x), jnp.floor(y)
    wx, wy = x - x0, y - y0
    flat = images.reshape(b, h * w, c)
    out = jnp.zeros((b, h * w, c), images.dtype)
    for dy, wgt_y in ((0, 1.0 - wy), (1, wy)):
        for dx, wgt_x in ((0, 1.0 - wx), (1, wx)):
            xi, yi = x0 + dx, y0 + dy
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
            vals = jnp.take_along_axis(flat, idx[..., None], axis=1)
            wgt = jnp.where(inside, wgt_x * wgt_y, 0.0).astype(images.dtype)
            out = out + vals * wgt[..., None]
    return out.reshape(b, h, w, c)


@jax.jit
def random_flip(key, images, prob: float = 0.5):
    """Flip each image left-right with probability `prob` (exact: a reindexing, no resample)."""
    _check_batch(images)
    flip = _fires(key, images.shape[0], prob)
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames="config")
def random_affine(key, images, config: AugmentConfig):
    """Flip / rotate / scale / translate each image per `config` with one bilinear resample."""
    _check_batch(images)
    b, h, w, _ = images.shape
    return warp_affine(images, sample_affine(key, b, h, w, config))


def adjust_gamma(images, gamma):
    """x ** gamma per image; gamma (B,). Inputs clipped to [0, 1] first (x ** g needs x >= 0)."""
    g = jnp.asarray(gamma, images.dtype).reshape(-1, 1, 1, 1)
    return jnp.clip(images, 0.0, 1.0) ** g


def adjust_contrast(images, factor):
    """mean + factor * (x - mean), mean over each image's pixels and channels; factor (B,)."""
    f = jnp.asarray(factor, images.dtype).reshape(-1, 1, 1, 1)
    mean = jnp.mean(images, axis=(1, 2, 3), keepdims=True)
    return mean + f * (images - mean)


def adjust_brightness(images, delta):
    """x + delta per image; delta (B,)."""
    return images + jnp.asarray(delta, images.dtype).reshape(-1, 1, 1, 1)


@functools.partial(jax.jit, static_argnames="config")
def random_photometric(key, images, config: AugmentConfig):
    """Gamma, contrast, brightness per `config` (each fires per image with its probability),
    then clip to [0, 1]."""
    _check_batch(images)
    b = images.shape[0]
    kg, kg2, kc, kc2, kb, kb2 = jax.random.split(key, 6)
    glo, ghi = config.gamma_range
    gamma = jnp.exp(jax.random.uniform(kg, (b,), minval=math.log(glo), maxval=math.log(ghi)))
    gamma = jnp.where(_fires(kg2, b, config.gamma_prob), gamma, 1.0)
    clo, chi = config.contrast_range
    factor = jnp.where(_fires(kc2, b, config.contrast_prob),
                       jax.random.uniform(kc, (b,), minval=clo, maxval=chi), 1.0)
    delta = jnp.where(_fires(kb2, b, config.brightness_prob),
                      jax.random.uniform(kb, (b,), minval=-1.0, maxval=1.0) * config.max_brightness, 0.0)
    x = adjust_gamma(images, gamma)
    x = adjust_contrast(x, factor)
    x = adjust_brightness(x, delta)
    return jnp.clip(x, 0.0, 1.0)


def ellipse_masks(centres, semi_axes, angles, height: int, width: int):
    """(B, H, W) bool: pixel centres inside each image's ellipse. centres (B, 2) (x, y) and
    semi_axes (B, 2) (a, b) in pixels, angles (B,) radians (counter-clockwise on screen)."""
    ys, xs = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) + 0.5,
                          jnp.arange(width, dtype=jnp.float32) + 0.5, indexing="ij")
    dx = xs[None] - centres[:, 0, None, None]
    dy = ys[None] - centres[:, 1, None, None]
    cos, sin = jnp.cos(angles)[:, None, None], jnp.sin(angles)[:, None, None]
    u = (dx * cos - dy * sin) / semi_axes[:, 0, None, None]
    v = (dx * sin + dy * cos) / semi_axes[:, 1, None, None]
    return u * u + v * v <= 1.0


@functools.partial(jax.jit, static_argnames=("config",))
def random_fill(key, images, config: AugmentConfig):
    """Each image, with probability `config.fill_prob`, gets one random ellipse filled in from
    its surroundings (`mskjax.fill.fill_masked`; every channel alike). (B, H, W, C) -> same."""
    _check_batch(images)
    b, h, w, c = images.shape
    kf, kc, ka, kt = jax.random.split(key, 4)
    fires = _fires(kf, b, config.fill_prob)
    centres = jax.random.uniform(kc, (b, 2)) * jnp.asarray([w, h], jnp.float32)
    lo, hi = config.fill_size_range
    axes = jax.random.uniform(ka, (b, 2), minval=lo, maxval=hi) * float(max(h, w))
    angles = jax.random.uniform(kt, (b,), minval=0.0, maxval=math.pi)
    masks = ellipse_masks(centres, axes, angles, h, w) & fires[:, None, None]
    per_channel = jnp.moveaxis(images, -1, 1).reshape(b * c, h, w)
    filled = fill_masked(per_channel, jnp.repeat(masks, c, axis=0)[:, None], dilate=0)[:, 0]
    out = jnp.moveaxis(filled.reshape(b, c, h, w), 1, -1).astype(images.dtype)
    return jnp.where(fires[:, None, None, None], out, images)


@functools.partial(jax.jit, static_argnames="config")
def augment(key, images, config: AugmentConfig = AugmentConfig()):
    """All augmentations of `config`: one affine resample, then the photometric ones.

    Args:
      key: a `jax.random` key (the caller splits it per step; e.g. fold in the step number).
      images: (B, H, W, C) float in [0, 1] (the loader's "image", before `normalize`).
      config: an `AugmentConfig` (a static argument: each distinct config compiles once).

    Returns:
      (B, H, W, C) of images.dtype in [0, 1]; exactly `images` when nothing can fire.
    """
    _check_batch(images)
    kgeo, kphoto = jax.random.split(key)
    x = images
    if config.geometric:
        x = random_affine(kgeo, x, config)
    if config.fill_prob > 0:  # its own key, so the other draws stay those of a config without it
        x = random_fill(jax.random.fold_in(key, 2), x, config)
    if config.gamma_prob > 0 or config.contrast_prob > 0 or config.brightness_prob > 0:
        x = random_photometric(kphoto, x, config)
    return x
