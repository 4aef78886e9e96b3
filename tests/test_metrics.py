"""Metrics: parity with scikit-learn (tolerance 1e-12), study aggregation, report/bootstrap,
masks and boxes, pointing game, PxAP, MaxBoxAccV2, deletion/insertion."""
from __future__ import annotations

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from mskjax import metrics as M
from mskjax.boxes import component_boxes, connected_components

TOL = 1e-12


def _random_tied(rng, n=257):
    y = rng.integers(0, 2, n)
    s = rng.integers(0, 12, n) / 11.0  # many tied scores, some exactly at 0.5? no: k/11
    s[:20] = 0.5  # exact threshold hits: p >= 0.5 counts as abnormal
    w = rng.integers(0, 4, n).astype(float)
    return y, s, w


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_parity_with_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, s, w = _random_tied(rng)
    pred = (s >= 0.5).astype(int)
    assert abs(M.accuracy(y, s) - skm.accuracy_score(y, pred)) < TOL
    assert abs(M.auroc(y, s) - skm.roc_auc_score(y, s)) < TOL
    assert abs(M.cohen_kappa(y, s) - skm.cohen_kappa_score(y, pred)) < TOL
    assert abs(M.sensitivity(y, s) - skm.recall_score(y, pred)) < TOL
    assert abs(M.specificity(y, s) - skm.recall_score(1 - y, 1 - pred)) < TOL
    assert abs(M.average_precision(y, s) - skm.average_precision_score(y, s)) < TOL
    # weighted forms (the bootstrap relies on them)
    assert abs(M.accuracy(y, s, sample_weight=w) - skm.accuracy_score(y, pred, sample_weight=w)) < TOL
    assert abs(M.auroc(y, s, sample_weight=w) - skm.roc_auc_score(y, s, sample_weight=w)) < TOL
    assert abs(M.cohen_kappa(y, s, sample_weight=w)
               - skm.cohen_kappa_score(y, pred, sample_weight=w)) < TOL
    assert abs(M.average_precision(y, s, sample_weight=w)
               - skm.average_precision_score(y, s, sample_weight=w)) < TOL
    tn, fp, fn, tp = skm.confusion_matrix(y, pred, sample_weight=w).ravel()
    assert abs(M.sensitivity(y, s, sample_weight=w) - tp / (tp + fn)) < TOL
    assert abs(M.specificity(y, s, sample_weight=w) - tn / (tn + fp)) < TOL
    # other thresholds
    assert abs(M.accuracy(y, s, threshold=0.3) - skm.accuracy_score(y, s >= 0.3)) < TOL


