"""SAM image encoder: a plain ViT (ViTDet style) with windowed and global attention, decomposed
relative position embeddings, an absolute position embedding and a conv + LayerNorm2d neck.

Input (B, S, S, 3) float32: normalised and padded images in the SAM input frame (see
`mskjax.sam.preprocess`), S = img_size. Output (B, S/p, S/p, out_chans) image embeddings, p the
patch size (16).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mskjax.models.sam.common import ENCODER_LN_EPS, LAYERNORM2D_EPS, MLPBlock, layer_norm, linear_resize_matrix


def rel_pos_index(q_size: int, k_size: int) -> np.ndarray:
    """(q_size, k_size) int indices into a relative-position table of length 2 * max(q, k) - 1.

    Same float32 arithmetic and truncation as segment_anything's `get_rel_pos`, which scales the
    shorter side's coordinates when q and k sizes differ.
    """
    q_ratio = np.float32(max(k_size / q_size, 1.0))
    k_ratio = np.float32(max(q_size / k_size, 1.0))
    q_coords = np.arange(q_size, dtype=np.float32)[:, None] * q_ratio
    k_coords = np.arange(k_size, dtype=np.float32)[None, :] * k_ratio
    rel = (q_coords - k_coords) + np.float32((k_size - 1) * max(q_size / k_size, 1.0))
    return rel.astype(np.int64)  # truncation toward zero, as torch's .long()


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative position embeddings (q_size, k_size, C) gathered from a table rel_pos (L, C).

    When L differs from 2 * max(q_size, k_size) - 1 the table is first resized along L with
    torch-style linear interpolation (align_corners=False), as the official code does.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        m = jnp.asarray(linear_resize_matrix(rel_pos.shape[0], max_rel_dist))
        rel_pos = jnp.matmul(m, rel_pos, precision=jax.lax.Precision.HIGHEST)
    return rel_pos[rel_pos_index(q_size, k_size)]


def relative_attention_logits(q: jax.Array, k: jax.Array, r_h: jax.Array, r_w: jax.Array,
                              h: int, w: int, scale: float) -> jax.Array:
    """Attention logits with decomposed relative positions, (b, nh, n, n), n = h * w tokens in
    row-major (y, x) order: logits[i, j] = scale * q_i . k_j + q_i . r_h[y_i, y_j] + q_i . r_w[x_i, x_j].

    q, k (b, nh, n, hd); r_h (h, h, hd), r_w (w, w, hd) from `get_rel_pos`. The two relative terms
    ride in the one matmul: q is extended by its (n, h) and (n, w) relative products, k by the
    one-hot rows and columns of its token. segment_anything adds them to the (n, n) logits as two
    broadcast passes; on XLA:CPU the extended matmul is 1.2-1.3x faster for the whole attention
    (the logits are written once). The dot adds the extra terms after q . k, the official order: on
    XLA:CPU the encoder's embeddings came out bit-identical to the separate sums (512 and 1024 px);
    other backends may round differently within float32.
    """
    b, nh, n, hd = q.shape
    rq = q.reshape(b, nh, h, w, hd)  # unscaled q, as the official code
    rel_h = jnp.einsum("bnyxd,ykd->bnyxk", rq, r_h).reshape(b, nh, n, h)
    rel_w = jnp.einsum("bnyxd,xkd->bnyxk", rq, r_w).reshape(b, nh, n, w)
    key_rows = jnp.asarray(np.repeat(np.eye(h, dtype=np.float32), w, axis=0), q.dtype)  # (n, h)
    key_cols = jnp.asarray(np.tile(np.eye(w, dtype=np.float32), (h, 1)), q.dtype)  # (n, w)
    q_ext = jnp.concatenate([q * scale, rel_h, rel_w], axis=-1)
    k_ext = jnp.concatenate([k, jnp.broadcast_to(key_rows, (b, nh, n, h)),
                             jnp.broadcast_to(key_cols, (b, nh, n, w))], axis=-1)
    return q_ext @ k_ext.swapaxes(-1, -2)


def padding_mask(h: int, w: int, window: int) -> np.ndarray:
    """(B', window, window, 1) bool per window of `window_partition` of an (1, h, w) grid: True on
    real tokens, False on the padding added at the bottom / right."""
    hp, wp = h + (-h) % window, w + (-w) % window
    valid = np.zeros((1, hp, wp, 1), bool)
    valid[:, :h, :w] = True
    return valid.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3).reshape(
        -1, window, window, 1)


class EncoderAttention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions.

    input_size (h, w) sizes the relative position tables (2h - 1, head_dim), (2w - 1, head_dim):
    the window size for windowed blocks, the token grid for global ones. window > 0 attends within
    non-overlapping window x window windows of the grid (zero-padded at the bottom / right, as
    segment_anything's blocks do); 0 over the whole grid.
    Submodules qkv, proj; params rel_pos_h, rel_pos_w.
    """

    num_heads: int
    input_size: tuple[int, int]
    use_rel_pos: bool = True
    qkv_bias: bool = True
    window: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, gh, gw, c = x.shape
        qkv_layer = nn.Dense(3 * c, use_bias=self.qkv_bias, name="qkv")
        qkv = qkv_layer(x)  # (b, gh, gw, 3c), real tokens only
        if self.window > 0:
            # segment_anything pads the tokens and then projects them; a padded (zero) token's
            # projection is the bias alone, so projecting only the real tokens and filling the
            # padding with the bias is the same computation with 1.7x fewer rows at 512 px
            # (32 x 32 tokens -> 9 windows of 14 x 14); the output projection likewise runs on the
            # real tokens after the windows are put back.
            qkv, padded = window_partition(qkv, self.window)
            if self.qkv_bias and padded != (gh, gw):
                fill = qkv_layer.variables["params"]["bias"].astype(qkv.dtype)
                valid = np.tile(padding_mask(gh, gw, self.window), (b, 1, 1, 1))
                qkv = jnp.where(jnp.asarray(valid), qkv, fill)
        bw, h, w = qkv.shape[:3]
        nh = self.num_heads
        hd = c // nh
        # Heads first, once: (3, b, nh, n, hd). Every product below is then a plain batched
        # matmul over (b, nh); on XLA:CPU the attention ran 1.15-1.2x faster than with einsums
        # over the (b, n, nh, hd) layout, within 1e-7 (the whole encoder a few percent;
        # tools/profile_sam_encoder.py, docs/BENCHMARKS.md "SAM's encoder profiled").
        qkv = qkv.reshape(bw, h * w, 3, nh, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (bw, nh, n, hd)
        if self.use_rel_pos:
            # Zero-initialised as in segment_anything.
            rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros,
                                   (2 * self.input_size[0] - 1, hd), jnp.float32)
            rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros,
                                   (2 * self.input_size[1] - 1, hd), jnp.float32)
            attn = relative_attention_logits(q, k, get_rel_pos(h, h, rel_pos_h), get_rel_pos(w, w, rel_pos_w),
                                             h, w, hd ** -0.5)
        else:
            attn = (q * (hd ** -0.5)) @ k.swapaxes(-1, -2)  # (bw, nh, n, n)
        attn = jax.nn.softmax(attn, axis=-1)
        out = (attn @ v).transpose(0, 2, 1, 3).reshape(bw, h, w, c)
        if self.window > 0:
            out = window_unpartition(out, self.window, padded, (gh, gw))
        return nn.Dense(c, name="proj")(out)


