"""python -m mskjax.train --config configs/x.py --workdir DIR [--config.a.b=v ...]

Checks every `--config.a.b` override against the config file before absl parses (a typo is an
error listing the valid fields, never a silent new field), joins the mesh (several processes with
config.distributed), and runs the config's `kind`: "classifier" (mskjax.train.classifier) or "sam"
(mskjax.train.sam). Library logging (Orbax, absl) is at WARNING unless `--verbosity=0` (or -v)
asks for INFO. Exit codes: 0 done, 2 bad config or input (a checkpoint of another layout
included), 3 non-finite loss, 4 checkpoint write failed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from mskjax import compile_cache, distributed
from mskjax.train import classifier, sam
from mskjax.train.config import ConfigError
from mskjax.train.loop import TrainingDiverged
from mskjax.train.run_checkpoints import CheckpointLayoutError, CheckpointWriteError

KINDS = {"classifier": classifier.train_and_evaluate, "sam": sam.train_and_evaluate}


def check_overrides(argv: list[str]) -> str | None:
    """An error message for any `--config.a.b=v` naming a field the config file lacks (listing the
    valid ones at that level), or None. Runs before absl parses, so a typo never becomes a
    traceback or a silent new field."""
    path = None
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            path = a.split("=", 1)[1]
        elif a == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
    if not path:
        return None
    if not Path(path).is_file():
        return f"config file not found: {path}"
    spec = importlib.util.spec_from_file_location("_mskjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        return f"{path} has no get_config()"
    config = module.get_config()
    for a in argv:
        if not a.startswith("--config."):
            continue
        dotted = a[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                level = "config" + "".join("." + w for w in walked)
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return (f"unknown config field --config.{dotted}: {level} has no field {part!r}; "
                        f"valid fields of {level}: {', '.join(valid)}")
            node = node[part]
            walked.append(part)
    return None


def train_and_evaluate(config, workdir: str | Path) -> dict:
    """Runs the training `config.kind` names ("classifier" when absent)."""
    kind = config.get("kind", "classifier")
    if kind not in KINDS:
        raise ConfigError(f"config.kind: {kind!r} is not one of {list(KINDS)}")
    return KINDS[kind](config, workdir)


def main(argv=None) -> int:
    if argv is not None:  # config_flags reads its overrides from sys.argv itself
        sys.argv = list(argv)
    err = check_overrides(list(sys.argv))
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    flags.DEFINE_string("workdir", None, "where checkpoints, logs and results go")
    config_flags.DEFINE_config_file("config", None, "a configs/*.py file; override fields with --config.a.b=v",
                                    lock_config=True)
    flags.mark_flags_as_required(["config", "workdir"])

    # Library logging (Orbax, absl, JAX) at WARNING unless --verbosity / -v asks for more: the
    # trainer's own lines are print()s and always show; warnings and errors always show too.
    asked = any(a.startswith(("--verbosity", "-v=", "--v=")) or a in ("-v", "--v") for a in sys.argv[1:])

    def run(_):
        if not asked:
            absl_logging.set_verbosity(absl_logging.WARNING)
        FLAGS = flags.FLAGS
        config = FLAGS.config
        distributed.initialize(config.distributed.coordinator, config.distributed.num_processes,
                               config.distributed.process_id,
                               heartbeat_timeout_s=config.distributed.heartbeat_timeout_s or None)
        compile_cache.enable()  # one per-user cache: a second run, or a new workdir, compiles from it
        try:
            train_and_evaluate(config, FLAGS.workdir)
        except (ConfigError, TrainingDiverged, FileNotFoundError, CheckpointWriteError, CheckpointLayoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 3 if isinstance(e, TrainingDiverged) else 4 if isinstance(e, CheckpointWriteError) else 2
        return 0

    try:
        app.run(run, argv=argv)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
