"""Segment Anything as pure functions: preprocess -> embed -> decode -> postprocess.

Frames (boxes are (x0, y0, x1, y1), points (x, y), float pixels; pixel i covers [i, i + 1)):
- original: the image as given, (H, W) = original_size.
- SAM input: the image resized so its long side is img_size ("input_size" (h, w) before padding),
  then zero-padded at the bottom/right to img_size x img_size. Prompts go to `decode` in this frame
  (`transform_boxes` / `transform_points` take them there).
- low-res: mask logits on an (img_size / 4)^2 grid covering the padded SAM input.

Typical use (model = mskjax.models.sam.build_sam(arch), variables from mskjax.weights.sam; or
both from `mskjax.checkpoint.load_sam`, which also builds LiteMedSAM):

    validate_prompt_boxes(boxes, original_size)     # user prompts: a clear error, not a bad mask
    batch = preprocess(images, img_size, preprocessing_of(model))   # host-side, NumPy out
    emb = jax.jit(embed, static_argnums=0)(model, variables, batch.images)
    out = jax.jit(decode, static_argnums=0, static_argnames=("multimask", "return_masks"))(
        model, variables, emb, boxes=transform_boxes(boxes, batch.original_sizes, img_size))
    masks_i = postprocess(out["low_res_logits"][i], batch.input_sizes[i], batch.original_sizes[i],
                          img_size)

LiteMedSAM (`mskjax.models.sam.LiteMedSam`, img_size 256) goes through the same functions: it has
Sam's methods (the functions call them by name), its own input recipe (preprocessing
"lite_medsam": cv2 INTER_AREA resize of the long side to 256, per-image min-max to [0, 1], zero
padding bottom/right; no mean/std), the same frames (its resized size follows the same rounding
rule) and low-res logits of 256 x 256, i.e. one per input pixel, which `postprocess` crops and
resizes to the original frame exactly as for SAM.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mskjax.geometry import validate_boxes
from mskjax.models.sam.common import linear_resize_matrix
from mskjax.models.sam import is_lite_medsam, lite_medsam_preprocess
from mskjax.models.sam.lite_medsam import area_resize
from mskjax.models.sam.sam import MASK_THRESHOLD, PIXEL_MEAN, PIXEL_STD
from mskjax.passes import default_images_per_pass, in_passes

# Logit given to every pixel of a padded (invalid) prompt: far below the threshold, still finite
# so that interpolation and losses stay NaN-free.
INVALID_PROMPT_LOGIT = -1e4

_HIGHEST = jax.lax.Precision.HIGHEST

# Input recipes `preprocess` knows: "sam" (SamPredictor.set_image) and "lite_medsam"
# (CVPR24_LiteMedSAM_infer.py).
PREPROCESSING = ("sam", "lite_medsam")


def preprocessing_of(model) -> str:
    """The input recipe a segmenter module takes: "lite_medsam" for LiteMedSam, else "sam"."""
    return "lite_medsam" if is_lite_medsam(model) else "sam"


class SamInputs(NamedTuple):
    """images (B, S, S, 3) float32 normalised and zero-padded; input_sizes (B, 2) int32 (h, w) of
    the resized image inside the padding; original_sizes (B, 2) int32 (H, W)."""

    images: np.ndarray
    input_sizes: np.ndarray
    original_sizes: np.ndarray


def sam_input_size(original_size: Sequence[int], img_size: int = 1024) -> tuple[int, int]:
    """(h, w) of an (H, W) image resized so its long side is img_size (ResizeLongestSide's rule:
    scale = img_size / max(H, W), each side int(side * scale + 0.5), in float64)."""
    old_h, old_w = int(original_size[0]), int(original_size[1])
    if old_h <= 0 or old_w <= 0:
        raise ValueError(f"image size must be positive, got {(old_h, old_w)}")
    scale = img_size * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def _as_image_list(images) -> list[np.ndarray]:
    if isinstance(images, np.ndarray):
        if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3)):
            return [images]
        if images.ndim in (3, 4):  # (B, H, W) gray or (B, H, W, C)
            return list(images)
        raise ValueError(f"expected an image (H, W[, C]) or a batch (B, H, W[, C]), got {images.shape}")
    return [np.asarray(im) for im in images]


def _check_image(image: np.ndarray, index: int) -> None:
    """ValueError naming image `index` unless it is uint8 (H, W), (H, W, 1) or (H, W, 3)."""
    if image.dtype != np.uint8:
        raise ValueError(f"image {index}: SAM preprocessing takes uint8 images, got {image.dtype} "
                         "(window/scale 16-bit radiographs to 8 bits first)")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))):
        raise ValueError(f"image {index}: expected (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")


def _to_rgb(image: np.ndarray, index: int) -> np.ndarray:
    _check_image(image, index)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:  # grayscale radiograph: the same value in R, G and B
        return np.repeat(image[..., None], 3, axis=-1)
    return image


def preprocess(images_uint8, img_size: int = 1024, preprocessing: str = "sam") -> SamInputs:
    """Resize (long side -> img_size), normalise and pad images as the model's official predictor.

    images_uint8: one image or a sequence/batch of images, each (H, W) grayscale, (H, W, 1) or
    (H, W, 3) RGB, uint8; sizes may differ. Host-side NumPy, not jit-able.
    preprocessing "sam" (SamPredictor.set_image): PIL's bilinear (antialiased) resize of the uint8
    image, as the official `ResizeLongestSide.apply_image`; then (x - PIXEL_MEAN) / PIXEL_STD in
    float32 and zero padding at the bottom/right.
    preprocessing "lite_medsam" (`preprocessing_of(model)` for LiteMedSam; img_size must be 256):
    `mskjax.models.sam.lite_medsam_preprocess` per image: cv2 INTER_AREA resize (bit-exact NumPy
    port), min-max over the resized image to [0, 1], zero padding at the bottom/right.
    Both give input_sizes by the same rule (`sam_input_size`).
    """
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}: expected one of {PREPROCESSING}")
    imgs = _as_image_list(images_uint8)
    if not imgs:
        raise ValueError("preprocess got no images")
    if preprocessing == "lite_medsam":
        return _preprocess_lite_medsam(imgs, img_size)
    mean = np.asarray(PIXEL_MEAN, np.float32)
    std = np.asarray(PIXEL_STD, np.float32)
    out = np.zeros((len(imgs), img_size, img_size, 3), np.float32)
    input_sizes = np.zeros((len(imgs), 2), np.int32)
    original_sizes = np.zeros((len(imgs), 2), np.int32)
    for i, im in enumerate(imgs):
        rgb = _to_rgb(im, i)
        h, w = sam_input_size(rgb.shape[:2], img_size)
        resized = np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        out[i, :h, :w] = (resized.astype(np.float32) - mean) / std
        input_sizes[i] = (h, w)
        original_sizes[i] = rgb.shape[:2]
    return SamInputs(out, input_sizes, original_sizes)


def resize_into_canvas(image_u8: np.ndarray, img_size: int, preprocessing: str = "sam"
                       ) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W) uint8 -> ((S, S) uint8 with the image resized into the top-left (h, w), (h, w)).

    The resize of `mskjax.sam.preprocess` with the same recipe, on uint8 (per channel, and the three
    channels of a gray image are equal): "sam" PIL's antialiased bilinear; "lite_medsam" cv2's
    INTER_AREA (`area_resize`, rounded to uint8 as cv2 does)."""
    if preprocessing not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocessing!r}: expected one of {PREPROCESSING}")
    h, w = sam_input_size(image_u8.shape[:2], img_size)
    if preprocessing == "lite_medsam":
        resized = area_resize(image_u8[..., None], h, w)[..., 0]
    else:
        resized = np.asarray(Image.fromarray(image_u8).resize((w, h), Image.BILINEAR))
    canvas = np.zeros((img_size, img_size), np.uint8)
    canvas[:h, :w] = resized
    return canvas, (h, w)


