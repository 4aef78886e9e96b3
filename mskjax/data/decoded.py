"""What every decoder returns and the checks they share: `Decoded`, `ImageDecodeError`, pixel
limits, luma. `images.py` (JPEG/PNG, and the dispatcher) and `dicom.py` both build on it, so
neither imports the other's internals.
"""
from __future__ import annotations

import dataclasses
import errno
import os

import numpy as np

# 8192 x 8192: larger than any radiograph detector (43 cm at 0.05 mm is 8600 px on one side, but
# clinical exports are at most ~4300 px), and below Pillow's warning threshold (~89.5 M pixels).
DEFAULT_MAX_PIXELS = 8192 * 8192

# ITU-R BT.601 luma weights (R, G, B).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

class ImageDecodeError(ValueError):
    """A file exists but cannot be decoded into an image. `path` and `reason` are kept as attributes."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot decode image {self.path!r}: {reason}")


@dataclasses.dataclass(frozen=True, eq=False)
class Decoded:
    """One decoded radiograph.

    Attributes:
      image: float32 (H, W), values in [0, 1], displayed frame, 0 = black.
      original_size: (H, W) of `image`, i.e. of the displayed frame (after EXIF orientation).
      bits_stored: significant bits per sample: PNG sBIT when present else the PNG/JPEG sample depth;
        DICOM BitsStored. Informational: see the module docstring for how values are scaled.
      bits_allocated: bits per sample in the container (8 or 16 for PNG/JPEG; DICOM BitsAllocated).
      path: the file decoded, as given (made absolute).
      source_format: "JPEG", "PNG" or "DICOM".
      source_mode: Pillow mode of the stored image ("L", "I;16", "RGB", ...) or the DICOM
        Photometric Interpretation ("MONOCHROME1", ...).
      exif_orientation: the EXIF orientation (1..8) applied to reach the displayed frame; 1 = none.
      pixel_spacing: (row, col) spacing in mm (DICOM PixelSpacing or ImagerPixelSpacing), else None.
    """

    image: np.ndarray
    original_size: tuple[int, int]
    bits_stored: int
    bits_allocated: int
    path: str
    source_format: str
    source_mode: str
    exif_orientation: int = 1
    pixel_spacing: tuple[float, float] | None = None


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB in any numeric dtype -> (...) float64 luma with `LUMA_WEIGHTS`, same units."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = LUMA_WEIGHTS
    return rgb[..., 0] * r + rgb[..., 1] * g + rgb[..., 2] * b


def check_is_file(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(errno.ENOENT, f"no such image file: {path!r}", path)
    if os.path.isdir(path):
        raise ImageDecodeError(path, "is a directory, not an image file")


def check_pixel_count(path: str, height: int, width: int, max_pixels: int | None) -> None:
    if height <= 0 or width <= 0:
        raise ImageDecodeError(path, f"header gives an empty image ({width}x{height})")
    if max_pixels is not None and height * width > max_pixels:
        raise ImageDecodeError(
            path,
            f"image is {width}x{height} = {height * width} pixels, more than max_pixels={max_pixels}"
            " (possible decompression bomb; raise max_pixels if the file is trusted)",
        )
