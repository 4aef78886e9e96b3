"""Decode one radiograph file (JPEG, PNG or DICOM) into a grayscale float32 image in [0, 1].

Frame: the returned image is in the *displayed* frame: EXIF orientation is applied, so annotations
made on the displayed picture (FracAtlas, most viewers) line up with `Decoded.image` pixels. Pixel
(row i, col j) covers [j, j+1) x [i, i+1) in (x, y) box coordinates.

Choices, and why:

* **16-bit intensity scaling: by the container range** (value / 65535). The PNG specification says
  samples always use the full range of their bit depth (an `sBIT` chunk only tells a reader how many
  bits were significant originally; the data are already scaled up), so dividing by 2**16 - 1 keeps
  the calibrated relation between pixel values and between files. Dividing by a guessed "real" bit
  depth (12-bit data in a 16-bit container) is only right for non-conforming writers and cannot be
  decided from the file; a per-image min/max stretch would make every image's contrast depend on its
  content (a collimator edge or a burnt-in text label sets the scale) and would hide exposure
  differences. Contrast normalisation, if wanted, belongs in the batch stage where it is explicit.
  (DICOM is different: `BitsStored` and the VOI LUT are authoritative there; see `dicom.py`.)
* **RGB to gray:** ``gray = 0.299 R + 0.587 G + 0.114 B`` (the ITU-R BT.601 luma weights, the same
  weights Pillow's ``convert("L")`` uses) computed in float64 and *not* rounded to 8 bits, so a gray
  radiograph stored as R = G = B decodes to exactly that channel / 255.
* **Alpha is dropped, not composited.** Radiographs carry alpha only as an export artefact; the
  colour channels hold the measured intensities, and compositing onto black or white would invent
  intensities where alpha < 255. Modes LA / RGBA / PA / P-with-transparency drop their alpha.
* **16-bit colour or gray+alpha PNGs** are read by Pillow at 8 bits (it keeps the high byte); the
  scale is unchanged (value / 255 of the high byte) and `Decoded.bits_stored` reports 8.
* **CMYK / YCbCr** go through Pillow's own conversion to RGB (no ICC colour management), then luma.
* **Truncated or corrupt files raise `ImageDecodeError`; nothing is ever half-decoded.** Pillow can
  fill a truncated JPEG with grey when ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is set by anyone in
  the process. We never set it, and we do not rely on it being unset: before Pillow sees the bytes we
  walk the file's own structure (JPEG markers up to EOI, entropy-coded data included; PNG chunks with
  their CRCs up to IEND) and refuse a file that ends early. When that process-wide flag *is* set we
  also check the PNG zlib stream is complete, because Pillow then stops reporting decoder errors.
* **Decompression bombs:** the pixel count is read from the header and checked against
  `max_pixels` before any pixel is decoded. Pillow's own process-wide limit
  (``PIL.Image.MAX_IMAGE_PIXELS``) still applies on top; its refusal is re-raised as
  `ImageDecodeError` too.
"""
from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from mskjax.data.decoded import (DEFAULT_MAX_PIXELS, LUMA_WEIGHTS, Decoded, ImageDecodeError, check_is_file,
                                 check_pixel_count, rgb_to_gray)
from mskjax.data.dicom import decode_dicom

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "Decoded",
    "ImageDecodeError",
    "decode_image",
    "read_yolo_boxes",
    "LUMA_WEIGHTS",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8\xff"
# Start-of-frame markers carry the image size (all but DHT C4, JPG C8, DAC CC).
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_EXIF_ORIENTATION_TAG = 0x0112