def _preprocess_lite_medsam(imgs: list[np.ndarray], img_size: int) -> SamInputs:
    out = np.zeros((len(imgs), img_size, img_size, 3), np.float32)
    input_sizes = np.zeros((len(imgs), 2), np.int32)
    original_sizes = np.zeros((len(imgs), 2), np.int32)
    for i, im in enumerate(imgs):
        _check_image(im, i)  # the same checks and messages as "sam", without its RGB copy
        # A grey image goes in as it is: the recipe resizes it once and fills all three channels
        # (a three-channel copy would be resized three times to the same values).
        out[i], input_sizes[i] = lite_medsam_preprocess(im, img_size)
        original_sizes[i] = im.shape[:2]
    return SamInputs(out, input_sizes, original_sizes)


def _scale_xy(coords, original_size, img_size: int):
    """coords (..., 2k) x/y interleaved, original_size (..., 2) (H, W) a prefix-batch of coords."""
    is_jax = isinstance(coords, jax.Array) or isinstance(original_size, jax.Array)
    xp = jnp if is_jax else np
    dtype = jnp.float32 if is_jax else np.float64
    coords = xp.asarray(coords, dtype)
    size = xp.asarray(original_size, dtype)
    if size.shape[-1] != 2:
        raise ValueError(f"original_size must end in (H, W), got shape {size.shape}")
    extra = coords.ndim - size.ndim
    if extra < 0 or coords.shape[:size.ndim - 1] != size.shape[:-1]:
        raise ValueError(f"original_size {size.shape} is not a batch prefix of coordinates {coords.shape}")
    size = size.reshape(size.shape[:-1] + (1,) * extra + (2,))
    old_h, old_w = size[..., 0], size[..., 1]
    scale = img_size * 1.0 / xp.maximum(old_h, old_w)
    new_h, new_w = xp.floor(old_h * scale + 0.5), xp.floor(old_w * scale + 0.5)
    k = coords.shape[-1] // 2
    factors = xp.stack([new_w / old_w, new_h / old_h], axis=-1)  # (..., 2) as (x, y)
    factors = xp.concatenate([factors] * k, axis=-1)
    out = coords * factors
    return out.astype(jnp.float32) if is_jax else out.astype(np.float32)


