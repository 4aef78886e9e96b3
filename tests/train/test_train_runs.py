"""Whole training runs in subprocesses: kill and resume, 1 vs 4 devices, 2 processes vs 1,
non-finite loss, a corrupted latest checkpoint. Tiny data (16 synthetic studies, 32 px ResNet18,
6 steps) so each run is mostly compile time."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util

HERE = Path(__file__).parent
REPO = HERE.parents[1]
RUN = [sys.executable, str(HERE / "run_train.py")]
TOTAL_STEPS = 6  # 26 training images // batch 8 = 3 steps x 2 epochs


def run(workdir, data, *extra, env=None, check=True):
    e = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run(RUN + [str(workdir), str(data), *extra], env=e, capture_output=True, text=True,
                         timeout=900, cwd=REPO)
    if check and out.returncode != 0:
        raise AssertionError(f"run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


def final_params(workdir, step=TOTAL_STEPS):
    import jax
    path = (Path(workdir) / "checkpoints" / str(step) / "state").absolute()
    ckptr = ocp.StandardCheckpointer()
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # restore any topology onto one device
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one), meta)
    tree = ckptr.restore(path, abstract)
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree["params"]).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    subprocess.run([sys.executable, "-m", "mskjax.data.synthetic", "--out", str(root), "--studies", "16",
                    "--seed", "0"], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return root


AUGMENT = "--config.data.augment=True"
# Device-count comparisons stop after 3 steps. Further on, float summation order (which differs
# between 1 and 4 devices) is amplified in leaves that start at zero: after 6 steps the BatchNorm
# biases (norm ~1e-3) differ by ~1e-3 relative while the losses still agree to 5e-5.
SHORT = ("--config.train.epochs=1",)
SHORT_STEPS = 3


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One uninterrupted run on one device, with augmentation (and the localization baseline)."""
    wd = tmp_path_factory.mktemp("ref") / "run"
    out = run(wd, data, AUGMENT, "--config.eval.subtract_normal_mean=True")
    assert "valid at step 6" in out.stdout
    # Quiet by default: no absl/Orbax INFO line (I1205 12:00:00.000 ...) in either stream.
    info = [l for l in (out.stdout + out.stderr).splitlines() if re.match(r"I\d{4} \d\d:\d\d", l)]
    assert not info, info[:5]
    return wd


@pytest.fixture(scope="module")
def reference_plain(tmp_path_factory, data):
    """One uninterrupted run on one device, no augmentation (for device-count comparisons)."""
    wd = tmp_path_factory.mktemp("ref_plain") / "run"
    run(wd, data, *SHORT)
    return wd


def test_reference_run_writes_everything(reference):
    assert (reference / "best" / "mskjax.json").is_file()
    assert (reference / "results.json").is_file()
    lines = (reference / "metrics.jsonl").read_text().splitlines()
    assert any('"train/loss"' in l for l in lines)
    assert sorted(int(p.name) for p in (reference / "checkpoints").iterdir() if p.name.isdigit())[-1] == TOTAL_STEPS


# Kill points: mid-write of the step-4 checkpoint (async write in flight), between step 2's update
# and its checkpoint, and inside the first validation pass (step 3, before its checkpoint).
KILLS = [("4", "after_save", 4), ("2", "before_save", 1), ("1", "during_eval", 2)]


@pytest.mark.parametrize("at, point, resume_step", KILLS, ids=[k[1] for k in KILLS])
def test_sigkill_and_resume_equals_uninterrupted(tmp_path, data, reference, at, point, resume_step):
    wd = tmp_path / "run"
    # Away from a write, synchronous checkpoints make "the last complete checkpoint" deterministic
    # (an earlier asynchronous write could still be in flight when the kill lands).
    sync = () if point == "after_save" else ("--config.checkpoint.async_writes=False",)
    killed = run(wd, data, AUGMENT, *sync, env={"MSKJAX_KILL_AT_STEP": at, "MSKJAX_KILL_POINT": point},
                 check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run(wd, data, AUGMENT)
    # after_save: the step-4 write may or may not have finished before the kill; either is fine.
    steps = (resume_step, resume_step - 1) if point == "after_save" else (resume_step,)
    assert any(f"resumed from the checkpoint at step {s}" in resumed.stdout for s in steps), resumed.stdout[-2000:]
    ref, got = final_params(reference), final_params(wd)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg="/".join(k))


def test_corrupted_latest_checkpoint_falls_back(tmp_path, data, reference):
    wd = tmp_path / "run"
    shutil.copytree(reference, wd)
    latest = wd / "checkpoints" / str(TOTAL_STEPS)
    for f in latest.rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "state" in f.parts:
            f.write_bytes(b"garbage")
    out = run(wd, data, AUGMENT)
    assert f"checkpoint at step {TOTAL_STEPS}" in out.stdout and "falling back" in out.stdout
    assert f"resumed from the checkpoint at step {TOTAL_STEPS - 1}" in out.stdout
    ref, got = final_params(reference), final_params(wd)
    for k in ref:
        np.testing.assert_array_equal(got[k], ref[k], err_msg="/".join(k))


