"""Maps -> boxes: peak boxes, connected components vs scipy.ndimage, threshold boxes, Otsu."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage as ndi

from mskjax import boxes as B
from mskjax import cam as camlib

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


def test_peak_box_shifted_by_default_and_clipped_on_request_near_borders():
    m = np.zeros((1, 224, 224), np.float32)
    m[0, 3, 220] = 1.0
    np.testing.assert_allclose(B.peak_boxes(m).boxes[0], [174.0, 0.0, 224.0, 50.0])
    np.testing.assert_allclose(B.peak_boxes(m, border="shift").boxes[0], [174.0, 0.0, 224.0, 50.0])
    np.testing.assert_allclose(B.peak_boxes(m, border="clip").boxes[0], [195.5, 0.0, 224.0, 28.5])
    np.testing.assert_allclose(B.peak_boxes(m).peaks[0], [220.5, 3.5])  # the peak itself stays put
    with pytest.raises(ValueError, match="border"):
        B.peak_boxes(m, border="wrap")


def test_peak_box_scales_with_input_side_and_explicit_side():
    m = np.zeros((1, 448, 448), np.float32)
    m[0, 200, 200] = 1.0
    box = B.peak_boxes(m).boxes[0]
    assert float(box[2] - box[0]) == pytest.approx(100.0)  # 50 * 448 / 224
    box = B.peak_boxes(m, box_side=30).boxes[0]
    np.testing.assert_allclose(box, [185.5, 185.5, 215.5, 215.5])
    box = B.peak_boxes(m, input_side=224).boxes[0]
    assert float(box[2] - box[0]) == pytest.approx(50.0)


def test_peak_tie_is_the_plateau_of_the_first_maximum():
    # The first maximum in row-major order is (2, 8); its plateau is {(2, 8), (2, 9)}: the peak is
    # their centroid. The separate tie at (7, 1) is ignored.
    m = np.zeros((1, 10, 10), np.float32)
    m[0, 7, 1] = m[0, 2, 8] = m[0, 2, 9] = 5.0
    np.testing.assert_allclose(B.peak_boxes(m, box_side=2).peaks[0], [9.0, 2.5])
    row, col = B.plateau_peak_pixel(m)
    assert (int(row[0]), int(col[0])) == (2, 8)  # nearest plateau pixel; tie -> first


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


# --------------------------------------------------------------------------------------------
# Peaks at the right place (issue 18): raw-map peaks, plateaus, boxes that keep their size
# --------------------------------------------------------------------------------------------

SIDE_128 = 50 * 128 / 224  # the report's 50 px box at 224, scaled to a 128 px input: 28.571...


def _one_hot_raw(h, w, i, j, rng=None):
    """A raw (h, w) map whose unique maximum 1.0 is cell (i, j); zeros, or noise in [0, 0.5)."""
    r = np.zeros((h, w), np.float32) if rng is None else rng.uniform(0, 0.5, (h, w)).astype(np.float32)
    r[i, j] = 1.0
    return r


def _assert_full_box_inside(boxes, side, hw, atol=1e-4):
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    h, w = hw
    np.testing.assert_allclose(boxes[:, 2] - boxes[:, 0], side, atol=atol)
    np.testing.assert_allclose(boxes[:, 3] - boxes[:, 1], side, atol=atol)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()


def test_minimal_case_edge_cell_peak_and_box():
    """The issue's case: 4x4 raw map, maximum in cell (row 1, col 0), drawn at 128 px."""
    raw = _one_hot_raw(4, 4, 1, 0)[None]
    up = camlib.postprocess(raw, (128, 128))  # ReLU, min-max, bilinear (edge clamp), min-max
    # The defect: the upsampled maximum is a plateau over cols 0..15 x rows 47..48; the first
    # maximum is on the left border and the clipped box is about half size.
    row, col = B.argmax_2d(up)
    assert (int(row[0]), int(col[0])) == (47, 0)
    old = B.peak_boxes(up, border="clip").boxes[0]  # the new peak, the old border rule
    assert float(old[2] - old[0]) < SIDE_128

    # From the raw map: the cell centre, exactly, and a full-size box.
    np.testing.assert_allclose(B.raw_map_peaks(raw, (128, 128)), [[16.0, 48.0]])
    pk = B.peak_boxes_from_raw(raw, (128, 128))
    np.testing.assert_allclose(pk.peaks, [[16.0, 48.0]])
    np.testing.assert_allclose(pk.boxes, [[16 - SIDE_128 / 2, 48 - SIDE_128 / 2,
                                           16 + SIDE_128 / 2, 48 + SIDE_128 / 2]], atol=1e-4)
    np.testing.assert_allclose(pk.scores, [1.0])
    _assert_full_box_inside(pk.boxes, SIDE_128, (128, 128))

    # From the upsampled map: the plateau's centroid (8, 48), a quarter cell (8 px) toward the
    # border from the cell centre, and a full-size box shifted inside.
    np.testing.assert_allclose(B.plateau_peak(up), [[8.0, 48.0]])
    pk_up = B.peak_boxes(up)
    np.testing.assert_allclose(pk_up.peaks, [[8.0, 48.0]])
    np.testing.assert_allclose(pk_up.boxes, [[0.0, 48 - SIDE_128 / 2, SIDE_128, 48 + SIDE_128 / 2]],
                               atol=1e-4)
    _assert_full_box_inside(pk_up.boxes, SIDE_128, (128, 128))
    # resize_maps alone (no min-max) gives the same plateau
    np.testing.assert_allclose(B.plateau_peak(camlib.resize_maps(raw, (128, 128))), [[8.0, 48.0]])


