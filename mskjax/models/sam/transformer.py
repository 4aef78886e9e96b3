"""SAM's two-way transformer: prompt tokens and image tokens attend to each other.

Tokens are (n, T, D); the image is flattened to (n, h * w, D) in row-major (y, x) order.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.sam.common import TRANSFORMER_LN_EPS, MLPBlock, layer_norm


class DownsampledAttention(nn.Module):
    """Multi-head attention whose q/k/v projections map D to D / downsample_rate.

    q (n, Tq, D), k and v (n, Tk, D) -> (n, Tq, D). Submodules q_proj, k_proj, v_proj, out_proj.
    """

    num_heads: int
    downsample_rate: int = 1

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        dim = q.shape[-1]
        internal = dim // self.downsample_rate
        if internal % self.num_heads:
            raise ValueError(f"{self.num_heads} heads do not divide the internal dim {internal}")
        hd = internal // self.num_heads

        def heads(x, name):
            y = nn.Dense(internal, name=name)(x)
            return y.reshape(*y.shape[:-1], self.num_heads, hd)

        qh, kh, vh = heads(q, "q_proj"), heads(k, "k_proj"), heads(v, "v_proj")
        attn = jnp.einsum("bqnd,bknd->bnqk", qh, kh) / math.sqrt(hd)
        attn = jax.nn.softmax(attn, axis=-1)
        out = jnp.einsum("bnqk,bknd->bqnd", attn, vh).reshape(*q.shape[:-1], internal)
        return nn.Dense(dim, name="out_proj")(out)


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image cross attention, token MLP (ReLU), image->token cross
    attention; post-norm after each. Submodules self_attn, norm1, cross_attn_token_to_image, norm2,
    mlp, norm3, norm4, cross_attn_image_to_token."""

    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = DownsampledAttention(self.num_heads, name="self_attn")(queries, queries, queries)
        else:
            q = queries + query_pe
            queries = queries + DownsampledAttention(self.num_heads, name="self_attn")(q, q, queries)
        queries = layer_norm(TRANSFORMER_LN_EPS, name="norm1")(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + DownsampledAttention(
            self.num_heads, self.downsample_rate, name="cross_attn_token_to_image")(q, k, keys)
        queries = layer_norm(TRANSFORMER_LN_EPS, name="norm2")(queries)

        queries = queries + MLPBlock(self.mlp_dim, "relu", name="mlp")(queries)
        queries = layer_norm(TRANSFORMER_LN_EPS, name="norm3")(queries)

        q, k = queries + query_pe, keys + key_pe
        keys = keys + DownsampledAttention(
            self.num_heads, self.downsample_rate, name="cross_attn_image_to_token")(k, q, queries)
        keys = layer_norm(TRANSFORMER_LN_EPS, name="norm4")(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """image (n, h, w, D), image_pe (n or 1, h, w, D), tokens (n, T, D) -> (tokens (n, T, D),
    image tokens (n, h * w, D)). Submodules layers_{i}, final_attn_token_to_image, norm_final_attn."""

    depth: int = 2
    num_heads: int = 8
    mlp_dim: int = 2048
    downsample_rate: int = 2

    @nn.compact
    def __call__(self, image: jax.Array, image_pe: jax.Array, tokens: jax.Array):
        n, h, w, d = image.shape
        keys = image.reshape(n, h * w, d)
        key_pe = image_pe.reshape(image_pe.shape[0], h * w, d)
        queries = tokens
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                self.num_heads, self.mlp_dim, self.downsample_rate, skip_first_layer_pe=(i == 0),
                name=f"layers_{i}")(queries, keys, tokens, key_pe)
        q, k = queries + tokens, keys + key_pe
        queries = queries + DownsampledAttention(
            self.num_heads, self.downsample_rate, name="final_attn_token_to_image")(q, k, keys)
        queries = layer_norm(TRANSFORMER_LN_EPS, name="norm_final_attn")(queries)
        return queries, keys