def validate_prompt_boxes(boxes, original_size, valid=None, name: str = "prompt boxes") -> np.ndarray:
    """Eager (NumPy) check of prompt boxes (..., 4) (x0, y0, x1, y1) in original-image pixels, before
    `transform_boxes` (which scales without checking, so padded all-zero prompts can pass through it).

    Raises `mskjax.geometry.InvalidBoxError` (a ValueError) naming the first box that is non-finite,
    inverted, of zero area or entirely outside the image; prompts with valid=False are not checked.
    Returns the boxes as float64."""
    return validate_boxes(boxes, original_size, valid=valid, name=name)


def transform_boxes(boxes, original_size, img_size: int = 1024):
    """Boxes (..., 4) (x0, y0, x1, y1) in original-image pixels -> the SAM input frame
    (ResizeLongestSide.apply_boxes). original_size (H, W), or (..., 2) for a leading batch of boxes,
    e.g. boxes (B, P, 4) with original_sizes (B, 2). NumPy in (float64 maths) -> NumPy float32 out;
    JAX arrays in -> JAX float32 (jit-able)."""
    if np.shape(boxes)[-1] != 4:
        raise ValueError(f"boxes must be (..., 4), got shape {np.shape(boxes)}")
    return _scale_xy(boxes, original_size, img_size)


def transform_points(points, original_size, img_size: int = 1024):
    """Points (..., 2) (x, y) in original-image pixels -> the SAM input frame
    (ResizeLongestSide.apply_coords). original_size as in `transform_boxes`."""
    if np.shape(points)[-1] != 2:
        raise ValueError(f"points must be (..., 2), got shape {np.shape(points)}")
    return _scale_xy(points, original_size, img_size)