@pytest.mark.parametrize("hw", [(4, 4), (5, 3)])
@pytest.mark.parametrize("out_hw", [(128, 128), (224, 224), (100, 160)])
def test_every_cell_peak_at_cell_centre_and_full_box_inside(hw, out_hw):
    h, w = hw
    H, W = out_hw
    rng = np.random.default_rng(h * 10 + w)
    cells = [(i, j) for i in range(h) for j in range(w)]
    border = [(i, j) for i, j in cells if i in (0, h - 1) or j in (0, w - 1)]
    assert len(border) == 2 * (h + w) - 4  # every border cell is among the cells tested
    for noise in (None, rng):
        raw = np.stack([_one_hot_raw(h, w, i, j, noise) for i, j in cells])
        centres = np.array([[(j + 0.5) * W / w, (i + 0.5) * H / h] for i, j in cells])
        side = 50 * max(H, W) / 224

        np.testing.assert_allclose(B.raw_map_peaks(raw, out_hw), centres, rtol=1e-6)
        pk = B.peak_boxes_from_raw(raw, out_hw)
        np.testing.assert_allclose(pk.peaks, centres, rtol=1e-6)
        _assert_full_box_inside(pk.boxes, side, out_hw)
        # the box contains its peak, and is centred on it wherever it fits
        b = np.asarray(pk.boxes)
        assert ((b[:, 0] <= centres[:, 0]) & (centres[:, 0] <= b[:, 2])).all()
        assert ((b[:, 1] <= centres[:, 1]) & (centres[:, 1] <= b[:, 3])).all()
        fits = ((centres[:, 0] >= side / 2) & (centres[:, 0] <= W - side / 2)
                & (centres[:, 1] >= side / 2) & (centres[:, 1] <= H - side / 2))
        np.testing.assert_allclose(((b[:, :2] + b[:, 2:]) / 2)[fits], centres[fits], atol=1e-4)

        # The upsampled map (as the CAM functions return it): the plateau centroid is within a
        # quarter cell (+ 1 px of discretisation) of the cell centre, never on the border itself
        # unless the cell is, and the box keeps its full size inside the image.
        up = camlib.postprocess(raw, out_hw)
        pk_up = B.peak_boxes(up)
        dev = np.abs(np.asarray(pk_up.peaks) - centres)
        assert (dev <= np.array([W / w, H / h]) / 4 + 1.0).all(), dev.max(0)
        _assert_full_box_inside(pk_up.boxes, side, out_hw)
        # interior directions have no plateau: within a pixel of the centre
        for k, (i, j) in enumerate(cells):
            if 0 < j < w - 1:
                assert dev[k, 0] <= 1.0
            if 0 < i < h - 1:
                assert dev[k, 1] <= 1.0


def _plateau_peak_reference(m):
    """numpy/scipy: first finite maximum, its 8-connected tie component, centroid of centres."""
    m = np.asarray(m, np.float64)
    ok = ~np.isnan(m)
    if not ok.any():
        return np.array([np.nan, np.nan])
    v = np.where(ok, m, -np.inf)
    first = np.unravel_index(np.argmax(v), v.shape)
    lab, _ = ndi.label(ok & (v == v[first]), structure=EIGHT)
    rr, cc = np.nonzero(lab == lab[first])
    return np.array([cc.mean() + 0.5, rr.mean() + 0.5])


