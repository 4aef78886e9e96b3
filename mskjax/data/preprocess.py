"""Decoded radiograph -> fixed-size model input on the host.

`preprocess` turns one decoded gray image (H0, W0) float32 in [0, 1] into an (S, S, C) float32
array plus the `mskjax.geometry.Geometry` that maps boxes and maps between the two frames.

Resizing, and why this filter:

* Pillow ``Image.resize`` on the float32 ("F" mode) image with **``Image.BILINEAR``** (a triangle
  filter). Pillow's resize is a separable convolution whose support widens with the downscale
  factor, so downsampling is **antialiased** (a 2000 px radiograph at 224 px averages ~9 source
  pixels per output pixel instead of sampling 2, which would alias trabecular texture and
  fracture lines into moire). Upsampling is plain bilinear with edge clamping.
* Bilinear rather than bicubic/Lanczos: its kernel is non-negative, so the output never
  overshoots [0, 1] (Lanczos rings at hardware and cortical edges, and clipping the ringing would
  change intensities); and it is what torchvision's ``Resize`` does by default (bilinear,
  antialias=True), the pipeline the course report used. It matches torch
  ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)`` to ~1e-6 (tested).
* The resize runs on float32 pixels, so 16-bit sources keep their precision (no 8-bit round trip).

Modes:

* ``"resize"``: squash the whole image to S x S (aspect ratio not kept), as the course report did.
* ``"letterbox"``: keep the aspect ratio (longer side -> S, SAM's rounding), then pad to S x S with
  **value 0 (black), content centred** (`letterbox_geometry(align="center")`). 0 is the background
  of a radiograph, so the padding looks like collimated air rather than a new structure.
* ``"lite_medsam"``: LiteMedSAM's input recipe (`mskjax.models.sam.lite_medsam_preprocess`, the
  segmenter's and the `tiny_vit_medsam` classifier's): long side -> S with OpenCV's INTER_AREA
  (`area_resize`, on the float image, so no uint8 rounding), min-max over the resized image to
  [0, 1], zero padding at the **bottom/right** (`letterbox_geometry(align="topleft")`). Its encoder
  was pretrained on exactly these inputs; resizing with Pillow instead shifts them.

Normalisation is the classifier's (`mskjax.classifier.prepare_images`), applied after augmentation, on
[0, 1] inputs.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from mskjax.geometry import Geometry, letterbox_geometry, resize_geometry
from mskjax.models.sam.lite_medsam import lite_medsam_preprocess

__all__ = ["MODES", "preprocess", "resize_image"]

MODES = ("resize", "letterbox", "lite_medsam")

def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a float (H, W) image to (height, width) with Pillow's antialiased bilinear filter.

    Returns float32 (height, width). Same size in and out returns a float32 copy unchanged.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.shape == (height, width):
        return img.copy()
    pil = Image.fromarray(np.ascontiguousarray(img))  # 2-D float32 -> Pillow mode "F"
    return np.array(pil.resize((int(width), int(height)), Image.BILINEAR), dtype=np.float32)  # writable copy


def preprocess(
    decoded_image: np.ndarray, size: int, mode: str = "resize", channels: int = 1
) -> tuple[np.ndarray, Geometry]:
    """Resize (or letterbox) one decoded image to a square model input.

    Args:
      decoded_image: (H0, W0) float32 in [0, 1], displayed frame (e.g. `decode_image(...).image`).
      size: side S of the square output, pixels.
      mode: "resize" (squash to S x S), "letterbox" (keep aspect, pad with 0, centred) or
        "lite_medsam" (keep aspect, INTER_AREA, min-max to [0, 1], pad with 0 at the bottom/right).
      channels: 1, or 3 (the gray channel repeated, for RGB-pretrained backbones).

    Returns:
      image: (S, S, channels) float32 in [0, 1] (values stay in range: non-negative kernel).
      geometry: scalar-field `Geometry` from the original (H0, W0) frame to the (S, S) input frame.

    Raises:
      ValueError: wrong rank, empty image, non-finite pixels, unknown mode, bad size or channels.
    """
    img = np.asarray(decoded_image)
    if img.ndim != 2:
        raise ValueError(f"preprocess expects a gray (H, W) image; got shape {img.shape}")
    if img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"preprocess got an empty image of shape {img.shape}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be a positive int; got {size}")
    img = img.astype(np.float32, copy=False)
    if not np.all(np.isfinite(img)):
        raise ValueError("preprocess got non-finite pixel values")
    h0, w0 = img.shape
    if mode == "resize":
        geom = resize_geometry((h0, w0), (size, size))
        out = resize_image(img, size, size)
    elif mode == "lite_medsam":
        geom = letterbox_geometry((h0, w0), size, align="topleft")
        full, hw = lite_medsam_preprocess(img, size)
        if hw != tuple(int(v) for v in geom.content_hw):  # one rounding rule for both (SAM's)
            raise AssertionError(f"LiteMedSAM size {hw} != letterbox content {geom.content_hw}")
        out = full[..., 0].copy()
    else:
        geom = letterbox_geometry((h0, w0), size, align="center")
        ch, cw = (int(v) for v in geom.content_hw)
        top, left = int(geom.top), int(geom.left)
        out = np.zeros((size, size), np.float32)
        out[top:top + ch, left:left + cw] = resize_image(img, ch, cw)
    np.clip(out, 0.0, 1.0, out=out)  # float rounding only; the kernel cannot overshoot
    out = np.repeat(out[..., None], channels, axis=-1)
    return out, _scalar_geometry(geom)


def _scalar_geometry(geom: Geometry) -> Geometry:
    """Geometry with plain Python float fields (numpy 0-d arrays stack and serialise awkwardly)."""
    return Geometry(*(float(f) for f in geom._data()), input_h=geom.input_h, input_w=geom.input_w)
