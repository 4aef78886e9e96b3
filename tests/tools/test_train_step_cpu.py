"""tools/train_step_cpu.py: its variants are what they say (the "before" form really is the old
BatchNorm and max pool, traced apart), and a tiny run writes its JSON."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "train_step_cpu.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("train_step_cpu", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_before_form_is_traced_apart_and_gives_the_same_loss(tool):
    j = tool.jax_calls("resnet18", 32, 2, before=True, parts=["full step", "forward + backward"],
                       options=["ynnpack", "eigen"])
    assert len(j["calls"]) == 8
    new, old = "mskjax full step, ynnpack", "mskjax full step, ynnpack [before]"
    # The old BatchNorm backward and reduce_window max pool lower to other HLO than the new ones.
    assert j["hlo_lines"][new] != j["hlo_lines"][old]
    for name, loss in j["loss"].items():
        assert math.isfinite(loss)
        # 1e-3: BatchNorm over 2 samples in layer4 (batch 2 at 1 x 1) magnifies rounding.
        assert abs(loss - j["loss"][new]) <= 1e-3 * max(1.0, abs(loss)), name
    # The layers are restored after the "before" trace.
    from mskjax.models import layers, resnet
    assert layers.batch_norm_train.__name__ == "batch_norm_train" and resnet.max_pool is layers.max_pool


def test_tiny_run_writes_json(tool, tmp_path):
    out = tmp_path / "r.json"
    assert tool.main(["--models", "resnet18@32", "--batch", "2", "--rounds", "1", "--parts", "full",
                      "--options", "eigen", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    med = r["results"][0]["median_s"]
    assert set(med) == {"mskjax full step, eigen", "torch full step, NCHW", "torch full step, channels_last"}
    assert all(v > 0 for v in med.values())
    with pytest.raises(SystemExit):
        tool.main(["--models", "resnet7@32"])
