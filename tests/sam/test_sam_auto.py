"""Automatic mask generation (mskjax.sam_auto) against segment_anything's SamAutomaticMaskGenerator.

Pieces against the official utilities (segment_anything.utils.amg, torchvision.ops.batched_nms):
point grid bit-equal; stability score equal (it is a ratio of pixel counts); boxes equal (ours are
pixel-edge boxes, the official's pixel-index boxes: ours - (0, 0, 1, 1)); NMS keep order equal
(scores without ties). The filtering/NMS stage runs on synthetic blob-shaped logits through the
official steps. End to end: a randomly initialised official SAM with our vit_tiny layout at 256 px,
converted with mskjax.weights.sam, through the official generator and ours on the same image:
the same masks in the same order (predicted IoU within 1e-3, stability within 1e-2, points
within 1e-3 px, at most 1% of a mask's pixels differing). Random SAM weights give masks that are
noise over the whole image; the blob test is what exercises varied boxes and NMS.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
from torchvision.ops import batched_nms

from mskjax import sam as samfn
from mskjax import sam_auto
from mskjax.models.sam import build_sam
from mskjax.weights.sam import sam_variables_from_state_dict

INDEX_TO_EDGE = np.asarray([0, 0, 1, 1], np.float32)


def torch_nms(boxes, scores, iou_threshold):
    """torchvision's batched_nms with one category, as the official generator calls it."""
    keep = batched_nms(torch.as_tensor(boxes, dtype=torch.float32),
                       torch.as_tensor(scores, dtype=torch.float32),
                       torch.zeros(len(boxes)), iou_threshold=iou_threshold)
    return keep.numpy()


def box_iou_matrix(boxes):
    b = np.asarray(boxes, np.float64)
    x0 = np.maximum(b[:, None, 0], b[None, :, 0])
    y0 = np.maximum(b[:, None, 1], b[None, :, 1])
    x1 = np.minimum(b[:, None, 2], b[None, :, 2])
    y1 = np.minimum(b[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / (area[:, None] + area[None, :] - inter)


# ---------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize("n", [1, 2, 4, 5, 16, 32])
def test_point_grid_matches_official(n):
    grid = sam_auto.point_grid(n)
    assert grid.shape == (n * n, 2) and grid.dtype == np.float64
    np.testing.assert_array_equal(grid, build_point_grid(n))
    assert grid.min() > 0 and grid.max() < 1
    with pytest.raises(ValueError, match="points_per_side"):
        sam_auto.point_grid(0)


@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.0, 0.25), (0.3, 2.0)])
def test_stability_score_matches_official(threshold, offset):
    rng = np.random.default_rng(int(10 * offset))
    logits = (3.0 * rng.normal(size=(3, 4, 30, 50))).astype(np.float32)
    logits[0, 0] = -5.0  # empty at both cutoffs: 0 / 0
    logits[0, 1] = 5.0  # full at both cutoffs: 1
    expected = calculate_stability_score(torch.from_numpy(logits), threshold, offset).numpy()
    ours = np.asarray(jax.jit(sam_auto.stability_score)(jnp.asarray(logits), threshold, offset))
    assert ours.shape == (3, 4) and ours.dtype == np.float32
    assert np.isnan(ours[0, 0]) and np.isnan(expected[0, 0]) and ours[0, 1] == 1.0
    np.testing.assert_array_equal(ours, expected)  # both are the same ratio of integer counts
    assert 0.05 < np.nanmin(ours) and np.nanmax(ours[1:]) < 0.95  # not all trivial


