"""mskjax.plots: each figure's numbers against the tables (mskjax.metrics, scikit-learn), and the
trainer's WORKDIR/plots from a tiny run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from mskjax import metrics, plots

REPO = Path(__file__).resolve().parents[1]
RUN_TRAIN = REPO / "tests" / "train" / "run_train.py"


def _png(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


def _data(n_studies=60, seed=0):
    """Studies of 1-4 images, three body parts, tied probabilities (rounded), abnormal scored higher."""
    rng = np.random.default_rng(seed)
    probs, labels, studies, parts = [], [], [], []
    for s in range(n_studies):
        y = int(rng.random() < 0.45)
        part = ["XR_WRIST", "XR_HAND", "XR_ELBOW"][s % 3]
        for _ in range(rng.integers(1, 5)):
            probs.append(round(float(np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)), 2))
            labels.append(y)
            studies.append(f"study{s:03d}")
            parts.append(part)
    return np.array(probs), np.array(labels), np.array(studies), np.array(parts)


def test_roc_curve_equals_sklearn_and_its_area_the_metrics_auroc():
    p, y, _, _ = _data()
    fpr, tpr, thr = plots.roc_curve(y, p)
    want_fpr, want_tpr, want_thr = sk_roc_curve(y, p, drop_intermediate=False)
    np.testing.assert_allclose(fpr, want_fpr, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tpr, want_tpr, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(thr, want_thr)
    assert len(np.unique(p)) < len(p)  # ties are exercised
    assert plots.area(fpr, tpr) == pytest.approx(metrics.auroc(y, p), abs=1e-12)
    assert plots.area(fpr, tpr) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    with pytest.raises(ValueError, match="one class"):
        plots.roc_curve(np.ones(4, int), np.linspace(0, 1, 4))


def test_roc_figure_data_matches_the_classification_report(tmp_path):
    p, y, st, bp = _data()
    threshold = 0.45
    report = metrics.classification_report(p, y, st, bp, threshold=threshold, n_bootstrap=0)
    got = plots.classification_plots(tmp_path, "test", p, y, st, bp, threshold=threshold)
    groups = {"overall": report["overall"], **report["by_body_part"]}
    assert set(got["roc_image"]) == set(got["roc_study"]) == set(groups) == {"overall", "XR_WRIST", "XR_HAND", "XR_ELBOW"}
    for name, table in groups.items():
        img, study = got["roc_image"][name], got["roc_study"][name]
        assert img["n"] == table["n_images"] and study["n"] == table["n_studies"]
        assert img["auroc"] == pytest.approx(table["image"]["auroc"]["value"], abs=1e-12), name
        assert study["auroc"] == pytest.approx(table["study"]["auroc"]["value"], abs=1e-12), name
        op = study["operating_point"]  # the table's study-level sensitivity / specificity at the threshold
        assert op["threshold"] == threshold
        assert op["tpr"] == pytest.approx(table["study"]["sensitivity"]["value"], abs=1e-12), name
        assert 1 - op["fpr"] == pytest.approx(table["study"]["specificity"]["value"], abs=1e-12), name
        # the marked point lies on the drawn curve: the ROC point of the lowest threshold >= t
        k = np.flatnonzero(study["thresholds"] >= threshold)[-1]
        assert (study["fpr"][k], study["tpr"][k]) == pytest.approx((op["fpr"], op["tpr"]))
    for f in got["files"]:
        w, h = _png(f)
        assert w > 300 and h > 300
    s = plots.summary(got)
    json.dumps(s)  # JSON-able: no arrays left
    assert s["roc_study"]["overall"]["auroc"] == got["roc_study"]["overall"]["auroc"]


def test_reliability_bins_count_every_image_once(tmp_path):
    p, y, _, _ = _data()
    p = np.r_[p, 0.0, 0.1, 1.0]  # the edges: 0 in the first bin, 0.1 in the second, 1 in the last
    y = np.r_[y, 0, 0, 1]
    b = plots.plot_reliability(y, p, tmp_path / "rel.png", n_bins=10)
    assert b["counts"].sum() == len(p) == b["n"]
    idx = np.minimum((p * 10 + 1e-9).astype(int), 9)  # independent binning
    np.testing.assert_array_equal(b["counts"], np.bincount(idx, minlength=10))
    for i in range(10):
        if b["counts"][i]:
            assert b["observed"][i] == pytest.approx(y[idx == i].mean())
            assert b["mean_predicted"][i] == pytest.approx(p[idx == i].mean())
        else:
            assert np.isnan(b["observed"][i])
    filled = b["counts"] > 0
    ece = np.sum(b["counts"][filled] * np.abs(b["observed"][filled] - b["mean_predicted"][filled])) / len(p)
    assert b["ece"] == pytest.approx(ece)
    _png(tmp_path / "rel.png")


def test_training_curves_read_the_log_and_a_resumed_step_is_taken_once(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "train/loss": 0.9, "train/lr": 0.1}, {"step": 2, "train/loss": 0.8},
            {"step": 2, "valid/study_auroc": 0.6, "valid/study_kappa": 0.1},
            {"step": 2, "train/loss": 0.7},  # resumed: step 2 logged again
            {"step": 3, "train/loss": 0.5}, {"step": 3, "valid/study_auroc": 0.7, "valid/study_kappa": float("nan")}]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = plots.plot_training_curves(log, tmp_path / "curves.png", best_step=3)
    assert sorted(drawn) == ["train/loss", "valid/study_auroc", "valid/study_kappa"]
    np.testing.assert_array_equal(drawn["train/loss"]["step"], [1, 2, 3])
    np.testing.assert_array_equal(drawn["train/loss"]["value"], [0.9, 0.7, 0.5])
    np.testing.assert_array_equal(drawn["valid/study_auroc"]["value"], [0.6, 0.7])
    _png(tmp_path / "curves.png")


def test_a_group_with_one_class_is_listed_not_drawn(tmp_path):
    got = plots.plot_roc({"overall": ([0, 1, 1], [0.1, 0.8, 0.4]), "XR_HAND": ([1, 1], [0.8, 0.4])},
                         tmp_path / "roc.png", threshold=0.5)
    assert got["overall"]["auroc"] == 1.0
    assert got["overall"]["operating_point"] == {"threshold": 0.5, "tpr": 0.5, "fpr": 0.0}
    assert "undefined" in got["XR_HAND"] and "fpr" not in got["XR_HAND"]
    _png(tmp_path / "roc.png")


def test_trainer_says_plots_are_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    from mskjax.train import classifier
    monkeypatch.setattr(plots, "_MISSING", "matplotlib is not installed (test)")
    classifier.write_plots(tmp_path, {}, 0.5)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "plots skipped: matplotlib is not installed" in out
    assert not (tmp_path / "plots").exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny classifier run (tests/train/tiny_config.py, 6 steps at 32 px) with a test split."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path_factory.mktemp("data") / "synthetic"
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(root), "--studies", "16",
                    "--seed", "0"], check=True, capture_output=True, env=env)
    wd = tmp_path_factory.mktemp("plots_run") / "run"
    out = subprocess.run([sys.executable, str(RUN_TRAIN), str(wd), str(root), "--config.eval.test_split=test"],
                         env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return wd, out.stdout


def test_trainer_writes_plots_that_match_its_results(tiny_run):
    wd, stdout = tiny_run
    assert f"plots in {wd / 'plots'}" in stdout
    names = {"training_curves.png"} | {f"{kind}_{split}_{level}.png" for split in ("valid", "test")
                                       for kind, level in (("roc", "image"), ("roc", "study"), ("reliability", "image"))}
    for name in names:
        w, h = _png(wd / "plots" / name)
        assert w > 300 and h > 300, name
    results = json.loads((wd / "results.json").read_text())
    summary = json.loads((wd / "plots" / "plots.json").read_text())
    assert summary["threshold"] == results["test"]["threshold"]
    for split in ("valid", "test"):
        rep, got = results[split], summary[split]
        for level in ("image", "study"):
            want = rep["overall"][level]["auroc"]["value"]
            assert got[f"roc_{level}"]["overall"]["auroc"] == pytest.approx(want, abs=1e-12), (split, level)
        assert got["roc_study"]["overall"]["operating_point"]["tpr"] == pytest.approx(
            rep["overall"]["study"]["sensitivity"]["value"])
        assert set(got["roc_image"]) == {"overall", *rep["by_body_part"]}
        assert sum(got["reliability_image"]["counts"]) == rep["overall"]["n_images"]
    assert summary["training_curves"]["series"] == ["train/loss", "valid/image_auroc", "valid/study_auroc",
                                                    "valid/study_kappa"]


def test_segment_report_shows_the_classification_plots(tmp_path, monkeypatch):
    """A labelled `mskjax.segment` run: index.html embeds the ROC and reliability figures, drawn from
    the arrays behind metrics.json's classification table."""
    import importlib.util

    from mskjax import segment
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline_for_plots", REPO / "tests" / "test_pipeline.py")
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    cls_dir, sam_dir = helpers.make_checkpoints(tmp_path / "ckpt", "resize", seed=3)
    root = helpers.make_synthetic(tmp_path / "syn")
    drawn = []
    draw = plots.classification_plots
    monkeypatch.setattr(plots, "classification_plots", lambda *a, **k: drawn.append(draw(*a, **k)) or drawn[-1])
    out = tmp_path / "out"
    rc = segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"synthetic:{root}",
                       "--out", str(out), "--batch", "8", "--bootstrap", "0"])
    assert rc == 0 and len(drawn) == 1
    table = json.loads((out / "metrics.json").read_text())["classification"]
    got = drawn[0]
    for level in ("image", "study"):
        assert got[f"roc_{level}"]["overall"]["auroc"] == pytest.approx(table["overall"][level]["auroc"]["value"],
                                                                        abs=1e-12)
    assert got["reliability_image"]["counts"].sum() == table["overall"]["n_images"]
    html = (out / "index.html").read_text()
    for f in got["files"]:
        rel = Path(f).relative_to(out).as_posix()
        assert f"<img src='{rel}'" in html, rel
        _png(out / rel)