def decode_image(path: str | os.PathLike, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoded:
    """Decode a JPEG, PNG or DICOM radiograph into a grayscale float32 (H, W) image in [0, 1].

    The format is sniffed from the bytes (PNG signature, JPEG SOI, "DICM" at offset 128), with a
    ``.dcm`` / ``.dicom`` suffix also sent to `mskjax.data.dicom.decode_dicom`. See the module
    docstring for intensity scaling, colour, alpha and truncation rules.

    Args:
      path: file to read.
      max_pixels: refuse images with more than this many pixels (H * W) before decoding them;
        None disables our check (Pillow's own limit still applies).

    Raises:
      FileNotFoundError: no file at `path`.
      ImageDecodeError: a directory, an unsupported format, a truncated or corrupt file, an
        unsupported pixel mode, or an image larger than `max_pixels`.
    """
    path = os.path.abspath(os.fspath(path))
    check_is_file(path)
    with open(path, "rb") as f:
        data = f.read()
    kind = _sniff(data, path)
    if kind == "DICOM":

        return decode_dicom(path, max_pixels=max_pixels)

    if kind == "PNG":
        header = _png_structure(data, path)
    else:
        header = _jpeg_structure(data, path)
    width, height = header["width"], header["height"]
    check_pixel_count(path, height, width, max_pixels)

    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as im:
            im.load()
            orientation = _exif_orientation(im)
            gray = _to_gray(im, path)
            mode = im.mode
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(path, f"refused by Pillow's decompression-bomb limit: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, MemoryError) as e:
        raise ImageDecodeError(path, f"{kind} decoder failed: {e}") from e

    if ImageFile.LOAD_TRUNCATED_IMAGES and kind == "PNG":
        # Pillow ignores decoder errors under that flag: check the compressed stream ourselves.
        _check_png_stream(data, path)

    if gray.shape != (height, width):
        raise ImageDecodeError(path, f"decoded {gray.shape[::-1]} pixels but the header says {(width, height)}")
    gray = apply_exif_orientation(gray, orientation)
    bits_allocated = 16 if mode.startswith("I") else 8
    if mode in ("P", "PA", "1"):  # palette indices / bilevel: the samples are 8-bit after lookup
        bits_stored = 8 if mode != "1" else 1
    else:
        bits_stored = header.get("significant_bits") or header.get("bit_depth") or bits_allocated
        # Pillow keeps only the high byte of 16-bit colour / gray+alpha PNGs: say so.
        bits_stored = min(bits_stored, bits_allocated)
    if mode.startswith("I") and header.get("bit_depth", 16) != 16:
        raise ImageDecodeError(path, f"unexpected mode {mode} for a {header.get('bit_depth')}-bit image")
    return Decoded(
        image=gray,
        original_size=(int(gray.shape[0]), int(gray.shape[1])),
        bits_stored=int(bits_stored),
        bits_allocated=bits_allocated,
        path=path,
        source_format=kind,
        source_mode=mode,
        exif_orientation=orientation,
    )


def apply_exif_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Map a stored-frame array (H, W, ...) to the displayed frame for EXIF orientation 1..8.

    Same geometry as Pillow's ``ImageOps.exif_transpose``; values outside 1..8 are treated as 1
    (Pillow ignores them too).
    """
    if orientation == 2:
        out = image[:, ::-1]
    elif orientation == 3:
        out = image[::-1, ::-1]
    elif orientation == 4:
        out = image[::-1, :]
    elif orientation == 5:
        out = np.swapaxes(image, 0, 1)
    elif orientation == 6:
        out = np.swapaxes(image, 0, 1)[:, ::-1]
    elif orientation == 7:
        out = np.swapaxes(image, 0, 1)[::-1, ::-1]
    elif orientation == 8:
        out = np.swapaxes(image, 0, 1)[::-1, :]
    else:
        return image
    return np.ascontiguousarray(out)


def read_yolo_boxes(
    path: str | os.PathLike, width: int, height: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read a YOLO label file (one ``class cx cy w h`` per line, normalised to [0, 1]) as pixel boxes.

    Args:
      path: the .txt file. Blank lines are ignored.
      width, height: size of the displayed image the labels refer to, in pixels.

    Returns:
      classes: int32 (N,).
      boxes: float64 (N, 4), (x0, y0, x1, y1) in pixels of that image (pixel i covers [i, i+1)).

    Raises:
      FileNotFoundError: no such file.
      ValueError: a line without 5 fields, a non-integer class, a non-numeric value, a negative
        width/height, or a box outside [0, 1] (tolerance 1e-6); the message names file and line.
    """
    path = os.fspath(path)
    if width <= 0 or height <= 0:
        raise ValueError(f"{path}: image size must be positive, got width={width} height={height}")
    classes, boxes = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}:{lineno}"
            if len(fields) != 5:
                raise ValueError(f"{where}: expected 'class cx cy w h', got {len(fields)} fields: {line.strip()!r}")
            try:
                cls = int(fields[0])
                cx, cy, w, h = (float(v) for v in fields[1:])
            except ValueError as e:
                raise ValueError(f"{where}: not a YOLO label line {line.strip()!r} ({e})") from e
            if not all(np.isfinite((cx, cy, w, h))) or w < 0 or h < 0:
                raise ValueError(f"{where}: invalid box size in {line.strip()!r}")
            x0, x1 = cx - w / 2, cx + w / 2
            y0, y1 = cy - h / 2, cy + h / 2
            tol = 1e-6
            if x0 < -tol or y0 < -tol or x1 > 1 + tol or y1 > 1 + tol:
                raise ValueError(f"{where}: box {(x0, y0, x1, y1)} lies outside the normalised image [0, 1]")
            classes.append(cls)
            boxes.append(
                (
                    min(max(x0, 0.0), 1.0) * width,
                    min(max(y0, 0.0), 1.0) * height,
                    min(max(x1, 0.0), 1.0) * width,
                    min(max(y1, 0.0), 1.0) * height,
                )
            )
    return np.asarray(classes, dtype=np.int32), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


# --------------------------------------------------------------------------------------------
# Helpers.


def _sniff(data: bytes, path: str) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(_JPEG_SOI):
        return "JPEG"
    if data[128:132] == b"DICM" or Path(path).suffix.lower() in (".dcm", ".dicom"):
        return "DICOM"
    if not data:
        raise ImageDecodeError(path, "file is empty")
    raise ImageDecodeError(
        path, f"unsupported format: not JPEG, PNG or DICOM (first bytes {data[:8]!r})"
    )


def _jpeg_structure(data: bytes, path: str) -> dict:
    """Walk JPEG markers to EOI (entropy-coded segments included); return the SOF header fields.

    Raises ImageDecodeError when the file ends before EOI (truncated) or a segment is malformed.
    """
    n = len(data)
    pos = 2  # after SOI
    header: dict = {}

    def truncated(what: str) -> ImageDecodeError:
        return ImageDecodeError(path, f"truncated JPEG: file ends ({n} bytes) {what} before the EOI marker")

    while True:
        if pos >= n:
            raise truncated("after a segment")
        if data[pos] != 0xFF:
            raise ImageDecodeError(path, f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02x}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise truncated("inside a marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length field
            continue
        if pos + 2 > n:
            raise truncated(f"inside the length of marker 0x{marker:02x}")
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2:
            raise ImageDecodeError(path, f"corrupt JPEG: marker 0x{marker:02x} at byte {pos - 2} has length {length}")
        if pos + length > n:
            raise truncated(f"inside segment 0x{marker:02x} at byte {pos - 2}")
        if marker in _JPEG_SOF and "width" not in header:
            if length < 8:
                raise ImageDecodeError(path, f"corrupt JPEG: start-of-frame segment too short ({length})")
            header["bit_depth"] = data[pos + 2]
            header["height"] = int.from_bytes(data[pos + 3 : pos + 5], "big")
            header["width"] = int.from_bytes(data[pos + 5 : pos + 7], "big")
            header["components"] = data[pos + 7]
        pos += length
        if marker == 0xDA:  # SOS: entropy-coded data until the next non-RST, non-stuffed marker
            if "width" not in header:
                raise ImageDecodeError(path, "corrupt JPEG: scan data before any start-of-frame segment")
            while True:
                i = data.find(b"\xff", pos)
                if i < 0 or i + 1 >= n:
                    raise truncated("inside entropy-coded scan data")
                nxt = data[i + 1]
                if nxt == 0xFF:  # fill byte before a marker
                    pos = i + 1
                elif nxt == 0x00 or 0xD0 <= nxt <= 0xD7:  # stuffed 0xFF or restart marker
                    pos = i + 2
                else:
                    pos = i
                    break
    if "width" not in header:
        raise ImageDecodeError(path, "corrupt JPEG: no start-of-frame segment before EOI")
    return header


def _png_structure(data: bytes, path: str) -> dict:
    """Walk PNG chunks to IEND checking every CRC; return IHDR fields (+ sBIT significant bits)."""
    n = len(data)
    pos = len(_PNG_SIGNATURE)
    header: dict = {}
    first = True
    while True:
        if pos + 8 > n:
            raise ImageDecodeError(path, f"truncated PNG: file ends ({n} bytes) before the IEND chunk")
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise ImageDecodeError(
                path, f"truncated PNG: chunk {ctype!r} at byte {pos} needs {length} bytes, file ends at {n}"
            )
        body = data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : end], "big")
        if zlib.crc32(data[pos + 4 : pos + 8 + length]) != crc:
            raise ImageDecodeError(path, f"corrupt PNG: CRC mismatch in chunk {ctype!r} at byte {pos}")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise ImageDecodeError(path, "corrupt PNG: first chunk is not a valid IHDR")
            header["width"] = int.from_bytes(body[0:4], "big")
            header["height"] = int.from_bytes(body[4:8], "big")
            header["bit_depth"] = body[8]
            header["color_type"] = body[9]
            first = False
        elif ctype == b"sBIT" and length >= 1:
            header["significant_bits"] = max(body)
        elif ctype == b"IEND":
            return header
        pos = end


