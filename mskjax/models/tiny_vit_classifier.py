"""LiteMedSAM's TinyViT image encoder as a classifier backbone (a `SplitModel`).

Segments (defaults = LiteMedSAM's encoder, `mskjax.models.sam.tiny_vit.TinyViT`, 256 px input):

  input        (B, 256, 256, 1 or 3)  LiteMedSAM-preprocessed (long side resized to 256, min-max to
                                      [0, 1], zero padding bottom/right: `mskjax.sam.preprocess(...,
                                      preprocessing="lite_medsam")`); one channel is repeated to
                                      three, as LiteMedSAM's preprocessing repeats a grey image
  patch_embed  (B, 256, 256, 64)
  layers_0     (B, 128, 128, 128)     MBConv x2 + merge
  layers_1     (B, 64, 64, 160)       TinyViT blocks x2 (window 7) + merge
  layers_2     (B, 64, 64, 320)       TinyViT blocks x6 (window 14) + merge (stride 1)
  layers_3     (B, 64, 64, 320)       TinyViT blocks x2 (window 7)
  neck         (B, 64, 64, 256)       SAM's neck: LiteMedSAM's image embedding (the "features")

Head (`head_type`):
  "linear"  global average pool + Dense "fc" (so every CAM method, `cam` included, applies);
  "mil"     `mskjax.models.mil.GatedAttentionMIL` ("mil") over the feature grid, all cells valid
            (use `mil_outputs` for its attention / instance-logit maps and a validity mask).

Variable names are TinyViT's at the top level (patch_embed, layers_{i}, neck_{0..3}), so LiteMedSAM's
image-encoder variables drop in unchanged (`mskjax.weights.litemedsam.tiny_vit_classifier_variables`).
BatchNorm layers always use their running statistics (the encoder's BatchNorms are frozen even
when the other weights are trained).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from mskjax.models.mil import GatedAttentionMIL, MILOutput
from mskjax.models.sam.common import LAYERNORM2D_EPS, layer_norm
from mskjax.models.sam.tiny_vit import BasicLayer, ConvLayer, PatchEmbed
from mskjax.models.split import SplitModel

HEAD_TYPES = ("linear", "mil")


class TinyViTClassifier(SplitModel):
    """TinyViT stages + neck, then a linear or gated-attention MIL head. See the module docstring."""

    num_classes: int = 1
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
    head_type: str = "linear"
    mil_hidden: int = 64
    mil_attention_dim: int = 32

    @property
    def segments(self) -> Sequence[str]:
        return ("patch_embed",) + tuple(f"layers_{i}" for i in range(len(self.depths))) + ("neck",)

    @property
    def embedding_size(self) -> int:
        """Side of the feature grid: img_size over the merge strides (64 for LiteMedSAM)."""
        return self.img_size // math.prod(self.merge_strides)

    def run_segment(self, name: str, x: jax.Array, train: bool) -> jax.Array:
        n = len(self.depths)
        if name == "patch_embed":
            if x.ndim != 4 or x.shape[1:3] != (self.img_size, self.img_size) or x.shape[-1] not in (1, 3):
                raise ValueError(f"{type(self).__name__} expects (B, {self.img_size}, {self.img_size}, 1 or 3) "
                                 f"images, got {x.shape}")
            if x.shape[-1] == 1:
                x = jnp.repeat(x, 3, axis=-1)
            return PatchEmbed(self.embed_dims[0], name="patch_embed")(x.astype(jnp.float32))
        if name.startswith("layers_"):
            i = int(name.split("_")[1])
            out_dim = self.embed_dims[i + 1] if i < n - 1 else None
            stride = self.merge_strides[i] if i < n - 1 else 1
            if i == 0:
                return ConvLayer(self.depths[0], self.mbconv_expand_ratio, out_dim, stride, name=name)(x)
            return BasicLayer(self.depths[i], self.num_heads[i], self.window_sizes[i], self.mlp_ratio,
                              self.local_conv_size, out_dim, stride, name=name)(x)
        if name == "neck":
            x = nn.Conv(self.out_chans, (1, 1), use_bias=False, name="neck_0")(x)
            x = layer_norm(LAYERNORM2D_EPS, name="neck_1")(x)
            x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="neck_2")(x)
            return layer_norm(LAYERNORM2D_EPS, name="neck_3")(x)
        raise ValueError(f"unknown segment {name!r}: expected one of {list(self.segments)}")

    def run_head(self, x: jax.Array, train: bool) -> jax.Array:
        if self.head_type == "linear":
            x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
            return nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(x)
        if self.head_type == "mil":
            return GatedAttentionMIL(self.num_classes, self.mil_hidden, self.mil_attention_dim, name="mil")(
                x, None, train).logits
        raise ValueError(f"unknown head_type {self.head_type!r}: expected one of {list(HEAD_TYPES)}")


def mil_outputs(model: TinyViTClassifier, variables, features: jax.Array,
                valid: jax.Array | None = None) -> MILOutput:
    """The MIL head's logits, attention and instance logits for features (B, h, w, C) (the "neck"
    output) of a `head_type="mil"` model, cells outside `valid` (B, h, w) left out of the pooling.
    With valid None the logits equal `model.apply(variables, features, method="head")`."""
    if model.head_type != "mil":
        raise ValueError(f"mil_outputs needs head_type 'mil', the model has {model.head_type!r}")
    head = GatedAttentionMIL(model.num_classes, model.mil_hidden, model.mil_attention_dim, parent=None)
    return head.apply({"params": variables["params"]["mil"]}, features, valid)


def linear_head_map(model: TinyViTClassifier, variables, features: jax.Array, target: int = 0) -> jax.Array:
    """CAM of a linear-head model on its features (B, h, w, C): sum_c W[c, target] A_c, (B, h, w)
    float32, before ReLU and scaling (Zhou et al. 2016; `mskjax.cam.cam`'s raw map). Over a global
    average pool, Grad-CAM's channel weights are W[:, target] / (h w), so it has the same peak."""
    if model.head_type != "linear":
        raise ValueError(f"linear_head_map needs head_type 'linear', the model has {model.head_type!r}")
    w = jnp.asarray(variables["params"]["fc"]["kernel"], jnp.float32)[:, target]
    return jnp.einsum("bhwc,c->bhw", features.astype(jnp.float32), w)
