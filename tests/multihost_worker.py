"""One process of the two-process CPU test in tests/test_multihost.py (not a test module itself).

    python tests/multihost_worker.py --process-id 0 --num-processes 2 --coordinator 127.0.0.1:PORT \
        --data DEMO/scenes --out OUT [--worker-count 1]

Run with XLA_FLAGS=--xla_force_host_platform_device_count=2 (2 CPU devices per process). The process joins the
job through ``multihost.initialize_distributed``, reads one epoch of the real grain training pipeline with the
per-process slice at its defaults (jax.process_index/process_count), turns every host batch into global arrays on
a mesh of all devices, runs a tiny CLIP forward + the scene contrastive loss on the global batch, and writes what
the test checks to ``OUT/process_<i>.json`` and ``OUT/process_<i>_batches.npz``.

The module top level runs again in grain's spawned ``mp_prefetch`` workers (they re-import ``__main__``). There it
records, in ``OUT/grain_child_<pid>.json``, that ``initialize_distributed()`` refused to run, which is the grain#802
guard at work: a worker never joins the distributed job.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import sys
import time

START = time.perf_counter()
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Importing jax before jax.distributed.initialize is fine; only touching a backend is not.
import jax
import ml_collections
import numpy as np

from geoalign_jax.data import pipeline, records
from geoalign_jax.losses import contrastive
from geoalign_jax.models import clip
from geoalign_jax.parallel import mesh as mesh_lib
from geoalign_jax.parallel import multihost

#: Folder where a grain worker (a multiprocessing child re-importing this file) reports the init guard.
CHILD_REPORT_ENV = "GEOALIGN_MULTIHOST_TEST_CHILD_REPORT_DIR"

MODEL_NAME = "tiny"
MODEL_SEED = 0
GLOBAL_BATCH_SIZE = 8
IMAGE_SIZE = 32  # the tiny model's input size


def _report_child_guard(report_dir: pathlib.Path) -> None:
    """In a grain worker: try the call that an import-time init would make and record what happened."""
    result: dict = {"pid": os.getpid(), "parent_pid": os.getppid()}
    try:
        # configuration comes from the inherited JAX_* variables; a short timeout in case the guard fails
        multihost.initialize_distributed(initialization_timeout_s=5)
        result["refused"] = False
    except Exception as error:  # noqa: BLE001 - the test checks which error it was
        result["refused"] = isinstance(error, RuntimeError) and "grain" in str(error)
        result["message"] = f"{type(error).__name__}: {error}"
    result["distributed_initialized"] = jax.distributed.is_initialized()
    (report_dir / f"grain_child_{os.getpid()}.json").write_text(json.dumps(result))


# A spawned child (grain worker) imports this file as "__mp_main__"; the real process runs it as "__main__".
if __name__ == "__mp_main__" and os.environ.get(CHILD_REPORT_ENV):
    _report_child_guard(pathlib.Path(os.environ[CHILD_REPORT_ENV]))


def data_config(data_dir: str, worker_count: int) -> ml_collections.ConfigDict:
    """The pipeline config both the workers and the test's single-process reference use."""
    config = pipeline.default_data_config()
    config.train_shards = data_dir
    config.train_split = "train"
    config.batch_size = GLOBAL_BATCH_SIZE
    config.image_size = IMAGE_SIZE
    config.long_context_length = 0
    config.num_epochs = 1
    config.seed = 7
    config.worker_count = worker_count
    config.worker_buffer_size = 1
    config.read_threads = 1
    config.read_buffer_size = 4
    return config


def model_config() -> clip.CLIPConfig:
    return clip.get_model_config(MODEL_NAME)


