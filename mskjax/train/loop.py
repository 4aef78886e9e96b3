"""The one training loop, shared by every kind of training (classifier, SAM), and its logging.

A kind of training hands `run` a `Task`: its jitted step, its batches, its evaluation and its
export. The loop owns what they share: resume from the latest run checkpoint, stop on a
non-finite loss naming the step and the last good checkpoint, log progress with an ETA (stdout,
WORKDIR/metrics.jsonl, TensorBoard), evaluate every `eval.every_epochs`, export the best model by
the task's validation score, checkpoint every `checkpoint.every_steps` (default: every epoch) with
the data position and the best so far.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import numpy as np
from jax.experimental import multihost_utils

from mskjax import distributed
from mskjax.train.run_checkpoints import RunCheckpoints, release_free_heap


class TrainingDiverged(RuntimeError):
    """The loss became non-finite; the message names the step and the last good checkpoint."""


# ---------------------------------------------------------------------------------------------
# Logging and host helpers

def log(msg: str) -> None:
    """Prints on the main process only."""
    if distributed.is_main_process():
        print(msg, flush=True)


def resident_mb() -> float | None:
    """This process's resident memory in MiB (Linux /proc; None where unavailable). Logged so that
    a long run shows a leak (tools/soak.py checks it)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def host(x) -> np.ndarray:
    """A (possibly multi-process) global array -> the full numpy array on every process."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def host_copy(tree):
    """A replicated pytree -> numpy on this host (its first addressable shard), for export."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else np.asarray(a),
                        tree)


def json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def tensorboard(workdir: Path):
    try:
        from tensorboardX import SummaryWriter  # optional: metrics.jsonl has the same numbers
    except ImportError:  # optional: metrics.jsonl carries the same numbers
        return None
    return SummaryWriter(str(workdir / "tb"))


def write_scalars(log_file, writer, step: int, values: dict) -> None:
    if log_file:
        log_file.write(json.dumps({"step": step, **values}) + "\n")
        log_file.flush()
    if writer:
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                writer.add_scalar(k, v, step)


def prepare_workdir(workdir: str | Path, config) -> Path:
    """WORKDIR as an absolute path, created with config.json on the main process."""
    workdir = Path(workdir).absolute()
    if distributed.is_main_process():
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    log(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), processes: {jax.process_count()}")
    return workdir


def write_results(workdir: Path, result: dict) -> None:
    if distributed.is_main_process():
        (workdir / "results.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n")


# ---------------------------------------------------------------------------------------------
# The loop

class Batches(Protocol):
    """The training data as the loop sees it: the next global batch, and a position to checkpoint."""

    def next(self) -> dict: ...

    def state(self) -> dict: ...


@dataclasses.dataclass
class Evaluation:
    """One validation pass: the score the best model is chosen by (higher is better, finite), what
    to remember of it with the best step, the log line, the scalars, and what to export."""

    score: float
    best: dict[str, Any]
    line: str
    scalars: dict[str, float]
    report: dict
    variables: Any


@dataclasses.dataclass
class Task:
    """A kind of training, as the loop runs it.

    state: the initial train state (replicated; "step" inside), replaced by a resumed one.
    train_step: jitted (state, batch) -> (state, metrics with "loss", "grad_norm" and any others).
    batches: data position (None: from the start) -> Batches.
    evaluate: state -> Evaluation on the validation split.
    export_best: (Evaluation, step) -> None; writes WORKDIR/best.
    best_key: name the best score is kept under in run checkpoints ("kappa", "dice").
    train_scalars: metrics (host floats) -> (text for the progress line, extra scalars).
    before_training: called once with the (possibly resumed) state before the first step.
    """

    state: Any
    train_step: Callable
    batches: Callable[[dict | None], Batches]
    evaluate: Callable[[Any], Evaluation]
    export_best: Callable[[Evaluation, int], None]
    best_key: str
    batch_size: int
    steps_per_epoch: int
    total_steps: int
    lr: Callable[[int], float]
    train_scalars: Callable[[dict], tuple[str, dict]] = lambda m: ("", {})
    before_training: Callable[[Any], None] | None = None
    on_error: Callable[[], None] | None = None


