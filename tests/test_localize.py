"""`mskjax.localize`: the pure core on hand-made maps with known answers (pointing game, PxAP, Dice,
MaxBoxAccV2, thresholds tuned on one split and applied to another), its agreement with
`mskjax.metrics` / `mskjax.boxes`, and the CLI end to end on a tiny synthetic dataset with a tiny
random classifier checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mskjax import boxes as boxlib
from mskjax import checkpoint, localize, metrics
from mskjax.cam import METHODS
from mskjax.models import create


def _square_map(h, w, y0, x0, side, value=1.0, background=0.0):
    m = np.full((h, w), background, np.float64)
    m[y0:y0 + side, x0:x0 + side] = value
    return m


# ---------------------------------------------------------------------------------------------
# Known answers

def test_peak_inside_mask_is_a_hit_and_outside_needs_the_tolerance():
    mask = _square_map(20, 30, 5, 5, 4).astype(bool)          # rows/cols 5..8
    inside = np.zeros((20, 30))
    inside[7, 6] = 1.0
    outside = np.zeros((20, 30))
    outside[7, 12] = 1.0                                       # nearest mask pixel (7, 8): 4 px away
    [hit, miss] = localize.measure_maps([inside, outside], [mask, mask], tolerances=(0.0, 4.0, 3.9))
    assert hit.hits.tolist() == [True, True, True]
    assert miss.hits.tolist() == [False, True, False]
    # Same answer as the library's pointing game.
    pg = metrics.pointing_game(np.stack([inside, outside]), np.stack([mask, mask]), tolerance_px=4.0)
    assert np.asarray(pg.hits).tolist() == [True, True]
    s = localize.score_split([hit, miss], localize.choose_thresholds([hit, miss]), tolerances=(0.0, 4.0, 3.9))
    assert {k: v for k, v in s["pointing_game"]["0px"].items() if k != "chance"} == {
        "hit_rate": 0.5, "hits": 1, "n": 2, "tolerance_px": 0.0}
    # Chance: a uniformly drawn peak hits the 4 x 4 mask on 16 of 600 pixels.
    assert s["pointing_game"]["0px"]["chance"] == pytest.approx(16 / 600)
    # Within 4 px of the mask: the mask dilated by a disc of radius 4.
    from scipy import ndimage
    near = ndimage.distance_transform_edt(~mask) <= 4.0
    assert s["pointing_game"]["4px"]["chance"] == pytest.approx(near.mean())
    assert s["pointing_game"]["4px"]["hit_rate"] == 1.0


def test_map_equal_to_mask_gives_dice_1_pxap_1_and_perfect_boxes():
    masks = [_square_map(24, 24, 3, 4, 6).astype(bool), _square_map(16, 28, 8, 15, 5).astype(bool)]
    gt = [np.array([[4, 3, 10, 9]]), np.array([[15, 8, 20, 13]])]
    ms = localize.measure_maps([m.astype(float) for m in masks], masks, gt, peak_boxes=[b[0] for b in gt],
                               threshold_boxes=[None, gt[1][0]])
    t = localize.choose_thresholds(ms)
    assert 0 < t.dice <= 1.0  # any t in (0, 1] reproduces the mask; ties go to the lowest
    assert t.dice == pytest.approx(0.01)
    s = localize.score_split(ms, t)
    assert s["dice"]["mean"] == 1.0 and s["pxap"]["value"] == 1.0
    assert s["max_box_acc_v2"]["value"] == 1.0 and s["max_box_acc_v2"]["n"] == 2
    assert s["peak_box_iou"] == {"mean": 1.0, "n": 2, "hit_rate_iou_0.5": 1.0}
    assert s["threshold_box_iou"]["mean"] == 0.5  # no threshold box on image 0 counts as IoU 0
    # A constant map has no information: PxAP falls to the mask's pixel share.
    flat = localize.measure_maps([np.ones((24, 24))], [masks[0]])
    assert localize.score_split(flat, t)["pxap"]["value"] == pytest.approx(36 / 576)


def _graded(core_is_mask: bool, offset: int):
    """A map with a bright 4x4 core (1.0) inside a dimmer 10x10 ring (0.5): on 'tune' images the
    ground truth is the core, on 'report' images the whole 10x10 square."""
    m = _square_map(24, 24, offset, offset, 10, 0.5)
    m[offset + 3:offset + 7, offset + 3:offset + 7] = 1.0
    if core_is_mask:
        mask = m == 1.0
        box = [offset + 3, offset + 3, offset + 7, offset + 7]
    else:
        mask = m > 0
        box = [offset, offset, offset + 10, offset + 10]
    return m, mask, np.array([box], float)


def test_thresholds_chosen_on_tune_are_the_ones_applied_to_report():
    tune = [_graded(True, o) for o in (2, 5, 9)]
    report = [_graded(False, o) for o in (1, 7)]
    tm = localize.measure_maps(*zip(*tune))
    rm = localize.measure_maps(*zip(*report))
    from_tune = localize.choose_thresholds(tm)
    from_report = localize.choose_thresholds(rm)
    # The two splits prefer different thresholds ...
    assert from_tune.dice == pytest.approx(0.51) and from_report.dice == pytest.approx(0.01)
    assert all(v == pytest.approx(0.5) for v in from_tune.box.values())
    assert all(v == pytest.approx(0.0) for v in from_report.box.values())
    # ... and the report split is scored with the tune split's.
    s = localize.score_split(rm, from_tune)
    assert s["dice"]["threshold"] == from_tune.dice
    assert s["dice"]["mean"] == pytest.approx(2 * 16 / (16 + 100))  # core predicted, whole square true
    assert s["max_box_acc_v2"]["value"] == 0.0                      # core box vs square box: IoU 0.16
    assert [v["threshold"] for v in s["max_box_acc_v2"]["per_iou"].values()] == list(from_tune.box.values())
    assert s["max_box_acc_v2"]["oracle_value"] == 1.0               # its own best would have been perfect
    assert localize.score_split(rm, from_report)["dice"]["mean"] == 1.0


# ---------------------------------------------------------------------------------------------
# Agreement with the library's definitions

def test_components_and_box_curve_match_the_jax_implementation():
    rng = np.random.default_rng(0)
    maps = rng.random((3, 14, 17))
    maps[1] = np.kron(rng.random((4, 5)), np.ones((4, 4)))[:14, :17]  # blocky: larger components
    thresholds = np.array([0.0, 0.3, 0.55, 0.8, 0.97])
    gt = np.array([[[2, 1, 9, 8], [10, 6, 16, 13]]] * 3, float)
    for m in maps:
        for t in thresholds:
            fg = m > t
            labels = boxlib.connected_components(jnp.asarray(fg)[None])
            b, _, valid = boxlib.component_boxes(labels)
            want = np.asarray(b[0])[np.asarray(valid[0])]
            got = metrics.host_component_boxes(fg)
            assert sorted(map(tuple, got)) == sorted(map(tuple, want.astype(float)))
    want = np.asarray(metrics.best_box_iou_curve(jnp.asarray(maps, jnp.float32), jnp.asarray(gt, jnp.float32),
                                                 jnp.ones((3, 2), bool), jnp.asarray(thresholds, jnp.float32)))
    got = np.stack([metrics.host_best_box_iou_curve(m.astype(np.float32), g, thresholds.astype(np.float32))
                    for m, g in zip(maps, gt)])
    np.testing.assert_allclose(got, want.T, atol=1e-6)
    # MaxBoxAccV2 at the tuned thresholds on the same images equals the library's best-threshold value.
    ms = localize.measure_maps(list(maps), [m > 0.5 for m in maps], list(gt))
    s = localize.score_split(ms, localize.choose_thresholds(ms))
    ref = metrics.max_box_acc_v2(maps, gt, thresholds=localize.BOX_THRESHOLDS)
    assert s["max_box_acc_v2"]["value"] == pytest.approx(ref["max_box_acc_v2"], abs=1e-9)


def test_pxap_and_dice_match_metrics_on_pooled_maps():
    rng = np.random.default_rng(1)
    maps = rng.random((4, 12, 15)) ** 3
    masks = np.zeros((4, 12, 15), bool)
    for i in range(4):
        masks[i, 2 + i:7 + i, 3:9 + i] = True
    ms = localize.measure_maps(list(maps), list(masks))
    tp = np.sum([m.tp_ge for m in ms], axis=0)
    ng = np.sum([m.n_ge for m in ms], axis=0)
    assert localize.pxap_from_counts(tp, ng) == pytest.approx(
        metrics.pxap(maps, masks, thresholds=localize.PXAP_THRESHOLDS), abs=1e-12)
    t = localize.choose_thresholds(ms)
    ref = np.asarray(metrics.dice_of_thresholded_map(maps, masks, localize.DICE_THRESHOLDS)).mean(1)
    assert t.dice == pytest.approx(localize.DICE_THRESHOLDS[np.argmax(ref)])
    assert localize.score_split(ms, t)["dice"]["mean"] == pytest.approx(ref.max(), abs=1e-12)


def test_bad_inputs_are_errors_naming_the_problem():
    with pytest.raises(ValueError, match="empty"):
        localize.measure_image(np.ones((4, 4)), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="both be"):
        localize.measure_image(np.ones((4, 5)), np.ones((4, 4), bool))
    with pytest.raises(localize.LocalizeError, match="unknown method"):
        localize.resolve_methods("grad_cam,nope", None)
    assert localize.resolve_methods("all", None)[0] == list(localize.LOCALIZE_METHODS)
    model = create("resnet18", num_classes=1)
    methods, notes = localize.resolve_methods("all", "layer3", model)
    assert methods == [m for m in localize.LOCALIZE_METHODS if m != "cam"] and "layer3" in notes[0]
    assert localize.resolve_methods("eigen_cam, grad_cam,eigen_cam", None)[0] == ["eigen_cam", "grad_cam"]


# ---------------------------------------------------------------------------------------------
# The CLI end to end

def _random_variables(shapes, seed: int):
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "kernel":
            return (rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(s.shape, np.float32)
    return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A 1-channel ResNet18 at 64 px (letterbox), random weights, in the checkpoint contract."""
    model = create("resnet18", num_classes=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 1)), train=False))
    meta = checkpoint.classifier_metadata("resnet18", 1, 1, 64, {"padding": "symmetric"},
                                          {"input_range": [0.0, 1.0], "mean": [0.5], "std": [0.25]})
    meta["data"] = {"mode": "letterbox", "image_size": 64}
    return checkpoint.save(tmp_path_factory.mktemp("ckpt") / "classifier", _random_variables(shapes, 0), meta)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """12 studies split valid/test (seed 0: abnormal studies in both), small images."""
    out = tmp_path_factory.mktemp("data") / "syn"
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(out), "--studies", "12", "--seed", "0",
                    "--splits", "valid:0.5,test:0.5", "--size-range", "96", "160", "--workers", "1"], check=True,
                   capture_output=True)
    return out


