"""`python -m mskjax.segment` end to end on tiny random-weight checkpoints (synthetic dataset with a
corrupt file, FracAtlas images with unreadable inputs), its errors, and the demo's stage plan."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mskjax import pipeline
from mskjax import demo, inputs, segment

def _pipeline_helpers():
    """test_pipeline.py's checkpoint and data builders (tests/ is not a package: load by path)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_mskjax_test_pipeline", Path(__file__).with_name("test_pipeline.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_checkpoints = _pipeline_helpers().make_checkpoints
make_synthetic = _pipeline_helpers().make_synthetic


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("ckpt"), "resize", seed=3)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("data") / "syn")
    victim = sorted((root / "test").rglob("*.png"))[-1]  # a normal study's image
    victim.write_bytes(victim.read_bytes()[:200])  # truncated: unreadable, must be reported
    return root, victim


def _rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dataset_run_writes_every_output(ckpts, synthetic, tmp_path, capsys):
    cls_dir, sam_dir = ckpts
    root, victim = synthetic
    out = tmp_path / "out"
    rc = segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"synthetic:{root}",
                       "--out", str(out), "--threshold", "0.0", "--batch", "8", "--bootstrap", "20"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "images" in err and "img/s" in err  # the progress bar
    n_images = len(open(root / "test_image_paths.csv").read().split())
    rows = _rows(out / "predictions.csv")
    m = json.loads((out / "metrics.json").read_text())
    assert len(rows) == n_images - 1 == m["counts"]["processed"]
    assert m["counts"]["unreadable"] == 1 and m["unreadable"][0]["path"] == str(victim)
    assert "ImageDecodeError" in m["unreadable"][0]["reason"]
    html = (out / "index.html").read_text()
    assert str(victim) in html and "Classification" in html and "<script" not in html

    # Threshold 0: every image is judged abnormal and gets its box; study decisions are means.
    assert all(r["predicted"] == "1" for r in rows) and all(r["boxes"] for r in rows)
    by_study: dict = {}
    for r in rows:
        by_study.setdefault(r["study"], []).append(float(r["probability"]))
    for r in rows:
        assert float(r["study_probability"]) == pytest.approx(np.mean(by_study[r["study"]]), abs=1e-5)

    # Masks at original size; mask areas in the CSV match the PNGs; overlays and thumbnails exist.
    for r in rows:
        mask = np.asarray(Image.open(out / "masks" / f"{r['name']}.png"))
        assert mask.shape == Image.open(r["path"]).size[::-1]
        assert int((mask > 0).sum()) == int(r["mask_area"])
        assert (out / "overlays" / f"{r['name']}.png").is_file() and (out / "thumbs" / f"{r['name']}.png").is_file()

    # Ground truth: the abnormal study's images carry masks and boxes, so every measure is there.
    abnormal = [r for r in rows if r["label"] == "1"]
    assert abnormal and all(r["dice"] and r["dice_gt_box"] and r["box_iou"] and r["pointing_hit"] for r in abnormal)
    assert m["segmentation"]["dice_gt_boxes"]["n"] == len(abnormal) == m["segmentation"]["dice_cam_boxes"]["n"]
    assert m["segmentation"]["dice_cam_boxes"]["mean"] == pytest.approx(np.mean([float(r["dice"]) for r in abnormal]), abs=1e-5)
    assert m["localization"]["pointing_game"]["n"] == len(abnormal)
    assert m["localization"]["pointing_game_15px"]["accuracy"] == pytest.approx(
        np.mean([int(r["pointing_hit_15px"]) for r in abnormal]), abs=1e-9)
    assert all(0 <= float(r["peak_x"]) <= Image.open(r["path"]).size[0] for r in rows)
    cls = m["classification"]["overall"]
    assert cls["n_images"] == n_images - 1 and cls["n_studies"] == len(by_study)
    assert m["settings"]["pipeline"]["cam"] == "grad_cam" and m["settings"]["classifier_input"]["mode"] == "resize"