def test_plateau_peak_matches_scipy_reference_on_quantised_maps():
    rng = np.random.default_rng(4)
    maps = rng.integers(0, 3, (16, 12, 17)).astype(np.float32)  # many large tie sets
    maps[rng.random(maps.shape) < 0.05] = np.nan
    maps[3] = 7.0  # constant: the whole map
    maps[5] = np.nan  # all NaN
    got = np.asarray(jax.jit(B.plateau_peak)(maps))
    for m, g in zip(maps, got):
        np.testing.assert_allclose(g, _plateau_peak_reference(m), rtol=1e-6)
    np.testing.assert_allclose(got[3], [8.5, 6.0])
    assert np.isnan(got[5]).all()
    # the chosen pixel is always a maximum and nearest the centroid
    row, col = B.plateau_peak_pixel(maps)
    for k, m in enumerate(maps):
        if k == 5:
            assert (int(row[k]), int(col[k])) == (0, 0)
            continue
        assert m[row[k], col[k]] == np.nanmax(m)


def test_plateau_shapes():
    m = np.zeros((4, 20, 20), np.float32)
    m[0, 5:9, 10:16] = 1.0  # rectangle -> its centre
    m[1, 2, 2] = m[1, 3, 3] = m[1, 4, 4] = 1.0  # diagonal chain: 8-connected, one plateau
    m[2, 0:6, 0] = 1.0  # L-shaped: centroid off the plateau
    m[2, 5, 0:6] = 1.0
    m[3, 10, 10] = 1.0  # unique maximum; an isolated equal value elsewhere would be ignored
    m[3, 0, 19] = 0.5
    peaks = np.asarray(B.plateau_peak(m))
    np.testing.assert_allclose(peaks[0], [13.0, 7.0])
    np.testing.assert_allclose(peaks[1], [3.5, 3.5])
    ref = _plateau_peak_reference(m[2])
    np.testing.assert_allclose(peaks[2], ref, rtol=1e-6)
    assert m[2, int(ref[1]), int(ref[0])] == 0  # the centroid's own pixel is off the plateau ...
    row, col = B.plateau_peak_pixel(m)
    assert m[2, row[2], col[2]] == 1.0  # ... but the chosen pixel is on it, nearest the centroid
    d2 = lambda r, c: (c + 0.5 - ref[0]) ** 2 + (r + 0.5 - ref[1]) ** 2  # noqa: E731
    rr, cc = np.nonzero(m[2] == 1.0)
    assert d2(int(row[2]), int(col[2])) == pytest.approx(min(d2(r, c) for r, c in zip(rr, cc)))
    np.testing.assert_allclose(peaks[3], [10.5, 10.5])
    # raw maps: two tied adjacent cells -> the midpoint of their centres in the image frame
    raw = np.zeros((1, 4, 4), np.float32)
    raw[0, 0, 1] = raw[0, 0, 2] = 3.0
    np.testing.assert_allclose(B.raw_map_peaks(raw, (128, 128)), [[64.0, 16.0]])
    # an all-nonpositive raw map after ReLU is one plateau: the image centre
    np.testing.assert_allclose(B.raw_map_peaks(np.zeros((3, 5), np.float32), (90, 100)), [50.0, 45.0])


def test_nan_is_ignored_and_all_nan_gives_nan():
    m = np.zeros((3, 8, 8), np.float32)
    m[0, 1, 1] = np.nan
    m[0, 6, 5] = 2.0
    m[1, 3, 3:5] = 1.0
    m[1, 3, 5] = np.nan  # NaN does not join or break a plateau
    m[2] = np.nan
    pk = B.peak_boxes(m, box_side=4)
    np.testing.assert_allclose(pk.peaks[:2], [[5.5, 6.5], [4.0, 3.5]])
    np.testing.assert_allclose(pk.scores[:2], [2.0, 1.0])
    assert np.isnan(pk.peaks[2]).all() and np.isnan(pk.boxes[2]).all() and np.isnan(pk.scores[2])
    # a NaN box is never "non-empty" (the pipeline's validity test drops it)
    b = np.asarray(pk.boxes[2])
    assert not (b[2] > b[0]) and not (b[3] > b[1])
    assert np.isfinite(np.asarray(pk.boxes[:2])).all()
    raw = np.full((1, 4, 4), np.nan, np.float32)
    raw[0, 2, 3] = -5.0  # the only finite cell, however low
    np.testing.assert_allclose(B.raw_map_peaks(raw, (128, 128)), [[112.0, 80.0]])
    raw[0, 2, 3] = np.nan
    out = B.peak_boxes_from_raw(raw, (128, 128))
    assert np.isnan(out.peaks).all() and np.isnan(out.boxes).all() and np.isnan(out.scores).all()
    # masking cells with NaN (e.g. outside the image content) keeps the peak out of them
    raw = np.zeros((1, 4, 4), np.float32)
    raw[0, :, 0] = 9.0
    raw[0, 1, 2] = 1.0
    masked = np.where(np.arange(4)[None, None, :] == 0, np.nan, raw).astype(np.float32)
    np.testing.assert_allclose(B.raw_map_peaks(masked, (128, 128)), [[80.0, 48.0]])