def test_masks_to_boxes_matches_official():
    rng = np.random.default_rng(3)
    masks = rng.uniform(size=(2, 6, 23, 31)) > 0.995  # sparse: boxes of varied extent
    masks[0, 0] = False  # empty
    masks[0, 1] = False
    masks[0, 1, 7, 4] = True  # one pixel
    masks[0, 2] = True  # full
    masks[1, 3] = False
    masks[1, 3, 22, 30] = True  # the last pixel
    boxes, valid = jax.jit(sam_auto.masks_to_boxes)(jnp.asarray(masks))
    boxes, valid = np.asarray(boxes), np.asarray(valid)
    expected = batched_mask_to_box(torch.from_numpy(masks)).numpy()
    assert boxes.shape == (2, 6, 4) and boxes.dtype == np.float32 and valid.dtype == bool
    np.testing.assert_array_equal(valid, masks.any(axis=(-2, -1)))
    assert not valid[0, 0] and valid.sum() >= 10
    np.testing.assert_array_equal(boxes[~valid], 0.0)
    np.testing.assert_array_equal(expected[~valid], 0)
    np.testing.assert_array_equal(boxes[valid] - INDEX_TO_EDGE, expected[valid])
    np.testing.assert_array_equal(boxes[0, 1], [4, 7, 5, 8])  # pixel (x=4, y=7) covers [4, 5) x [7, 8)
    np.testing.assert_array_equal(boxes[0, 2], [0, 0, 31, 23])