def test_study_gate_and_peak_choice_from_the_command_line(ckpts, synthetic, tmp_path):
    cls_dir, sam_dir = ckpts
    root, victim = synthetic
    out = tmp_path / "out"
    plain = tmp_path / "plain"
    common = ["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"synthetic:{root}", "--batch", "8",
              "--bootstrap", "0", "--no-progress"]
    assert segment.main([*common, "--out", str(plain)]) == 0
    rows = _rows(plain / "predictions.csv")
    # A threshold between the study probabilities, so that both kinds of study are there.
    thr = float(np.median(sorted({float(r["study_probability"]) for r in rows})))
    assert segment.main([*common, "--out", str(out), "--gate", "study", "--threshold", f"{thr}", "--peaks", "2",
                         "--choose", "confidence", "--map-points", "peak_negative", "--negative-points", "3"]) == 0
    rows = _rows(out / "predictions.csv")
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["pipeline"]["gate"] == "study" and m["settings"]["pipeline"]["peaks"] == 2
    assert m["settings"]["pipeline"]["map_points"] == "peak_negative" and m["settings"]["pipeline"]["negative_points"] == 3
    assert {r["predicted"] for r in rows} == {"0", "1"}
    for r in rows:  # masks follow the study's decision, not the image's own probability
        assert r["predicted"] == r["study_predicted"] == str(int(float(r["study_probability"]) >= thr))
        assert (len([b for b in r["boxes"].split(";") if b]) == 1) == (r["predicted"] == "1")
        if r["predicted"] == "0":
            assert r["mask_area"] == "0"
    assert segment.main([*common, "--out", str(tmp_path / "x"), "--peaks", "2"]) == 2
    assert segment.main([*common, "--out", str(tmp_path / "y"), "--boxes", "threshold", "--map-points", "negative"]) == 2


def test_images_run_with_threshold_boxes_and_unreadable_files(ckpts, shared_data, tmp_path):
    cls_dir, sam_dir = ckpts
    frac = sorted((shared_data / "fracatlas" / "images").iterdir())[:2]
    truncated = shared_data / "quirks" / "truncated.jpg"
    out = tmp_path / "out"
    rc = segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--images", *map(str, frac), str(truncated),
                       str(tmp_path / "missing.png"), "--out", str(out), "--boxes", "threshold", "--max-boxes", "2",
                       "--cam", "grad_cam_plus_plus", "--threshold", "0.0", "--batch", "2", "--probability-flips", "h", "--no-progress"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["counts"] == {**m["counts"], "inputs": 4, "processed": 2, "unreadable": 2}
    assert m["settings"]["pipeline"]["probability_flips"] == "h"
    assert {u["path"] for u in m["unreadable"]} == {str(truncated), str(tmp_path / "missing.png")}
    assert m["classification"] is None and "no labels" in m["classification_note"]
    rows = _rows(out / "predictions.csv")
    assert [r["path"] for r in rows] == [str(p) for p in frac]
    for r in rows:
        boxes = [list(map(float, b.split())) for b in r["boxes"].split(";") if b]
        assert 1 <= len(boxes) <= 2 and r["label"] == "" and r["dice"] == ""
        w, h = Image.open(r["path"]).size
        assert all(0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h for b in boxes)
    assert m["settings"]["pipeline"]["boxes"] == "threshold"


def test_errors_name_the_path(ckpts, tmp_path, capsys):
    cls_dir, sam_dir = ckpts
    missing = tmp_path / "no_such_checkpoint"
    args = ["--images", str(tmp_path), "--out", str(tmp_path / "o")]
    (tmp_path / "x.png").write_bytes(b"")
    assert segment.main(["--classifier", str(missing), "--sam", str(sam_dir), *args]) == 2
    assert str(missing) in capsys.readouterr().err
    assert segment.main(["--classifier", str(sam_dir), "--sam", str(sam_dir), *args]) == 2
    err = capsys.readouterr().err
    assert str(sam_dir) in err and "not a classifier" in err
    assert segment.main(["--classifier", str(cls_dir), "--sam", str(cls_dir), *args]) == 2
    assert "not a SAM" in capsys.readouterr().err
    assert segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), *args, "--choose", "deletion",
                         "--choice-scales", "1,half"]) == 2
    assert "--choice-scales '1,half'" in capsys.readouterr().err
    assert segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), *args, "--choose", "deletion",
                         "--boxes", "threshold"]) == 2
    assert "needs boxes='peak'" in capsys.readouterr().err
    assert segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", "kaggle:/x",
                         "--out", str(tmp_path / "o")]) == 2
    assert "--dataset must be" in capsys.readouterr().err
    assert segment.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"mura:{missing}",
                         "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_dataset_spec_and_names(tmp_path):
    (tmp_path / "d").mkdir()
    assert inputs.parse_dataset(f"synthetic:{tmp_path / 'd'}") == ("synthetic", str(tmp_path / "d"), "test")
    assert inputs.parse_dataset(f"mura:{tmp_path / 'd'}:train") == ("mura", str(tmp_path / "d"), "train")
    assert inputs.parse_dataset(f"fracatlas:{tmp_path / 'd'}")[2] == "valid"
    a = segment.output_name(3, "/x/train/XR_HAND/patient1/study1_positive/image1.png")
    assert a == "0003_XR_HAND_patient1_study1_positive_image1"
    items, skips = inputs.items_from_paths([str(tmp_path)])
    assert items == [] and len(skips) == 1 and skips[0][0] == str(tmp_path) and "no image file" in skips[0][1]