def test_batched_single_and_jit_agree():
    rng = np.random.default_rng(5)
    raw = rng.normal(size=(5, 4, 6)).astype(np.float32)
    up = camlib.postprocess(raw, (96, 144))
    batched = B.peak_boxes_from_raw(raw, (96, 144))
    jitted = jax.jit(lambda r: B.peak_boxes_from_raw(r, (96, 144), box_side=30.0))(jnp.asarray(raw))
    up_b = B.peak_boxes(up)
    up_j = jax.jit(lambda m: (B.peak_boxes(m), B.plateau_peak(m), B.plateau_peak_pixel(m)))(up)
    rp = jax.jit(B.raw_map_peaks, static_argnames=("out_hw", "subcell"))(raw, out_hw=(96, 144))
    np.testing.assert_allclose(rp, batched.peaks)
    np.testing.assert_allclose(jitted.peaks, batched.peaks)
    _assert_full_box_inside(jitted.boxes, 30.0, (96, 144))
    for a, b in zip(up_j[0], up_b):
        np.testing.assert_allclose(a, b)
    np.testing.assert_allclose(up_j[1], up_b.peaks)
    for i in range(5):
        one = B.peak_boxes_from_raw(raw[i], (96, 144))
        assert one.boxes.shape == (4,) and one.peaks.shape == (2,) and one.scores.shape == ()
        for a, b in zip(one, batched):
            np.testing.assert_allclose(a, b[i])
        np.testing.assert_allclose(B.raw_map_peaks(raw[i], (96, 144)), rp[i])
        np.testing.assert_allclose(B.plateau_peak(up[i]), up_b.peaks[i])
        r, c = B.plateau_peak_pixel(up[i])
        assert (int(r), int(c)) == (int(up_j[2][0][i]), int(up_j[2][1][i]))
        for a, b in zip(B.peak_boxes(up[i]), up_b):
            np.testing.assert_allclose(a, b[i])


def test_shift_keeps_size_clip_only_when_box_exceeds_image_and_bounds():
    m = np.zeros((3, 40, 60), np.float32)
    m[0, 0, 0] = 1.0
    m[1, 39, 59] = 1.0
    m[2, 20, 30] = 1.0
    pk = B.peak_boxes(m, box_side=10)
    np.testing.assert_allclose(pk.boxes, [[0, 0, 10, 10], [50, 30, 60, 40], [25.5, 15.5, 35.5, 25.5]])
    np.testing.assert_allclose(B.peak_boxes(m, box_side=10, border="clip").boxes[2], pk.boxes[2])
    big = B.peak_boxes(m, box_side=50).boxes  # wider than tall: clipped in y only
    np.testing.assert_allclose(big[:, [1, 3]], [[0, 40]] * 3)
    np.testing.assert_allclose(big[:, 2] - big[:, 0], 50)
    # bounds: stay inside a content box (e.g. a letterboxed image's content), per image or shared
    bounds = np.array([[5, 5, 55, 35], [0, 0, 60, 40], [0, 0, 60, 40]], np.float32)
    pb = B.peak_boxes(m, box_side=10, bounds=bounds).boxes
    np.testing.assert_allclose(pb, [[5, 5, 15, 15], [50, 30, 60, 40], [25.5, 15.5, 35.5, 25.5]])
    pb = jax.jit(lambda x, bd: B.peak_boxes(x, box_side=10, bounds=bd).boxes)(m, bounds[0])
    np.testing.assert_allclose(pb[1], [45, 25, 55, 35])
    raw = np.zeros((1, 4, 4), np.float32)
    raw[0, 3, 3] = 1.0
    np.testing.assert_allclose(B.peak_boxes_from_raw(raw, (128, 128), box_side=40,
                                                     bounds=[0, 0, 100, 128]).boxes,
                               [[60, 88, 100, 128]])