def host_params(config: clip.CLIPConfig) -> dict:
    """Deterministic random parameters made on the host with numpy (same on every process and in the test).

    Why not ``clip.init_params``: its jitted initialiser takes ~7 s to compile on a CPU, three times per test
    run; the loss only needs the same parameters everywhere. Shapes come from the real initialiser (abstractly);
    layer-norm scales are 1, biases 0, ``logit_scale`` ln(1/0.07), other weights N(0, 0.02).
    """
    shapes = jax.eval_shape(functools.partial(clip.init_params, config), jax.random.key(MODEL_SEED))
    rng = np.random.default_rng(MODEL_SEED)

    def make(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name == "logit_scale":
            return np.full(leaf.shape, np.log(1 / 0.07), np.float32)
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        return (0.02 * rng.standard_normal(leaf.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(make, shapes)


def scene_loss_fn(config: clip.CLIPConfig):
    """(params, image, text) -> (loss, image embeddings): the tiny CLIP forward + symmetric InfoNCE."""
    def scene_loss(params, image, text):
        image_embedding, _ = clip.encode_image(config, params, image)
        text_embedding, _ = clip.encode_text(config, params, text)
        loss, _ = contrastive.clip_loss(image_embedding, text_embedding, params["logit_scale"])
        return loss, image_embedding

    return scene_loss


def _record_ids(config: ml_collections.ConfigDict) -> list[str]:
    """The ids of this process's records, in stream order: the same per-process slice (at its defaults) that
    ``make_train_dataset`` decodes. The test ties them to the batches through the captions."""
    return [records.decode_record(raw)["id"] for _, raw in pipeline.make_record_dataset(config)]


def _bad_input_messages(sharding: jax.sharding.NamedSharding) -> dict[str, str]:
    """host_batch_to_global must refuse a local batch that does not divide over the local devices, and a
    host-side scalar; both messages go back to the test."""
    messages = {}
    for name, batch in (
        ("indivisible", {"image": np.zeros((3, 4), np.float32)}),
        ("scalar", {"decode_errors": np.int64(0)}),
    ):
        try:
            multihost.host_batch_to_global(batch, sharding)
            messages[name] = "<accepted>"
        except ValueError as error:
            messages[name] = str(error)
    return messages


def run(args: argparse.Namespace) -> dict:
    # First thing, before any jax backend use: join the two-process job.
    multihost.initialize_distributed(
        args.coordinator, args.num_processes, args.process_id, initialization_timeout_s=args.timeout
    )
    multihost.initialize_distributed(args.coordinator, args.num_processes, args.process_id)  # idempotent
    timings = {"initialized": time.perf_counter() - START}



    out = pathlib.Path(args.out)
    config = data_config(args.data, args.worker_count)
    ids = _record_ids(config)

    mesh = mesh_lib.make_mesh({"data": -1})  # every device of every process
    sharding = mesh_lib.batch_sharding(mesh)
    model = model_config()
    params = multihost.host_tree_to_replicated(host_params(model), mesh)
    step = jax.jit(scene_loss_fn(model))
    timings["model_ready"] = time.perf_counter() - START

    local_images, local_texts, losses, gathered_texts, gathered_embeddings = [], [], [], [], []
    iterator = pipeline.make_train_iterator(config)
    try:
        for host_batch in iterator:
            pipeline.pop_host_metrics(host_batch)
            global_batch = multihost.host_batch_to_global(
                {"image": host_batch["image"], "text": host_batch["text"]}, sharding
            )
            loss, image_embedding = step(params, global_batch["image"], global_batch["text"])
            gathered = multihost.gather_to_host({"text": global_batch["text"], "image_embedding": image_embedding})
            local_images.append(host_batch["image"])
            local_texts.append(host_batch["text"])
            losses.append(float(loss))  # the replicated scalar, read from this process's own devices
            gathered_texts.append(gathered["text"])
            gathered_embeddings.append(gathered["image_embedding"])
            timings.setdefault("first_step", time.perf_counter() - START)
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
    multihost.sync_barrier("epoch-done", timeout_s=args.timeout)
    timings["epoch_done"] = time.perf_counter() - START

    np.savez(
        out / f"process_{args.process_id}_batches.npz",
        image=np.stack(local_images), text=np.stack(local_texts),
        gathered_text=np.stack(gathered_texts), gathered_image_embedding=np.stack(gathered_embeddings),
    )
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_device_count": jax.local_device_count(),
        "device_count": jax.device_count(),
        "global_batch_shape": list(global_batch["image"].shape) if losses else None,
        "ids": ids,
        "losses": losses,
        "bad_input_messages": _bad_input_messages(sharding),
        "timings_s": timings,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--coordinator", required=True, help="host:port of process 0's coordinator")
    parser.add_argument("--data", required=True, help="converted demo scenes folder (with manifest.json)")
    parser.add_argument("--out", required=True, help="folder for the results")
    parser.add_argument("--worker-count", type=int, default=0, help="grain worker processes (mp_prefetch)")
    parser.add_argument("--timeout", type=int, default=60, help="seconds for init and barriers")
    args = parser.parse_args(argv)
    result = run(args)  # an exception prints its traceback and exits with status 1
    path = pathlib.Path(args.out) / f"process_{args.process_id}.json"
    path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
