"""tools/second_peak.py's peak search (the measurement itself runs on a trained classifier)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).parents[2] / "tools"
sys.path.insert(0, str(TOOLS))  # the tool imports its sibling probe_record
_spec = importlib.util.spec_from_file_location("second_peak", TOOLS / "second_peak.py")
second_peak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(second_peak)


def test_second_peak_is_the_highest_value_outside_the_radius():
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 4, 4], maps[0, 5, 6], maps[0, 12, 10] = 1.0, 0.9, 0.5  # 0.9 is within the radius of the first
    maps[1, 2, 13], maps[1, 14, 1] = 1.0, 0.7
    first = np.array([[4.5, 4.5], [13.5, 2.5]])  # (x, y) pixel centres
    pts, vals = second_peak.second_peaks(maps, first, radius=3.0)
    np.testing.assert_allclose(pts, [[10.5, 12.5], [1.5, 14.5]])
    np.testing.assert_allclose(vals, [0.5, 0.7])
    # a radius that excludes everything but the far corner region still finds its maximum
    pts, _ = second_peak.second_peaks(maps, first, radius=12.0)
    assert np.hypot(*(pts[0] - first[0])) >= 12.0 and np.hypot(*(pts[1] - first[1])) >= 12.0
