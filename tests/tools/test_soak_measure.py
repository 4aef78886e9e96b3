"""tools/soak.py's growth measure: a leak fails it, one-off single-sample spikes do not."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).parents[2] / "tools" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)


def _series(fn, steps=2000, every=10):
    return [(s, fn(s)) for s in range(every, steps + 1, every)]


def test_flat_memory_with_single_sample_spikes_is_no_growth():
    rss = _series(lambda s: 1000.0 + (90.0 if s in (810, 1290, 1640) else 0.0))
    m = soak.growth_measure(rss, warmup=300, window=200)
    assert m["base"] == 1000.0 and m["growth_percent"] == pytest.approx(0.0)


def test_a_leak_is_growth():
    rss = _series(lambda s: 1000.0 + 0.05 * s)  # 50 MB per 1,000 steps
    m = soak.growth_measure(rss, warmup=300, window=200)
    assert m["growth_percent"] > 5.0
    assert m["peak_window"][0] == max(st for st, _ in m["medians"])


def test_too_few_windows_is_none():
    assert soak.growth_measure(_series(lambda s: 1.0, steps=400), warmup=300, window=200) is None
