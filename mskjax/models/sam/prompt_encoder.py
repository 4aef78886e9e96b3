"""SAM prompt encoder: points, boxes and a dense low-resolution mask.

Coordinates are (x, y) float pixels in the SAM input frame (the resized, unpadded image inside the
S x S padded input; pixel i covers [i, i + 1)). Sparse outputs are (n, T, D) tokens, dense outputs
(n, h, w, D) with (h, w) the image-embedding grid.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.sam.common import LAYERNORM2D_EPS, EmbeddingTable, gelu, layer_norm

_HIGHEST = jax.lax.Precision.HIGHEST


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features of (x, y) in [0, 1]^2: [sin(2 pi (2c - 1) G), cos(...)], G (2, F).

    G is a fixed random buffer (trained SAM checkpoints carry theirs): it lives in the "buffers"
    collection, not "params", so optimisers leave it alone.
    """

    num_pos_feats: int = 128

    def setup(self):
        self.gaussian = self.variable(
            "buffers", "positional_encoding_gaussian_matrix",
            lambda: jax.random.normal(self.make_rng("params"), (2, self.num_pos_feats), jnp.float32))

    def encode(self, coords01: jax.Array) -> jax.Array:
        """(..., 2) normalised (x, y) -> (..., 2F)."""
        c = 2.0 * coords01 - 1.0
        # HIGHEST: angles reach tens of radians, reduced-precision matmuls would shift them.
        c = jnp.matmul(c, self.gaussian.value, precision=_HIGHEST)
        c = 2.0 * math.pi * c
        return jnp.concatenate([jnp.sin(c), jnp.cos(c)], axis=-1)

    def dense(self, h: int, w: int) -> jax.Array:
        """(h, w, 2F) encoding of the cell centres of an h x w grid."""
        ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
        return self.encode(grid)

    def with_coords(self, coords: jax.Array, image_size: tuple[int, int]) -> jax.Array:
        """(..., 2) pixel (x, y) in an image of size (H, W) -> (..., 2F)."""
        # Divide (not multiply by the reciprocal), as the official code does.
        size = jnp.asarray([image_size[1], image_size[0]], jnp.float32)
        return self.encode(coords.astype(jnp.float32) / size)


class PromptEncoder(nn.Module):
    """Mirrors segment_anything's PromptEncoder.

    embed_dim D (256); image_embedding_size (h, w) = S / 16; input_image_size (S, S).
    Submodules pe_layer, point_embeddings_{0..3} (negative point, positive point, box corner 1,
    box corner 2), not_a_point_embed, no_mask_embed, mask_downscaling_{0,1,3,4,6} (torch indices).
    """

    embed_dim: int = 256
    image_embedding_size: tuple[int, int] = (64, 64)
    input_image_size: tuple[int, int] = (1024, 1024)
    mask_in_chans: int = 16

    def setup(self):
        d = self.embed_dim
        self.pe_layer = PositionEmbeddingRandom(d // 2)
        self.point_embeddings = [EmbeddingTable(1, d) for _ in range(4)]
        self.not_a_point_embed = EmbeddingTable(1, d)
        self.no_mask_embed = EmbeddingTable(1, d)
        self.mask_downscaling_0 = nn.Conv(self.mask_in_chans // 4, (2, 2), strides=(2, 2),
                                          padding="VALID")
        self.mask_downscaling_1 = layer_norm(LAYERNORM2D_EPS)
        self.mask_downscaling_3 = nn.Conv(self.mask_in_chans, (2, 2), strides=(2, 2), padding="VALID")
        self.mask_downscaling_4 = layer_norm(LAYERNORM2D_EPS)
        self.mask_downscaling_6 = nn.Conv(d, (1, 1))

    @property
    def mask_input_size(self) -> tuple[int, int]:
        return (4 * self.image_embedding_size[0], 4 * self.image_embedding_size[1])

    def dense_pe(self) -> jax.Array:
        """(h, w, D) positional encoding of the image-embedding grid."""
        return self.pe_layer.dense(*self.image_embedding_size)

    def embed_points(self, points: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        """points (n, N, 2) pixel (x, y), labels (n, N) int -> (n, N [+1], D).

        Labels: 1 foreground, 0 background, -1 not a point (padding; its position is ignored).
        pad appends one not-a-point token, as the official code does when no box is given.
        """
        points = points.astype(jnp.float32) + 0.5  # centre of the pixel
        labels = labels.astype(jnp.int32)
        if pad:
            n = points.shape[0]
            points = jnp.concatenate([points, jnp.zeros((n, 1, 2), jnp.float32)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((n, 1), jnp.int32)], axis=1)
        emb = self.pe_layer.with_coords(points, self.input_image_size)
        lab = labels[..., None]
        emb = jnp.where(lab == -1, self.not_a_point_embed()[0], emb)
        emb = emb + jnp.where(lab == 0, self.point_embeddings[0]()[0], 0.0)
        emb = emb + jnp.where(lab == 1, self.point_embeddings[1]()[0], 0.0)
        return emb

    def embed_boxes(self, boxes: jax.Array) -> jax.Array:
        """boxes (n, 4) pixel (x0, y0, x1, y1) -> (n, 2, D), one token per corner."""
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        emb = self.pe_layer.with_coords(corners, self.input_image_size)
        corner_embed = jnp.concatenate([self.point_embeddings[2](), self.point_embeddings[3]()], axis=0)
        return emb + corner_embed

    def embed_masks(self, masks: jax.Array) -> jax.Array:
        """masks (n, 4h, 4w) logits -> (n, h, w, D)."""
        x = masks.astype(jnp.float32)[..., None]
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(self, n: int, points: jax.Array | None = None, labels: jax.Array | None = None,
                 boxes: jax.Array | None = None, masks: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """Embeds n prompts. Returns sparse (n, T, D) and dense (n, h, w, D) embeddings.

        T = (points: N + 1 if no boxes else N) + (boxes: 2); the order is points then box corners.
        Without masks the dense embedding is the learned no-mask vector at every cell.
        """
        sparse = jnp.zeros((n, 0, self.embed_dim), jnp.float32)
        if points is not None:
            if labels is None:
                raise ValueError("point prompts need labels (1 foreground, 0 background, -1 padding)")
            sparse = jnp.concatenate([sparse, self.embed_points(points, labels, boxes is None)], axis=1)
        if boxes is not None:
            sparse = jnp.concatenate([sparse, self.embed_boxes(boxes)], axis=1)
        no_mask = self.no_mask_embed()  # always touched, so initialisation creates it
        if masks is not None:
            if tuple(masks.shape[1:]) != self.mask_input_size:
                raise ValueError(f"mask input must be (n, {self.mask_input_size[0]}, "
                                 f"{self.mask_input_size[1]}), got {masks.shape}")
            dense = self.embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = jnp.broadcast_to(no_mask[0], (n, h, w, self.embed_dim))
        return sparse, dense
