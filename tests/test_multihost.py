"""Multi-host plumbing (geoalign_jax/parallel/multihost.py), including a real two-process jax.distributed run.

The two-process tests start two local processes (tests/multihost_worker.py), each with 2 CPU devices, that join one
job through ``initialize_distributed``, read one epoch of the real grain pipeline over a small demo dataset and
compute a tiny CLIP's scene contrastive loss on the global batch of a 4-device mesh. They check that the hosts'
data slices are disjoint and cover the split, that the global loss equals the single-process loss on the hosts'
batches concatenated in process order, and that both processes agree.
"""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys
import time

import numpy as np
import pytest

import process_harness
from geoalign_jax.parallel import multihost

REPO_ROOT = process_harness.REPO_ROOT
WORKER = REPO_ROOT / "tests" / "multihost_worker.py"
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
WORKER_TIMEOUT_S = 150  # per run of both processes; a hang fails the test instead of blocking the suite


def _load_module(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


worker = _load_module("multihost_worker", WORKER)


# ----------------------------------------------------------------------------------------------------------
# Configuration resolution and the init guards (no jax backend, no processes)

ENV_NAMES = process_harness.ENV_NAMES


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_config_from_env_and_arguments_take_precedence():
    environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
               "JAX_LOCAL_DEVICE_IDS": "0, 1"}
    assert multihost.resolve_distributed_config(environ=environ) == multihost.DistributedConfig(
        "10.0.0.1:1234", 4, 3, (0, 1)
    )
    explicit = multihost.resolve_distributed_config("host:99", 2, 0, 5, environ=environ)
    assert explicit == multihost.DistributedConfig("host:99", 2, 0, (5,))
    assert multihost.resolve_distributed_config(environ={}) == multihost.DistributedConfig()


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID"),
        ({"JAX_PROCESS_ID": "-1"}, "JAX_PROCESS_ID"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "JAX_COORDINATOR_ADDRESS"),
        ({"JAX_LOCAL_DEVICE_IDS": "0,gpu1"}, "JAX_LOCAL_DEVICE_IDS"),
    ],
)
def test_bad_config_is_refused_naming_the_variable(environ, named):
    with pytest.raises(ValueError, match=named):
        multihost.resolve_distributed_config(environ=environ)


def test_nothing_configured_is_a_single_process_no_op(clean_env):
    clean_env.setattr(multihost, "detected_cluster", lambda: None)
    multihost.initialize_distributed()
    import jax

    assert not jax.distributed.is_initialized()


def test_require_mode_without_configuration_fails(clean_env):
    clean_env.setattr(multihost, "detected_cluster", lambda: None)
    clean_env.setenv(multihost.MODE_ENV, "require")
    with pytest.raises(RuntimeError, match="GEOALIGN_DISTRIBUTED=require"):
        multihost.initialize_distributed()


def test_partial_configuration_names_what_is_missing(clean_env):
    clean_env.setattr(multihost, "detected_cluster", lambda: None)
    clean_env.setenv(multihost.COORDINATOR_ENV, "127.0.0.1:1")
    with pytest.raises(ValueError, match=r"num_processes \(JAX_NUM_PROCESSES\), process_id \(JAX_PROCESS_ID\)"):
        multihost.initialize_distributed()


def test_refuses_to_run_in_a_multiprocessing_child(clean_env):
    """What a grain worker sees after its bootstrap (the re-import phase is covered by the grain-worker run)."""
    import multiprocessing

    clean_env.setattr(multiprocessing, "parent_process", lambda: object())
    with pytest.raises(RuntimeError, match="grain"):
        multihost.initialize_distributed("127.0.0.1:1", 2, 0)


# ----------------------------------------------------------------------------------------------------------
# host_batch_to_global in this (single) process, on whatever devices it has


def test_single_process_batch_becomes_a_global_array_with_the_same_rows():
    import jax

    from geoalign_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": -1})
    sharding = mesh_lib.batch_sharding(mesh)
    rows = 2 * jax.device_count()
    batch = {"image": np.arange(rows * 6, dtype=np.float32).reshape(rows, 2, 3),
             "mask": np.arange(rows) % 2 == 0}
    global_batch = multihost.host_batch_to_global(batch, sharding)
    for key, value in batch.items():
        assert global_batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(global_batch[key]), value)


def test_batch_sharding_that_splits_another_axis_is_refused():
    from jax.sharding import NamedSharding, PartitionSpec

    from geoalign_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh({"data": -1})
    with pytest.raises(ValueError, match="non-leading axis"):
        multihost.host_batch_to_global({"image": np.zeros((4, 4), np.float32)},
                                       NamedSharding(mesh, PartitionSpec(None, "data")))


