"""Faults while running: a full disk during a checkpoint write, and a process of a two-process run
dying. (SIGKILL during training and a corrupted latest checkpoint are covered by
tests/train/test_train_runs.py: test_sigkill_and_resume_equals_uninterrupted and
test_corrupted_latest_checkpoint_falls_back.)"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import etils.epath
import jax
import numpy as np
import pytest

from mskjax import distributed
from mskjax.train.run_checkpoints import CheckpointLayoutError, CheckpointWriteError, RunCheckpoints, layout_difference

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("psum_worker.py")
HEARTBEAT_S = 5
SURVIVOR_LIMIT_S = 60


# ------------------------------------------------------------------------------- full disk


def _state(offset: float) -> dict:
    return {"dense": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4) + offset,
                      "bias": np.full((4,), offset, np.float32)},
            "step": np.asarray(int(offset), np.int32)}


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _fill_disk(monkeypatch) -> list[str]:
    """Every Python-level file write of Orbax (metadata, JSON items) raises ENOSPC; returns the
    paths it refused, so the test can check the fault was really hit."""
    refused: list[str] = []

    def full(self, *args, **kwargs):
        refused.append(str(self))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(etils.epath.Path, "write_text", full)
    monkeypatch.setattr(etils.epath.Path, "write_bytes", full)
    return refused


@pytest.mark.parametrize("async_writes", [True, False], ids=["async", "sync"])
def test_full_disk_while_checkpointing_keeps_previous(tmp_path, monkeypatch, async_writes):
    directory = tmp_path / "checkpoints"
    ckpts = RunCheckpoints(directory, keep=3, async_writes=async_writes)
    ckpts.save(1, _state(1.0), {"loader": {"epoch": 0, "position": 4}})
    ckpts.wait()
    before = _digest(directory / "1")

    with monkeypatch.context() as m:
        refused = _fill_disk(m)
        with pytest.raises(CheckpointWriteError) as info:
            ckpts.save(2, _state(2.0), {"loader": {"epoch": 1, "position": 8}})
            ckpts.wait()  # an asynchronous write reports here
    assert refused, "the simulated full disk was never hit"
    err = info.value
    assert err.errno == errno.ENOSPC and err.step == 2
    message = str(err)
    assert "step 2" in message and "full" in message and str(directory) in message, message
    assert "newest complete checkpoint, step 1, is untouched" in message, message

    # The previous checkpoint: byte for byte as before, and a fresh run restores it without falling back.
    assert _digest(directory / "1") == before
    warnings: list[str] = []
    fresh = RunCheckpoints(directory, keep=3)
    step, state, data = fresh.restore_latest(_abstract(_state(0.0)), log=warnings.append)
    assert step == 1 and data == {"loader": {"epoch": 0, "position": 4}} and not warnings, warnings
    jax.tree.map(np.testing.assert_array_equal, state, _state(1.0))

    # Space freed: the resumed run checkpoints again and that restores. (A real restart is a new
    # process and rewrites step 2; in this process the failed asynchronous write's array writers may
    # still be finishing inside 2.orbax-checkpoint-tmp, so the async case writes step 3 instead of
    # racing them for that directory.)
    next_step = 3 if async_writes else 2
    fresh.save(next_step, _state(float(next_step)), {"loader": {"epoch": 1, "position": 8}})
    fresh.close()
    step, state, _ = RunCheckpoints(directory, keep=3).restore_latest(_abstract(_state(0.0)))
    assert step == next_step
    jax.tree.map(np.testing.assert_array_equal, state, _state(float(next_step)))


def test_poll_confirms_a_finished_write_and_surfaces_a_failed_one(tmp_path, monkeypatch):
    """poll() never blocks on a write in flight; once the write has ended it confirms it (releasing
    its freed heap) or raises the write's CheckpointWriteError, as wait() would."""
    import mskjax.train.run_checkpoints as rc
    released = []
    monkeypatch.setattr(rc, "release_free_heap", lambda: released.append(1) or True)
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=3, async_writes=True)
    in_progress = {"value": True}
    monkeypatch.setattr(ckpts.manager, "is_saving_in_progress", lambda: in_progress["value"])

    ckpts.save(1, _state(1.0), {})
    ckpts.poll()  # "still writing": returns at once, nothing confirmed
    assert ckpts._in_flight == 1
    in_progress["value"] = False
    ckpts.poll()
    assert ckpts._in_flight is None and released  # (Orbax's finalize callback may release too)
    count = len(released)
    ckpts.poll()  # nothing in flight: a no-op
    assert len(released) == count

    with monkeypatch.context() as m:
        _fill_disk(m)
        ckpts.save(2, _state(2.0), {})
        with pytest.raises(CheckpointWriteError, match="step 2"):
            ckpts.poll()
    assert RunCheckpoints(tmp_path / "checkpoints", keep=3).latest_step() == 1


