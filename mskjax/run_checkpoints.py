"""Training-run checkpoints: the full train state plus the data iterator's position, the last N
kept, written asynchronously and collectively (every process calls save/restore).

A checkpoint that cannot be restored (half-written, corrupted) is reported and the previous one is
tried, so a crash during a write never costs more than the steps since the checkpoint before it.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp


class RunCheckpoints:
    def __init__(self, directory: str | Path, keep: int, async_writes: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_writes,
                                                 create=True))

    def save(self, step: int, state: Any, data_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        data=ocp.args.JsonSave(data_state)), force=True)

    def restore_latest(self, abstract_state: Any, log=print) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores cleanly, or None.

        Each one that fails is named with the reason before falling back to the one before it."""
        self.manager.wait_until_finished()
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
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

    def _set_aside(self, step: int) -> Path:
        """Renames a damaged step directory (kept for inspection; Orbax ignores the new name) so
        the resumed run can write that step again."""
        import jax
        from jax.experimental import multihost_utils
        aside = self.directory / f"damaged-step-{step}"
        if jax.process_index() == 0:
            n = 0
            while aside.exists():
                n += 1
                aside = self.directory / f"damaged-step-{step}.{n}"
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"mskjax_set_aside_{step}")
        self.manager.reload()
        return aside

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