def embed(model, variables: dict, images: jax.Array, images_per_pass: int | None = None) -> jax.Array:
    """Image embeddings (B, e, e, 256) of preprocessed images (B, S, S, 3), e = S/16 for SAM, S/4
    for LiteMedSAM (model.config.embedding_size). model: a Sam or LiteMedSam (anything with an
    `embed_images` method). Jit with static_argnums=0.

    images_per_pass: the encoder runs on this many images at a time (`mskjax.passes.in_passes`, a
    `lax.map` over chunks); 0 runs the whole batch at once; None picks per backend
    (`mskjax.passes.default_images_per_pass`). The result is the same either way (each image's
    embedding depends on that image alone)."""
    k = default_images_per_pass() if images_per_pass is None else images_per_pass
    return in_passes(lambda x: model.apply(variables, x, method="embed_images"), images, k)


def upscale_logits(low_res_logits: jax.Array, img_size: int) -> jax.Array:
    """(..., L, L) -> (..., img_size, img_size): torch's bilinear, align_corners=False, no antialias."""
    lh, lw = low_res_logits.shape[-2:]
    m_h = jnp.asarray(linear_resize_matrix(lh, img_size))
    m_w = jnp.asarray(linear_resize_matrix(lw, img_size))
    return jnp.einsum("yi,...ij,xj->...yx", m_h, low_res_logits, m_w, precision=_HIGHEST)


def decode(model, variables: dict, embeddings: jax.Array, boxes: jax.Array | None = None,
           points: jax.Array | None = None, point_labels: jax.Array | None = None,
           mask_input: jax.Array | None = None, multimask: bool = True,
           prompt_valid: jax.Array | None = None, return_masks: bool = False) -> dict:
    """Masks for B images x P prompts each (padded to a common P; prompt_valid marks real ones).

    model: a Sam or LiteMedSam (anything with a `predict_masks` method and a config with img_size).
    embeddings (B, h, w, 256) from `embed`. Prompts in the SAM input frame:
      boxes (B, P, 4); points (B, P, N, 2) with point_labels (B, P, N) (1 foreground,
      0 background, -1 padding point); mask_input (B, P, 4h, 4w) low-res logits (e.g. from a
      previous call). Any combination; at least one of them.
    prompt_valid (B, P) bool: outputs of invalid prompts are INVALID_PROMPT_LOGIT / IoU 0.
    Returns {"low_res_logits": (B, P, M, 4h, 4w), "iou_predictions": (B, P, M)} with M = 3 if
    multimask else 1, plus "masks" (B, P, M, S, S) bool in the padded SAM input frame if
    return_masks (crop/resize per image with `postprocess` for the original frame).
    Jit with static_argnums=0 and static_argnames=("multimask", "return_masks").
    """
    b = embeddings.shape[0]
    given = [x for x in (boxes, points, mask_input) if x is not None]
    if not given:
        raise ValueError("decode needs at least one prompt: boxes, points or mask_input")
    p = given[0].shape[1]
    for name, x in (("boxes", boxes), ("points", points), ("point_labels", point_labels),
                    ("mask_input", mask_input), ("prompt_valid", prompt_valid)):
        if x is not None and tuple(x.shape[:2]) != (b, p):
            raise ValueError(f"{name} must start with (B, P) = {(b, p)}, got shape {x.shape}")
    if (points is None) != (point_labels is None):
        raise ValueError("points and point_labels go together")

    def flat(x):
        return None if x is None else x.reshape(b * p, *x.shape[2:])

    _, h, w, c = embeddings.shape
    per_prompt = jnp.broadcast_to(embeddings[:, None], (b, p, h, w, c)).reshape(b * p, h, w, c)
    logits, iou = model.apply(variables, per_prompt, flat(boxes), flat(points), flat(point_labels),
                              flat(mask_input), multimask, method="predict_masks")
    logits = logits.reshape(b, p, *logits.shape[1:])
    iou = iou.reshape(b, p, -1)
    if prompt_valid is not None:
        valid = jnp.asarray(prompt_valid, bool)
        logits = jnp.where(valid[:, :, None, None, None], logits, INVALID_PROMPT_LOGIT)
        iou = jnp.where(valid[:, :, None], iou, 0.0)
    out = {"low_res_logits": logits, "iou_predictions": iou}
    if return_masks:
        out["masks"] = upscale_logits(logits, model.config.img_size) > MASK_THRESHOLD
    return out