def test_localization_curves_are_the_numbers_behind_maxboxacc_and_pxap(tmp_path):
    """localize's curve figure: the box-accuracy curves at the tune-chosen thresholds equal
    score_split's MaxBoxAccV2 entries, and the PR curve's area equals its PxAP."""
    from mskjax import localize
    rng = np.random.default_rng(3)
    maps, masks, boxes = [], [], []
    for i in range(12):
        mask = np.zeros((40, 48), bool)
        y, x = rng.integers(4, 28), rng.integers(4, 36)
        mask[y:y + 8, x:x + 10] = True
        m = rng.random((40, 48)) * 0.5
        m[y:y + 8, x:x + 10] += rng.random() * (1.0 if i % 3 else 0.2)  # some maps find it, some barely
        maps.append(m)
        masks.append(mask)
        boxes.append(np.array([[x, y, x + 10, y + 8]], np.float64))
    measures = localize.measure_maps(maps, masks, boxes)
    thr = localize.choose_thresholds(measures[:6])
    scored = localize.score_split(measures[6:], thr)
    data = localize.curve_data(measures[6:])
    drawn = plots.plot_localization_curves(data, tmp_path / "loc.png", chosen=thr.box)
    assert Image.open(tmp_path / "loc.png").size[0] > 0
    assert drawn["pxap"] == pytest.approx(scored["pxap"]["value"], abs=1e-12)
    t = data["box_thresholds"]
    for d, entry in scored["max_box_acc_v2"]["per_iou"].items():
        acc = drawn["box_accuracy"][float(d)]
        assert acc[int(np.argmin(np.abs(t - entry["threshold"])))] == pytest.approx(entry["accuracy"])