def test_subcell_recovers_the_vertex_of_a_quadratic():
    h, w, H, W = 6, 8, 96, 128
    x0, y0 = 3.3, 2.8  # vertex in cell units (cell centres at j + 0.5): cell (row 2, col 3)
    jj, ii = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    raw = (-(jj - x0) ** 2 - 2 * (ii - y0) ** 2).astype(np.float32)
    exact = [x0 * W / w, y0 * H / h]
    np.testing.assert_allclose(B.raw_map_peaks(raw, (H, W), subcell=True), exact, rtol=1e-5)
    np.testing.assert_allclose(B.raw_map_peaks(raw, (H, W)), [3.5 * W / w, 2.5 * H / h])  # off: cell
    np.testing.assert_allclose(B.peak_boxes_from_raw(raw, (H, W), subcell=True).peaks, exact, rtol=1e-5)
    # at the border (no neighbour on one side) and on a plateau there is no refinement
    raw_edge = (-(jj - 0.3) ** 2 - (ii - 2.8) ** 2).astype(np.float32)
    np.testing.assert_allclose(B.raw_map_peaks(raw_edge, (H, W), subcell=True),
                               [0.5 * W / w, 2.8 * H / h], rtol=1e-5)
    flat = np.zeros((h, w), np.float32)
    flat[2, 3:5] = 1.0
    np.testing.assert_allclose(B.raw_map_peaks(flat, (H, W), subcell=True), [4.0 * W / w, 2.5 * H / h])


def test_integer_maps_and_bad_arguments():
    m = np.zeros((1, 6, 6), np.int32)
    m[0, 2, 3] = 4
    np.testing.assert_allclose(B.plateau_peak(m), [[3.5, 2.5]])
    np.testing.assert_allclose(B.raw_map_peaks(m, (60, 60)), [[35.0, 25.0]])
    with pytest.raises(ValueError, match="box_side"):
        B.peak_boxes_from_raw(m, (60, 60), box_side=-1.0)
    with pytest.raises(ValueError, match="out_hw"):
        B.raw_map_peaks(m, (0, 60))
    with pytest.raises(ValueError, match="maps must be"):
        B.plateau_peak(np.zeros((2, 2, 2, 2), np.float32))


def test_peak_point_is_on_the_plateau_even_when_its_centroid_is_not():
    # An L-shaped plateau: its centroid (about (3.2, 3.2) in pixel units) is not a plateau pixel.
    m = np.zeros((8, 8), np.float32)
    m[1, 1:7] = 1.0
    m[1:7, 1] = 1.0
    x, y = np.asarray(B.peak_point(m))
    assert m[int(y), int(x)] == 1.0
    cx, cy = np.asarray(B.plateau_peak(m))
    assert m[int(cy), int(cx)] == 0.0  # the centroid itself is off the plateau
    # A unique maximum: its pixel centre.
    u = np.zeros((5, 6), np.float32)
    u[3, 4] = 2.0
    np.testing.assert_allclose(np.asarray(B.peak_point(u)), [4.5, 3.5])


def test_separated_peaks_are_the_highest_pixels_far_enough_from_every_earlier_peak():
    m = np.zeros((2, 32, 32), np.float32)
    m[0, 10, 10] = 1.0
    m[0, 10, 12] = 0.9   # 2 px from the first: too close at radius 5
    m[0, 20, 25] = 0.8   # the second
    m[0, 22, 25] = 0.7   # 2 px from the second: too close
    m[0, 3, 28] = 0.6    # the third
    m[1, 5, 5] = 2.0
    m[1, 5, 6] = 2.0     # a plateau: the first peak is its centroid, (6.0, 5.5)
    peaks, values, valid = B.separated_peaks(jnp.asarray(m), 3, 5.0)
    np.testing.assert_allclose(peaks[0], [[10.5, 10.5], [25.5, 20.5], [28.5, 3.5]])
    np.testing.assert_allclose(values[0], [1.0, 0.8, 0.6])
    assert valid[0].all()
    np.testing.assert_allclose(peaks[1, 0], [6.0, 5.5])
    # The first peak is the one rule's peak (plateau_peak) for any map.
    rng = np.random.default_rng(0)
    maps = _blobs(rng, 4, 24, 24)
    p, v, ok = B.separated_peaks(jnp.asarray(maps), 2, 6.0)
    np.testing.assert_allclose(p[:, 0], B.plateau_peak(maps))
    for i in range(4):  # the second: brute force over pixel centres at least 6 px from the first
        ys, xs = np.mgrid[:24, :24] + 0.5
        far = np.hypot(xs - float(p[i, 0, 0]), ys - float(p[i, 0, 1])) >= 6.0
        assert float(v[i, 1]) == maps[i][far].max()
        assert maps[i, int(p[i, 1, 1]), int(p[i, 1, 0])] == maps[i][far].max()


