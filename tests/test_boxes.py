"""Maps -> boxes: peak boxes, connected components vs scipy.ndimage, threshold boxes, Otsu."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from mskjax import boxes as B

EIGHT = np.ones((3, 3), int)


def _blobs(rng, b, h, w, sigma=2.0, density=0.02):
    """Random smooth maps with several separate bumps."""
    spikes = (rng.random((b, h, w)) < density) * rng.uniform(0.5, 1.0, (b, h, w))
    return np.stack([ndi.gaussian_filter(s, sigma) for s in spikes]).astype(np.float32)


def test_peak_box_224_is_50x50_centred_on_max():
    m = np.zeros((2, 224, 224), np.float32)
    m[0, 100, 120] = 1.0  # row 100, col 120
    m[1, 60, 30] = 2.0
    out = B.peak_boxes(m)
    np.testing.assert_allclose(out.boxes[0], [120.5 - 25, 100.5 - 25, 120.5 + 25, 100.5 + 25])
    np.testing.assert_allclose(out.peaks[1], [30.5, 60.5])
    np.testing.assert_allclose(out.scores, [1.0, 2.0])
    w = out.boxes[:, 2] - out.boxes[:, 0]
    h = out.boxes[:, 3] - out.boxes[:, 1]
    np.testing.assert_allclose(w, 50) and np.testing.assert_allclose(h, 50)


def test_peak_box_clipped_and_shifted_near_borders():
    m = np.zeros((1, 224, 224), np.float32)
    m[0, 3, 220] = 1.0
    np.testing.assert_allclose(B.peak_boxes(m).boxes[0], [195.5, 0.0, 224.0, 28.5])
    np.testing.assert_allclose(B.peak_boxes(m, border="shift").boxes[0], [174.0, 0.0, 224.0, 50.0])


def test_peak_box_scales_with_input_side_and_explicit_side():
    m = np.zeros((1, 448, 448), np.float32)
    m[0, 200, 200] = 1.0
    box = B.peak_boxes(m).boxes[0]
    assert float(box[2] - box[0]) == pytest.approx(100.0)  # 50 * 448 / 224
    box = B.peak_boxes(m, box_side=30).boxes[0]
    np.testing.assert_allclose(box, [185.5, 185.5, 215.5, 215.5])
    box = B.peak_boxes(m, input_side=224).boxes[0]
    assert float(box[2] - box[0]) == pytest.approx(50.0)


def test_peak_tie_break_first_in_row_major_order():
    m = np.zeros((1, 10, 10), np.float32)
    m[0, 7, 1] = m[0, 2, 8] = m[0, 2, 9] = 5.0
    np.testing.assert_allclose(B.peak_boxes(m, box_side=2).peaks[0], [8.5, 2.5])


def test_connected_components_match_scipy_on_random_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((6, 33, 47)) < rng.uniform(0.3, 0.65, (6, 1, 1))
    labels = np.asarray(jax.jit(B.connected_components)(masks))
    for mask, lab in zip(masks, labels):
        ref, n = ndi.label(mask, structure=EIGHT)
        assert ((lab >= 0) == mask).all()
        # same partition: a one-to-one map between our labels and scipy's
        pairs = set(zip(lab[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n == len(np.unique(lab[mask]))
        # our label is the flat index of the component's first pixel (row-major)
        flat = np.arange(mask.size).reshape(mask.shape)
        for our, theirs in pairs:
            assert our == flat[ref == theirs].min()


def test_connected_components_long_snake():
    # one serpentine component whose path length is about H*W/2 (worst case for propagation)
    s = np.zeros((40, 40), bool)
    s[::2] = True
    s[1::4, -1] = True
    s[3::4, 0] = True
    lab = np.asarray(B.connected_components(s))
    assert set(np.unique(lab).tolist()) == {-1, 0}


def test_threshold_boxes_match_scipy_find_objects():
    rng = np.random.default_rng(1)
    maps = _blobs(rng, 5, 48, 40)
    k = 6
    out = jax.jit(lambda m: B.threshold_boxes(m, fraction=0.3, k=k))(maps)
    for i, m in enumerate(maps):
        fg = m >= 0.3 * m.max()
        lab, n = ndi.label(fg, structure=EIGHT)
        objs = ndi.find_objects(lab)
        sums = ndi.sum(m, lab, index=np.arange(1, n + 1))
        order = np.argsort(-sums, kind="stable")[:k]  # scipy numbers components row-major too
        ref_boxes = np.array([[objs[j][1].start, objs[j][0].start, objs[j][1].stop, objs[j][0].stop]
                              for j in order], float).reshape(-1, 4)
        nv = min(n, k)
        assert int(out.valid[i].sum()) == nv
        assert out.valid[i, :nv].all()
        np.testing.assert_array_equal(np.asarray(out.boxes[i, :nv]), ref_boxes)
        np.testing.assert_allclose(np.asarray(out.scores[i, :nv]), sums[order], rtol=1e-5)
        assert n >= 2  # the data really has several components


def test_threshold_boxes_pads_with_validity_mask():
    m = np.zeros((1, 20, 20), np.float32)
    m[0, 2:5, 3:6] = 1.0  # mass 9
    m[0, 10:12, 10:18] = 0.9  # mass 14.4: ranked first by sum
    out = B.threshold_boxes(m, fraction=0.5, k=4)
    np.testing.assert_array_equal(out.valid[0], [True, True, False, False])
    np.testing.assert_allclose(out.boxes[0, :2], [[10, 10, 18, 12], [3, 2, 6, 5]])
    np.testing.assert_allclose(out.boxes[0, 2:], 0)
    np.testing.assert_allclose(out.scores[0, 2:], 0)
    by_max = B.threshold_boxes(m, fraction=0.5, k=4, score="max")
    np.testing.assert_allclose(by_max.boxes[0, :2], [[3, 2, 6, 5], [10, 10, 18, 12]])
    np.testing.assert_allclose(by_max.scores[0, :2], [1.0, 0.9])


def _otsu_bruteforce(x, bins):
    """Maximise the between-class variance over every split of an np.histogram."""
    hist, edges = np.histogram(x, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    best, arg = -1.0, 0
    for t in range(bins - 1):
        w0, w1 = hist[: t + 1].sum(), hist[t + 1:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0 = (hist[: t + 1] * centers[: t + 1]).sum() / w0
        m1 = (hist[t + 1:] * centers[t + 1:]).sum() / w1
        v = w0 * w1 * (m0 - m1) ** 2
        if v > best * (1 + 1e-6):
            best, arg = v, t
    return centers[arg]


def test_otsu_matches_bruteforce_and_separates_modes():
    rng = np.random.default_rng(2)
    maps = np.stack([
        np.concatenate([rng.normal(0.2, 0.05, 600), rng.normal(0.8, 0.05, 424)]).reshape(32, 32),
        rng.gamma(2.0, 1.0, (32, 32)),
        _blobs(rng, 1, 32, 32)[0],
    ]).astype(np.float32)
    thr = np.asarray(jax.jit(B.otsu_threshold, static_argnums=1)(maps, 64))
    for m, t in zip(maps, thr):
        ref = _otsu_bruteforce(m.astype(np.float64), 64)
        bin_w = (m.max() - m.min()) / 64
        assert abs(t - ref) <= 1e-3 * bin_w + 1e-6
    assert 0.35 < thr[0] < 0.65
    assert float(B.otsu_threshold(np.full((4, 4), 3.0, np.float32))) == 3.0
    out = B.threshold_boxes(maps[:1], method="otsu", k=2)
    assert bool(out.valid[0, 0])


def test_single_map_and_jit_static_shapes():
    rng = np.random.default_rng(3)
    maps = _blobs(rng, 3, 24, 24)
    f = jax.jit(lambda m: (B.peak_boxes(m), B.threshold_boxes(m, k=3)))
    pk, th = f(jnp.asarray(maps))
    assert pk.boxes.shape == (3, 4) and th.boxes.shape == (3, 3, 4) and th.valid.shape == (3, 3)
    one = B.peak_boxes(maps[1])
    np.testing.assert_allclose(one.boxes, pk.boxes[1])
    one_t = B.threshold_boxes(maps[1], k=3)
    np.testing.assert_allclose(one_t.boxes, th.boxes[1])
    with pytest.raises(ValueError, match="k must be"):
        B.threshold_boxes(maps, k=0)
