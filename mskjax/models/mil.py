"""Gated-attention multiple-instance pooling over a patch grid (Ilse, Tomczak and Welling 2018,
"Attention-based Deep Multiple Instance Learning", eq. 9), written here from the paper.

An image is a bag of patches: the cells of a feature map (B, h, w, C). Each cell k is embedded
(optional Dense + ReLU, `hidden` units; 0 keeps the input features), scored by the gated attention

    e_k = w^T (tanh(V x_k) * sigmoid(U x_k))          (attention_V, attention_U: Dense(attention_dim);
    a_k = softmax over the bag's valid cells of e_k    attention_w: Dense(1))

and the bag embedding z = sum_k a_k x_k goes through one Dense ("classifier") to the logits.
Because the classifier is affine and the a_k sum to 1, the logit is exactly the attention-weighted
mean of the **instance logits** s_k = classifier(x_k): logit = sum_k a_k s_k. Two per-patch maps
therefore come for free and serve as localization maps: the attention a_k (where the model looks)
and the instance logits s_k (what each patch alone says).

Cells marked invalid (e.g. the zero padding of a letterboxed input) get attention exactly 0; a bag
with no valid cell gets all-zero attention and the classifier's bias as its logit.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn


class MILOutput(NamedTuple):
    """logits (B, K); attention (B, h, w) (sums to 1 over valid cells, 0 elsewhere);
    attention_logits (B, h, w) (e_k before the softmax; -inf at invalid cells);
    instance_logits (B, h, w, K) (the classifier applied to each cell's embedding)."""

    logits: jax.Array
    attention: jax.Array
    attention_logits: jax.Array
    instance_logits: jax.Array


def masked_softmax(scores: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Softmax of scores (B, N) over the last axis restricted to valid (B, N) bool entries: invalid
    entries are exactly 0; a row without a valid entry is all 0 (not NaN)."""
    if valid is None:
        return jax.nn.softmax(scores, axis=-1)
    masked = jnp.where(valid, scores, -jnp.inf)
    top = jnp.max(masked, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.where(valid, jnp.exp(masked - top), 0.0)
    return e / jnp.maximum(jnp.sum(e, axis=-1, keepdims=True), jnp.finfo(e.dtype).tiny)


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL head: feats (B, h, w, C), valid (B, h, w) bool or None -> MILOutput.

    Submodules: embed (Dense(hidden), absent when hidden == 0), attention_V, attention_U,
    attention_w, classifier. `dropout` applies to the cell embeddings when train=True (needs a
    "dropout" rng)."""

    num_classes: int = 1
    hidden: int = 128
    attention_dim: int = 64
    dropout: float = 0.0

    @nn.compact
    def __call__(self, feats: jax.Array, valid: jax.Array | None = None, train: bool = False) -> MILOutput:
        if feats.ndim != 4:
            raise ValueError(f"GatedAttentionMIL expects a feature map (B, h, w, C), got {feats.shape}")
        b, h, w, c = feats.shape
        x = feats.astype(jnp.float32).reshape(b, h * w, c)
        if valid is not None:
            if valid.shape != (b, h, w):
                raise ValueError(f"valid must be (B, h, w) = {(b, h, w)}, got {valid.shape}")
            valid = valid.reshape(b, h * w).astype(bool)
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, name="embed")(x))
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        gate = jnp.tanh(nn.Dense(self.attention_dim, name="attention_V")(x)) * \
            nn.sigmoid(nn.Dense(self.attention_dim, name="attention_U")(x))
        e = nn.Dense(1, name="attention_w")(gate)[..., 0]  # (B, N)
        a = masked_softmax(e, valid)
        classifier = nn.Dense(self.num_classes, name="classifier")
        z = jnp.einsum("bn,bnc->bc", a, x)
        logits = classifier(z)
        instance = classifier(x)  # (B, N, K)
        e_out = e if valid is None else jnp.where(valid, e, -jnp.inf)
        return MILOutput(logits, a.reshape(b, h, w), e_out.reshape(b, h, w),
                         instance.reshape(b, h, w, self.num_classes))
