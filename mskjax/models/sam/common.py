"""Small pieces shared by the SAM modules.

All feature maps are NHWC. Parameter names follow Flax (`kernel`, `bias`, `scale`, `embedding`);
`mskjax.weights.sam` maps them one to one to the official PyTorch checkpoint keys.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# torch.nn.GELU is the exact erf form; flax's nn.gelu defaults to the tanh approximation.
gelu = partial(jax.nn.gelu, approximate=False)

# torch's LayerNorm computes the biased variance as mean((x - mean)^2); Flax's default "fast"
# variance, mean(x^2) - mean(x)^2, loses precision when |mean| >> std.
ENCODER_LN_EPS = 1e-6  # ImageEncoderViT blocks (norm_layer=partial(LayerNorm, eps=1e-6))
LAYERNORM2D_EPS = 1e-6  # LayerNorm2d everywhere (neck, mask downscaling, output upscaling)
TRANSFORMER_LN_EPS = 1e-5  # nn.LayerNorm default in the two-way transformer


def layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
    """LayerNorm over the last (channel) axis with torch's variance formula.

    On NHWC maps this is SAM's LayerNorm2d (which normalises NCHW over the channel axis).
    Params: scale (C,), bias (C,).
    """
    return nn.LayerNorm(epsilon=epsilon, use_fast_variance=False, name=name)


class EmbeddingTable(nn.Module):
    """A learned table (num, dim), used whole (torch `nn.Embedding(...).weight`). Param: embedding."""

    num: int
    dim: int

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("embedding", nn.initializers.normal(1.0), (self.num, self.dim), jnp.float32)


class MLPBlock(nn.Module):
    """lin1 -> activation -> lin2 on the last axis (SAM's MLPBlock). Submodules lin1, lin2."""

    mlp_dim: int
    activation: str = "gelu"  # "gelu" (exact) or "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = {"gelu": gelu, "relu": jax.nn.relu}[self.activation]
        y = act(nn.Dense(self.mlp_dim, name="lin1")(x))
        return nn.Dense(x.shape[-1], name="lin2")(y)


class ConvTranspose2x2(nn.Module):
    """Transposed convolution with kernel 2 and stride 2 (no overlap): (B, H, W, Cin) -> (B, 2H, 2W, features).

    out[2i + a, 2j + b, o] = sum_c x[i, j, c] * kernel[a, b, c, o] + bias[o]. Written as an einsum so
    there is no kernel-flip convention to get wrong. kernel (2, 2, Cin, features) equals torch's
    ConvTranspose2d weight (Cin, features, 2, 2) transposed by (2, 3, 0, 1).
    """

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, cin = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, cin, self.features),
                            jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        y = jnp.einsum("bhwc,xyco->bhxwyo", x, kernel)
        return y.reshape(b, 2 * h, 2 * w, self.features) + bias


def linear_resize_matrix(in_len: int, out_len: int) -> np.ndarray:
    """(out_len, in_len) float32 matrix of torch's linear interpolation, align_corners=False, no antialias.

    Row i holds the two weights torch's `F.interpolate(mode="linear"/"bilinear")` gives output
    sample i: source position s = (i + 0.5) * in/out - 0.5 clamped at 0, taps floor(s) and
    floor(s) + 1 (clamped to the last sample). Computed in float32 as torch does for float32 input.
    Bilinear resizing is this matrix applied along each axis.
    """
    scale = np.float32(in_len) / np.float32(out_len)
    dst = np.arange(out_len, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
    i0 = src.astype(np.int64)  # src >= 0, so truncation is floor
    i0 = np.minimum(i0, in_len - 1)
    i1 = np.minimum(i0 + 1, in_len - 1)
    lam1 = (src - i0.astype(np.float32)).astype(np.float32)
    lam0 = np.float32(1.0) - lam1
    m = np.zeros((out_len, in_len), np.float32)
    rows = np.arange(out_len)
    np.add.at(m, (rows, i0), lam0)
    np.add.at(m, (rows, i1), lam1)
    return m