def run(task: Task, config, workdir: Path) -> tuple[Any, dict]:
    """Trains `task` to config.train's end (resuming from WORKDIR/checkpoints when a run was
    interrupted) and returns (final state, best {best_key: score, "step": step, ...})."""
    state = task.state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    ckpts = RunCheckpoints(workdir / "checkpoints", keep=config.checkpoint.keep,
                           async_writes=config.checkpoint.async_writes)
    data_state, best = None, {task.best_key: -math.inf, "step": -1}
    restored = ckpts.restore_latest(abstract, log=log)
    if restored is not None:
        step0, state, saved = restored
        data_state, best = saved["loader"], saved["best"]
        log(f"resumed from the checkpoint at step {step0} in {ckpts.directory}")

    batches = task.batches(data_state)
    writer = tensorboard(workdir) if distributed.is_main_process() else None
    log_file = open(workdir / "metrics.jsonl", "a") if distributed.is_main_process() else None
    step = int(host(state["step"]))
    total, per_epoch, bs = task.total_steps, task.steps_per_epoch, task.batch_size
    if task.before_training is not None and step < total:
        task.before_training(state)
    ckpt_every = config.checkpoint.every_steps or per_epoch
    t_window, n_window, last_saved = time.time(), 0, ckpts.latest_step()
    try:
        while step < total:
            state, m = task.train_step(state, batches.next())
            step += 1
            n_window += bs
            loss = float(host(m["loss"]))
            if not math.isfinite(loss):
                raise TrainingDiverged(
                    f"non-finite loss ({loss}) at step {step}; stopping. The last good checkpoint is "
                    f"{'step ' + str(last_saved) if last_saved is not None else 'none'} in {ckpts.directory}")
            if step % config.train.log_every == 0 or step == total:
                ckpts.poll()  # a finished checkpoint write: surface its error now
                # Free heap back to the OS at every log step, not only after checkpoints: what the
                # steps' temporaries and the loader threads free stays in glibc's per-thread arenas,
                # and without this the soak's resident memory wandered by tens of MB between
                # checkpoints (tools/soak.py). Costs milliseconds per log step.
                release_free_heap()
                now = time.time()
                ips = n_window / max(now - t_window, 1e-9)
                eta = (total - step) * bs / max(ips, 1e-9)
                text, extra = task.train_scalars({k: float(host(v)) for k, v in m.items()})
                log(f"step {step}/{total} epoch {step / per_epoch:.2f} loss {loss:.4f}{text} "
                    f"lr {float(task.lr(step)):.2e} {ips:.1f} img/s eta {fmt_time(eta)}")
                write_scalars(log_file, writer, step, {"train/loss": loss, "train/lr": float(task.lr(step)),
                                                       "train/images_per_s": ips,
                                                       "train/grad_norm": float(host(m["grad_norm"])), **extra})
                t_window, n_window = now, 0
            end_of_epoch = step % per_epoch == 0
            if (end_of_epoch and (step // per_epoch) % config.eval.every_epochs == 0) or step == total:
                ev = task.evaluate(state)
                release_free_heap()  # evaluation's buffers are freed by now
                log(f"valid at step {step}: {ev.line}")
                write_scalars(log_file, writer, step, ev.scalars)
                score = ev.score if math.isfinite(ev.score) else -1.0
                # .get: a run checkpoint written when the task kept its best under another key
                # (a map-prompt SAM before 2026-12-06's valid/map_dice) has no score under this one
                if score > best.get(task.best_key, -math.inf):
                    best = {task.best_key: score, "step": step, **ev.best}
                    ckpts.wait()  # one collective write at a time: the step checkpoint may still be in flight
                    task.export_best(ev, step)
                    release_free_heap()  # the export's host copy and Orbax buffers are freed by now
            if step % ckpt_every == 0 or step == total:
                ckpts.save(step, state, {"loader": batches.state(), "best": best})
                last_saved = step
    except BaseException:
        if task.on_error is not None:
            task.on_error()
        raise
    finally:
        ckpts.close()
        if log_file:
            log_file.close()
        if writer:
            writer.close()
    return state, best