def test_full_disk_on_first_checkpoint_says_none_exists(tmp_path, monkeypatch):
    ckpts = RunCheckpoints(tmp_path / "checkpoints", keep=2, async_writes=False)
    _fill_disk(monkeypatch)
    with pytest.raises(CheckpointWriteError, match=r"step 7 .*full.*no complete checkpoint exists yet"):
        ckpts.save(7, _state(7.0), {})


def test_checkpoint_of_another_layout_is_named_not_set_aside(tmp_path):
    """Restoring into a state of another layout (an extra leaf, a leaf of another shape) raises
    CheckpointLayoutError naming the step and the leaf; the checkpoint is not renamed as damaged and
    still restores into its own layout."""
    directory = tmp_path / "checkpoints"
    ckpts = RunCheckpoints(directory, keep=3, async_writes=False)
    ckpts.save(4, _state(4.0), {"loader": {"epoch": 1}})
    ckpts.close()

    wider = _state(0.0)
    wider["dense"]["kernel"] = np.zeros((3, 5), np.float32)
    extra = dict(_state(0.0), ema={"kernel": np.zeros((3, 4), np.float32)})
    for other, leaf in ((wider, "['dense']['kernel']: shape (3, 4) stored, (3, 5)"), (extra, "arrays stored")):
        with pytest.raises(CheckpointLayoutError, match=r"step 4 .*another layout") as info:
            RunCheckpoints(directory, keep=3).restore_latest(_abstract(other))
        assert leaf in str(info.value), str(info.value)
    assert sorted(p.name for p in directory.iterdir()) == ["4"]
    step, state, data = RunCheckpoints(directory, keep=3).restore_latest(_abstract(_state(0.0)))
    assert step == 4 and data == {"loader": {"epoch": 1}}
    jax.tree.map(np.testing.assert_array_equal, state, _state(4.0))
    assert layout_difference(jax.tree.map(lambda x: x, _abstract(_state(0.0))), _abstract(_state(1.0))) is None


# ------------------------------------------------------------------------- a process dies


def test_heartbeat_timeout_is_validated(monkeypatch):
    monkeypatch.setenv(distributed.HEARTBEAT_ENV, "soon")
    with pytest.raises(ValueError, match=distributed.HEARTBEAT_ENV):
        distributed.initialize("127.0.0.1:1", 2, 0)
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        distributed.initialize("127.0.0.1:1", 2, 0, heartbeat_timeout_s=0)


class _Lines:
    """Collects a process's merged stdout/stderr on a thread, so neither pipe can fill and block it."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.text: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc):
        for line in proc.stdout:
            self.text.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                return False
            if line is None:
                return False
            if line.startswith(prefix):
                return True
        return False

    def all(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.text)


# What the survivor says about the process it lost: the coordinator (process 0) names the task that
# stopped sending heartbeats; process 1 loses the coordination service itself, which lives in
# process 0 ("the leader").
LOST_PROCESS_MESSAGE = {
    1: r"Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b",
    0: r"leader task was preempted/died",
}


@pytest.mark.parametrize("victim,when", [(1, "step 40"), (0, "step 40"), (1, "initialised")],
                         ids=["worker-dies-in-collective", "coordinator-dies-in-collective",
                              "worker-dies-after-init"])
def test_survivor_exits_with_error_when_the_other_process_dies(victim, when):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(HEARTBEAT_S)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
             for i in range(2)]
    outs = [_Lines(p) for p in procs]
    survivor = 1 - victim
    try:
        assert outs[victim].wait_for(when, timeout=120), (
            f"process {victim} never printed {when!r}:\n{outs[victim].all()[-3000:]}")
        os.kill(procs[victim].pid, signal.SIGKILL)
        try:
            rc = procs[survivor].wait(timeout=SURVIVOR_LIMIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {survivor} still running {SURVIVOR_LIMIT_S} s after process {victim} was "
                        f"killed (heartbeat timeout {HEARTBEAT_S} s):\n{''.join(outs[survivor].text)[-3000:]}")
        text = outs[survivor].all()
        assert rc != 0, f"the survivor exited 0 although process {victim} died:\n{text[-3000:]}"
        assert re.search(LOST_PROCESS_MESSAGE[victim], text), (
            f"the survivor's output does not name the lost process {victim}:\n{text[-3000:]}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