def _check_png_stream(data: bytes, path: str) -> None:
    """Decompress the concatenated IDAT stream and require it to end properly (adler32 checked)."""
    pos, idat = len(_PNG_SIGNATURE), []
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + length])
        pos += 12 + length
    d = zlib.decompressobj()
    try:
        for piece in idat:
            d.decompress(piece, 0)
            while d.unconsumed_tail:
                d.decompress(d.unconsumed_tail, 0)
    except zlib.error as e:
        raise ImageDecodeError(path, f"corrupt PNG: image data stream is invalid ({e})") from e
    if not d.eof:
        raise ImageDecodeError(path, "truncated PNG: image data stream ends early")


def _exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: Pillow's exif_transpose also ignores it
        return 1
    return int(value) if isinstance(value, int) and 1 <= value <= 8 else 1


def _to_gray(im: Image.Image, path: str) -> np.ndarray:
    """Pillow image (stored frame) -> float32 (H, W) in [0, 1], per the rules in the module docstring."""
    mode = im.mode
    if mode == "1":
        out = np.asarray(im).astype(np.float32)  # bool -> 0.0 / 1.0
    elif mode == "L":
        out = np.asarray(im).astype(np.float32) / np.float32(255.0)
    elif mode in ("LA", "La"):
        if mode == "La":  # premultiplied alpha: the stored gray is not the measured intensity
            raise ImageDecodeError(path, "unsupported mode 'La' (premultiplied alpha)")
        out = np.asarray(im)[..., 0].astype(np.float32) / np.float32(255.0)
    elif mode in ("RGB", "RGBX", "RGBA"):
        out = rgb_to_gray(np.asarray(im)[..., :3]) / 255.0
    elif mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        rgb = im.convert("RGBA" if has_alpha else "RGB")
        out = rgb_to_gray(np.asarray(rgb)[..., :3]) / 255.0
    elif mode in ("CMYK", "YCbCr"):
        out = rgb_to_gray(np.asarray(im.convert("RGB"))) / 255.0
    elif mode.startswith("I;16"):
        out = np.asarray(im).astype(np.float32) / np.float32(65535.0)
    elif mode == "I":
        raw = np.asarray(im)
        lo, hi = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageDecodeError(
                path, f"32-bit integer image with values in [{lo}, {hi}] has no known 16-bit range"
            )
        out = raw.astype(np.float64) / 65535.0
    else:
        raise ImageDecodeError(path, f"unsupported pixel mode {mode!r}")
    out = out.astype(np.float32, copy=False)
    return np.clip(out, 0.0, 1.0, out=out)
