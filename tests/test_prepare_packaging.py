"""Install paths: pyproject.toml's dependencies and extras agree with the requirement files that
tools/setup_env.sh installs, every accelerator extra pins the one jax version, and a missing torch names its extra."""
from __future__ import annotations

import pathlib
import re
import sys
import tomllib

import pytest

from geoalign_jax.convert import weight_files

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def _requirement_lines(name: str) -> list[str]:
    lines = [line.split("#")[0].strip() for line in (REPO_ROOT / name).read_text().splitlines()]
    return [line for line in lines if line]


def _pins(requirements: list[str]) -> dict[str, str]:
    """{normalised distribution name (extras dropped): version pin or ''}."""
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)(\[[^\]]+\])?\s*(==\s*(\S+))?", requirement)
        assert match, f"unexpected requirement form {requirement!r}"
        pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(4) or ""
    return pins


def test_dependencies_are_requirements_txt():
    assert _pins(PYPROJECT["dependencies"]) == _pins(_requirement_lines("requirements.txt"))


def test_test_extra_is_requirements_test_txt():
    lines = _requirement_lines("requirements-test.txt")
    assert lines[0] == "-r requirements.txt"
    extras = PYPROJECT["optional-dependencies"]
    assert _pins(extras["test"]) == _pins(lines[1:])
    assert _pins(extras["torch"]).items() <= _pins(extras["test"]).items()


def test_accelerator_extras_pin_the_same_jax():
    extras = PYPROJECT["optional-dependencies"]
    assert set(extras) == {"cpu", "gpu", "tpu", "torch", "test", "gcs"}
    jax_version = _pins(PYPROJECT["dependencies"])["jax"]
    assert jax_version and _pins(PYPROJECT["dependencies"])["jaxlib"] == jax_version
    assert extras["cpu"] == []  # the plain install is the CPU one
    assert extras["gpu"] == [f"jax[cuda12]=={jax_version}"]
    assert f"jax[tpu]=={jax_version}" in extras["tpu"]
    assert all(pin for pin in _pins(extras["tpu"]).values())


def test_missing_torch_names_the_extra_to_install(tmp_path, monkeypatch):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if it were not installed
    with pytest.raises(ImportError, match=re.escape("pip install 'geoalign-jax[torch]'")):
        weight_files.read_state_dict(checkpoint)
    assert "torch" in PYPROJECT["optional-dependencies"]


def test_gcs_extra_is_what_the_tests_and_tpu_install_and_its_absence_is_named(monkeypatch):
    extras = PYPROJECT["optional-dependencies"]
    assert _pins(extras["gcs"]).items() <= _pins(extras["tpu"]).items()
    assert _pins(extras["gcs"]).items() <= _pins(extras["test"]).items()
    from geoalign_jax.data import filesystem

    monkeypatch.setitem(sys.modules, "gcsfs", None)
    with pytest.raises(ImportError, match=re.escape("gs://b/x: reading or writing gs:// needs gcsfs: pip install "
                                                    "'geoalign-jax[gcs]'")):
        filesystem.path("gs://b/x")
