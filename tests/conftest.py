"""Shared test fixtures: paths to the real RS samples beside the repository."""
from __future__ import annotations

import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real RS samples in ../shared/data; tests that need them skip with the reason when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real RS samples not found at {SHARED_DATA} (../shared/data beside the repository)")
    return SHARED_DATA