def test_separated_peaks_report_no_peak_where_nothing_is_far_enough():
    m = np.zeros((1, 8, 8), np.float32)
    m[0, 4, 4] = 1.0
    peaks, values, valid = B.separated_peaks(jnp.asarray(m), 2, 20.0)  # every pixel within 20 px
    assert valid[0].tolist() == [True, False]
    assert np.isnan(np.asarray(peaks[0, 1])).all() and np.isnan(float(values[0, 1]))
    nan_map = np.full((1, 8, 8), np.nan, np.float32)
    _, _, valid = B.separated_peaks(jnp.asarray(nan_map), 2, 1.0)
    assert not np.asarray(valid).any()
    with pytest.raises(ValueError, match="k must be"):
        B.separated_peaks(jnp.asarray(m), 0, 1.0)


def test_boxes_around_points_match_peak_boxes_and_stay_inside_bounds():
    rng = np.random.default_rng(1)
    maps = _blobs(rng, 3, 40, 40)
    pk = B.peak_boxes(maps, box_side=12.0)
    around = B.boxes_around(pk.peaks[:, None], 12.0, (40, 40))
    np.testing.assert_allclose(around[:, 0], pk.boxes)
    pts = jnp.asarray([[[1.0, 1.0], [39.0, 20.0]]], jnp.float32)
    out = np.asarray(B.boxes_around(pts, 10.0, (40, 40), bounds=jnp.asarray([0.0, 0.0, 30.0, 40.0])))
    np.testing.assert_allclose(out[0], [[0, 0, 10, 10], [20, 15, 30, 25]])
    assert B.box_side_for(None, 224.0) == 50.0 and B.box_side_for(64.0, 128.0) == 64.0


def test_lowest_points_are_the_lowest_grid_places_inside_each_box():
    """A 5 x 5 grid inside each box, read at the pixel holding each cell centre: the n lowest in
    order, ties to the first in row-major order, disallowed and NaN pixels never chosen, and
    (NaN, valid False) when fewer than n places remain."""
    maps = np.ones((1, 10, 10), np.float32)
    maps[0, 7, 7] = 0.2  # grid centre (7.0, 7.0) in a [0, 10) box reads pixel (row 7, col 7)
    maps[0, 3, 1] = 0.5  # (x 1, y 3)
    maps[0, 2, 3] = 0.0  # not on the grid: never read
    box = np.asarray([[[0.0, 0.0, 10.0, 10.0]]], np.float32)
    pts, ok = B.lowest_points(maps, box, 3)
    np.testing.assert_allclose(np.asarray(pts)[0, 0], [[7.0, 7.0], [1.0, 3.0], [1.0, 1.0]])
    assert np.asarray(ok).all()
    # A second box on the right half: its own grid (centres at x = 5.5, 6.5, ...).
    two = np.asarray([[[0.0, 0.0, 10.0, 10.0], [5.0, 0.0, 10.0, 10.0]]], np.float32)
    pts, _ = B.lowest_points(maps, two, 1)
    np.testing.assert_allclose(np.asarray(pts)[0, :, 0], [[7.0, 7.0], [7.5, 7.0]])
    allowed = np.ones((1, 10, 10), bool)
    allowed[0, 7, 7] = False
    maps[0, 5, 5] = np.nan
    pts, ok = B.lowest_points(maps, box, 2, allowed=allowed)
    np.testing.assert_allclose(np.asarray(pts)[0, 0], [[1.0, 3.0], [1.0, 1.0]])
    # Only one place allowed: the second point is missing.
    only = np.zeros((1, 10, 10), bool)
    only[0, 1, 1] = True
    pts, ok = B.lowest_points(maps, box, 2, allowed=only)
    np.testing.assert_array_equal(np.asarray(ok)[0, 0], [True, False])
    assert np.isnan(np.asarray(pts)[0, 0, 1]).all()
    with pytest.raises(ValueError, match="grid"):
        B.lowest_points(maps, box, 26)
