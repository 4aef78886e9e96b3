"""Frames: original image <-> model input (resize, letterbox), boxes, points, maps, validation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mskjax import geometry as G


def test_resize_geometry_numbers():
    g = G.resize_geometry((600, 800), (224, 224))
    assert g.scale_y == pytest.approx(224 / 600) and g.scale_x == pytest.approx(224 / 800)
    assert float(g.top) == 0 and float(g.left) == 0
    # the whole original maps onto the whole input
    np.testing.assert_allclose(G.boxes_to_input(np.array([0, 0, 800, 600.0]), g), [0, 0, 224, 224])


@pytest.mark.parametrize(
    "hw, align, new_hw, top_left",
    [
        ((600, 800), "topleft", (768, 1024), (0, 0)),
        ((600, 800), "center", (768, 1024), (128, 0)),
        ((300, 200), "center", (1024, 683), (0, 170)),  # 200 * 1024/300 = 682.67 -> 683
        ((300, 200), "topleft", (1024, 683), (0, 0)),
        ((1000, 1000), "center", (1024, 1024), (0, 0)),
    ],
)
def test_letterbox_hand_computed(hw, align, new_hw, top_left):
    g = G.letterbox_geometry(hw, 1024, align=align)
    assert (g.input_h, g.input_w) == (1024, 1024)
    assert tuple(float(v) for v in g.content_hw) == new_hw
    assert (float(g.top), float(g.left)) == top_left
    assert g.scale_y == pytest.approx(new_hw[0] / hw[0]) and g.scale_x == pytest.approx(new_hw[1] / hw[1])
    # the image's corners land on the content's corners
    box = G.boxes_to_input(np.array([0.0, 0.0, hw[1], hw[0]]), g)
    np.testing.assert_allclose(box, [top_left[1], top_left[0], top_left[1] + new_hw[1],
                                     top_left[0] + new_hw[0]], atol=1e-9)


def test_letterbox_matches_segment_anything_resize():
    from segment_anything.utils.transforms import ResizeLongestSide

    for hw in [(600, 800), (333, 517), (1023, 7), (2500, 2048)]:
        new_h, new_w = ResizeLongestSide.get_preprocess_shape(hw[0], hw[1], 1024)
        g = G.letterbox_geometry(hw, 1024, align="topleft")
        assert tuple(int(v) for v in g.content_hw) == (new_h, new_w)
        # SAM scales box coordinates by new/old per axis: same as ours
        ref = ResizeLongestSide(1024).apply_boxes(np.array([[10.0, 20.0, 30.0, 40.0]]), hw)
        np.testing.assert_allclose(G.boxes_to_input(np.array([[10.0, 20, 30, 40]]), g), ref)


def test_round_trip_numpy_and_jit_batched():
    rng = np.random.default_rng(0)
    hws = np.array([[600, 800], [300, 200], [1024, 1024], [37, 911]])
    boxes = rng.uniform(0, 1, (4, 5, 4)) * np.array([800, 600, 800, 600])
    for geom in (G.letterbox_geometry(hws, 224), G.letterbox_geometry(hws, 1024, "topleft"),
                 G.resize_geometry(hws, (224, 224))):
        back = G.boxes_to_original(G.boxes_to_input(boxes, geom), geom)
        np.testing.assert_allclose(back, boxes, rtol=1e-12, atol=1e-9)
        # per-image geometry really is per image: image 1's box equals a lone geometry's answer
        single = G.letterbox_geometry(tuple(hws[1]), geom.input_h) if geom.top.any() else None
        if single is not None:
            np.testing.assert_allclose(G.boxes_to_input(boxes[1], single),
                                       G.boxes_to_input(boxes, geom)[1])
    jgeom = G.letterbox_geometry(jnp.asarray(hws), 224)
    f = jax.jit(lambda b, g: G.boxes_to_original(G.boxes_to_input(b, g), g))
    out = f(jnp.asarray(boxes, jnp.float32), jgeom)
    assert isinstance(out, jax.Array)
    np.testing.assert_allclose(np.asarray(out), boxes, rtol=1e-5, atol=1e-2)
    pts = boxes[..., :2]
    np.testing.assert_allclose(
        G.points_to_original(G.points_to_input(pts, G.letterbox_geometry(hws, 224)),
                             G.letterbox_geometry(hws, 224)), pts, atol=1e-9)


def test_point_mapping_formula():
    g = G.letterbox_geometry((100, 200), 50, align="center")  # scale 0.25, content 25 x 50, top 12
    np.testing.assert_allclose(G.points_to_input(np.array([[0.0, 0.0], [200.0, 100.0], [4.0, 8.0]]), g),
                               [[0, 12], [50, 37], [1, 14]])


def test_stack_geometries_equals_batched():
    a = G.letterbox_geometry((600, 800), 224)
    b = G.letterbox_geometry((300, 200), 224)
    s = G.stack_geometries([a, b])
    t = G.letterbox_geometry(np.array([[600, 800], [300, 200]]), 224)
    for x, y in zip(s._data(), t._data()):
        np.testing.assert_allclose(x, y)
    with pytest.raises(ValueError, match="input size"):
        G.stack_geometries([a, G.letterbox_geometry((600, 800), 1024)])


def test_map_to_original_matches_torch_crop_then_interpolate():
    rng = np.random.default_rng(1)
    for hw, side, align in [((60, 90), 32, "topleft"), ((60, 90), 32, "center"),
                            ((13, 11), 64, "center"), ((40, 30), 40, "topleft")]:
        g = G.letterbox_geometry(hw, side, align)
        m = rng.random((side, side)).astype(np.float32)
        ch, cw = (int(v) for v in g.content_hw)
        top, left = int(g.top), int(g.left)
        crop = torch.from_numpy(m[top:top + ch, left:left + cw])[None, None]
        ref = F.interpolate(crop, size=hw, mode="bilinear", align_corners=False)[0, 0].numpy()
        out = G.map_to_original(m, g)
        assert out.shape == hw
        np.testing.assert_allclose(out, ref, atol=1e-5)
        jout = G.map_to_original(jnp.asarray(m), g)
        np.testing.assert_allclose(np.asarray(jout), ref, atol=1e-5)


def test_map_to_original_simple_values_and_batched_jit():
    # plain resize 4x4 -> 2x2 input: each input pixel covers a 2x2 block of the original
    g = G.resize_geometry((4, 4), (2, 2))
    m = np.array([[0.0, 1.0], [2.0, 3.0]])
    out = G.map_to_original(m, g)
    # corners replicate (edge clamp); interior pixels interpolate 1/4, 3/4
    np.testing.assert_allclose(out[0], [0, 0.25, 0.75, 1])
    np.testing.assert_allclose(out[:, 0], [0, 0.5, 1.5, 2])
    # a map that is constant on the content and different on the padding: padding never leaks
    gl = G.letterbox_geometry(jnp.array([[50, 100], [50, 100]]), 20, "center")
    maps = jnp.full((2, 20, 20), 7.0).at[:, :5].set(-100).at[:, 15:].set(-100)
    fn = jax.jit(G.map_to_original, static_argnums=2)
    out = fn(maps, gl, (50, 100))
    assert out.shape == (2, 50, 100)
    np.testing.assert_allclose(np.asarray(out), 7.0, rtol=1e-6)
    with pytest.raises(ValueError, match="disagrees"):
        G.map_to_original(np.zeros((20, 20)), G.letterbox_geometry((50, 100), 20), (60, 100))


def test_clip_boxes_single_and_per_image():
    b = np.array([[-5.0, -1.0, 30.0, 12.0], [2.0, 3.0, 4.0, 5.0]])
    np.testing.assert_array_equal(G.clip_boxes(b, (10, 20)), [[0, 0, 20, 10], [2, 3, 4, 5]])
    per = G.clip_boxes(jnp.asarray(b)[:, None, :], jnp.array([[10, 20], [4, 3]]))
    np.testing.assert_array_equal(np.asarray(per)[:, 0], [[0, 0, 20, 10], [2, 3, 3, 4]])


@pytest.mark.parametrize(
    "box, why",
    [
        ([5, 5, 3, 8], "inverted"),
        ([5, 5, 8, 5], "zero area"),
        ([np.nan, 1, 2, 3], "non-finite"),
        ([1, 1, np.inf, 3], "non-finite"),
        ([25, 1, 30, 3], "outside"),
        ([-9, -9, 0, 5], "outside"),
    ],
)
def test_validate_boxes_errors_name_box_and_reason(box, why):
    boxes = np.array([[1.0, 1.0, 4.0, 4.0], box], dtype=float)
    with pytest.raises(G.InvalidBoxError, match=rf"img\.png: box 1 .*{why}"):
        G.validate_boxes(boxes, (10, 20), name="img.png")
    assert issubclass(G.InvalidBoxError, ValueError)


def test_validate_boxes_accepts_partial_and_skips_padding():
    ok = G.validate_boxes([[-3.0, 2.0, 5.0, 40.0]], (10, 20))  # partly outside: allowed
    assert ok.shape == (1, 4)
    padded = np.array([[[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]]])
    G.validate_boxes(padded, (10, 10), valid=np.array([[True, False]]))
    with pytest.raises(G.InvalidBoxError, match=r"box \(0, 1\)"):
        G.validate_boxes(padded, (10, 10))