@functools.lru_cache(maxsize=4096)
def postprocess_matrix(low: int, img_size: int, inner: int, out: int) -> np.ndarray:
    """(out, low) float64: one axis of SAM's postprocess folded into one matrix: bilinear
    (align_corners=False, no antialias) upscale of `low` cells to img_size, crop to the first
    `inner` pixels (the unpadded input), bilinear resize to `out` pixels (the original frame)."""
    if not 0 < inner <= img_size:
        raise ValueError(f"input size {inner} must lie within img_size {img_size}")
    return linear_resize_matrix(inner, out).astype(np.float64) @ linear_resize_matrix(low, img_size)[:inner]


def postprocess(low_res_logits: jax.Array, input_size: Sequence[int], original_size: Sequence[int],
                img_size: int = 1024, return_logits: bool = False) -> jax.Array:
    """Low-res logits (..., L, L) of one image -> its original frame (..., H, W), traceable.

    As Sam.postprocess_masks: bilinear (align_corners=False, no antialias) upscale to img_size,
    crop to input_size (h, w), bilinear resize to original_size (H, W); the three linear steps are
    folded into one matrix per axis (`postprocess_matrix`). Returns bool masks (logit > 0.0) or,
    with return_logits, the logits. Sizes must be concrete ints (they fix output shapes); for many
    image sizes on the host, `postprocess_host` avoids one compilation per size.
    """
    in_h, in_w = (int(v) for v in input_size)
    out_h, out_w = (int(v) for v in original_size)
    lh, lw = low_res_logits.shape[-2:]
    if not (0 < in_h <= img_size and 0 < in_w <= img_size):
        raise ValueError(f"input_size {(in_h, in_w)} must lie within img_size {img_size}")
    m_h = postprocess_matrix(lh, img_size, in_h, out_h).astype(np.float32)
    m_w = postprocess_matrix(lw, img_size, in_w, out_w).astype(np.float32)
    logits = jnp.einsum("yi,...ij,xj->...yx", jnp.asarray(m_h), low_res_logits, jnp.asarray(m_w),
                        precision=_HIGHEST)
    return logits if return_logits else logits > MASK_THRESHOLD


def postprocess_host(low_res_logits: np.ndarray, input_size: Sequence[int], original_size: Sequence[int],
                     img_size: int, return_logits: bool = False) -> np.ndarray:
    """`postprocess` in NumPy (float64 products): (..., L, L) low-res logits of one image ->
    (..., H, W) bool masks (logit > 0.0) or, with return_logits, float32 logits in its original
    frame. NumPy so that every new image size does not compile a new XLA program."""
    in_h, in_w = (int(v) for v in input_size)
    out_h, out_w = (int(v) for v in original_size)
    lh, lw = np.shape(low_res_logits)[-2:]
    if not (0 < in_h <= img_size and 0 < in_w <= img_size):
        raise ValueError(f"input_size {(in_h, in_w)} must lie within img_size {img_size}")
    m_h = postprocess_matrix(lh, img_size, in_h, out_h)
    m_w = postprocess_matrix(lw, img_size, in_w, out_w)
    logits = m_h @ np.asarray(low_res_logits, np.float64) @ m_w.T
    return logits.astype(np.float32) if return_logits else logits > MASK_THRESHOLD


# ---------------------------------------------------------------------------------------------
# The mirrored view (left-right inside the image; test-time averaging in `mskjax.pipeline`)

