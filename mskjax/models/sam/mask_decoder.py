"""SAM mask decoder: output tokens + prompt tokens through the two-way transformer, then masks from
hypernetwork MLPs applied to an upscaled image embedding, and an IoU prediction head.

Outputs are low-resolution mask logits (n, M, 4h, 4w) over the padded SAM input frame (4h = S/4)
and predicted IoU (n, M); M = num_multimask_outputs (multimask) or 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.sam.common import LAYERNORM2D_EPS, ConvTranspose2x2, EmbeddingTable, gelu, layer_norm
from mskjax.models.sam.transformer import TwoWayTransformer


class MLP(nn.Module):
    """num_layers Dense layers, ReLU between them. Submodules layers_{i}."""

    hidden_dim: int
    output_dim: int
    num_layers: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.output_dim if last else self.hidden_dim, name=f"layers_{i}")(x)
            if not last:
                x = jax.nn.relu(x)
        return x


class MaskDecoder(nn.Module):
    """Mirrors segment_anything's MaskDecoder.

    Submodules iou_token, mask_tokens, transformer, output_upscaling_{0,1,3} (ConvT 2x2, LayerNorm2d,
    ConvT 2x2; torch Sequential indices), output_hypernetworks_mlps_{i}, iou_prediction_head.
    """

    transformer_dim: int = 256
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    transformer_depth: int = 2
    transformer_heads: int = 8
    transformer_mlp_dim: int = 2048

    @nn.compact
    def __call__(self, image_embeddings: jax.Array, image_pe: jax.Array, sparse: jax.Array,
                 dense: jax.Array, multimask: bool) -> tuple[jax.Array, jax.Array]:
        """image_embeddings (n, h, w, D), one per prompt; image_pe (h, w, D); sparse (n, T, D);
        dense (n, h, w, D). Returns logits (n, M, 4h, 4w) and iou (n, M)."""
        d = self.transformer_dim
        num_mask_tokens = self.num_multimask_outputs + 1
        n = sparse.shape[0]
        output_tokens = jnp.concatenate(
            [EmbeddingTable(1, d, name="iou_token")(),
             EmbeddingTable(num_mask_tokens, d, name="mask_tokens")()], axis=0)
        tokens = jnp.concatenate(
            [jnp.broadcast_to(output_tokens, (n, *output_tokens.shape)), sparse], axis=1)

        src = image_embeddings + dense
        hs, src = TwoWayTransformer(self.transformer_depth, self.transformer_heads,
                                    self.transformer_mlp_dim, name="transformer")(
            src, image_pe[None], tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1:1 + num_mask_tokens, :]

        _, h, w, _ = image_embeddings.shape
        x = src.reshape(n, h, w, d)
        x = ConvTranspose2x2(d // 4, name="output_upscaling_0")(x)
        x = gelu(layer_norm(LAYERNORM2D_EPS, name="output_upscaling_1")(x))
        x = gelu(ConvTranspose2x2(d // 8, name="output_upscaling_3")(x))  # (n, 4h, 4w, d/8)
        hyper_in = jnp.stack(
            [MLP(d, d // 8, 3, name=f"output_hypernetworks_mlps_{i}")(mask_tokens_out[:, i, :])
             for i in range(num_mask_tokens)], axis=1)  # (n, M+1, d/8)
        masks = jnp.einsum("nmc,nyxc->nmyx", hyper_in, x)
        iou_pred = MLP(self.iou_head_hidden_dim, num_mask_tokens, self.iou_head_depth,
                       name="iou_prediction_head")(iou_token_out)
        sl = slice(1, None) if multimask else slice(0, 1)
        return masks[:, sl], iou_pred[:, sl]
