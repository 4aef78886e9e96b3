"""decode_dicom: files pydicom ships in its wheel (offline) and files written here with exact expectations."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from mskjax.data.dicom import decode_dicom
from mskjax.data.images import ImageDecodeError, decode_image


def _bundled(name: str) -> str:
    """A test file inside the pydicom wheel; fail (not skip) if this pydicom lacks it."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"pydicom {pydicom.__version__} does not bundle {name}")
    return str(path)


def _write(path, pixels: np.ndarray, *, photometric="MONOCHROME2", bits_stored=None, signed=False, **elements):
    """Write an uncompressed single-frame DICOM with the given stored values and extra elements."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored or 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for k, v in elements.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------------------------- written files


def test_monochrome1_12bit_with_rescale_and_window_exact(tmp_path):
    # stored s -> modality m = 2 s - 100; LINEAR window c=1000, w=401: 0 for m <= 799.5,
    # 1 for m > 1199.5, else (m - 999.5) / 400 + 0.5; MONOCHROME1 then inverts.
    stored = np.array([[400, 450, 550], [649, 650, 700]])
    p = _write(
        tmp_path / "m1.dcm",
        stored,
        photometric="MONOCHROME1",
        bits_stored=12,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=1000,
        WindowWidth=401,
        PixelSpacing=[0.1, 0.2],
    )
    d = decode_dicom(p)
    window = np.array([[0.0, 0.00125, 0.50125], [0.99625, 1.0, 1.0]])
    np.testing.assert_allclose(d.image, 1.0 - window, atol=1e-6)
    assert d.image.dtype == np.float32 and d.image.shape == (2, 3)
    assert d.original_size == (2, 3)
    assert d.source_format == "DICOM" and d.source_mode == "MONOCHROME1"
    assert d.bits_stored == 12 and d.bits_allocated == 16
    assert d.pixel_spacing == (0.1, 0.2)


def test_window_matches_pydicom_apply_voi_lut_rescaled(tmp_path):
    """Parity: our [0, 1] output is pydicom's windowing output mapped from its output range."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (8, 8))
    p = _write(tmp_path / "w.dcm", stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=10,
               WindowCenter=800, WindowWidth=600, VOILUTFunction="SIGMOID")
    ds = pydicom.dcmread(p)
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    lo, hi = 0 * 0.5 + 10, 4095 * 0.5 + 10
    np.testing.assert_allclose(decode_dicom(p).image, (ref - lo) / (hi - lo), atol=1e-6)
    # and the sigmoid itself, by the standard's formula
    m = stored * 0.5 + 10
    np.testing.assert_allclose(decode_dicom(p).image, 1 / (1 + np.exp(-4 * (m - 800) / 600)), atol=1e-6)


