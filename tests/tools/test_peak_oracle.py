"""tools/peak_oracle.py end to end on tiny random-weight checkpoints and the tests' synthetic data."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).parents[2] / "tools"
sys.path.insert(0, str(TOOLS))  # the tool imports its sibling probe_record


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peak_oracle = _load("peak_oracle", TOOLS / "peak_oracle.py")
helpers = _load("_mskjax_test_pipeline_oracle", Path(__file__).parents[1] / "test_pipeline.py")


def test_peak_oracle_scores_each_peak_and_the_best_is_at_least_the_first(tmp_path):
    cls_dir, sam_dir = helpers.make_checkpoints(tmp_path / "ckpt", "resize", seed=5)
    root = helpers.make_synthetic(tmp_path / "syn")
    out = tmp_path / "oracle.json"
    assert peak_oracle.main(["--classifier", str(cls_dir), "--sam", str(sam_dir), "--dataset", f"synthetic:{root}:test",
                             "--cam", "grad_cam", "--cam-layer", "", "--map-flips", "h", "--box-side", "16",
                             "--peaks", "3", "--peak-separation", "0.25", "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["n"] > 0 and rec["peaks"] == 3 and len(rec["mean_dice_by_peak"]) == 3
    assert rec["images_with_peak"][0] == rec["n"]  # the first peak always exists
    assert rec["mean_dice_best_peak"] >= rec["mean_dice_by_peak"][0] - 1e-4
    assert 0 <= rec["images_best_not_first"] <= rec["n"]
    assert all(0.0 <= d <= 1.0 for d in rec["mean_dice_by_peak"] if not np.isnan(d))
