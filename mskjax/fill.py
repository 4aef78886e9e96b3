"""Filling image regions in from their surroundings (a removed structure replaced by what is around it).

Used to ask a classifier what it loses when a region is gone (`mskjax.deletion_choice`) and, as an
augmentation (`mskjax.data.augment`, `fill_prob`), to teach it that a filled-in patch is not itself
evidence. Traceable (static shapes, jit-able).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
    """(N, H, W) separable Gaussian blur, zero outside (normalised convolution divides that out)."""
    r = max(1, int(math.ceil(3.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), jnp.float32)
    # Rows, then columns.
    y = jax.lax.conv_general_dilated(x[:, None], k[None, None, None, :], (1, 1), [(0, 0), (r, r)])
    y = jax.lax.conv_general_dilated(y, k[None, None, :, None], (1, 1), [(r, r), (0, 0)])
    return y[:, 0]


def fill_masked(images: jax.Array, masks: jax.Array, dilate: int = 1) -> jax.Array:
    """Images (B, S, S) in [0, 1] and masks (B, C, S, S) bool -> (B, C, S, S): each image with its
    c-th mask (grown by `dilate` pixels) filled in from the pixels around it.

    The fill is a normalised convolution: blur(image * keep) / blur(keep) at a fine scale (sigma
    S/32) where enough kept pixels are near, else at a coarse one (S/8), else the kept pixels' mean,
    so a removed structure is replaced by its surroundings rather than by a smear of itself."""
    b, c, h, w = masks.shape
    m = masks.astype(jnp.float32)
    if dilate > 0:
        m = jax.lax.reduce_window(m, 0.0, jax.lax.max, (1, 1, 2 * dilate + 1, 2 * dilate + 1), (1, 1, 1, 1), "SAME")
    keep = 1.0 - m
    x = jnp.broadcast_to(images[:, None].astype(jnp.float32), (b, c, h, w))
    flat_x, flat_k = (x * keep).reshape(b * c, h, w), keep.reshape(b * c, h, w)
    side = float(max(h, w))
    fills = []
    for sigma in (side / 32.0, side / 8.0):
        num, den = _gaussian_blur(flat_x, sigma), _gaussian_blur(flat_k, sigma)
        fills.append((num / jnp.maximum(den, 1e-6), den))
    (fine, w_fine), (coarse, w_coarse) = fills
    mean = (flat_x.sum((1, 2)) / jnp.maximum(flat_k.sum((1, 2)), 1.0))[:, None, None]
    fill = jnp.where(w_fine > 0.1, fine, jnp.where(w_coarse > 1e-3, coarse, mean))
    out = flat_x + (1.0 - flat_k) * fill
    return out.reshape(b, c, h, w)


__all__ = ["fill_masked"]
