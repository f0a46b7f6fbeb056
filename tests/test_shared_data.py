"""The real-sample fixture of conftest.py: skips with the reason for users without the samples, fails when
GEOALIGN_REQUIRE_SHARED_DATA=1 (CI), and never lets a half-present folder through."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import conftest


def _sample_folder(root, entries=conftest.SAMPLE_ENTRIES):
    for name in entries:
        (root / name).mkdir(parents=True)
    return root


def test_a_complete_folder_is_returned_whatever_the_requirement(tmp_path):
    folder = _sample_folder(tmp_path / "samples")
    for required in ("", "0", "1"):
        environ = {conftest.SHARED_DATA_ENV: str(folder), conftest.REQUIRE_SHARED_DATA_ENV: required}
        assert conftest.locate_shared_data(environ) == folder.resolve()


def test_the_folder_defaults_to_shared_data_beside_the_checkout_and_a_relative_one_starts_here(tmp_path, monkeypatch):
    assert conftest.shared_data_path({}) == conftest.REPO_ROOT.parent / "shared" / "data"
    assert conftest.shared_data_path({conftest.SHARED_DATA_ENV: ""}) == conftest.REPO_ROOT.parent / "shared" / "data"
    monkeypatch.chdir(tmp_path)
    assert conftest.shared_data_path({conftest.SHARED_DATA_ENV: "samples"}) == tmp_path.resolve() / "samples"


def test_an_absent_folder_skips_with_the_path_unless_required(tmp_path):
    absent = tmp_path / "nowhere"
    with pytest.raises(pytest.skip.Exception, match="nowhere lacks aid_sample, captions, dota_sample, rsicd_sample"):
        conftest.locate_shared_data({conftest.SHARED_DATA_ENV: str(absent)})
    with pytest.raises(pytest.fail.Exception, match="GEOALIGN_REQUIRE_SHARED_DATA=1 requires them") as failure:
        conftest.locate_shared_data({conftest.SHARED_DATA_ENV: str(absent), conftest.REQUIRE_SHARED_DATA_ENV: "1"})
    assert str(absent) in str(failure.value)


def test_a_partial_folder_names_what_it_lacks(tmp_path):
    folder = _sample_folder(tmp_path / "samples", entries=("aid_sample", "captions"))
    environ = {conftest.SHARED_DATA_ENV: str(folder), conftest.REQUIRE_SHARED_DATA_ENV: "1"}
    with pytest.raises(pytest.fail.Exception, match=r"lacks dota_sample, rsicd_sample \(set GEOALIGN_SHARED_DATA"):
        conftest.locate_shared_data(environ)


def test_an_unknown_requirement_value_is_refused():
    with pytest.raises(pytest.UsageError, match="GEOALIGN_REQUIRE_SHARED_DATA='yes'"):
        conftest.shared_data_required({conftest.REQUIRE_SHARED_DATA_ENV: "yes"})


def test_the_fixture_provides_every_sample_folder(shared_data):
    assert set(conftest.SAMPLE_ENTRIES) <= {p.name for p in shared_data.iterdir() if p.is_dir()}
    assert len(list((shared_data / "aid_sample").iterdir())) == 30


@pytest.mark.parametrize("required, outcome", [("1", "1 error"), ("0", "1 skipped")])
def test_a_pytest_run_without_the_samples_fails_only_when_required(tmp_path, required, outcome):
    """The seam: a real pytest run with the folder pointed elsewhere, as .ci/run's environment would see it."""
    environ = dict(os.environ, **{conftest.SHARED_DATA_ENV: str(tmp_path / "missing"),
                                  conftest.REQUIRE_SHARED_DATA_ENV: required})
    test_id = f"{__file__}::test_the_fixture_provides_every_sample_folder"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", test_id],
                         cwd=conftest.REPO_ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert outcome in run.stdout, run.stdout + run.stderr
    assert run.returncode == (1 if required == "1" else 0), run.stdout + run.stderr
    assert f"real RS samples not found: {tmp_path / 'missing'} lacks aid_sample" in run.stdout