def mirror_columns(x, widths, axis: int = -1):
    """x (B, ...) with, for each item b, its columns [0, widths[b]) along `axis` (negative: counted
    from the end, the same for every item) in reverse order and the others unchanged: an image in
    the SAM input frame (content at the top-left, padding at the right) mirrored left-right inside
    its content, the padding kept at the right (as `mskjax.train.sam.hflip` trains). Applying it
    twice gives x back. widths (B,) int: the content's width (`sam_input_size`'s w). NumPy in ->
    NumPy out; JAX arrays in -> JAX out (jit-able)."""
    if axis >= 0:
        raise ValueError(f"axis must be negative (counted from the end), got {axis}")
    xp = jnp if isinstance(x, jax.Array) or isinstance(widths, jax.Array) else np
    s = x.shape[axis]
    col = xp.arange(s)
    w = xp.asarray(widths).reshape(-1, 1)
    src = xp.where(col[None] < w, w - 1 - col[None], col[None])  # (B, S) source column of each column
    if xp is np:
        return np.stack([np.take(a, c, axis=axis) for a, c in zip(x, src)]) if len(x) else x.copy()
    return jax.vmap(lambda a, c: jnp.take(a, c, axis=axis))(x, src)


def mirror_boxes(boxes, widths):
    """Boxes (B, ..., 4) in the SAM input frame -> the same boxes in the frame mirrored by
    `mirror_columns` (x -> w - x, so (x0, x1) -> (w - x1, w - x0)). widths (B,)."""
    xp = jnp if isinstance(boxes, jax.Array) else np
    w = xp.asarray(widths, xp.float32).reshape((-1,) + (1,) * (boxes.ndim - 2))
    return xp.stack([w - boxes[..., 2], boxes[..., 1], w - boxes[..., 0], boxes[..., 3]], axis=-1)


def mirror_points(points, widths):
    """Points (B, ..., 2) (x, y) in the SAM input frame -> the mirrored frame (x -> w - x)."""
    xp = jnp if isinstance(points, jax.Array) else np
    w = xp.asarray(widths, xp.float32).reshape((-1,) + (1,) * (points.ndim - 2))
    return xp.stack([w - points[..., 0], points[..., 1]], axis=-1)


# ---------------------------------------------------------------------------------------------
# A box, also as a dense mask prompt

# Logit magnitude of the box rendered as a dense mask prompt (`box_mask_prompt`): +4 for a low-res
# cell fully inside the box, -4 fully outside, linear in the covered fraction between.
BOX_MASK_LOGIT = 4.0


def uses_box_mask_prompt(config_or_meta) -> bool:
    """Whether each box prompt also goes in as a dense mask prompt: config.train.box_mask_prompt for
    a training config, "box_mask_prompt" for checkpoint metadata (absent = False)."""
    if isinstance(config_or_meta, dict):
        return bool(config_or_meta.get("box_mask_prompt", False))
    return bool(config_or_meta.train.get("box_mask_prompt", False))


def box_mask_prompt(boxes: jax.Array, img_size: int, low_res_size: int | None = None) -> jax.Array:
    """Boxes (..., 4) (x0, y0, x1, y1) in the SAM input frame -> mask-prompt logits (..., L, L) on the
    low-res grid (L = low_res_size, default img_size / 4 as SAM's; cell k covers input pixels
    [k c, (k + 1) c), c = img_size / L, on each axis). LiteMedSAM's grid is its input's
    (model.config.low_res_size = 256 = img_size).

    A cell's logit is BOX_MASK_LOGIT * (2 f - 1), f the fraction of the cell inside the box, so the
    box edge is located to a fraction of a cell. Why: a 16 px patch ViT gives one embedding per
    16 x 16 px, and the lesions here are 5-40 px wide; SAM's sparse box tokens reach the mask only
    through attention, which a model trained from scratch takes long to learn to resolve below
    one patch. The mask prompt goes through the prompt encoder's convolutions straight into the
    image embedding the mask upscaler reads (frozen random convolutions, as the rest of the prompt
    encoder), and the decoder learns to use it in minutes (see configs/sam_synthetic.py).
    """
    return BOX_MASK_LOGIT * (2.0 * box_coverage(boxes, img_size, low_res_size) - 1.0)


