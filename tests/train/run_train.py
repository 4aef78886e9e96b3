"""Runs `mskjax.train` in a subprocess for the trainer tests, on a tiny synthetic dataset.

    python tests/train/run_train.py WORKDIR DATA_ROOT [--config.x=y ...]

Environment: MSKJAX_KILL_AT_STEP=N sends SIGKILL to this process at step N, to test resume, at the
point MSKJAX_KILL_POINT names:
  after_save   (default) right after the checkpoint of step N is *started* (asynchronous write in flight)
  before_save  after step N's update, before its checkpoint (the run resumes from step N - 1)
  during_eval  inside the N-th validation pass (before that epoch's checkpoint)
"""
import os
import signal
import sys

# Devices must be set before jax is imported.
if os.environ.get("MSKJAX_TEST_DEVICES"):
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={os.environ['MSKJAX_TEST_DEVICES']}"

from mskjax.train import __main__ as train  # noqa: E402
from mskjax.train import classifier, run_checkpoints  # noqa: E402

kill_at = int(os.environ.get("MSKJAX_KILL_AT_STEP", "0"))
kill_point = os.environ.get("MSKJAX_KILL_POINT", "after_save")
if kill_point not in ("after_save", "before_save", "during_eval"):
    sys.exit(f"run_train.py: unknown MSKJAX_KILL_POINT {kill_point!r}")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


if kill_at:
    _save = run_checkpoints.RunCheckpoints.save

    def save_and_maybe_die(self, step, state, data_state):
        if step == kill_at and kill_point == "before_save":
            _die()
        _save(self, step, state, data_state)
        if step == kill_at and kill_point == "after_save":
            _die()

    run_checkpoints.RunCheckpoints.save = save_and_maybe_die
    if kill_point == "during_eval":
        _evaluate, passes = classifier.evaluate, []

        def evaluate_and_maybe_die(*args, **kwargs):
            passes.append(1)
            if len(passes) == kill_at:
                _die()
            return _evaluate(*args, **kwargs)

        classifier.evaluate = evaluate_and_maybe_die

workdir, root, *rest = sys.argv[1:]
here = os.path.dirname(os.path.abspath(__file__))
argv = ["train", f"--config={os.path.join(here, 'tiny_config.py')}", f"--workdir={workdir}",
        f"--config.data.root={root}", *rest]
sys.exit(train.main(argv))
