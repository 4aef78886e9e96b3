"""Decode a single-frame DICOM radiograph into a grayscale float32 image in [0, 1] (pydicom 3).

The display pipeline of DICOM PS3.3 C.11 / PS3.4 N.2, in order:

1. Pixel data decoded by pydicom (compressed transfer syntaxes need an installed plugin: with this
   environment Pillow gives JPEG baseline and JPEG 2000, pydicom itself RLE; JPEG-LS and 12-bit JPEG
   Extended need gdcm / pylibjpeg / pyjpegls). A syntax nobody can decode raises `ImageDecodeError`
   naming the transfer syntax UID and its name.
2. Modality LUT: Modality LUT Sequence or Rescale Slope / Intercept (`pydicom.pixels.apply_modality_lut`).
3. VOI: the first VOI LUT Sequence item (our own lookup: see `_apply_voi_lut_item` for the pydicom
   bug it avoids), else the first Window Center / Width pair with its VOI LUT Function (LINEAR,
   LINEAR_EXACT, SIGMOID) (`pydicom.pixels.apply_voi_lut`). Its
   output range is then mapped to [0, 1]: a VOI LUT's range is [0, 2**bits - 1] with bits from its
   LUT Descriptor; windowing's range is the one pydicom 3.0.2 windows into (the stored-value range of
   BitsStored / PixelRepresentation, passed through Rescale Slope / Intercept; [0, 2**bits - 1] of
   the Modality LUT when there is one), so a LINEAR window maps to 0 below, 1 above, and
   ``(x - (c - 0.5)) / (w - 1) + 0.5`` between.
4. No VOI at all: the modality output range of the stored bits (as in 3) is mapped to [0, 1] — the
   same "scale by the declared bit depth" rule `images.py` uses, never a per-image min/max stretch.
5. MONOCHROME1 (minimum = white) is inverted last (``1 - v``), so 0 is black in every output.

RGB / YBR_* data are converted to RGB by pydicom and to gray with the BT.601 luma weights, scaled by
BitsStored. PALETTE COLOR and multi-frame files are refused with a clear error.

PixelSpacing (0028,0030) is kept as (row, col) mm; when absent, ImagerPixelSpacing (0018,1164)
(spacing at the detector, not calibrated to the patient) is used; else None.
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder

from mskjax.data.decoded import (
    DEFAULT_MAX_PIXELS,
    Decoded,
    ImageDecodeError,
    check_is_file,
    check_pixel_count,
    rgb_to_gray,
)

__all__ = ["decode_dicom"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")


def decode_dicom(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode one single-frame DICOM file; see the module docstring for the display pipeline.

    Returns:
      `Decoded` with image float32 (Rows, Columns) in [0, 1] (0 = black), original_size
      (Rows, Columns), bits_stored / bits_allocated from the header, source_format "DICOM",
      source_mode the Photometric Interpretation, pixel_spacing (row, col) mm or None.

    Raises:
      FileNotFoundError: no such file.
      ImageDecodeError: not DICOM, no pixel data, multi-frame, unsupported photometric
        interpretation, an undecodable transfer syntax, truncated pixel data, or more than
        `max_pixels` pixels.
    """
    path = os.path.abspath(os.fspath(path))
    check_is_file(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise ImageDecodeError(path, f"not a DICOM file ({e})") from e
    except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
        raise ImageDecodeError(path, f"cannot parse DICOM ({type(e).__name__}: {e})") from e

    if "PixelData" not in ds:
        raise ImageDecodeError(path, "DICOM dataset has no Pixel Data (7FE0,0010)")
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits_stored = int(ds.get("BitsStored", ds.BitsAllocated))
        bits_allocated = int(ds.BitsAllocated)
        photometric = str(ds.PhotometricInterpretation).strip().upper()
    except (AttributeError, TypeError, ValueError) as e:
        raise ImageDecodeError(path, f"missing or invalid image pixel module element ({e})") from e
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise ImageDecodeError(path, f"multi-frame DICOM ({frames} frames) is not supported")
    if photometric not in _MONOCHROME + _COLOUR:
        raise ImageDecodeError(path, f"unsupported Photometric Interpretation {photometric!r}")
    check_pixel_count(path, rows, cols, max_pixels)

    tsyntax = _transfer_syntax(ds)
    if tsyntax is not None and tsyntax.is_compressed:
        decoder = get_decoder(tsyntax)
        if decoder is None or not decoder.is_available:
            missing = "; ".join(getattr(decoder, "missing_dependencies", []) or []) or "no decoder"
            raise ImageDecodeError(
                path,
                f"no installed handler decodes transfer syntax {tsyntax} ({tsyntax.name}): {missing}",
            )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom warns on benign VR/padding quirks
            stored = ds.pixel_array
    except Exception as e:  # pydicom and its plugins raise RuntimeError, ValueError, NotImplementedError...
        name = f"{tsyntax} ({tsyntax.name})" if tsyntax is not None else "unknown transfer syntax"
        raise ImageDecodeError(path, f"cannot decode pixel data, transfer syntax {name}: {e}") from e
    if stored.shape[:2] != (rows, cols):
        raise ImageDecodeError(path, f"pixel data shape {stored.shape} does not match Rows x Columns {(rows, cols)}")

    if photometric in _COLOUR:
        # pydicom's pixel_array returns RGB for YBR_* by default.
        image = rgb_to_gray(stored) / float(2**bits_stored - 1)
    else:
        image = _monochrome_to_unit(stored, ds, path)
        if photometric == "MONOCHROME1":
            image = 1.0 - image
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return Decoded(
        image=image,
        original_size=(rows, cols),
        bits_stored=bits_stored,
        bits_allocated=bits_allocated,
        path=path,
        source_format="DICOM",
        source_mode=photometric,
        exif_orientation=1,
        pixel_spacing=_pixel_spacing(ds, path),
    )


def _transfer_syntax(ds: pydicom.Dataset):
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return uid


def _monochrome_to_unit(stored: np.ndarray, ds: pydicom.Dataset, path: str) -> np.ndarray:
    """Modality LUT, then VOI LUT / window, then the known output range -> float64 in [0, 1]."""
    try:
        values = apply_modality_lut(stored, ds)
        has_voi_lut = _valid_voi_lut(ds)
        has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
        if has_voi_lut:
            out, lo, hi = _apply_voi_lut_item(values, ds, path)
        elif has_window:
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            lo, hi = _modality_output_range(ds)
        else:
            out = values
            # Ordered, so a negative Rescale Slope still maps the lowest modality value to black.
            lo, hi = sorted(_modality_output_range(ds))
    except (ValueError, NotImplementedError, AttributeError, TypeError, KeyError, IndexError) as e:
        raise ImageDecodeError(path, f"cannot apply modality / VOI transform ({type(e).__name__}: {e})") from e
    if hi == lo:
        raise ImageDecodeError(path, f"degenerate output range [{lo}, {hi}]")
    return (np.asarray(out, dtype=np.float64) - lo) / (hi - lo)


def _apply_voi_lut_item(values: np.ndarray, ds: pydicom.Dataset, path: str) -> tuple[np.ndarray, float, float]:
    """First VOI LUT Sequence item applied per PS3.3 C.11.2.1.1; returns (output, 0, 2**bits - 1).

    Our own lookup rather than `pydicom.pixels.apply_voi`: pydicom 3.0.2 builds its index array in
    the LUT's *output* dtype, so an 8-bit LUT with more than 256 entries, or an input beyond
    first_map + 255, wraps around (uint8 overflow) and picks the wrong entries.
    """
    item = ds.VOILUTSequence[0]
    n_entries, first_map, bits = (int(v) for v in item.LUTDescriptor)
    n_entries = n_entries or 2**16  # 0 means 65536 entries
    if not (bits == 8 or 10 <= bits <= 16):
        raise ImageDecodeError(path, f"VOI LUT with {bits} bits per entry is not supported")
    raw = item.LUTData
    if isinstance(raw, (bytes, bytearray)):  # OW: raw 16-bit words in the dataset's byte order
        little = ds.original_encoding[1] is not False
        lut = np.frombuffer(raw, dtype="<u2" if little else ">u2")
    else:
        lut = np.atleast_1d(np.asarray(raw))  # US: a list of ints (one int when VM is 1)
    lut = lut.astype(np.float64)[:n_entries]
    if lut.size != n_entries:
        raise ImageDecodeError(path, f"VOI LUT has {lut.size} entries, its descriptor says {n_entries}")
    index = np.clip(np.floor(np.asarray(values, dtype=np.float64)) - first_map, 0, n_entries - 1).astype(np.int64)
    return lut[index], 0.0, float(2**bits - 1)


def _valid_voi_lut(ds: pydicom.Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    if not seq:
        return False
    item = seq[0]
    return item.get("LUTDescriptor") is not None and item.get("LUTData") is not None


def _modality_output_range(ds: pydicom.Dataset) -> tuple[float, float]:
    """Range of modality-LUT output values, exactly as pydicom 3.0.2's `apply_windowing` windows into."""
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 0:
        lo, hi = 0.0, float(2**bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)
    return lo, hi


def _pixel_spacing(ds: pydicom.Dataset, path: str) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError) as e:
            raise ImageDecodeError(path, f"invalid {keyword} {value!r}: expected two numbers ({e})") from e
        if not (row > 0 and col > 0):
            raise ImageDecodeError(path, f"invalid {keyword} {value!r}: spacing must be positive")
        return row, col
    return None
