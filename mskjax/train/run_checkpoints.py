"""Training-run checkpoints: the full train state plus the data iterator's position, the last N
kept, written asynchronously and collectively (every process calls save/restore).

A checkpoint that cannot be restored (half-written, corrupted) is reported and the previous one is
tried, so a crash during a write never costs more than the steps since the checkpoint before it.
A write that fails (full disk, permissions, I/O error) raises `CheckpointWriteError` naming the
step, the directory and the newest complete checkpoint, which the failed write never touches.
A checkpoint whose state has another layout than the run resuming it (another architecture,
optimizer, EMA on or off) is not damaged: `CheckpointLayoutError` names the first leaf
that differs and leaves the checkpoints as they are.
"""
from __future__ import annotations

import ctypes
import errno
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from mskjax import distributed


def _load_malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent from musl and macOS
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _load_malloc_trim()


def release_free_heap() -> bool:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim(0)`); False where unavailable.

    Why: a checkpoint write copies the whole train state to host memory and encodes it in
    TensorStore's threads. glibc gives freed memory back to the OS only from the top of each
    heap, so the holes that copy leaves between longer-lived allocations stay resident and add up
    write after write (the soak in tools/soak.py measured this as most of its growth, with the
    memory actually in use flat). `malloc_trim(0)` releases every whole free page in all arenas
    (madvise), which costs milliseconds per checkpoint."""
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


class CheckpointWriteError(OSError):
    """A training checkpoint could not be written. `errno` is the cause's (ENOSPC for a full disk)
    when it had one; `step` is the step whose write failed. Earlier checkpoints are untouched."""

    def __init__(self, code: int | None, message: str, step: int | None):
        super().__init__(*((code, message) if code is not None else (message,)))
        self.step = step


class CheckpointLayoutError(ValueError):
    """The newest checkpoint holds a state of another layout than the one this run builds."""


def layout_difference(stored: Any, abstract: Any) -> str | None:
    """None when `stored` (a checkpoint's tree metadata) has `abstract`'s leaves: the same number,
    the same shapes in flattening order. Else what differs: the counts when they differ, and the
    first leaf (by `abstract`'s path) whose shape differs or that has no counterpart."""
    have = [tuple(getattr(leaf, "shape", ()) or ()) for leaf in jax.tree.leaves(stored)]
    paths = jax.tree_util.tree_flatten_with_path(abstract)[0]
    first = None
    for i, (path, leaf) in enumerate(paths):
        if i >= len(have) or have[i] != tuple(leaf.shape):
            got = f"shape {have[i]}" if i < len(have) else "nothing"
            first = f"{jax.tree_util.keystr(path)}: {got} stored, {tuple(leaf.shape)} in this run's state"
            break
    if first is None and len(have) == len(paths):
        return None
    counts = f"{len(have)} arrays stored, {len(paths)} in this run's state"
    if len(have) == len(paths):
        return first
    return counts + (f"; first difference {first}" if first else "")


class RunCheckpoints:
    def __init__(self, directory: str | Path, keep: int, async_writes: bool = True):
        self.directory = Path(directory).absolute()
        self._in_flight: int | None = None  # step of an asynchronous write not yet confirmed
        self._async_writes = async_writes
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_writes, create=True,
                # At the end of each write, hand the pages its buffers used back (see release_free_heap).
                async_options=ocp.AsyncOptions(post_finalization_callback=release_free_heap) if async_writes else None))

    def save(self, step: int, state: Any, data_state: dict) -> None:
        """Starts writing `step` (returns before the write ends when asynchronous).

        Raises CheckpointWriteError when this write, or the previous asynchronous one (which
        Orbax finishes first anyway), fails; the message names the failed step."""
        self.wait()
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            data=ocp.args.JsonSave(data_state)), force=True)
        except Exception as e:  # OSError from Python writes, ValueError & co. from TensorStore
            raise self._write_error(step, e) from e
        self._in_flight = step
        if not self._async_writes:
            self.wait()  # the write has ended: confirm it and release its memory now

    def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores cleanly, or None.

        Each one that fails is named with the reason before falling back to the one before it."""
        self.wait()
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            self._check_layout(step, abstract_state)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # damaged files raise many types (ValueError, OSError, TensorStore errors)
                aside = self._set_aside(step)
                log(f"warning: checkpoint at step {step} in {self.directory} cannot be restored "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); moved to {aside.name}, "
                    "falling back to the previous one")
                continue
            return step, out["state"], dict(out["data"])
        return None

    def _check_layout(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointLayoutError when `step`'s stored state has other leaves than
        `abstract_state`; unreadable metadata is left to the restore (a damaged checkpoint)."""
        try:
            with ocp.StandardCheckpointer() as reader:
                stored = reader.metadata(self.directory / str(step) / "state")
            stored = getattr(stored, "item_metadata", stored)
            stored = getattr(stored, "tree", stored)
        except Exception:  # noqa: BLE001 - half-written or corrupted: restore_latest's fallback handles it
            return
        if stored is None:
            return
        diff = layout_difference(stored, abstract_state)
        if diff is not None:
            raise CheckpointLayoutError(
                f"the checkpoint at step {step} in {self.directory} holds a training state of another layout "
                f"than this run's ({diff}): it was written with another config (architecture, optimizer, "
                f"EMA, ...). Resume with the config it was written with ({self.directory.parent / 'config.json'} "
                f"for a trainer's workdir) or start in a new --workdir; the checkpoints are left as they are.")

    def _set_aside(self, step: int) -> Path:
        """Renames a damaged step directory (kept for inspection; Orbax ignores the new name) so
        the resumed run can write that step again."""

        aside = self.directory / f"damaged-step-{step}"
        if distributed.is_main_process():
            n = 0
            while aside.exists():
                n += 1
                aside = self.directory / f"damaged-step-{step}.{n}"
            (self.directory / str(step)).rename(aside)
        distributed.barrier(f"mskjax_set_aside_{step}")
        self.manager.reload()
        return aside

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        """Blocks until the asynchronous write in flight ends; raises CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(self._in_flight, e) from e
        if self._in_flight is not None:
            release_free_heap()  # the finished write's buffers are all freed now
        self._in_flight = None

    def poll(self) -> None:
        """Non-blocking: when the asynchronous write in flight has finished, confirms it (raising
        CheckpointWriteError if it failed) and hands its freed memory back; else returns at once.
        Call it now and then (e.g. at each log step) so the memory goes back soon after the write."""
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def _write_error(self, step: int | None, cause: Exception) -> CheckpointWriteError:
        code = getattr(cause, "errno", None)
        if code == errno.ENOSPC:
            reason = f"the disk holding {self.directory} is full"
        elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = f"{self.directory} is not writable"
        else:
            reason = "the write failed"
        complete = self._complete_steps()
        kept = (f"the newest complete checkpoint, step {complete[-1]}, is untouched and a restart resumes from it"
                if complete else "no complete checkpoint exists yet")
        detail = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
        return CheckpointWriteError(
            code, f"cannot write the checkpoint of step {step} in {self.directory}: {reason} ({detail}); {kept}",
            step)

    def _complete_steps(self) -> list[int]:
        """Finalised step directories on disk (Orbax renames `N.orbax-checkpoint-tmp` to `N` last)."""
        try:
            return sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit() and p.is_dir())
        except OSError:
            return []