def box_coverage(boxes: jax.Array, img_size: int, low_res_size: int | None = None) -> jax.Array:
    """Boxes (..., 4) in the SAM input frame -> (..., L, L) float32 in [0, 1]: the fraction of each
    low-res cell inside the box (cells as in `box_mask_prompt`, which is this mapped to logits)."""
    low = img_size // 4 if low_res_size is None else int(low_res_size)
    cell = img_size / low
    edges = jnp.arange(low, dtype=jnp.float32) * cell
    b = boxes.astype(jnp.float32)

    def coverage(a0, a1):  # (...,) -> (..., low): covered fraction of each cell along one axis
        return jnp.clip(jnp.minimum(a1[..., None], edges + cell) - jnp.maximum(a0[..., None], edges), 0.0, cell) / cell

    fx, fy = coverage(b[..., 0], b[..., 2]), coverage(b[..., 1], b[..., 3])
    return fy[..., :, None] * fx[..., None, :]


def map_prompt(maps: jax.Array, boxes: jax.Array, img_size: int, low_res_size: int | None = None) -> jax.Array:
    """The classifier's map inside its box as a dense mask prompt, for a SAM trained on them
    (`data.map_prompts` in mskjax.train.sam; checkpoint metadata "map_prompt").

    maps (..., T, T) float in [0, 1]: the map in the SAM input frame at full resolution (T =
    img_size; `mskjax.pipeline.map_in_sam_frame` with low_res_size = img_size), 0 on padding.
    boxes (..., 4) SAM input frame. Returns logits (..., L, L): BOX_MASK_LOGIT * (2 f m - 1), f the
    cell's fraction inside the box (`box_coverage`) and m the map's mean over the cell, so a cell
    inside the box at the map's maximum gets +BOX_MASK_LOGIT, one where the map is half its maximum
    0, and every cell outside the box -BOX_MASK_LOGIT, as `box_mask_prompt` there. Mean-pooling from
    T (not sampling at L) so that a map flipped at T in training pools like the pipeline's.
    """
    low = img_size // 4 if low_res_size is None else int(low_res_size)
    t = maps.shape[-1]
    k = t // low
    cells = maps.astype(jnp.float32).reshape(maps.shape[:-2] + (low, k, low, k)).mean(axis=(-3, -1))
    return BOX_MASK_LOGIT * (2.0 * box_coverage(boxes, img_size, low) * cells - 1.0)


def peak_point_prompts(points: jax.Array, given: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Point prompts for a SAM trained with `data.peak_point` (mskjax.train.sam): points (B, P, 2)
    (x, y) SAM input frame and given (B, P) bool -> one point per prompt, (B, P, 1, 2) float32,
    and labels (B, P, 1) int32: a positive point (label 1) where `given` (map-derived prompts), else
    a padding point (label -1, SAM's "not a point" token), so that every prompt has the same tokens."""
    labels = jnp.where(given, 1, -1).astype(jnp.int32)[..., None]
    return jnp.where(given[..., None], points, 0.0)[:, :, None, :].astype(jnp.float32), labels


def padding_point_prompts(prompt_shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """`peak_point_prompts` with no point given: (B, P) -> padding points (B, P, 1, 2) and labels
    (B, P, 1) = -1, what a SAM trained with `data.peak_point` saw beside every tight box."""
    none = jnp.zeros(tuple(prompt_shape), bool)
    return peak_point_prompts(jnp.zeros(none.shape + (2,), jnp.float32), none)


def decode_boxes(model, variables: dict, embeddings: jax.Array, boxes: jax.Array, box_mask: bool,
                 points: jax.Array | None = None, point_labels: jax.Array | None = None,
                 mask_input: jax.Array | None = None) -> jax.Array:
    """Single-mask low-res logits (B, P, L, L) for box prompts (B, P, 4) in the SAM input frame,
    with the boxes also given as dense mask prompts when box_mask (or the given mask_input
    (B, P, L, L) logits instead), and optional points (B, P, N, 2) with labels (B, P, N) beside them."""
    if mask_input is None and box_mask:
        mask_input = box_mask_prompt(boxes, model.config.img_size, model.config.low_res_size)
    return decode(model, variables, embeddings, boxes=boxes, points=points, point_labels=point_labels,
                  mask_input=mask_input, multimask=False)["low_res_logits"][:, :, 0]
