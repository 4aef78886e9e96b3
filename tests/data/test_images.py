"""decode_image: every file in ../shared/data/quirks, every supported pixel mode, and every refusal."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from mskjax.data import images
from mskjax.data.images import Decoded, ImageDecodeError, decode_image, read_yolo_boxes


@pytest.fixture(scope="module")
def quirks(shared_data):
    return shared_data / "quirks"


def _luma(rgb) -> np.ndarray:
    rgb = np.asarray(rgb, dtype=np.float64)
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0


# ---------------------------------------------------------------------------------- quirk files


def test_truncated_jpeg_raises_naming_the_file(quirks):
    path = quirks / "truncated.jpg"
    with pytest.raises(ImageDecodeError) as e:
        decode_image(path)
    assert str(path) in str(e.value)
    assert "truncated" in str(e.value)
    assert e.value.path == str(path)
    assert isinstance(e.value, ValueError)


def test_truncated_jpeg_raises_even_when_pillow_is_told_to_accept_truncation(quirks, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    # Pillow alone would now return a half-grey image without complaint ...
    with Image.open(quirks / "truncated.jpg") as im:
        im.load()
    # ... we do not.
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(quirks / "truncated.jpg")


def test_exif_orientation_8_decodes_in_displayed_frame(quirks, shared_data):
    path = quirks / "exif_orientation_8.jpg"
    with Image.open(path) as im:
        assert im.size == (373, 454)  # stored: 373 wide, 454 high
        displayed = ImageOps.exif_transpose(im)
    d = decode_image(path)
    assert d.exif_orientation == 8
    assert d.image.shape == (373, 454) and d.original_size == (373, 454)  # 454 wide, 373 high
    np.testing.assert_allclose(d.image, _luma(np.asarray(displayed)), atol=1e-6)
    # FracAtlas's copy of the same image was EXIF-transposed and re-encoded (quality 92): same content.
    with Image.open(shared_data / "fracatlas" / "images" / "IMG0002628.jpg") as ref:
        ref_arr = np.asarray(ref, dtype=np.float64) / 255.0
    assert ref_arr.shape == d.image.shape
    assert np.abs(d.image - ref_arr).mean() < 2.0 / 255.0
    # The stored frame rotated the other way would not match.
    wrong = np.rot90(d.image, 2)
    assert np.abs(wrong - ref_arr).mean() > 10 * np.abs(d.image - ref_arr).mean()


def test_rgb_jpeg_uses_bt601_luma(quirks):
    path = quirks / "rgb_jpeg.jpg"
    d = decode_image(path)
    with Image.open(path) as im:
        assert im.mode == "RGB"
        rgb = np.asarray(im)
        pil_l = np.asarray(im.convert("L"), dtype=np.float64) / 255.0
    assert d.source_mode == "RGB" and d.bits_stored == 8 and d.bits_allocated == 8
    assert d.image.dtype == np.float32 and d.image.shape == (373, 454)
    np.testing.assert_allclose(d.image, _luma(rgb), atol=1e-6)
    # Pillow's 'L' uses the same weights but rounds to 8 bits: within half a level.
    assert np.abs(d.image - pil_l).max() <= 0.5 / 255.0 + 1e-6


def test_large_radiograph_decodes_full_size(quirks, shared_data):
    path = quirks / "large_2304x2880.jpg"
    d = decode_image(path)
    assert d.image.shape == (2880, 2304) and d.original_size == (2880, 2304)
    assert d.image.dtype == np.float32 and 0.0 <= d.image.min() and d.image.max() <= 1.0
    with Image.open(path) as im:
        np.testing.assert_allclose(d.image, np.asarray(im, dtype=np.float64) / 255.0, atol=1e-6)
    # FracAtlas keeps this image (IMG0000019) downscaled to 410x512: same picture.
    with Image.open(shared_data / "fracatlas" / "images" / "IMG0000019.jpg") as ref:
        small_ref = np.asarray(ref, dtype=np.float64) / 255.0
    ours = Image.fromarray((d.image * 255).round().astype(np.uint8)).resize((410, 512), Image.Resampling.BOX)
    assert np.abs(np.asarray(ours, dtype=np.float64) / 255.0 - small_ref).mean() < 3.0 / 255.0


def test_large_radiograph_refused_above_max_pixels(quirks):
    with pytest.raises(ImageDecodeError, match=r"2304x2880 = 6635520 pixels.*max_pixels=1000000"):
        decode_image(quirks / "large_2304x2880.jpg", max_pixels=1_000_000)
    assert decode_image(quirks / "large_2304x2880.jpg", max_pixels=2304 * 2880).image.shape == (2880, 2304)


def test_uint16_png_scaled_by_16_bit_range(quirks):
    path = quirks / "uint16_wrist.png"
    with Image.open(path) as im:
        assert im.mode == "I;16"
        raw = np.asarray(im)
    assert raw.dtype == np.uint16
    d = decode_image(path)
    assert d.source_mode == "I;16" and d.bits_allocated == 16 and d.bits_stored == 16
    assert d.image.shape == (727, 494)
    np.testing.assert_array_equal(d.image, raw.astype(np.float32) / np.float32(65535))
    assert d.image.max() == 1.0 and d.image.min() == 0.0


def test_uint16_yolo_boxes_in_pixels(quirks):
    classes, boxes = read_yolo_boxes(quirks / "uint16_wrist_boxes_yolo.txt", 494, 727)
    # File: "8 0.05668 0.837689 0.109312 0.088033" -> class 8 (text label).
    np.testing.assert_array_equal(classes, [8])
    expected = [
        (0.05668 - 0.109312 / 2) * 494,
        (0.837689 - 0.088033 / 2) * 727,
        (0.05668 + 0.109312 / 2) * 494,
        (0.837689 + 0.088033 / 2) * 727,
    ]
    np.testing.assert_allclose(boxes, [expected], rtol=0, atol=1e-9)
    np.testing.assert_allclose(boxes[0], [1.0, 577.0, 55.0, 641.0], atol=1e-3)
    # The box frames the burnt-in text label: bright pixels are far denser there than overall.
    img = decode_image(quirks / "uint16_wrist.png").image
    x0, y0, x1, y1 = boxes[0]
    region = img[int(y0) : int(np.ceil(y1)), int(x0) : int(np.ceil(x1))]
    assert (region > 0.9).mean() > 20 * (img > 0.9).mean()


# ---------------------------------------------------------------------------------- YOLO parsing


@pytest.mark.parametrize(
    "text, match",
    [
        ("8 0.5 0.5 0.1\n", "5 fields|expected"),
        ("x 0.5 0.5 0.1 0.1\n", "not a YOLO"),
        ("1 0.5 0.5 0.1 0.1\n2 0.98 0.5 0.1 0.1\n", r"\.txt:2: box .* outside"),
        ("1 0.5 0.5 -0.1 0.1\n", "invalid box size"),
    ],
)
def test_yolo_bad_lines_raise_naming_file_and_line(tmp_path, text, match):
    p = tmp_path / "labels.txt"
    p.write_text(text)
    with pytest.raises(ValueError, match=match) as e:
        read_yolo_boxes(p, 100, 50)
    assert str(p) in str(e.value)


def test_yolo_empty_file_gives_empty_arrays(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("\n")
    classes, boxes = read_yolo_boxes(p, 100, 50)
    assert classes.shape == (0,) and boxes.shape == (0, 4)


# ---------------------------------------------------------------------------------- pixel modes


def _save(tmp_path, im: Image.Image, name: str, **kw):
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_8bit_gray_png_exact(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    d = decode_image(_save(tmp_path, Image.fromarray(arr), "g.png"))
    assert isinstance(d, Decoded)
    assert d.source_format == "PNG" and d.source_mode == "L" and d.bits_stored == 8
    np.testing.assert_allclose(d.image, arr / 255.0, atol=1e-7)
    assert d.path == str(tmp_path / "g.png")


def test_12bit_data_in_16bit_png_is_not_stretched(tmp_path):
    # A non-conforming writer that stores 12-bit values unscaled: we keep the container scale.
    arr = np.linspace(0, 4095, 64 * 32).astype(np.uint16).reshape(64, 32)
    d = decode_image(_save(tmp_path, Image.fromarray(arr), "w12.png"))
    assert d.source_mode.startswith("I;16")
    np.testing.assert_allclose(d.image, arr / 65535.0, rtol=1e-6)
    assert d.image.max() == pytest.approx(4095 / 65535, rel=1e-6)


def test_rgb_png_pure_colours(tmp_path):
    arr = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [90, 90, 90]]], dtype=np.uint8)
    d = decode_image(_save(tmp_path, Image.fromarray(arr, "RGB"), "rgb.png"))
    np.testing.assert_allclose(d.image, [[0.299, 0.587, 0.114, 90 / 255]], atol=1e-6)


def test_rgba_alpha_dropped_not_composited(tmp_path):
    arr = np.array([[[100, 100, 100, 0], [200, 200, 200, 128], [10, 20, 30, 255]]], dtype=np.uint8)
    d = decode_image(_save(tmp_path, Image.fromarray(arr, "RGBA"), "rgba.png"))
    np.testing.assert_allclose(d.image[0], [100 / 255, 200 / 255, _luma([10, 20, 30])], atol=1e-6)


def test_la_alpha_dropped(tmp_path):
    arr = np.array([[[100, 0], [250, 255]]], dtype=np.uint8)
    d = decode_image(_save(tmp_path, Image.fromarray(arr, "LA"), "la.png"))
    assert d.source_mode == "LA"
    np.testing.assert_allclose(d.image, [[100 / 255, 250 / 255]], atol=1e-6)


def test_palette_png_maps_through_palette(tmp_path):
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 255, 0, 40, 40, 40] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    p = _save(tmp_path, im, "p.png")
    d = decode_image(p)
    assert d.source_mode == "P" and d.bits_stored == 8
    np.testing.assert_allclose(d.image, [[0.299, 0.587, 40 / 255]], atol=1e-6)
    # With a transparent index: alpha is dropped, the colour is kept.
    p2 = _save(tmp_path, im, "pt.png", transparency=2)
    np.testing.assert_allclose(decode_image(p2).image, [[0.299, 0.587, 40 / 255]], atol=1e-6)


def test_bilevel_png(tmp_path):
    im = Image.fromarray(np.array([[0, 255, 255]], dtype=np.uint8)).convert("1")
    d = decode_image(_save(tmp_path, im, "b.png"))
    np.testing.assert_array_equal(d.image, [[0.0, 1.0, 1.0]])


def test_cmyk_jpeg(tmp_path):
    # Left half: no ink (white); right half: full black ink.
    arr = np.zeros((16, 32, 4), dtype=np.uint8)
    arr[:, 16:, 3] = 255
    d = decode_image(_save(tmp_path, Image.fromarray(arr, "CMYK"), "c.jpg", quality=100))
    assert d.source_mode == "CMYK"
    assert d.image[:, :12].min() > 0.97 and d.image[:, 20:].max() < 0.03


def test_mode_i_scaled_by_16_bit_range_and_out_of_range_refused():
    ok = Image.fromarray(np.array([[0, 1000, 65535]], dtype=np.int32))
    assert ok.mode == "I"
    np.testing.assert_allclose(images._to_gray(ok, "x"), [[0, 1000 / 65535, 1]], rtol=1e-6)
    bad = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    with pytest.raises(ImageDecodeError, match="no known 16-bit range"):
        images._to_gray(bad, "x")


def test_float_mode_refused():
    with pytest.raises(ImageDecodeError, match="unsupported pixel mode 'F'"):
        images._to_gray(Image.fromarray(np.zeros((2, 2), np.float32)), "x")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    arr = np.arange(6 * 10, dtype=np.uint8).reshape(6, 10) * 4  # asymmetric, non-square
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = _save(tmp_path, im, f"o{orientation}.png", exif=exif)
    with Image.open(p) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored), dtype=np.float64) / 255.0
    d = decode_image(p)
    assert d.exif_orientation == orientation
    assert d.original_size == expected.shape
    np.testing.assert_allclose(d.image, expected, atol=1e-7)


# ---------------------------------------------------------------------------------- refusals


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (64, 64), dtype=np.uint16)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("lenient", [False, True])
@pytest.mark.parametrize("keep", [0.5, 0.9, -2])
def test_cut_jpeg_refused(tmp_path, monkeypatch, lenient, keep):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    data = _jpeg_bytes()
    n = int(len(data) * keep) if keep > 0 else len(data) + keep  # -2: only the EOI marker missing
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[:n])
    with pytest.raises(ImageDecodeError, match="truncated") as e:
        decode_image(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("lenient", [False, True])
def test_cut_png_refused(tmp_path, monkeypatch, lenient):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", lenient)
    data = _png_bytes()
    p = tmp_path / "cut.png"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="truncated PNG"):
        decode_image(p)


def test_png_with_bad_crc_refused(tmp_path):
    data = bytearray(_png_bytes())
    i = data.index(b"IDAT") + 20
    data[i] ^= 0xFF
    p = tmp_path / "crc.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="CRC mismatch in chunk b'IDAT'"):
        decode_image(p)


def test_png_with_corrupt_stream_refused_even_when_lenient(tmp_path, monkeypatch):
    """Corrupt the deflate data but fix the CRC: only decoding can tell."""
    import zlib

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = bytearray(_png_bytes())
    start = data.index(b"IDAT") - 4
    length = int.from_bytes(data[start : start + 4], "big")
    body = data[start + 8 : start + 8 + length]
    body[2:] = bytes(len(body) - 2)  # keep the zlib header, zero the deflate stream
    data[start + 8 : start + 8 + length] = body
    data[start + 8 + length : start + 12 + length] = zlib.crc32(data[start + 4 : start + 8 + length]).to_bytes(4, "big")
    p = tmp_path / "stream.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageDecodeError, match="image data stream is invalid"):
        decode_image(p)


def test_jpeg_with_trailing_bytes_after_eoi_is_fine(tmp_path):
    p = tmp_path / "tail.jpg"
    p.write_bytes(_jpeg_bytes() + b"\x00" * 100 + b"trailer")
    assert decode_image(p).image.shape == (64, 64)


def test_missing_file_raises_file_not_found_naming_path(tmp_path):
    p = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        decode_image(p)


def test_directory_raises(tmp_path):
    with pytest.raises(ImageDecodeError, match="is a directory"):
        decode_image(tmp_path)


def test_empty_and_unknown_formats_raise(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    with pytest.raises(ImageDecodeError, match="unsupported format"):
        decode_image(text)
    gif = tmp_path / "x.gif"
    Image.new("L", (4, 4)).save(gif)
    with pytest.raises(ImageDecodeError, match="unsupported format"):
        decode_image(gif)


def test_max_pixels_checked_before_decoding_png(tmp_path):
    p = _save(tmp_path, Image.new("L", (300, 200)), "big.png")
    with pytest.raises(ImageDecodeError, match=r"300x200 = 60000 pixels"):
        decode_image(p, max_pixels=59_999)
    assert decode_image(p, max_pixels=None).image.shape == (200, 300)


@pytest.mark.parametrize(
    "options",
    [dict(progressive=True), dict(restart_marker_blocks=2), dict(progressive=True, restart_marker_rows=1)],
)
def test_progressive_and_restart_marker_jpegs(tmp_path, monkeypatch, options):
    """Several scans / RSTn markers inside entropy-coded data: whole files decode, cut ones do not."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 255, (64, 80), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", **options)
    data = buf.getvalue()
    assert data.count(b"\xff\xda") > 1 or any(bytes([0xFF, 0xD0 + i]) in data for i in range(8))
    whole = tmp_path / "whole.jpg"
    whole.write_bytes(data)
    with Image.open(whole) as im:
        np.testing.assert_allclose(decode_image(whole).image, np.asarray(im) / 255.0, atol=1e-6)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(cut)


def _png_16bit_rgb(rgb16: np.ndarray) -> bytes:
    """A minimal 16-bit RGB PNG written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def test_16bit_rgb_png_read_at_8_bits_same_scale(tmp_path):
    rgb16 = np.array([[[65535, 0, 0], [0, 65535, 0], [0, 0, 65535], [30000, 30000, 30000]]], dtype=np.uint16)
    p = tmp_path / "rgb16.png"
    p.write_bytes(_png_16bit_rgb(rgb16))
    d = decode_image(p)
    assert d.source_mode == "RGB" and d.bits_stored == 8
    np.testing.assert_allclose(d.image, [[0.299, 0.587, 0.114, (30000 >> 8) / 255]], atol=1e-6)
