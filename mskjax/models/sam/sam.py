"""The Segment Anything model: configurations and the module that joins encoder, prompt encoder and
mask decoder.

Frames: images enter as (B, S, S, 3) normalised, zero-padded SAM inputs (S = img_size); prompt
coordinates are (x, y) pixels of that frame; image embeddings are (B, S/16, S/16, 256); mask logits
are (n, M, S/4, S/4) over the whole padded frame.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mskjax.models.sam.image_encoder import ImageEncoderViT
from mskjax.models.sam.mask_decoder import MaskDecoder
from mskjax.models.sam.prompt_encoder import PromptEncoder

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)
MASK_THRESHOLD = 0.0


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of one SAM variant (hashable, so a model can be a static jit argument)."""

    arch: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]
    window_size: int = 14
    img_size: int = 1024
    patch_size: int = 16
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid, img_size // patch_size."""
        return self.img_size // self.patch_size

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (and of a mask input), 4 * embedding_size."""
        return 4 * self.embedding_size


# Encoder settings of the official builders (build_sam_vit_h/l/b), plus a small ViT for CPU work.
_ARCHS = {
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    # Not an official variant: 192-wide, 6 blocks, 3 heads, windows of 8 (divides the 16 x 16 grid
    # of a 256 px input), global attention at blocks 2 and 5. Trained from scratch or distilled.
    "vit_tiny": dict(embed_dim=192, depth=6, num_heads=3, global_attn_indexes=(2, 5), window_size=8),
}
ARCHS = tuple(_ARCHS)


def sam_config(arch: str, img_size: int = 1024, **overrides) -> SamConfig:
    """Configuration for `arch` in ARCHS at input size img_size (a multiple of 16)."""
    if arch not in _ARCHS:
        raise ValueError(f"unknown SAM arch {arch!r}: expected one of {ARCHS}")
    if img_size <= 0 or img_size % 16:
        raise ValueError(f"SAM img_size must be a positive multiple of 16, got {img_size}")
    fields = {**_ARCHS[arch], "img_size": img_size, **overrides}
    return SamConfig(arch=arch, **fields)


def prompt_encoder_and_mask_decoder(c) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder for a config with prompt_embed_dim, embedding_size,
    img_size, mask_in_chans and the decoder fields (SamConfig, LiteMedSamConfig): the part every
    segmenter here shares. Assign them to `self.prompt_encoder` / `self.mask_decoder` in `setup`,
    so the parameter paths are the official ones."""
    e = c.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=c.prompt_embed_dim, image_embedding_size=(e, e),
        input_image_size=(c.img_size, c.img_size), mask_in_chans=c.mask_in_chans)
    mask_decoder = MaskDecoder(
        transformer_dim=c.prompt_embed_dim, num_multimask_outputs=c.num_multimask_outputs,
        iou_head_depth=c.iou_head_depth, iou_head_hidden_dim=c.iou_head_hidden_dim,
        transformer_depth=c.decoder_depth, transformer_heads=c.decoder_heads,
        transformer_mlp_dim=c.decoder_mlp_dim)
    return prompt_encoder, mask_decoder