def test_classification_bad_input():
    with pytest.raises(ValueError, match="one class"):
        M.auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        M.accuracy([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        M.auroc([0, 1], [0.1, np.nan])
    assert np.isnan(M.sensitivity([0, 0], [0.1, 0.9]))


def test_study_aggregate_hand_example():
    probs = [0.9, 0.7, 0.2, 0.4, 0.6, 0.1]
    studies = ["b/s2/", "b/s2/", "a/s1/", "a/s1/", "a/s1/", "c/s3/"]
    labels = [1, 1, 0, 0, 0, 0]
    agg = M.study_aggregate(probs, studies, labels)
    assert agg.study_ids.tolist() == ["a/s1/", "b/s2/", "c/s3/"]
    np.testing.assert_allclose(agg.probs, [0.4, 0.8, 0.1], atol=TOL)
    assert agg.labels.tolist() == [0, 1, 0] and agg.n_images.tolist() == [3, 2, 1]
    assert agg.image_study.tolist() == [1, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError, match=r"study 'a/s1/' has images with different labels"):
        M.study_aggregate(probs, studies, [1, 1, 0, 1, 0, 0])


def _fake_mura(rng, n_studies=120):
    parts = np.array(["XR_WRIST", "XR_HAND", "XR_ELBOW"])
    study_label = rng.integers(0, 2, n_studies)
    study_part = parts[rng.integers(0, 3, n_studies)]
    n_img = rng.integers(1, 5, n_studies)
    sid = np.repeat(np.arange(n_studies), n_img)
    y = study_label[sid]
    p = np.clip(0.2 * y + 0.4 + rng.normal(0, 0.25, len(sid)), 0, 1)
    names = np.array([f"{study_part[i]}/patient{i:05d}/study1/" for i in range(n_studies)])
    return p, y, names[sid], study_part[sid]


def test_classification_report_values_ci_and_determinism():
    rng = np.random.default_rng(0)
    p, y, sid, part = _fake_mura(rng)
    rep = M.classification_report(p, y, sid, part, n_bootstrap=300, seed=3)
    agg = M.study_aggregate(p, sid, y)
    ov = rep["overall"]
    assert ov["n_images"] == len(p) and ov["n_studies"] == 120
    assert abs(ov["image"]["auroc"]["value"] - skm.roc_auc_score(y, p)) < TOL
    assert abs(ov["image"]["accuracy"]["value"] - skm.accuracy_score(y, p >= 0.5)) < TOL
    st_pred = agg.probs >= 0.5
    assert abs(ov["study"]["kappa"]["value"] - skm.cohen_kappa_score(agg.labels, st_pred)) < TOL
    assert abs(ov["study"]["auroc"]["value"] - skm.roc_auc_score(agg.labels, agg.probs)) < TOL
    assert abs(ov["study"]["sensitivity"]["value"] - skm.recall_score(agg.labels, st_pred)) < TOL
    for level in ("image", "study"):
        for name, e in ov[level].items():
            assert e["ci_low"] <= e["value"] <= e["ci_high"], (level, name, e)
            assert e["ci_high"] - e["ci_low"] > 0
            assert e["n_valid_bootstrap"] == 300
    assert set(rep["by_body_part"]) == {"XR_WRIST", "XR_HAND", "XR_ELBOW"}
    wrist = np.array([s.startswith("XR_WRIST") for s in sid])
    w_agg = M.study_aggregate(p[wrist], sid[wrist], y[wrist])
    assert abs(rep["by_body_part"]["XR_WRIST"]["study"]["accuracy"]["value"]
               - skm.accuracy_score(w_agg.labels, w_agg.probs >= 0.5)) < TOL
    again = M.classification_report(p, y, sid, part, n_bootstrap=300, seed=3)
    assert again == rep
    other = M.classification_report(p, y, sid, part, n_bootstrap=300, seed=4)
    assert other["overall"]["study"]["auroc"]["ci_low"] != ov["study"]["auroc"]["ci_low"]
    assert other["overall"]["study"]["auroc"]["value"] == ov["study"]["auroc"]["value"]


def test_classification_report_body_part_must_be_per_study():
    with pytest.raises(ValueError, match="different body parts"):
        M.classification_report([0.1, 0.2], [0, 0], ["s", "s"], ["XR_HAND", "XR_WRIST"], n_bootstrap=0)


def test_dice_and_iou_hand_made():
    a = np.zeros((3, 4, 4), bool)
    b = np.zeros((3, 4, 4), bool)
    a[0, :2, :2] = True  # 4 px
    b[0, 1:3, :2] = True  # 4 px, overlap 2
    a[1, 0, 0] = True  # prediction but empty truth
    np.testing.assert_allclose(M.dice(a, b), [0.5, 0.0, 1.0])
    np.testing.assert_allclose(M.iou(a, b), [2 / 6, 0.0, 1.0])
    np.testing.assert_allclose(M.dice(a, b, empty_value=0.0)[2], 0.0)
    np.testing.assert_allclose(np.asarray(M.dice(jnp.asarray(a), jnp.asarray(b))), [0.5, 0, 1])


def test_box_iou():
    a = np.array([0.0, 0.0, 10.0, 10.0])
    assert M.box_iou(a, np.array([5.0, 0.0, 15.0, 10.0])) == pytest.approx(50 / 150)
    assert M.box_iou(a, a) == 1.0
    assert M.box_iou(a, np.array([10.0, 10.0, 20.0, 20.0])) == 0.0  # touching corners
    assert M.box_iou(np.zeros(4), np.zeros(4)) == 0.0  # degenerate
    pw = M.pairwise_box_iou(np.array([a, [2.0, 2.0, 4.0, 4.0]]),
                            np.array([[0.0, 0.0, 5.0, 10.0], [2.0, 2.0, 4.0, 4.0], [50, 50, 60, 60]]))
    np.testing.assert_allclose(pw, [[0.5, 0.04, 0], [4 / 50, 1.0, 0]])


def test_pointing_game_hits_misses_tolerance():
    maps = np.zeros((4, 10, 10), np.float32)
    masks = np.zeros((4, 10, 10), bool)
    maps[:, 5, 5] = 1.0
    masks[0, 4:7, 4:7] = True  # peak inside: hit
    masks[1, 0:2, 0:2] = True  # far away: miss
    masks[2, 5, 8] = True  # 3 px away: miss at 0, hit at 3
    # image 3: empty mask, not evaluable
    r0 = M.pointing_game(maps, masks)
    assert np.asarray(r0.hits).tolist() == [True, False, False, False]
    assert np.asarray(r0.evaluable).tolist() == [True, True, True, False]
    r3 = M.pointing_game(maps, masks, tolerance_px=3)
    assert np.asarray(r3.hits).tolist() == [True, False, True, False]
    assert not bool(M.pointing_game(maps, masks, tolerance_px=2.9).hits[2])


def test_pxap_exact_matches_sklearn_and_binned_equals_exact_on_grid():
    rng = np.random.default_rng(5)
    maps = rng.integers(0, 9, (3, 12, 12)) / 8.0  # exact binary fractions, many ties
    maps[:, 0, 0], maps[:, 0, 1] = 0.0, 1.0  # min 0 and max 1 so normalisation is the identity
    masks = rng.random((3, 12, 12)) < 0.3
    ref = skm.average_precision_score(masks.ravel(), maps.ravel())
    assert abs(M.pxap(maps, masks) - ref) < TOL
    assert abs(M.pxap(maps, masks, thresholds=np.arange(9) / 8.0) - ref) < TOL
    coarse = M.pxap(maps, masks, thresholds=[0.0, 0.5])
    assert abs(coarse - ref) > 1e-6  # binning changes the number
    sub = M.pxap(maps, masks, valid=[True, False, True])
    assert abs(sub - skm.average_precision_score(masks[[0, 2]].ravel(), maps[[0, 2]].ravel())) < TOL


def test_component_boxes_match_cv2_external_contours():
    rng = np.random.default_rng(6)
    masks = rng.random((4, 30, 30)) < 0.35
    labels = connected_components(masks)
    boxes, _, valid = component_boxes(labels)
    for m, b, v in zip(masks, np.asarray(boxes), np.asarray(valid)):
        contours = cv2.findContours(m.astype(np.uint8) * 255, cv2.RETR_EXTERNAL,
                                    cv2.CHAIN_APPROX_SIMPLE)[0]
        ref = sorted((x, y, x + w, y + h) for x, y, w, h in map(cv2.boundingRect, contours))
        ours = sorted(tuple(int(c) for c in row) for row in b[v])
        # cv2's outer contours can nest (an island inside another component's hole)
        assert set(ref) <= set(ours) and len(ours) >= len(ref)


def test_max_box_acc_v2_hand_cases():
    h = w = 32
    yy, xx = np.mgrid[:h, :w]

    def bump(cx, cy, s):
        return np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * s * s))

    gt = np.array([[[8.0, 8.0, 16.0, 16.0], [0, 0, 0, 0]]] * 3)
    gv = np.array([[True, False]] * 3)
    maps = np.stack([
        bump(12, 12, 3),  # on target
        bump(26, 26, 3),  # elsewhere
        bump(26, 26, 3) + 0.8 * bump(12, 12, 3),  # two blobs: the weaker one is right
    ]).astype(np.float32)
    r = M.max_box_acc_v2(maps, gt, gv, iou_thresholds=(0.5,))
    curve = r["accuracy_curve"][0]
    assert r["per_iou"][0.5]["accuracy"] == pytest.approx(2 / 3)  # all components count
    assert r["max_box_acc_v2"] == pytest.approx(2 / 3)
    t = r["per_iou"][0.5]["threshold"]
    assert curve[np.argmax(curve)] == pytest.approx(2 / 3) and 0 < t < 1
    alone = M.max_box_acc_v2(maps[1:2], gt[1:2], gv[1:2], iou_thresholds=(0.3, 0.5))
    assert alone["max_box_acc_v2"] == 0.0
    # an image with no valid GT box is not counted
    r2 = M.max_box_acc_v2(maps[:2], gt[:2], np.array([[True, False], [False, False]]),
                          iou_thresholds=(0.5,))
    assert r2["n_images"] == 1 and r2["max_box_acc_v2"] == 1.0