def test_demo_plan_skips_finished_stages(tmp_path, capsys):
    stages = {s.name: s for s in demo.plan(tmp_path)}
    assert list(stages) == ["data", "classifier", "sam", "segment"]
    assert not any(s.done for s in stages.values())
    assert stages["classifier"].command[1:4] == ["-m", "mskjax.train", "--config"]
    assert f"--config.data.root={tmp_path / 'data'}" in stages["classifier"].command
    seg = stages["segment"].command
    assert seg[seg.index("--dataset"):seg.index("--dataset") + 4] == [
        "--dataset", f"synthetic:{tmp_path / 'data'}:test", "--out", str(tmp_path / "segment")]
    # The segment stage uses the map the classifier's config localizes with.
    config = demo._load_config(demo.CLASSIFIER_CONFIG)
    assert seg[seg.index("--cam") + 1] == config.eval.cam_method
    assert seg[seg.index("--cam-layer") + 1] == config.eval.cam_layer
    # ... with the map-derived box and refine pass chosen on valid for the SAM the demo trains
    assert float(seg[seg.index("--box-side") + 1]) == demo.MAP_BOX_OF_INPUT * config.data.image_size
    assert seg[seg.index("--refine") + 1] == str(demo.REFINE_PASSES)
    if demo.SAM_CONFIG.is_file():
        from mskjax.train.config import validate_sam
        sc = demo._load_config(demo.SAM_CONFIG)
        validate_sam(sc, 1)
        assert sc.data.map_prompts  # the demo's SAM also learns its classifier's own map prompts ...
        sam_cmd = stages["sam"].command
        assert f"--config.data.map_prompts={tmp_path / 'classifier' / 'best'}" in sam_cmd
        for flag, field in (("--cam", "map_cam"), ("--cam-layer", "map_cam_layer"), ("--box-side", "map_box_side"),
                            ("--map-flips", "map_flips")):
            assert f"--config.data.{field}={seg[seg.index(flag) + 1]}" in sam_cmd  # ... as the segment stage draws them
        assert seg[seg.index("--map-flips") + 1] == config.eval.map_flips  # the classifier config's map
        assert ("--mirror-average" in seg) == demo.MIRROR_AVERAGE
        assert seg[seg.index("--probability-flips") + 1] == demo.PROBABILITY_FLIPS
        assert seg[seg.index("--gate") + 1] == demo.GATE
    if demo.SAM_CONFIG.is_file():
        assert stages["sam"].missing == ""
        # the SAM stage must ask for the very dataset the data stage writes, or the run refuses it
        data_cmd = stages["data"].command
        for flag, field in (("--studies", "synthetic_studies"), ("--seed", "synthetic_seed"),
                            ("--abnormality-scale", "synthetic_abnormality_scale"),
                            ("--conspicuity", "synthetic_conspicuity"), ("--parts", "synthetic_parts")):
            value = data_cmd[data_cmd.index(flag) + 1]
            assert f"--config.data.{field}={value}" in stages["sam"].command, (flag, stages["sam"].command)
        # ... and keeps about the SAM config's own step count on the larger classifier dataset
        assert demo.sam_epochs(7, 700, 2000) == 2 and demo.sam_epochs(7, 700, 700) == 7
        assert demo.sam_epochs(3, 100, 9000) == 1
    else:
        assert "sam_synthetic.py does not exist" in stages["sam"].missing
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic.json").write_text("{}")
    (tmp_path / "classifier" / "best").mkdir(parents=True)
    (tmp_path / "classifier" / "best" / "mskjax.json").write_text("{}")
    stages = {s.name: s for s in demo.plan(tmp_path)}
    assert stages["data"].done and stages["classifier"].done and not stages["sam"].done
    assert demo.main(["--workdir", str(tmp_path), "--dry-run"]) == 0
    assert "done (skipped)" in capsys.readouterr().out


