"""The per-user compilation cache: where it lives, and that a second process compiles from it."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from mskjax import compile_cache

PROGRAM = """
import sys, time
from mskjax import compile_cache
compile_cache.MIN_COMPILE_SECONDS = 0.0
where = compile_cache.enable()
import jax, jax.numpy as jnp
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
def f(x):
    for _ in range(30):
        x = jnp.tanh(x @ x.T + 1.0)
    return x
jax.jit(f)(jnp.ones((32, 32))).block_until_ready()
print(where)
print(sum(e == "/jax/compilation_cache/cache_hits" for e in events))
"""


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MSKJAX_CACHE_DIR", str(tmp_path / "c"))
    assert compile_cache.cache_dir() == tmp_path / "c"
    monkeypatch.setenv("MSKJAX_CACHE_DIR", "off")
    assert compile_cache.cache_dir() is None and compile_cache.enable() is None
    monkeypatch.delenv("MSKJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.cache_dir() == tmp_path / "xdg" / "mskjax" / "jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compile_cache.cache_dir() == Path.home() / ".cache" / "mskjax" / "jax"


def test_a_second_process_reads_what_the_first_wrote(tmp_path):
    env = {"MSKJAX_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
    first = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    where, hits = first.stdout.split()
    assert where == str(tmp_path / "cache") and hits == "0"
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert entries, "the first process wrote no cache entry"
    second = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, check=True)
    assert int(second.stdout.split()[1]) >= 1, "the second process did not read its program from the cache"
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == entries