def test_dice_of_thresholded_map():
    m = np.array([[[0.0, 0.2], [0.6, 1.0]]])
    gt = np.array([[[False, False], [True, True]]])
    np.testing.assert_allclose(M.dice_of_thresholded_map(m, gt, 0.5), [1.0])
    np.testing.assert_allclose(M.dice_of_thresholded_map(m, gt, [0.1, 0.5, 0.9]),
                               [[0.8], [1.0], [2 / 3]])


def test_deletion_insertion_analytic():
    b, h, w = 2, 8, 8
    images = np.ones((b, h, w, 1), np.float32)
    region = np.zeros((h, w), bool)
    region[:4, :4] = True  # 25% of the pixels

    def predict(x):  # "probability" = mean brightness inside the region
        return jnp.mean(jnp.where(region[None, :, :, None], x, 0.0), axis=(1, 2, 3)) * 4

    good = np.broadcast_to(region, (b, h, w)).astype(np.float32)
    bad = 1.0 - good
    r = M.deletion_insertion_auc(predict, images, np.stack([good[0], bad[0]]), steps=4)
    np.testing.assert_allclose(np.asarray(r.deletion_curve[0]), [1, 0, 0, 0, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.insertion_curve[0]), [0, 1, 1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.deletion_curve[1]), [1, 1, 1, 1, 0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.deletion_auc), [0.125, 0.875], atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.insertion_auc), [0.875, 0.125], atol=1e-6)


