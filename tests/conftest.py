"""Shared test fixtures: the folder of real RS samples that some tests read.

The samples (slices of public RS benchmarks; see docs/design.md, "Test data") are not part of the repository.
`GEOALIGN_SHARED_DATA` names their folder (default: `shared/data` beside the checkout). Without it the tests
that need them skip with the reason; `GEOALIGN_REQUIRE_SHARED_DATA=1` (set by .ci/run) makes that an error, so
CI cannot pass by skipping them.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "GEOALIGN_SHARED_DATA"
REQUIRE_SHARED_DATA_ENV = "GEOALIGN_REQUIRE_SHARED_DATA"
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# What the tests read; a folder missing one of these would otherwise fail later with a bare FileNotFoundError.
SAMPLE_ENTRIES = ("aid_sample", "captions", "dota_sample", "rsicd_sample")


def shared_data_path(environ: Mapping[str, str]) -> pathlib.Path:
    """The configured sample folder (a relative path is taken from the current directory)."""
    configured = environ.get(SHARED_DATA_ENV, "")
    return pathlib.Path(configured).resolve() if configured else DEFAULT_SHARED_DATA


def shared_data_required(environ: Mapping[str, str]) -> bool:
    """Whether absent samples are an error; any value but unset/""/"0"/"1" is refused rather than guessed."""
    value = environ.get(REQUIRE_SHARED_DATA_ENV, "")
    if value not in ("", "0", "1"):
        raise pytest.UsageError(f"{REQUIRE_SHARED_DATA_ENV}={value!r}: use 1 (absent samples fail) or 0 (they skip)")
    return value == "1"


def locate_shared_data(environ: Mapping[str, str]) -> pathlib.Path:
    """The sample folder; skips the calling test with the reason when it is incomplete, or fails it when the
    environment requires the samples."""
    path = shared_data_path(environ)
    missing = [name for name in SAMPLE_ENTRIES if not (path / name).is_dir()]
    if not missing:
        return path
    reason = (f"real RS samples not found: {path} lacks {', '.join(missing)} "
              f"(set {SHARED_DATA_ENV} to the sample folder)")
    if shared_data_required(environ):
        pytest.fail(f"{reason}; {REQUIRE_SHARED_DATA_ENV}=1 requires them", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """The real RS samples; every test that reads them takes this fixture (the one place that skips or fails)."""
    return locate_shared_data(os.environ)


def pytest_report_header(config: pytest.Config) -> str:
    required = "required" if shared_data_required(os.environ) else "skip if absent"
    return f"real RS samples: {shared_data_path(os.environ)} ({required})"