def test_cli_writes_both_files_for_every_method(classifier, synthetic, tmp_path, capsys):
    # A truncated abnormal image (the dataset reader skips it) and a truncated mask (found when the
    # run reads it): both listed with their reasons, neither fatal.
    victim = sorted((synthetic / "test").rglob("study1_positive/image*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:150])
    bad_mask = sorted((synthetic / "masks" / "valid").rglob("*.png"))[0]
    bad_mask.write_bytes(bad_mask.read_bytes()[:60])
    out = tmp_path / "out"
    rc = localize.main(["--classifier", str(classifier), "--dataset", f"synthetic:{synthetic}", "--tune", "valid",
                        "--report", "test", "--out", str(out), "--methods", "all", "--score-cam-limit", "2",
                        "--score-cam-channels", "8", "--faithfulness-limit", "2", "--faithfulness-steps", "2",
                        "--batch", "4", "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "localization.json").read_text())
    md = (out / "localization.md").read_text()
    assert report["tune_split"] == "valid" and report["report_split"] == "test"
    assert report["methods"] == list(localize.LOCALIZE_METHODS)
    for m in report["methods"]:  # the curves behind MaxBoxAccV2 and PxAP, one figure per method
        assert (out / "plots" / f"{m}.png").stat().st_size > 0
    n_abnormal = {}
    for role, split in (("tune", "valid"), ("report", "test")):
        n_abnormal[role] = sum(1 for _ in (synthetic / "masks" / split).rglob("*.png"))
        c = report["counts"][role]
        assert c["eligible"] + c["reader_skips"] == n_abnormal[role] and c["normal"] > 0
        assert c["scored"] == n_abnormal[role] - 1 and c["unreadable"] == 1
        assert set(report["results"][role]) == set(localize.LOCALIZE_METHODS)
    assert len(report["unreadable"]) == 2
    [image_entry] = [u for u in report["unreadable"] if u["split"] == "test"]
    assert str(victim) in image_entry["path"] + image_entry["reason"] and "truncated" in image_entry["reason"]
    [mask_entry] = [u for u in report["unreadable"] if u["split"] == "valid"]
    assert f"cannot read mask {bad_mask}" in mask_entry["reason"] and "truncated" in mask_entry["reason"]
    for role in ("tune", "report"):
        for method, r in report["results"][role].items():
            n = 2 if method == "score_cam" else report["counts"][role]["scored"]
            assert r["n_images"] == n and r["pxap"]["n"] == n
            assert 0.0 <= r["pxap"]["value"] <= 1.0 and 0.0 <= r["dice"]["mean"] <= 1.0
            assert r["deletion_auc"]["n"] == 2 and r["insertion_auc"]["n"] == 2
            assert set(r["max_box_acc_v2"]["per_iou"]) == {"0.3", "0.5", "0.7"}
            assert set(r["pointing_game"]) == {"0px", "15px"}
            # The report split is scored at the tune split's thresholds.
            t = report["thresholds_from_tune"][method]
            assert r["dice"]["threshold"] == t["dice"]
            assert {k: v["threshold"] for k, v in r["max_box_acc_v2"]["per_iou"].items()} == t["max_box_acc_v2"]
    # Both tables, every method, split names, and the Score-CAM limit stated.
    for text in (md, printed):
        assert "`test`" in text and "`valid`" in text
        assert all(f"| {m} |" in text for m in METHODS)
        assert "first 2 images" in text
    assert str(victim) in md and str(bad_mask) in md


def test_cli_refuses_tuning_on_the_reported_split_and_bad_checkpoints(classifier, synthetic, tmp_path, capsys):
    base = ["--dataset", f"synthetic:{synthetic}", "--out", str(tmp_path / "o"), "--no-progress"]
    assert localize.main(["--classifier", str(classifier), "--tune", "test", "--report", "test", *base]) == 2
    assert "must differ" in capsys.readouterr().err
    missing = tmp_path / "no_checkpoint"
    assert localize.main(["--classifier", str(missing), "--tune", "valid", "--report", "test", *base]) == 2
    assert str(missing) in capsys.readouterr().err
    assert localize.main(["--classifier", str(classifier), "--tune", "valid", "--report", "test", "--layer", "nope",
                          *base]) == 2
    assert "unknown layer" in capsys.readouterr().err
    assert not (tmp_path / "o" / "localization.json").exists()


def test_frames_line_up_when_the_map_is_the_mask(synthetic):
    """measure_split's plumbing (input frame -> original frame, boxes moved with the geometry) on a
    stand-in runner whose 'CAM' is the ground-truth mask preprocessed exactly like the image:
    letterboxed into the input frame, so any frame error would cost hits, Dice and box IoU."""
    from mskjax.data.images import decode_image
    from mskjax.data.preprocess import preprocess
    from mskjax.pipeline import read_mask
    from mskjax.inputs import items_from_dataset

    items, _, _ = items_from_dataset(f"synthetic:{synthetic}:test")
    chosen, _ = localize.eligible_items(items)

    class MaskRunner(localize.CamRunner):
        def __init__(self):  # no model: only what measure_split uses
            self.size, self.mode, self.batch_size, self.methods = 96, "letterbox", 3, ("grad_cam",)
            self.seen = 0

        def prepare(self, images):
            self.batch_items = readable[self.seen:self.seen + len(images)]
            self.seen += len(images)
            return super().prepare(images)

        def maps(self, raw, geom, score_cam):
            m = np.zeros((self.batch_size, self.size, self.size), np.float32)
            for i, it in enumerate(self.batch_items):
                mask = read_mask(it.mask_path, decode_image(it.path).image.shape).astype(np.float32)
                m[i] = preprocess(mask, self.size, self.mode)[0][..., 0]
            pk = boxlib.peak_boxes(m, input_side=96.0)
            tb = boxlib.threshold_boxes(m, fraction=0.5, k=1)
            return {"grad_cam": {"maps": m, "peak": np.asarray(pk.boxes), "peak_xy": np.asarray(boxlib.peak_point(m)),
                                 "threshold": np.asarray(tb.boxes[:, 0]),
                                 "threshold_valid": np.asarray(tb.valid[:, 0])}}

    readable = chosen  # every chosen item decodes, so prepare's k-th image is readable[k]
    unreadable: list = []
    ms = localize.measure_split(MaskRunner(), chosen, score_cam_limit=0, faithfulness_limit=0,
                                unreadable=unreadable, workers=2)["grad_cam"]
    assert not unreadable and len(ms) == len(chosen) >= 3
    s = localize.score_split(ms, localize.choose_thresholds(ms))
    assert s["pointing_game"]["0px"]["hit_rate"] == 1.0
    assert s["pxap"]["value"] > 0.95 and s["dice"]["mean"] > 0.9
    assert s["max_box_acc_v2"]["value"] >= 0.9 and s["threshold_box_iou"]["mean"] > 0.6


def test_flipped_maps_are_one_rule_in_localize_the_trainer_and_the_pipeline(classifier, synthetic):
    """map_flips: mskjax.localize (CamRunner), the trainer's report (make_cam_step) and the pipeline's
    map half give the same map and peak; localize refuses it beside a subtracted normal mean."""
    from mskjax.data.images import decode_image
    from mskjax.data.mura import read_mura
    from mskjax.pipeline import PipelineConfig, classifier_input_settings, classifier_inputs, make_map_half
    from mskjax.train.localization import make_cam_step
    model, variables, meta = checkpoint.load_classifier(classifier)
    records, _ = read_mura(synthetic, "test")
    images = [decode_image(r.path).image for r in records[:3]]
    size, mode, channels, norm = classifier_input_settings(meta)
    x, geom, hw, valid = classifier_inputs(images, size, mode, 4)
    half = make_map_half(model, PipelineConfig(cam="layer_cam", cam_layer="layer2", map_flips="hv", threshold=0.0),
                         norm, channels, 64)
    want = jax.jit(half)(variables, {"images": x, "geometry": geom, "original_hw": hw, "valid": valid,
                                     "threshold": np.float32(0.0)})
    runner = localize.CamRunner(model, variables, meta, ["layer_cam"], "layer2", batch_size=4, map_flips="hv")
    raw, rgeom, _ = runner.prepare(images)
    got = runner.maps(raw, rgeom, score_cam=False)["layer_cam"]
    maps, peaks, _ = make_cam_step(model, norm, channels, "layer_cam", "layer2", "hv")(variables, x, geom, None)
    for other in (got["maps"], np.asarray(maps)):
        np.testing.assert_allclose(other[:3], np.asarray(want["cam"])[:3], atol=1e-5)
    np.testing.assert_allclose(got["peak_xy"][:3], np.asarray(want["peak_input"])[:3], atol=1e-4)
    np.testing.assert_allclose(np.asarray(peaks)[:3], np.asarray(want["peak_input"])[:3], atol=1e-4)
    plain = localize.CamRunner(model, variables, meta, ["layer_cam"], "layer2", batch_size=4)
    assert not np.allclose(plain.maps(raw, rgeom, score_cam=False)["layer_cam"]["maps"][:3], got["maps"][:3])
    with pytest.raises(localize.LocalizeError, match="subtract-normal-mean"):
        runner.set_baseline(images)
    with pytest.raises(localize.LocalizeError, match="map_flips"):
        localize.CamRunner(model, variables, meta, ["layer_cam"], "layer2", map_flips="x")