def test_strings_and_scalars_are_refused_naming_the_key():
    from geoalign_jax.parallel import mesh as mesh_lib

    sharding = mesh_lib.batch_sharding(mesh_lib.make_mesh({"data": -1}))
    with pytest.raises(ValueError, match=r"batch\['id'\] has dtype <U1"):
        multihost.host_batch_to_global({"id": np.array(["a"])}, sharding)
    with pytest.raises(ValueError, match=r"batch\['decode_errors'\] is a host-side scalar"):
        multihost.host_batch_to_global({"decode_errors": np.int64(3)}, sharding)


# ----------------------------------------------------------------------------------------------------------
# Two real processes


@pytest.fixture(scope="module")
def demo_scenes(tmp_path_factory) -> pathlib.Path:
    """16 demo training scenes in 2 shards (64 px; the pipeline resizes to the tiny model's 32 px)."""
    demo = _load_module("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    out = tmp_path_factory.mktemp("demo")
    result = demo.make_demo_data(out, num_train=16, num_val=0, num_per_class=0, image_size=64, num_shards=2)
    return pathlib.Path(result["scenes"])


@pytest.fixture(scope="module")
def split_records(demo_scenes) -> dict[str, dict]:
    from geoalign_jax.data import sources

    source = sources.RecordSource.from_dir(demo_scenes, "train")
    records = [source[index] for index in range(len(source))]
    return {record["id"]: record for record in records}


def _run_workers(data: pathlib.Path, out: pathlib.Path, *, worker_count: int, extra_env: dict[str, str]) -> list[dict]:
    """Start both processes, wait with a deadline (killing both on timeout), return their JSON results.

    Any failure prints both processes' output so that the reason is in the test report.
    """
    coordinator = f"127.0.0.1:{process_harness.free_port()}"
    commands = [
        [sys.executable, str(WORKER), "--process-id", str(process_id), "--num-processes", str(NUM_PROCESSES),
         "--coordinator", coordinator, "--data", str(data), "--out", str(out),
         "--worker-count", str(worker_count), "--timeout", "60"]
        for process_id in range(NUM_PROCESSES)
    ]
    results, report = process_harness.run_processes(
        commands, out, env=process_harness.worker_env(DEVICES_PER_PROCESS, extra_env), timeout_s=WORKER_TIMEOUT_S,
        what="worker")
    print(report, *(f"process {i} timings (s): {r['timings_s']}" for i, r in enumerate(results)), sep="\n")
    return results


def _single_process_losses(host_batches: list[dict[str, np.ndarray]]) -> tuple[list[float], list[np.ndarray]]:
    """The reference: the same model and loss in this process, on each step's host batches concatenated in
    process order (whatever devices this process has; no mesh)."""
    import jax

    model = worker.model_config()
    params = worker.host_params(model)
    step = jax.jit(worker.scene_loss_fn(model))
    losses, embeddings = [], []
    for step_index in range(host_batches[0]["image"].shape[0]):
        image = np.concatenate([batches["image"][step_index] for batches in host_batches])
        text = np.concatenate([batches["text"][step_index] for batches in host_batches])
        loss, embedding = step(params, image, text)
        losses.append(float(loss))
        embeddings.append(np.asarray(embedding))
    return losses, embeddings


def _check_two_process_run(results: list[dict], out: pathlib.Path, split_records: dict[str, dict]) -> None:
    from geoalign_jax import tokenizer

    num_records = len(split_records)
    per_host = worker.GLOBAL_BATCH_SIZE // NUM_PROCESSES
    steps = num_records // worker.GLOBAL_BATCH_SIZE
    for process_id, result in enumerate(results):
        assert result["process_index"] == process_id and result["process_count"] == NUM_PROCESSES
        assert result["local_device_count"] == DEVICES_PER_PROCESS
        assert result["device_count"] == NUM_PROCESSES * DEVICES_PER_PROCESS
        assert result["global_batch_shape"] == [worker.GLOBAL_BATCH_SIZE, worker.IMAGE_SIZE, worker.IMAGE_SIZE, 3]
        assert len(result["losses"]) == steps, "one epoch = 16 records / global batch 8 = 2 steps"

    # (a) the hosts' slices are disjoint and cover the split exactly (one epoch, no record twice)
    ids = [result["ids"] for result in results]
    assert not set(ids[0]) & set(ids[1])
    assert sorted(ids[0] + ids[1]) == sorted(split_records)

    # ... and those ids are what each host's batches hold: each batch row is its record's tokenised caption
    host_batches = [dict(np.load(out / f"process_{i}_batches.npz")) for i in range(NUM_PROCESSES)]
    for process_id, batches in enumerate(host_batches):
        assert batches["text"].shape[:2] == (steps, per_host)
        rows = batches["text"].reshape(steps * per_host, -1)
        for row, record_id in zip(rows, ids[process_id]):
            captions = tokenizer.tokenize(split_records[record_id]["captions"])
            assert any(np.array_equal(row, caption) for caption in captions), (
                f"process {process_id}: batch row does not hold record {record_id}'s caption"
            )

    # the global batch is the hosts' batches in process order
    expected_text = np.concatenate([batches["text"] for batches in host_batches], axis=1)
    for batches in host_batches:
        np.testing.assert_array_equal(batches["gathered_text"], expected_text)

    # (b) the global loss on the 2-process mesh = the single-process loss on the concatenation
    reference_losses, reference_embeddings = _single_process_losses(host_batches)
    np.testing.assert_allclose(results[0]["losses"], reference_losses, rtol=0, atol=1e-5)
    for batches in host_batches:
        np.testing.assert_allclose(batches["gathered_image_embedding"], np.stack(reference_embeddings),
                                   rtol=1e-5, atol=1e-5)

    # (c) both processes hold the same loss value
    assert results[0]["losses"] == results[1]["losses"]

    # host_batch_to_global refuses bad input with a message naming the key and the cause
    for result in results:
        messages = result["bad_input_messages"]
        assert "batch['image'] has 3 rows" in messages["indivisible"]
        assert "2 local devices" in messages["indivisible"]
        assert "pop_host_metrics" in messages["scalar"] and "decode_errors" in messages["scalar"]


def _check_augmentation_as_in_one_process(out: pathlib.Path, data: pathlib.Path) -> None:
    """Under jax.distributed, host h's k-th example is the single-process stream's example at global position
    h + 2k, pixel for pixel: the random crop and flip follow the record's global position, not the host."""
    from geoalign_jax.data import pipeline

    host_batches = [dict(np.load(out / f"process_{i}_batches.npz")) for i in range(NUM_PROCESSES)]
    steps = host_batches[0]["image"].shape[0]
    iterator = pipeline.make_train_iterator(worker.data_config(str(data), 0), process_index=0, process_count=1)
    one_process = pipeline.take(iterator, steps)
    iterator.close()
    reference = {key: np.concatenate([batch[key] for batch in one_process]) for key in ("image", "text")}
    for process_id, batches in enumerate(host_batches):
        for key, expected in reference.items():
            rows = batches[key].reshape((-1, *batches[key].shape[2:]))
            np.testing.assert_array_equal(rows, expected[process_id::NUM_PROCESSES],
                                          err_msg=f"process {process_id} {key}")


def test_two_processes_read_disjoint_data_and_agree_on_the_global_loss(demo_scenes, split_records, tmp_path):
    results = _run_workers(demo_scenes, tmp_path, worker_count=0, extra_env={})
    _check_two_process_run(results, tmp_path, split_records)
    _check_augmentation_as_in_one_process(tmp_path, demo_scenes)


def test_grain_worker_processes_do_not_rejoin_the_job(demo_scenes, split_records, tmp_path):
    """worker_count=1: grain spawns a worker per host that re-imports the main module (grain#802). The
    worker inherits a complete JAX_* configuration, yet its import-time initialize_distributed() refuses, and
    the run gives the same guarantees as in-process loading."""
    children = tmp_path / "children"
    children.mkdir()
    results = _run_workers(demo_scenes, tmp_path, worker_count=1, extra_env={
        worker.CHILD_REPORT_ENV: str(children),
        multihost.COORDINATOR_ENV: f"127.0.0.1:{process_harness.free_port()}",
        multihost.NUM_PROCESSES_ENV: str(NUM_PROCESSES),
        multihost.PROCESS_ID_ENV: "0",
    })
    _check_two_process_run(results, tmp_path, split_records)
    _check_augmentation_as_in_one_process(tmp_path, demo_scenes)
    reports = [json.loads(path.read_text()) for path in sorted(children.glob("grain_child_*.json"))]
    assert len(reports) >= NUM_PROCESSES, f"expected a grain worker per process, got reports {reports}"
    for report in reports:
        assert report["refused"], report
        assert "grain" in report["message"]
        assert not report["distributed_initialized"]
