"""Shared pytest fixtures: where the real data lives, and JAX settings for reproducible tests."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO_ROOT / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data` beside the repository (FracAtlas and the input-quirk files).

    Fails, rather than skips, when it is missing: CI lays it out beside every checkout.
    """
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
