"""Runs `mskjax.train` in a subprocess for the trainer tests, on a tiny synthetic dataset.

    python tests/train/run_train.py WORKDIR DATA_ROOT [--config.x=y ...]

Environment: MSKJAX_KILL_AT_STEP=N sends SIGKILL to this process right after the checkpoint of
step N is *started* (asynchronous write in flight), to test resume.
"""
import os
import signal
import sys

# Devices must be set before jax is imported.
if os.environ.get("MSKJAX_TEST_DEVICES"):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ['MSKJAX_TEST_DEVICES']}"

from mskjax import run_checkpoints, train  # noqa: E402

kill_at = int(os.environ.get("MSKJAX_KILL_AT_STEP", "0"))
if kill_at:
    _save = run_checkpoints.RunCheckpoints.save

    def save_then_die(self, step, state, data_state):
        _save(self, step, state, data_state)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_checkpoints.RunCheckpoints.save = save_then_die

workdir, root, *rest = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))
argv = ["train", f"--config={os.path.join(here, 'tiny_config.py')}", f"--workdir={workdir}",
        f"--config.data.root={root}", *rest]
sys.exit(train.main(argv))