def test_demo_summary_reads_the_segment_metrics(tmp_path):
    seg = tmp_path / "segment"
    seg.mkdir()
    st = {"auroc": {"value": 0.97}, "kappa": {"value": 0.81}}
    (seg / "metrics.json").write_text(json.dumps({
        "counts": {"processed": 10, "studies": 4, "unreadable": 0},
        "classification": {"overall": {"study": st}},
        "localization": {"pointing_game": {"accuracy": 0.5, "n": 4}},
        "segmentation": {"dice_gt_boxes": {"mean": 0.7, "n": 4}, "dice_cam_boxes": {"mean": None, "n": 0}}}))
    text = demo.summary(tmp_path)
    assert "0.9700" in text and "0.8100" in text and "0.7000" in text and "n/a" in text


def test_fracatlas_tune_split_is_the_trainers_carved_valid(shared_data):
    """fracatlas:DIR:tune names exactly the images mskjax.train validates on (never trained on)."""
    from mskjax.data.splits import load_splits
    from mskjax.train.config import base_config
    root = str(shared_data / "fracatlas")
    items, _, desc = inputs.items_from_dataset(f"fracatlas:{root}:tune")
    data = base_config().data
    data.dataset, data.root = "fracatlas", root
    splits = load_splits(data, seed=0)
    assert [i.path for i in items] == [r.path for r in splits.records["valid"]]
    assert not {i.path for i in items} & {r.path for r in splits.records["train"]}
    assert "'tune'" in desc and 0 < len(items) < len(splits.records["train"])


def test_cli_box_options_parse():
    a = segment.build_parser().parse_args(["--classifier", "c", "--sam", "s", "--images", "x.png", "--out", "o",
                                           "--box-side", "56", "--box-fraction", "0.3", "--truth", "evidence"])
    assert (a.box_side, a.box_fraction, a.truth) == (56.0, 0.3, "evidence")
    d = segment.build_parser().parse_args(["--classifier", "c", "--sam", "s", "--images", "x.png", "--out", "o"])
    assert (d.box_side, d.box_fraction, d.truth, d.probability_flips) == (None, 0.5, "lesion", "none")


def test_default_cam_comes_from_the_classifiers_training_run():
    trained = {"localization": {"method": "layer_cam", "layer": "layer2"}}
    assert pipeline.default_cam(trained, None, None) == ("layer_cam", "layer2")
    assert pipeline.default_cam(trained, None, "layer3") == ("layer_cam", "layer3")  # the user's layer wins
    assert pipeline.default_cam(trained, "grad_cam", None) == ("grad_cam", None)  # the user's method wins
    assert pipeline.default_cam({}, None, None) == ("grad_cam", None)  # older checkpoints: the report's map
    assert pipeline.default_cam({"localization": {"method": "nope"}}, None, None) == ("grad_cam", None)
    # ... and so do its map's flips, when the map is the run's own
    flipped = {"localization": {"method": "layer_cam", "layer": "layer2", "map_flips": "hv"}}
    assert pipeline.default_map_flips(flipped, None, None) == "hv"
    assert pipeline.default_map_flips(flipped, None, "h") == "h"  # the user's flips win
    assert pipeline.default_map_flips(flipped, "grad_cam", None) == "none"  # another map: unflipped
    assert pipeline.default_map_flips(trained, None, None) == "none"  # recorded before flips existed


def test_an_empty_folder_is_reported_not_dropped(tmp_path, capsys):
    """issue 22, part 5: a folder with no image in it is named with its reason."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    assert segment.main(["--classifier", str(tmp_path / "c"), "--sam", str(tmp_path / "s"), "--images", str(empty),
                         str(tmp_path / "notes"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{empty}: folder holds no image file" in err and "it is empty" in err
    assert "1 other file(s) ignored" in err


def test_gallery_order_by_dice_when_there_is_ground_truth_else_by_probability():
    from types import SimpleNamespace as NS
    results = [NS(probability=p) for p in (0.2, 0.9, 0.5, 0.7)]
    order, key = segment.gallery_order(results, [{}, {}, {}, {}])
    assert order == [1, 3, 2, 0] and "probability" in key
    measures = [{"dice": 0.8}, {}, {"dice": 0.1}, {"dice": 0.5}]
    order, key = segment.gallery_order(results, measures)
    assert order == [2, 3, 0, 1] and "Dice" in key