def test_weights_equal_duplication_as_the_bootstrap_assumes():
    rng = np.random.default_rng(7)
    y, s, _ = _random_tied(rng, 90)
    idx = rng.integers(0, 90, 90)
    counts = np.bincount(idx, minlength=90).astype(float)
    assert abs(M.auroc(y, s, sample_weight=counts) - skm.roc_auc_score(y[idx], s[idx])) < TOL
    assert abs(M.cohen_kappa(y, s, sample_weight=counts)
               - skm.cohen_kappa_score(y[idx], s[idx] >= 0.5)) < TOL
    rows = M.auroc(y, s, sample_weight=np.stack([counts, np.ones(90)]))
    np.testing.assert_allclose(rows, [skm.roc_auc_score(y[idx], s[idx]), skm.roc_auc_score(y, s)],
                               atol=TOL)


def test_report_single_class_body_part_gives_nan_not_error():
    p = [0.2, 0.8, 0.6, 0.3]
    y = [0, 1, 1, 0]
    rep = M.classification_report(p, y, ["a", "b", "c", "d"], ["HAND", "HAND", "WRIST", "WRIST"],
                                  n_bootstrap=20, seed=0)
    hand = rep["by_body_part"]["HAND"]["study"]
    assert hand["auroc"]["value"] == 1.0
    rep2 = M.classification_report(p, y, ["a", "b", "c", "d"], ["HAND", "WRIST", "WRIST", "HAND"],
                                   n_bootstrap=0)
    assert rep2["by_body_part"]["WRIST"]["study"]["accuracy"]["value"] == 1.0
    assert np.isnan(rep2["by_body_part"]["WRIST"]["study"]["auroc"]["value"])
    assert np.isnan(rep2["by_body_part"]["WRIST"]["study"]["specificity"]["value"])
    assert np.isnan(rep2["by_body_part"]["WRIST"]["study"]["auroc"]["ci_low"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_youden_threshold_matches_sklearn_roc_curve(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(size=300) + 0.8 * y, 1)  # ties included
    fpr, tpr, thr = skm.roc_curve(y, s, drop_intermediate=False)
    j = tpr - fpr
    expected = thr[int(np.argmax(j))]  # sklearn's thresholds decrease: the first max is the highest t
    t = M.youden_threshold(y, s)
    assert t == expected
    pred = s >= t
    assert np.isclose(pred[y == 1].mean() - pred[y == 0].mean(), j.max(), atol=1e-12)
    assert np.isnan(M.youden_threshold(np.ones(5), np.arange(5.0)))


def test_auroc_by_type_matches_sklearn_on_each_type_against_normals():
    roc_auc_score = skm.roc_auc_score
    rng = np.random.default_rng(7)
    studies, labels, types = [], [], []
    for s in range(60):
        kind = ["", "fracture", "lesion", "hardware"][s % 4]
        for _ in range(int(rng.integers(1, 4))):
            studies.append(f"s{s}")
            labels.append(int(kind != ""))
            # a study's images need not all show its abnormality (types come from each image's boxes)
            types.append(() if not kind or rng.random() < 0.2 else (kind,))
    labels = np.array(labels)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.8, len(labels)), 0, 1)
    out = M.auroc_by_type(probs, labels, studies, types)
    assert sorted(out) == ["fracture", "hardware", "lesion"]
    st = np.array(studies)
    for name, r in out.items():
        img = np.array([y == 0 or name in t for y, t in zip(labels, types)])
        assert r["n_images"] == int(labels[img].sum())
        assert r["image_auroc"] == pytest.approx(roc_auc_score(labels[img], probs[img]), abs=1e-12)
        ids = sorted({s for s, t in zip(studies, types) if name in t} | {s for s, y in zip(studies, labels) if y == 0})
        y_st = [int(labels[st == i][0]) for i in ids]
        p_st = [probs[st == i].mean() for i in ids]
        assert r["n_studies"] == sum(y_st)
        assert r["study_auroc"] == pytest.approx(roc_auc_score(y_st, p_st), abs=1e-12)
    # no normal cases: undefined, not an error
    only = M.auroc_by_type([0.2, 0.9], [1, 1], ["a", "b"], [("lesion",), ("lesion",)])
    assert np.isnan(only["lesion"]["image_auroc"]) and only["lesion"]["n_images"] == 2
    with pytest.raises(ValueError, match="types"):
        M.auroc_by_type([0.2, 0.9], [0, 1], ["a", "b"], [()])


