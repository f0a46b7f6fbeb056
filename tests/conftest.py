"""The test session's environment (XLA compile options, one persistent compilation cache) and the shared
fixture of the real RS samples that some tests read.

Compiling the tiny models, not running them, is most of the suite's time on a CPU. Before any jax backend starts
(this file is imported before the test modules), the session adds to os.environ, so that every subprocess the
tests start (trainer and evaluator CLIs, multi-device and multi-process workers, nested pytest runs) inherits it:
  * TEST_XLA_FLAGS in XLA_FLAGS: XLA:CPU compiles with fewer LLVM optimisation passes. The code computes the
    same function (float reassociation aside, which the tolerances of the parity tests cover, unchanged), and
    comparisons of two runs (resume == uninterrupted, bit for bit) compare runs under the same flags.
  * jax's persistent compilation cache in one folder for the whole session: a program compiled by one test or
    subprocess (the same step in the demo, the trainer CLI runs, the evaluator) is loaded by the next one.
A flag or variable the caller's environment already sets wins (e.g. JAX_COMPILATION_CACHE_DIR=~/.cache/x to
keep the cache between runs); subprocesses that set their own device count keep the rest of XLA_FLAGS
(process_harness.xla_flags).

The samples (slices of public RS benchmarks; see docs/design.md, "Test data") are not part of the repository.
`GEOALIGN_SHARED_DATA` names their folder (default: `shared/data` beside the checkout). Without it the tests
that need them skip with the reason; `GEOALIGN_REQUIRE_SHARED_DATA=1` (set by .ci/run) makes that an error, so
CI cannot pass by skipping them.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Mapping, MutableMapping

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "GEOALIGN_SHARED_DATA"
REQUIRE_SHARED_DATA_ENV = "GEOALIGN_REQUIRE_SHARED_DATA"
DEFAULT_SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# What the tests read; a folder missing one of these would otherwise fail later with a bare FileNotFoundError.
SAMPLE_ENTRIES = ("aid_sample", "captions", "dota_sample", "rsicd_sample")
#: XLA:CPU compile options of the session (flag -> value): LLVM at -O0 without its expensive passes, XLA's
#: elemental IR emitters instead of the MLIR fusion emitters, one LLVM module (no split for parallel codegen).
#: The demo config's train step compiled in 7.9 s instead of 39.7 s (and ran 0.6 s a step instead of 0.36 s).
#: Written for jaxlib 0.10.2 (pinned): XLA aborts on a flag it does not know, so a jaxlib upgrade rechecks them.
TEST_XLA_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_llvm_disable_expensive_passes": "true",
                  "--xla_cpu_use_fusion_emitters": "false", "--xla_cpu_parallel_codegen_split_count": "1"}
COMPILATION_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_PREFIX = "geoalign-tests-jax-cache-"  # + the session's process id: see _remove_orphaned_caches
#: every program goes to the persistent cache, however small or fast to compile (jax's defaults skip those)
COMPILATION_CACHE_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def configure_session_environment(environ: MutableMapping[str, str]) -> str | None:
    """Adds the session's XLA flags and compilation cache to `environ` where it does not set them already;
    returns the cache folder it created (None: `environ` named one, e.g. inherited from a parent session)."""
    given = environ.get("XLA_FLAGS", "").split()
    added = [f"{flag}={value}" for flag, value in TEST_XLA_FLAGS.items()
             if not any(word.split("=", 1)[0] == flag for word in given)]
    environ["XLA_FLAGS"] = " ".join(given + added)
    for name, value in COMPILATION_CACHE_ENV.items():
        environ.setdefault(name, value)
    if environ.get(COMPILATION_CACHE_DIR_ENV):
        return None
    _remove_orphaned_caches()
    created = tempfile.mkdtemp(prefix=f"{CACHE_PREFIX}{os.getpid()}-")
    environ[COMPILATION_CACHE_DIR_ENV] = created
    return created


def _remove_orphaned_caches() -> None:
    """A session killed by a signal (CI cancelling, `timeout`) never reaches pytest_unconfigure: its cache folder,
    named with its process id, is removed by the next session once no process has that id."""
    if not pathlib.Path("/proc/self").exists():  # no /proc (macOS): whether a pid lives is not known here
        return
    for folder in pathlib.Path(tempfile.gettempdir()).glob(f"{CACHE_PREFIX}*-*"):
        pid = folder.name[len(CACHE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pathlib.Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


_CREATED_CACHE_DIR = configure_session_environment(os.environ)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CREATED_CACHE_DIR:
        shutil.rmtree(_CREATED_CACHE_DIR, ignore_errors=True)


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


def pytest_report_header(config: pytest.Config) -> list[str]:
    required = "required" if shared_data_required(os.environ) else "skip if absent"
    return [f"real RS samples: {shared_data_path(os.environ)} ({required})",
            f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, jax compilation cache {os.environ[COMPILATION_CACHE_DIR_ENV]}"]