def random_boxes(rng, n, side=100.0):
    """Boxes in clusters (so that many overlap), a few degenerate (zero width or height)."""
    centres = rng.uniform(0, side, size=(n // 8 + 1, 2))[rng.integers(0, n // 8 + 1, size=n)]
    centres = centres + rng.normal(scale=4.0, size=(n, 2))
    half = rng.uniform(2, 20, size=(n, 2))
    boxes = np.concatenate([centres - half, centres + half], axis=1).astype(np.float32)
    boxes[:3, 2] = boxes[:3, 0]  # zero width
    boxes[3:5, 3] = boxes[3:5, 1]  # zero height
    return boxes


@pytest.mark.parametrize("iou_threshold", [0.3, 0.5, 0.7])
def test_mask_nms_matches_torchvision(iou_threshold):
    rng = np.random.default_rng(int(iou_threshold * 10))
    n = 200
    boxes = random_boxes(rng, n)
    scores = rng.permutation(n).astype(np.float32) / n  # distinct: torch's sort is not stable
    valid = rng.uniform(size=n) > 0.2
    idx = np.flatnonzero(valid)
    expected = idx[torch_nms(boxes[idx], scores[idx], iou_threshold)]
    assert 10 < len(expected) < len(idx)  # NMS does something here

    nms = jax.jit(sam_auto.mask_nms, static_argnames="max_out")
    keep, keep_valid, num_kept = nms(boxes, scores, valid, iou_threshold, max_out=n)
    keep, keep_valid = np.asarray(keep), np.asarray(keep_valid)
    assert keep.shape == (n,) and keep.dtype == np.int32 and int(num_kept) == len(expected)
    np.testing.assert_array_equal(keep[:len(expected)], expected)
    assert keep_valid[:len(expected)].all() and not keep_valid[len(expected):].any()
    np.testing.assert_array_equal(keep[len(expected):], 0)

    # Fewer slots: the best ones, and num_kept still counts all survivors.
    keep5, valid5, num5 = nms(boxes, scores, valid, iou_threshold, max_out=5)
    np.testing.assert_array_equal(np.asarray(keep5), expected[:5])
    assert np.asarray(valid5).all() and int(num5) == len(expected)
    # More slots than boxes: padded.
    keep_big, valid_big, _ = nms(boxes[:3], scores[:3], np.ones(3, bool), iou_threshold, max_out=7)
    assert keep_big.shape == (7,) and not np.asarray(valid_big)[3:].any()


def test_mask_nms_bad_shapes():
    with pytest.raises(ValueError, match=r"boxes \(N, 4\)"):
        sam_auto.mask_nms(np.zeros((3, 4)), np.zeros(2), np.ones(3, bool), 0.5, 2)
    with pytest.raises(ValueError, match="max_out"):
        sam_auto.mask_nms(np.zeros((3, 4)), np.zeros(3), np.ones(3, bool), 0.5, 0)


# ---------------------------------------------------------------------------------------------
# Filters + NMS on blob-shaped logits, through the official steps


def blob_logits(rng, n, size):
    """(n, size, size) logits: elliptic blobs of random centre, radii and height; some repeated
    with a small shift (duplicates for NMS), one never positive, one positive everywhere."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = np.empty((n, size, size), np.float32)
    params = []
    for i in range(n):
        if i % 4 == 3 and params:  # near-duplicate of an earlier blob
            cx, cy, rx, ry, a = params[rng.integers(len(params))]
            cx, cy = cx + rng.normal(scale=1.0), cy + rng.normal(scale=1.0)
        else:
            cx, cy = rng.uniform(0, size, size=2)
            rx, ry = rng.uniform(2, size / 2, size=2)
            a = rng.uniform(1.0, 20.0)
        params.append((cx, cy, rx, ry, a))
        out[i] = a * (1 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
    out[0] = -3.0
    out[1] = 2.0
    return out


@pytest.mark.parametrize("pred_iou_thresh,stability_thresh,nms_thresh",
                         [(0.3, 0.8, 0.7), (0.0, 0.0, 0.5), (0.5, 0.0, 1.0)])
def test_select_masks_follows_official_steps(pred_iou_thresh, stability_thresh, nms_thresh):
    img_size, original_size = 256, (90, 130)
    input_size = samfn.sam_input_size(original_size, img_size)
    rng = np.random.default_rng(7)
    n = 96
    low_res = blob_logits(rng, n, img_size // 4)
    iou = rng.permutation(n).astype(np.float32) / n + 0.005
    candidate = np.ones(n, bool)
    candidate[-6:] = False  # padding prompts

    # The official _process_batch/_process_crop steps on the original-size logits.
    logits = torch.from_numpy(np.array(samfn.postprocess(jnp.asarray(low_res), input_size,
                                                           original_size, img_size,
                                                           return_logits=True)))
    stability = calculate_stability_score(logits, 0.0, 1.0).numpy()
    keep = candidate.copy()
    if pred_iou_thresh > 0:
        keep &= iou > pred_iou_thresh
    if stability_thresh > 0:
        keep &= stability >= stability_thresh
    boxes = batched_mask_to_box(logits > 0).numpy()
    keep &= (logits > 0).numpy().any(axis=(-2, -1))  # ours never returns empty masks
    idx = np.flatnonzero(keep)
    expected = idx[torch_nms(boxes[idx], iou[idx], nms_thresh)]
    assert len(expected) >= 5

    select = jax.jit(sam_auto.select_masks, static_argnames=(
        "input_size", "original_size", "img_size", "max_masks", "chunk_size"))
    k = 40
    out = select(jnp.asarray(low_res), jnp.asarray(iou), jnp.asarray(candidate), pred_iou_thresh,
                 stability_thresh, 1.0, nms_thresh, input_size=input_size,
                 original_size=original_size, img_size=img_size, max_masks=k, chunk_size=24)
    out = jax.tree.map(np.asarray, out)
    m = min(k, len(expected))
    assert int(out["num_kept"]) == len(expected)
    np.testing.assert_array_equal(out["index"][:m], expected[:m])
    assert out["valid"][:m].all() and not out["valid"][m:].any()
    np.testing.assert_array_equal(out["boxes"][:m] - INDEX_TO_EDGE, boxes[expected[:m]])
    np.testing.assert_allclose(out["stability_score"][:m], stability[expected[:m]], rtol=1e-6)
    np.testing.assert_array_equal(out["predicted_iou"][:m], iou[expected[:m]])
    np.testing.assert_array_equal(out["masks"][:m], (logits > 0).numpy()[expected[:m]])
    assert out["masks"].shape == (k, *original_size) and not out["masks"][m:].any()


# ---------------------------------------------------------------------------------------------
# End to end with a random official SAM (our vit_tiny layout at 256 px), converted


@pytest.fixture(scope="module")
def tiny_pair(build_official_sam):
    ref = build_official_sam("vit_tiny", 256, seed=0, randomise=False)
    variables = sam_variables_from_state_dict(ref.state_dict(), "vit_tiny", 256)
    return ref, build_sam("vit_tiny", 256), variables


# One static setting for the fast tests (one compilation); thresholds are traced.
SETTING = dict(points_per_side=4, points_per_batch=8, max_masks=48)  # all 16 x 3 masks
IMAGE_SHAPE = (40, 60, 3)


def image(seed):
    return np.random.default_rng(seed).integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8)


def official_generate(ref, img, **kw):
    amg = SamAutomaticMaskGenerator(ref, crop_n_layers=0, min_mask_region_area=0,
                                    output_mode="binary_mask", **kw)
    with torch.no_grad():
        return amg.generate(img)


def assert_same_as_official(anns, out):
    n = len(anns)
    assert int(out["num_kept"]) == n
    assert np.asarray(out["valid"]).sum() == min(n, len(out["valid"]))
    for k, a in enumerate(anns[:len(out["valid"])]):
        np.testing.assert_allclose(float(out["predicted_iou"][k]), a["predicted_iou"], atol=1e-3)
        np.testing.assert_allclose(float(out["stability_score"][k]), a["stability_score"], atol=1e-2)
        np.testing.assert_allclose(np.asarray(out["points"][k]), a["point_coords"][0], atol=1e-3)
        mask = np.asarray(out["masks"][k])
        assert (mask != a["segmentation"]).mean() <= 0.01, k
        x, y, w, h = a["bbox"]  # official: XYWH of its index box
        if (mask == a["segmentation"]).all():
            np.testing.assert_array_equal(np.asarray(out["boxes"][k]), [x, y, x + w + 1, y + h + 1])


def test_generate_matches_official_generator(tiny_pair):
    """No NMS suppression (IoU is never > 1): every candidate passing the filters, in order."""
    ref, model, variables = tiny_pair
    img = image(0)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
              box_nms_thresh=1.0, points_per_side=4, points_per_batch=8)
    anns = official_generate(ref, img, **kw)
    out = sam_auto.generate(model, variables, img, max_masks=SETTING["max_masks"], **kw)
    assert len(anns) == 48 - int(sum(~a["segmentation"].any() for a in anns))
    assert_same_as_official(anns, out)
    # The filters, at thresholds between observed values (away from float noise).
    ious = np.sort([a["predicted_iou"] for a in anns])
    iou_t = float(ious[len(ious) // 2] + ious[len(ious) // 2 + 1]) / 2
    kw.update(pred_iou_thresh=iou_t, box_nms_thresh=0.7)
    anns = official_generate(ref, img, **kw)
    out = sam_auto.generate(model, variables, img, max_masks=SETTING["max_masks"], **kw)
    assert len(anns) >= 1
    assert_same_as_official(anns, out)


def test_generate_shapes_filters_and_nms(tiny_pair):
    _, model, variables = tiny_pair
    img = image(1)
    run = partial(sam_auto.generate, model, variables, img, stability_score_offset=0.05, **SETTING)
    out = run(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    k = SETTING["max_masks"]
    shapes = {key: (v.shape, v.dtype) for key, v in out.items()}
    assert shapes == {
        "masks": ((k, 40, 60), np.dtype(bool)), "boxes": ((k, 4), np.dtype(np.float32)),
        "predicted_iou": ((k,), np.dtype(np.float32)), "stability_score": ((k,), np.dtype(np.float32)),
        "points": ((k, 2), np.dtype(np.float32)), "valid": ((k,), np.dtype(bool)),
        "num_kept": ((), np.dtype(np.int32))}
    valid = np.asarray(out["valid"])
    n_all = int(valid.sum())
    assert n_all == min(k, int(out["num_kept"])) and n_all >= 20
    assert valid[:n_all].all()  # valid entries first
    iou = np.asarray(out["predicted_iou"])[:n_all]
    assert (np.diff(iou) <= 0).all()  # sorted by predicted IoU
    # Boxes are the masks' boxes; points are grid points of the original frame.
    boxes, nonempty = sam_auto.masks_to_boxes(out["masks"])
    np.testing.assert_array_equal(np.asarray(boxes), np.asarray(out["boxes"]))
    np.testing.assert_array_equal(np.asarray(nonempty), valid)
    grid = sam_auto.point_grid(4) * [60, 40]
    pts = np.asarray(out["points"])[:n_all]
    assert np.abs(pts[:, None] - grid[None]).sum(-1).min(1).max() < 1e-4

    # Each filter removes what it should, and only that.
    positive = np.sort(iou[iou > 0])  # a threshold <= 0 turns the filter off, as the official
    assert len(positive) >= 4
    t = float(positive[len(positive) // 2])  # an observed value: '>' must drop it
    by_iou = run(pred_iou_thresh=t, stability_score_thresh=0.0, box_nms_thresh=1.0)
    assert int(by_iou["num_kept"]) == int((iou > t).sum()) < n_all
    stab = np.asarray(out["stability_score"])[:n_all]
    s = float(np.sort(stab)[len(stab) // 2])  # an observed value: '>=' must keep it
    by_stab = run(pred_iou_thresh=0.0, stability_score_thresh=s, box_nms_thresh=1.0)
    assert int(by_stab["num_kept"]) == int((stab >= s).sum()) < n_all
    none = run(pred_iou_thresh=float(iou.max()) + 1.0, stability_score_thresh=0.0)
    assert int(none["num_kept"]) == 0 and not np.asarray(none["valid"]).any()
    assert not np.asarray(none["masks"]).any()

    # NMS: no two kept boxes overlap more than the threshold (official index boxes).
    nms = run(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    v = np.asarray(nms["valid"])
    assert 1 <= v.sum() < n_all
    ious = box_iou_matrix(np.asarray(nms["boxes"])[v] - INDEX_TO_EDGE)
    np.fill_diagonal(ious, 0.0)
    assert not (ious > 0.7).any()


def test_generate_compiles_once_per_image_size(tiny_pair):
    _, model, variables = tiny_pair
    run = partial(sam_auto.generate, model, variables, stability_score_offset=0.05, **SETTING)
    run(image(2))  # may reuse a compilation from another test
    before = sam_auto.generate_from_input._cache_size()
    a = run(image(3), pred_iou_thresh=0.0, stability_score_thresh=0.0)
    b = run(image(4), pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.9)
    assert sam_auto.generate_from_input._cache_size() == before  # new image and thresholds
    assert np.asarray(a["valid"]).any() and np.asarray(b["valid"]).any()
    assert not np.array_equal(np.asarray(a["masks"][0]), np.asarray(b["masks"][0]))
    gray = image(5)[..., 0]  # grayscale of the same size: same compilation
    out = run(gray)
    assert out["masks"].shape == (SETTING["max_masks"], 40, 60)
    assert sam_auto.generate_from_input._cache_size() == before


def test_generate_bad_inputs(tiny_pair):
    _, model, variables = tiny_pair
    with pytest.raises(ValueError, match="one image"):
        sam_auto.generate(model, variables, np.zeros((2, 40, 60, 3), np.uint8))
    with pytest.raises(ValueError, match="points_per_side"):
        sam_auto.generate(model, variables, image(0), points_per_side=0)
    with pytest.raises(ValueError, match="box_nms_thresh"):
        sam_auto.generate(model, variables, image(0), box_nms_thresh=float("nan"))
    with pytest.raises(ValueError, match="uint8"):
        sam_auto.generate(model, variables, image(0).astype(np.float32))


@pytest.mark.slow
def test_generate_matches_official_vit_b_1024(build_official_sam):
    """The real configuration's size: vit_b at 1024 px (random weights), a 4 x 4 grid."""
    ref = build_official_sam("vit_b", 1024, seed=1, randomise=False)
    variables = sam_variables_from_state_dict(ref.state_dict(), "vit_b", 1024)
    model = build_sam("vit_b", 1024)
    img = np.random.default_rng(9).integers(0, 256, size=(120, 90, 3), dtype=np.uint8)
    kw = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, stability_score_offset=0.05,
              box_nms_thresh=1.0, points_per_side=4, points_per_batch=16)
    anns = official_generate(ref, img, **kw)
    out = sam_auto.generate(model, variables, img, max_masks=48, **kw)
    assert len(anns) >= 10
    assert_same_as_official(anns, out)