def test_pointing_hits_at_a_point_uses_its_pixel_and_the_pointing_game_rule():
    mask = np.zeros((20, 30), bool)
    mask[5:9, 5:9] = True  # rows/cols 5..8
    # (x, y) = (6.9, 7.2) lies in pixel (row 7, col 6): inside.
    assert M.pointing_hits_at((6.9, 7.2), mask, (0.0, 3.0)).tolist() == [True, True]
    # Pixel (7, 12): 4 px from the nearest mask pixel (7, 8).
    assert M.pointing_hits_at((12.5, 7.5), mask, (0.0, 3.9, 4.0)).tolist() == [False, False, True]
    # Points past the border are clamped to the border pixel; NaN never hits.
    assert M.pointing_hits_at((-3.0, 6.0), mask, (5.0,)).tolist() == [True]
    assert M.pointing_hits_at((np.nan, 6.0), mask, (50.0,)).tolist() == [False]


def test_pointing_chance_is_the_dilated_mask_fraction():
    mask = np.zeros((10, 10), bool)
    mask[4, 4] = True
    assert M.pointing_chance(mask, 0.0) == pytest.approx(0.01)
    # Within 1 px of one pixel: itself and its 4 neighbours.
    assert M.pointing_chance(mask, 1.0) == pytest.approx(0.05)
    both = M.pointing_chance(np.stack([mask, np.zeros_like(mask)]), 1.0)
    np.testing.assert_allclose(both, [0.05, 0.0])
