"""What the checkpoint content digest costs (geoalign_jax/checkpoint_steps.py) against the save it follows, at
a named model size (default ViT-B-16: parameters + AdamW moments, what the trainer saves each step).

    .venv/bin/python tools/bench_checkpoint_digest.py --model ViT-B-16 --repeats 3 --dir /tmp/bench_ckpt

Baseline: the trainer's own save (`train.checkpoint.Checkpointer.save` + `wait`, synchronous, without the
digest), measured in the same run on the same disk. Then the digest written after it (`write_digest`: size and
CRC-32 of every file of the step, ISA-L's CRC-32), the check before a restore (`verify_digest`), and the
previous digest (the same CRC-32 by zlib, which it replaced) over the same files, for comparison. Medians over `--repeats`
saves; the last printed line is one JSON object with the ratios and the machine's load average. The state
saved has random AdamW moments (a fresh state's zeros would compress to nothing). The files were just written, so the digest
reads them from the page cache, as it does in the trainer (where it runs in a thread of its own, beside the
training steps, not between them).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import sys
import time
import zlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ of this checkout

import grain
import jax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=pathlib.Path, required=True, help="scratch folder (removed first)")
    args = parser.parse_args()

    from geoalign_jax import checkpoint_steps
    from geoalign_jax.train import checkpoint as checkpoint_lib
    from geoalign_jax.train import experiment
    from geoalign_jax.train import loop

    config = experiment.get_config()
    config.model.name = args.model
    config.data.train_shards = str(args.dir / "no_shards")  # build() reads no shard
    setup = loop.build(config)
    state = loop.state_from_params(setup, None)
    # A trained state: AdamW moments of a fresh state are zeros, which compress to nothing and would make the
    # save (and the digest) of a real run look cheaper than they are.
    keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state.opt_state))))
    state = state.replace(opt_state=jax.tree.map(
        lambda leaf: jax.random.normal(next(keys), leaf.shape, leaf.dtype) * 1e-3
        if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating) else leaf, state.opt_state))
    jax.block_until_ready(state)
    iterator = iter(grain.MapDataset.range(8).to_iter_dataset())
    shutil.rmtree(args.dir, ignore_errors=True)
    checkpointer = checkpoint_lib.Checkpointer(args.dir, keep=args.repeats + 1, async_save=False)
    checkpointer._digest_committed = lambda: None  # the baseline is the save alone; the digest is timed below
    save, digest, verify, zlib_digest, sizes = [], [], [], [], []
    try:
        for step in range(1, args.repeats + 1):
            started = time.perf_counter()
            checkpointer.save(state, iterator, step=step)
            checkpointer.wait()
            save.append(time.perf_counter() - started)
            step_dir = checkpointer.directory / str(step)
            started = time.perf_counter()
            checkpoint_steps.write_digest(step_dir)
            digest.append(time.perf_counter() - started)
            started = time.perf_counter()
            assert checkpoint_steps.verify_digest(step_dir)
            verify.append(time.perf_counter() - started)
            started = time.perf_counter()
            previous = checkpoint_steps.compute_digest(step_dir, crc32=zlib.crc32)
            zlib_digest.append(time.perf_counter() - started)
            assert previous == json.loads((step_dir / checkpoint_steps.DIGEST_FILE).read_text())["files"]
            sizes.append(sum(path.stat().st_size for path in step_dir.rglob("*") if path.is_file()))
    finally:
        checkpointer.close()
        shutil.rmtree(args.dir, ignore_errors=True)
    result = {
        "model": args.model, "load_average": [round(value, 1) for value in os.getloadavg()],
        "cpus": os.cpu_count(), "step_bytes": int(statistics.median(sizes)), "device": jax.devices()[0].platform,
        "save_seconds": round(statistics.median(save), 3), "digest_seconds": round(statistics.median(digest), 3),
        "verify_seconds": round(statistics.median(verify), 3),
        "digest_over_save": round(statistics.median(digest) / statistics.median(save), 4),
        "verify_over_save": round(statistics.median(verify) / statistics.median(save), 4),
        "zlib_digest_seconds": round(statistics.median(zlib_digest), 3),
        "zlib_digest_over_save": round(statistics.median(zlib_digest) / statistics.median(save), 4),
        "digest_speedup_over_zlib": round(statistics.median(zlib_digest) / statistics.median(digest), 2),
    }
    print(f"{args.model}: step of {result['step_bytes'] / 2**30:.2f} GiB saved in {result['save_seconds']} s; "
          f"digest {result['digest_seconds']} s ({result['digest_over_save']:.1%} of the save), "
          f"check before restore {result['verify_seconds']} s; the previous zlib digest {result['zlib_digest_seconds']} s "
          f"({result['zlib_digest_over_save']:.1%}; ISA-L {result['digest_speedup_over_zlib']}x faster)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
