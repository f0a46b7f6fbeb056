"""A GCS bucket for the tests: the emulator (tools/gcs_emulator.py) on a free 127.0.0.1 port, behind a fault
proxy, started once per test session; nothing leaves the loopback interface.

``from gcs_fixtures import gcs`` in a test module registers the fixture there. The fixture sets
``STORAGE_EMULATOR_HOST`` for the session (data/filesystem.py reads it), so ``gs://`` paths in the package go
to the emulator, and gives a `Bucket` with the bucket name, the proxy and a gcsfs handle for uploads.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "geoalign-test"


def load_emulator_module():
    if "gcs_emulator" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gcs_emulator", REPO_ROOT / "tools" / "gcs_emulator.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["gcs_emulator"] = module
        spec.loader.exec_module(module)
    return sys.modules["gcs_emulator"]


@dataclasses.dataclass
class Bucket:
    name: str
    proxy: object  # gcs_emulator.FaultProxy
    fs: object  # gcsfs.core.GCSFileSystem on the emulator

    def url(self, *parts: str) -> str:
        return "gs://" + "/".join([self.name, *parts])

    def upload(self, local: str | os.PathLike, *parts: str) -> str:
        """Copy a local file or folder to gs://<bucket>/<parts>; returns that location."""
        target = "/".join([self.name, *parts])
        self.fs.put(os.fspath(local), target, recursive=os.path.isdir(local))
        self.fs.invalidate_cache()
        return "gs://" + target


@pytest.fixture(scope="session")
def gcs():
    import gcsfs.core

    from geoalign_jax.data import filesystem

    emulator = load_emulator_module()
    with emulator.running_emulator(BUCKET) as endpoint:
        proxy = emulator.FaultProxy(endpoint)
        saved = {name: os.environ.get(name) for name in (filesystem.EMULATOR_ENV, filesystem.NATIVE_EMULATOR_ENV)}
        os.environ[filesystem.EMULATOR_ENV] = proxy.endpoint
        os.environ[filesystem.NATIVE_EMULATOR_ENV] = proxy.endpoint
        try:
            yield Bucket(BUCKET, proxy, gcsfs.core.GCSFileSystem(endpoint_url=endpoint, token="anon"))
        finally:
            proxy.close()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture()
def healthy(gcs):
    """The bucket with no fault armed before and after the test."""
    gcs.proxy.allow_all()
    yield gcs
    gcs.proxy.allow_all()