def test_no_window_scales_by_bits_stored(tmp_path):
    stored = np.array([[0, 1000, 4095]])
    d = decode_dicom(_write(tmp_path / "a.dcm", stored, bits_stored=12))
    np.testing.assert_allclose(d.image, stored / 4095.0, atol=1e-6)
    assert d.pixel_spacing is None
    # Rescale without a window: same picture (range follows the rescale).
    d2 = decode_dicom(_write(tmp_path / "b.dcm", stored, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100))
    np.testing.assert_allclose(d2.image, stored / 4095.0, atol=1e-6)
    # A negative slope flips intensities: the lowest modality value is black.
    d3 = decode_dicom(_write(tmp_path / "c.dcm", stored, bits_stored=12, RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_allclose(d3.image, (4095 - stored) / 4095.0, atol=1e-6)


def test_signed_pixels_without_window(tmp_path):
    stored = np.array([[-32768, 0, 32767]])
    d = decode_dicom(_write(tmp_path / "s.dcm", stored, signed=True))
    np.testing.assert_allclose(d.image, (stored + 32768) / 65535.0, atol=1e-6)


def test_voi_lut_sequence_preferred_over_window(tmp_path):
    stored = np.array([[0, 99, 100, 200, 355, 356, 4000]])
    item = Dataset()
    # 256 entries, first stored value mapped = 100, 8-bit output (both elements have ambiguous VRs)
    item.add_new(0x00283002, "US", [256, 100, 8])  # LUT Descriptor
    item.add_new(0x00283006, "US", list(range(256)))  # LUT Data
    d = decode_dicom(_write(tmp_path / "lut.dcm", stored, bits_stored=12, VOILUTSequence=[item],
                            WindowCenter=50, WindowWidth=10))
    np.testing.assert_allclose(d.image, np.clip(stored - 100, 0, 255) / 255.0, atol=1e-6)


def test_voi_lut_as_ow_bytes_with_12_bit_output(tmp_path):
    stored = np.array([[0, 5, 10, 3000]])
    lut = (np.arange(11) * 400).astype("<u2")  # 11 entries starting at stored value 0, 12-bit output
    item = Dataset()
    item.add_new(0x00283002, "US", [11, 0, 12])
    item.add_new(0x00283006, "OW", lut.tobytes())
    d = decode_dicom(_write(tmp_path / "ow.dcm", stored, bits_stored=12, VOILUTSequence=[item]))
    np.testing.assert_allclose(d.image, [[0, 2000 / 4095, 4000 / 4095, 4000 / 4095]], atol=1e-6)


def test_imager_pixel_spacing_used_when_pixel_spacing_absent(tmp_path):
    d = decode_dicom(_write(tmp_path / "ips.dcm", np.zeros((2, 2)), ImagerPixelSpacing=[0.143, 0.15]))
    assert d.pixel_spacing == (0.143, 0.15)


def test_decode_image_dispatches_dicom_by_suffix_and_by_magic(tmp_path):
    stored = np.array([[0, 65535]])
    p = _write(tmp_path / "x.dcm", stored)
    assert decode_image(p).source_format == "DICOM"
    no_suffix = tmp_path / "image0001"
    no_suffix.write_bytes(p.read_bytes())
    np.testing.assert_allclose(decode_image(no_suffix).image, [[0.0, 1.0]], atol=1e-7)


def test_max_pixels_refused_before_decoding(tmp_path):
    p = _write(tmp_path / "big.dcm", np.zeros((20, 30)))
    with pytest.raises(ImageDecodeError, match=r"30x20 = 600 pixels"):
        decode_dicom(p, max_pixels=599)


def test_missing_and_non_dicom(tmp_path):
    with pytest.raises(FileNotFoundError, match="gone.dcm"):
        decode_dicom(tmp_path / "gone.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello, not a dicom file" * 10)
    with pytest.raises(ImageDecodeError, match="junk.dcm"):
        decode_image(junk)


# ---------------------------------------------------------------------------------- bundled files


def test_mr_small_window_by_the_standard_formula():
    path = _bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)  # 600, 1600; signed 16-bit, no rescale
    x = ds.pixel_array.astype(np.float64)
    expected = np.clip((x - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected[x <= c - 0.5 - (w - 1) / 2] = 0.0
    expected[x > c - 0.5 + (w - 1) / 2] = 1.0
    d = decode_dicom(path)
    np.testing.assert_allclose(d.image, expected, atol=1e-6)
    assert d.pixel_spacing == (0.3125, 0.3125)
    assert d.original_size == (64, 64)


def test_rle_and_jpeg2000_lossless_decode_same_as_uncompressed():
    ref = decode_dicom(_bundled("MR_small.dcm")).image
    np.testing.assert_array_equal(decode_dicom(_bundled("MR_small_RLE.dcm")).image, ref)
    np.testing.assert_array_equal(decode_dicom(_bundled("MR_small_jp2klossless.dcm")).image, ref)
    np.testing.assert_array_equal(decode_dicom(_bundled("MR_small_bigendian.dcm")).image, ref)


def test_ct_small_and_jpeg2000_decode():
    ct = decode_dicom(_bundled("CT_small.dcm"))
    assert ct.image.shape == (128, 128) and ct.pixel_spacing == (0.661468, 0.661468)
    j2k = decode_dicom(_bundled("JPEG2000.dcm"))
    assert j2k.image.shape == (1024, 256) and j2k.image.dtype == np.float32
    assert 0.0 <= j2k.image.min() < j2k.image.max() <= 1.0


def test_rgb_dicom_uses_luma():
    path = _bundled("SC_rgb_jpeg.dcm")
    ds = pydicom.dcmread(path)
    rgb = ds.pixel_array.astype(np.float64)
    d = decode_dicom(path)
    np.testing.assert_allclose(d.image, (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255, atol=1e-6)


@pytest.mark.parametrize(
    "name, uid, tsname",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "1.2.840.10008.1.2.4.80", "JPEG-LS Lossless"),
        ("JPEG-lossy.dcm", "1.2.840.10008.1.2.4.51", "JPEG Extended"),
    ],
)
def test_undecodable_transfer_syntax_named(name, uid, tsname):
    path = _bundled(name)
    with pytest.raises(ImageDecodeError) as e:
        decode_dicom(path)
    msg = str(e.value)
    assert uid in msg and tsname in msg and path in msg


@pytest.mark.parametrize(
    "name, match",
    [
        ("MR_truncated.dcm", "less than expected"),
        ("rtplan.dcm", "no Pixel Data"),
        ("examples_palette.dcm", "PALETTE COLOR"),
        ("SC_rgb_rle_2frame.dcm", r"multi-frame DICOM \(2 frames\)"),
    ],
)
def test_bundled_refusals(name, match):
    with pytest.raises(ImageDecodeError, match=match):
        decode_dicom(_bundled(name))