def _close(a, b, what):
    for k in a:
        rel = np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(a[k]), 1e-12)
        assert rel <= 1e-5, f"{what}: {'/'.join(k)} relative difference {rel:.2e}"


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory, data):
    wd = tmp_path_factory.mktemp("dev4") / "run"
    out = run(wd, data, *SHORT, env={"MSKJAX_TEST_DEVICES": "4"})
    assert "devices: 4" in out.stdout
    return wd


def test_one_device_equals_four_devices(reference_plain, four_devices):
    _close(final_params(reference_plain, SHORT_STEPS), final_params(four_devices, SHORT_STEPS), "1 vs 4 devices")


def test_two_processes_equal_one_process(tmp_path, data, four_devices):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    wd = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MSKJAX_TEST_DEVICES": "2"}
    procs = [subprocess.Popen(RUN + [str(wd), str(data), f"--config.distributed.coordinator=127.0.0.1:{port}",
                                     "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}", *SHORT],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    report = "\n".join(f"--- process {i} (exit {p.returncode}) stdout:\n{o[-2000:]}\n--- stderr:\n{e[-3000:]}"
                       for i, (p, (o, e)) in enumerate(zip(procs, outs)))
    assert all(p.returncode == 0 for p in procs), report
    assert "devices: 4" in outs[0][0] and "processes: 2" in outs[0][0]
    assert "step 1/" not in outs[1][0]  # only process 0 logs
    _close(final_params(four_devices, SHORT_STEPS), final_params(wd, SHORT_STEPS), "2 processes x 2 devices vs 1 x 4")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data):
    wd = tmp_path / "run"
    out = run(wd, data, "--config.train.optimizer=sgd", "--config.train.learning_rate=1e30",
              "--config.train.grad_clip=0", "--config.train.warmup_epochs=0", check=False)
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    assert "non-finite loss" in out.stderr and "at step" in out.stderr
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    import re
    bad = int(re.search(r"non-finite loss \(\S+\) at step (\d+)", out.stderr).group(1))
    assert all(s < bad for s in steps)


def test_reference_run_reports_localization_with_chance(reference, data):
    """results.json carries the best checkpoint's pointing game on valid (lesion and evidence masks),
    each with its chance level, recomputed here from the masks themselves."""
    import json

    from mskjax import metrics
    from mskjax.data.mura import read_mura
    from mskjax.pipeline import read_mask
    from PIL import Image

    result = json.loads((reference / "results.json").read_text())
    records, _ = read_mura(str(data), "valid")
    abnormal = [r for r in records if r.label == 1 and r.mask_path]
    if not abnormal:
        pytest.skip("this tiny valid split has no abnormal image with a mask")
    loc = result["valid_localization"]
    assert loc["n_abnormal_with_mask"] == len(abnormal) and loc["method"] == "grad_cam"
    assert loc["baseline_subtracted"] and not result["valid_localization_raw"]["baseline_subtracted"]
    # The baseline the pipeline will subtract: valid's normal images' mean raw map, at layer4's
    # resolution (1 x 1 for a 32 px input), in the checkpoint's metadata.
    meta = json.loads((reference / "best" / "mskjax.json").read_text())["localization"]
    assert meta["method"] == "grad_cam" and meta["layer"] is None  # None: the last feature map (layer4)
    assert np.asarray(meta["baseline"]).shape == (1, 1) and np.isfinite(meta["baseline"]).all()
    assert meta["baseline_images"] == sum(r.label == 0 for r in records)
    for truth, path_of in (("lesion", lambda r: r.mask_path), ("evidence", lambda r: r.evidence_path)):
        masks = [read_mask(path_of(r), Image.open(r.path).size[::-1]) for r in abnormal]
        masks = [m for m in masks if m.any()]
        want = [np.mean([metrics.pointing_chance(m, t) for m in masks]) for t in (0.0, 15.0)]
        got = loc[truth]
        assert got["0px"]["n"] == len(masks)
        assert got["0px"]["chance"] == pytest.approx(want[0]) and got["15px"]["chance"] == pytest.approx(want[1])
        assert 0.0 <= got["0px"]["hit_rate"] <= got["15px"]["hit_rate"] <= 1.0


def test_resume_with_another_optimizer_is_refused_and_keeps_the_checkpoints(tmp_path, data):
    """A workdir resumed with a config whose state has another layout (here AdamW's two moments where
    SGD kept one): exit 2 naming the checkpoint and the leaf that differs; nothing is set aside as
    damaged and the original config still resumes."""
    wd = tmp_path / "run"
    run(wd, data, *SHORT)
    before = sorted(p.name for p in (wd / "checkpoints").iterdir())
    out = run(wd, data, "--config.train.epochs=2", "--config.train.optimizer=adamw", check=False)
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"checkpoint at step {SHORT_STEPS}" in out.stderr and "another layout" in out.stderr, out.stderr[-2000:]
    assert "opt_state" in out.stderr and "config.json" in out.stderr, out.stderr[-2000:]
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == before
    out = run(wd, data, "--config.train.epochs=2")
    assert f"resumed from the checkpoint at step {SHORT_STEPS}" in out.stdout