def window_partition(x: jax.Array, window: int) -> tuple[jax.Array, tuple[int, int]]:
    """(B, H, W, C) -> (B * nwin, window, window, C), zero-padding H, W at the bottom/right up to a
    multiple of window. Returns the windows and the padded size (Hp, Wp)."""
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: jax.Array, window: int, padded_hw: tuple[int, int],
                       hw: tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`: (B * nwin, window, window, C) -> (B, H, W, C)."""
    hp, wp = padded_hw
    h, w = hw
    c = windows.shape[-1]
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.reshape(b, hp // window, wp // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)[:, :h, :w, :]


class EncoderBlock(nn.Module):
    """Pre-norm ViT block; window > 0 attends within non-overlapping windows, 0 globally.

    Submodules norm1, attn, norm2, mlp.
    """

    num_heads: int
    window: int
    grid_size: tuple[int, int]
    mlp_ratio: float = 4.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        shortcut = x
        x = layer_norm(ENCODER_LN_EPS, name="norm1")(x)
        attn_size = self.grid_size if self.window == 0 else (self.window, self.window)
        x = shortcut + EncoderAttention(self.num_heads, attn_size, window=self.window, name="attn")(x)
        return x + MLPBlock(int(dim * self.mlp_ratio), "gelu", name="mlp")(
            layer_norm(ENCODER_LN_EPS, name="norm2")(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> embed_dim, (B, S, S, 3) -> (B, S/p, S/p, D). Submodule proj."""

    embed_dim: int
    patch_size: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="proj")(x)


class ImageEncoderViT(nn.Module):
    """(B, S, S, 3) -> (B, S/p, S/p, out_chans). Mirrors segment_anything's ImageEncoderViT.

    Submodules patch_embed (proj: Conv p x p stride p), blocks_{i}, neck_0 (1x1 conv), neck_1
    (LayerNorm2d), neck_2 (3x3 conv), neck_3 (LayerNorm2d); param pos_embed (1, S/p, S/p, D).
    """

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: Sequence[int] = (2, 5, 8, 11)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(
                f"image encoder expects (B, {self.img_size}, {self.img_size}, 3) images, got {x.shape}")
        p = self.patch_size
        x = PatchEmbed(self.embed_dim, p, name="patch_embed")(x)
        grid = (self.img_size // p, self.img_size // p)
        # Zero-initialised as in segment_anything (its checkpoints carry trained values).
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, *grid, self.embed_dim),
                               jnp.float32)
        x = x + pos_embed
        for i in range(self.depth):
            window = 0 if i in tuple(self.global_attn_indexes) else self.window_size
            x = EncoderBlock(self.num_heads, window, grid, self.mlp_ratio, name=f"blocks_{i}")(x)
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, name="neck_0")(x)
        x = layer_norm(LAYERNORM2D_EPS, name="neck_1")(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="neck_2")(x)
        return layer_norm(LAYERNORM2D_EPS, name="neck_3")(x)
