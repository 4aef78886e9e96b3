"""Overlays, colormap, outlines, thumbnails and the HTML report."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mskjax import viz


def test_jet_endpoints_and_middle():
    np.testing.assert_allclose(viz.jet(np.array([0.0, 0.5, 1.0])),
                               [[0, 0, 0.5], [0.5, 1, 0.5], [0.5, 0, 0]], atol=1e-6)
    c = viz.jet(np.linspace(0, 1, 11))
    assert np.argmax(c[0]) == 2 and np.argmax(c[-1]) == 0  # blue for low, red for high
    assert viz.jet(np.array([-1.0, 2.0])).tolist() == viz.jet(np.array([0.0, 1.0])).tolist()  # clipped


def test_outline_of_a_square_is_its_border():
    m = np.zeros((10, 10), bool)
    m[2:8, 3:9] = True
    o = viz.outline(m)
    assert o.sum() == 2 * 6 + 2 * 4 and o[2, 3] and o[7, 8] and not o[4, 5]
    assert viz.outline(m, 2).sum() > o.sum()


def test_overlay_layers_land_where_they_should():
    img = np.full((40, 60), 0.5, np.float32)
    cam = np.zeros((40, 60), np.float32)
    cam[5:10, 5:10] = 1.0
    mask = np.zeros((40, 60), bool)
    mask[20:30, 30:50] = True
    out = viz.overlay(img, cam, np.array([[10.0, 10.0, 20.0, 20.0]]), mask, min_side=60, max_side=1024)
    assert out.shape == (40, 60, 3) and out.dtype == np.uint8
    assert tuple(out[35, 2]) == (128, 128, 128)            # untouched: gray where nothing is drawn
    r, g, b = out[7, 7].astype(int)
    assert r > b + 50 and r > g + 50                        # CAM peak is (dark) red
    assert tuple(out[10, 15]) == viz.BOX_COLOR             # box edge
    assert tuple(out[20, 40]) == viz.MASK_COLOR            # mask outline
    inside = out[25, 40].astype(int)
    assert inside[2] > inside[0] and tuple(inside) != viz.MASK_COLOR  # translucent cyan fill


def test_overlay_rescales_small_images_and_adds_a_caption():
    img = np.random.default_rng(0).uniform(size=(100, 80)).astype(np.float32)
    plain = viz.overlay(img)
    assert plain.shape == (600, 480, 3)  # integer upscaling to a long side >= 512
    block = plain[..., 0].reshape(100, 6, 80, 6).mean(axis=(1, 3)) / 255  # bilinear upscaling keeps the content
    assert np.corrcoef(block.ravel(), img.ravel())[0, 1] > 0.8
    cap = viz.overlay(img, caption="p = 0.9\nsecond line")
    assert cap.shape[0] > 600 and cap.shape[1] == 480
    big = viz.overlay(np.zeros((3000, 1500), np.float32))
    assert max(big.shape[:2]) == 1024
    with pytest.raises(ValueError, match="differ in size"):
        viz.overlay(img, np.zeros((10, 10)))


def test_thumbnail_and_png(tmp_path):
    rgb = np.zeros((300, 150, 3), np.uint8)
    t = viz.thumbnail(rgb, 100)
    assert t.shape == (100, 50, 3)
    p = viz.save_png(tmp_path / "a" / "m.png", np.eye(4, dtype=bool))
    assert np.asarray(Image.open(p)).tolist() == (np.eye(4) * 255).astype(int).tolist()


def test_report_is_plain_escaped_html(tmp_path):
    table = viz.html_table(["metric", "value"], [("dice <gt>", 0.5), ("auroc", float("nan"))])
    path = viz.write_report(tmp_path / "index.html", "Report & co", [("Seg", table)],
                            [{"thumb": "thumbs/a.png", "link": "overlays/a.png", "title": "a<b>.png",
                              "lines": ["p = 0.9"], "abnormal": True}], legend=viz.legend_items(True, True))
    text = path.read_text()
    assert "<script" not in text and "Report &amp; co" in text and "dice &lt;gt&gt;" in text
    assert "0.5000" in text and "n/a" in text and "thumbs/a.png" in text and "a&lt;b&gt;.png" in text