class Sam(nn.Module):
    """SAM as a Flax module. Variables: {"params": ..., "buffers": {prompt_encoder: {pe_layer:
    {positional_encoding_gaussian_matrix}}}} (the buffer is a fixed random matrix, not trained).

    Methods (use with `model.apply(variables, ..., method=...)`):
      embed_images(images (B, S, S, 3)) -> (B, S/16, S/16, 256)
      predict_masks(image_embeddings (n, h, w, 256), boxes (n, 4) | None, points (n, N, 2) | None,
                    point_labels (n, N) | None, mask_input (n, 4h, 4w) | None, multimask)
          -> (low_res_logits (n, M, 4h, 4w), iou_predictions (n, M))
      __call__: both, for one prompt per image (used to initialise).
    """

    config: SamConfig

    def setup(self):
        c = self.config
        self.image_encoder = ImageEncoderViT(
            img_size=c.img_size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
            num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, out_chans=c.prompt_embed_dim,
            window_size=c.window_size, global_attn_indexes=tuple(c.global_attn_indexes))
        self.prompt_encoder, self.mask_decoder = prompt_encoder_and_mask_decoder(c)

    def embed_images(self, images: jax.Array) -> jax.Array:
        return self.image_encoder(images)

    def predict_masks(self, image_embeddings: jax.Array, boxes: jax.Array | None = None,
                      points: jax.Array | None = None, point_labels: jax.Array | None = None,
                      mask_input: jax.Array | None = None, multimask: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
        n = image_embeddings.shape[0]
        sparse, dense = self.prompt_encoder(n, points, point_labels, boxes, mask_input)
        return self.mask_decoder(image_embeddings, self.prompt_encoder.dense_pe(), sparse, dense,
                                 multimask)

    def __call__(self, images: jax.Array, boxes: jax.Array | None = None,
                 points: jax.Array | None = None, point_labels: jax.Array | None = None,
                 mask_input: jax.Array | None = None, multimask: bool = True):
        """One prompt per image: images (B, S, S, 3), boxes (B, 4), points (B, N, 2), ..."""
        return self.predict_masks(self.embed_images(images), boxes, points, point_labels,
                                  mask_input, multimask)


def build_sam(arch: str, img_size: int = 1024, **overrides) -> Sam:
    """The Sam module for `arch` (see `sam_config`)."""
    return Sam(sam_config(arch, img_size, **overrides))


def _init_inputs(config: SamConfig):
    s, m = config.img_size, config.low_res_size
    return (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 4), jnp.float32),
            jnp.zeros((1, 1, 2), jnp.float32), jnp.ones((1, 1), jnp.int32),
            jnp.zeros((1, m, m), jnp.float32))


def init_sam_variables(model: Sam, rng: jax.Array) -> dict:
    """Freshly initialised variables {"params", "buffers"} for training from scratch.

    All random leaves are slices of ONE normal draw: XLA on CPU compiles each separate random op
    slowly (hundreds of per-parameter initialisers took minutes), one op compiles in seconds.
    Scaling: kernels LeCun normal (std 1 / sqrt(fan_in), fan_in = product of all axes but the
    last); embeddings and the positional-encoding gaussian N(0, 1); biases, pos_embed and the
    relative-position tables zero (as segment_anything); LayerNorm scales one.
    """
    shapes = sam_variable_shapes(model)
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(shapes)[0]
    treedef = jax.tree_util.tree_structure(shapes)

    def init(key):
        random = [(path, leaf) for path, leaf in paths_and_leaves if _init_kind(path) != "const"]
        total = sum(int(np.prod(leaf.shape)) for _, leaf in random)
        draw = jax.random.normal(key, (total,), jnp.float32)
        out, offset = [], 0
        for path, leaf in paths_and_leaves:
            kind, size = _init_kind(path), int(np.prod(leaf.shape))
            if kind == "const":
                fill = 1.0 if _leaf_name(path) == "scale" else 0.0
                out.append(jnp.full(leaf.shape, fill, jnp.float32))
                continue
            x = draw[offset:offset + size].reshape(leaf.shape)
            offset += size
            if kind == "kernel":
                x = x / np.sqrt(np.prod(leaf.shape[:-1]))
            out.append(x)
        return jax.tree_util.tree_unflatten(treedef, out)

    return jax.jit(init)(rng)


def _leaf_name(path) -> str:
    return str(getattr(path[-1], "key", path[-1]))


def _init_kind(path) -> str:
    """'kernel' (LeCun normal), 'normal' (N(0, 1)) or 'const' (zeros / ones)."""
    name = _leaf_name(path)
    if name == "kernel":
        return "kernel"
    if name in ("embedding", "positional_encoding_gaussian_matrix"):
        return "normal"
    return "const"  # bias, scale, pos_embed, rel_pos_h, rel_pos_w


def sam_variable_shapes(model: Sam) -> dict:
    """The variables' structure as jax.ShapeDtypeStruct leaves, without computing anything."""
    return jax.eval_shape(model.init, jax.random.key(0), *_init_inputs(model.config))
