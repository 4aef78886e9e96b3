"""One persistent XLA compilation cache per user, shared by every mskjax run.

A compiled step (the classifier's train step, the pipeline's step) is written once and read back by
every later process that compiles the same program on the same kind of machine: a second run of a
job, a fresh workdir, the demo's stages, the tests. Where it lives, first match wins:

* `MSKJAX_CACHE_DIR` (a path; "off" disables the cache);
* `$XDG_CACHE_HOME/mskjax/jax`;
* `~/.cache/mskjax/jax`.

Move it by setting `MSKJAX_CACHE_DIR`; delete the folder to empty it (safe at any time: entries
are keyed by the program, the JAX/XLA version and the device, and a miss only recompiles).
"""
from __future__ import annotations

import os
from pathlib import Path

import jax

ENV = "MSKJAX_CACHE_DIR"
MIN_COMPILE_SECONDS = 0.5  # smaller compiles cost less than reading them back is worth


def cache_dir() -> Path | None:
    """The cache folder for this user, or None when `MSKJAX_CACHE_DIR=off`."""
    env = os.environ.get(ENV, "").strip()
    if env.lower() == "off":
        return None
    if env:
        return Path(env).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(base).expanduser().absolute() / "mskjax" / "jax"


def enable() -> Path | None:
    """Points JAX's persistent compilation cache at `cache_dir()` (created if missing). Call before
    the first compile. Returns the folder, or None when disabled."""
    where = cache_dir()
    if where is None:
        return None
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return where
