"""preprocess (resize / letterbox) and normalize."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mskjax.data.preprocess import preprocess, resize_image
from mskjax.geometry import boxes_to_input


def _torch_resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return out[0, 0].numpy()


@pytest.mark.parametrize("shape,out", [((97, 61), (24, 24)), ((13, 19), (40, 40)), ((50, 50), (17, 33))])
def test_resize_matches_torch_antialiased_bilinear(shape, out):
    img = np.random.default_rng(0).random(shape, dtype=np.float32)
    got = resize_image(img, *out)
    assert got.dtype == np.float32 and got.shape == out
    np.testing.assert_allclose(got, _torch_resize(img, *out), atol=2e-5)


def test_downsampling_is_antialiased():
    # A 1-pixel checkerboard averages to 0.5 under an antialiasing filter; point sampling would alias it.
    img = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    got = resize_image(img, 8, 8)
    np.testing.assert_allclose(got, 0.5, atol=1e-3)  # edge pixels: renormalised truncated kernel


def test_preprocess_resize_mode():
    img = np.random.default_rng(1).random((30, 45), dtype=np.float32)
    out, geom = preprocess(img, 16, mode="resize")
    assert out.shape == (16, 16, 1) and out.dtype == np.float32
    np.testing.assert_allclose(out[..., 0], _torch_resize(img, 16, 16), atol=2e-5)
    assert (geom.input_h, geom.input_w) == (16, 16)
    assert geom.scale_y == pytest.approx(16 / 30) and geom.scale_x == pytest.approx(16 / 45)
    assert geom.top == 0 and geom.left == 0
    assert (geom.original_h, geom.original_w) == (30, 45)
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("shape", [(40, 80), (81, 20)])
def test_preprocess_letterbox_centres_content_and_pads_with_zero(shape):
    rng = np.random.default_rng(2)
    img = rng.uniform(0.2, 1.0, shape).astype(np.float32)  # strictly positive: padding is visible
    out, geom = preprocess(img, 32, mode="letterbox")
    ch, cw = (int(v) for v in geom.content_hw)
    top, left = int(geom.top), int(geom.left)
    assert max(ch, cw) == 32
    assert top == (32 - ch) // 2 and left == (32 - cw) // 2
    content = np.zeros((32, 32), bool)
    content[top:top + ch, left:left + cw] = True
    assert np.all(out[..., 0][~content] == 0.0)
    assert np.all(out[..., 0][content] > 0.0)
    np.testing.assert_allclose(out[top:top + ch, left:left + cw, 0], _torch_resize(img, ch, cw), atol=2e-5)


def test_letterbox_geometry_maps_boxes_onto_the_content():
    img = np.zeros((60, 120), np.float32)
    img[20:40, 70:100] = 1.0  # box (70, 20, 100, 40) in original pixels
    out, geom = preprocess(img, 48, mode="letterbox")
    x0, y0, x1, y1 = np.round(boxes_to_input(np.array([70.0, 20.0, 100.0, 40.0]), geom)).astype(int)
    inside = out[y0:y1, x0:x1, 0]
    assert inside.mean() > 0.95
    assert out[..., 0].sum() == pytest.approx(inside.sum(), rel=0.1)  # nearly all the mass is there


def test_preprocess_three_channels_repeat_gray():
    img = np.random.default_rng(3).random((20, 20), dtype=np.float32)
    out1, _ = preprocess(img, 10)
    out3, _ = preprocess(img, 10, channels=3)
    assert out3.shape == (10, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(out3[..., c], out1[..., 0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(decoded_image=np.zeros((4, 4, 3), np.float32), size=8), "gray"),
    (dict(decoded_image=np.zeros((4, 4), np.float32), size=8, mode="crop"), "mode"),
    (dict(decoded_image=np.zeros((4, 4), np.float32), size=8, channels=2), "channels"),
    (dict(decoded_image=np.full((4, 4), np.nan, np.float32), size=8), "non-finite"),
    (dict(decoded_image=np.zeros((4, 4), np.float32), size=0), "size"),
])
def test_preprocess_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        preprocess(**kwargs)


