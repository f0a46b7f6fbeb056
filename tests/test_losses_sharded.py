"""On 8 simulated CPU devices, sharded losses (plain under GSPMD, chunked under shard_map) give the same
values and gradients as the single-device plain losses, and the chunked form holds only a
[local batch x chunk] block of logits per device.

The 8 devices need XLA_FLAGS before jax is imported, so the test runs this same file as a subprocess
worker (`python tests/test_losses_sharded.py`) and checks the JSON it prints; the pytest process keeps
whatever device count it has.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8


def _worker() -> dict[str, float]:
    """Returns {case: worst |sharded - single| / (atol + rtol |single|)} over value and gradients."""
    import jax
    import numpy as np

    from geoalign_jax.losses.contrastive import clip_loss, hard_negative_loss, siglip_loss
    from geoalign_jax.losses.contrastive import l2_normalize, principal_component_reconstruction
    from geoalign_jax.losses.region import multi_positive_loss, region_text_loss
    from geoalign_jax.losses.smoothed import label_smoothed_clip_loss
    from geoalign_jax.models.roi_align import region_features
    from geoalign_jax.parallel.mesh import AxisContext, batch_sharding, make_mesh, replicated

    assert jax.device_count() == DEVICES, jax.devices()
    rng = np.random.default_rng(0)
    count, dim, negatives_per_row, regions = 32, 8, 3, 2
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)  # noqa: E731
    corners = rng.uniform(0, 1, size=(count, regions, 2, 2)).astype(np.float32)
    inputs = {
        "image": normal(count, dim),
        "text": normal(count, dim),
        "negatives": normal(count, negatives_per_row, dim),
        "patch_tokens": normal(count, 4, 4, dim),
        "region_text": normal(count, regions, dim),
        "logit_scale": np.float32(2.0),
        "logit_bias": np.float32(-1.5),
    }
    masks = {
        "mask": rng.random(count) > 0.2,
        "negative_mask": rng.random((count, negatives_per_row)) > 0.4,
        "region_mask": rng.random((count, regions)) > 0.3,
        "category": rng.integers(-1, 4, size=(count, regions)).astype(np.int32),
        "boxes": np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1),
    }

    def losses(chunk_size, context):
        common = dict(chunk_size=chunk_size, axis_context=context)
        return {
            "clip": lambda x, m: clip_loss(x["image"], x["text"], x["logit_scale"], mask=m["mask"], **common)[0],
            "siglip": lambda x, m: siglip_loss(x["image"], x["text"], x["logit_scale"], x["logit_bias"], mask=m["mask"], **common)[0],
            "hard_negative": lambda x, m: hard_negative_loss(
                x["image"], x["text"], x["negatives"], m["negative_mask"], x["logit_scale"], mask=m["mask"], **common
            )[0],
            "region_text": lambda x, m: region_text_loss(
                region_features(x["patch_tokens"], m["boxes"], 3), x["region_text"], m["region_mask"], x["logit_scale"], **common
            )[0],
            "multi_positive": lambda x, m: multi_positive_loss(
                region_features(x["patch_tokens"], m["boxes"], 3), x["region_text"], m["category"], m["region_mask"], x["logit_scale"], **common
            )[0],
            # Long-CLIP's primary-component matching (4 PCA groups, SVD differentiated) + label smoothing.
            "pcm_smoothed": lambda x, m: label_smoothed_clip_loss(
                principal_component_reconstruction(l2_normalize(x["image"]), 2, groups=4), x["text"], x["logit_scale"],
                label_smoothing=0.1, normalize_images=False, mask=m["mask"], **common
            )[0],
        }

    def worst(result, reference, rtol=1e-5, atol=1e-5):
        pairs = zip(jax.tree.leaves(result), jax.tree.leaves(reference))
        return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (atol + rtol * np.abs(np.asarray(b))))) for a, b in pairs)

    references = {name: jax.jit(jax.value_and_grad(fn))(inputs, masks) for name, fn in losses(0, None).items()}
    results: dict[str, float] = {}
    meshes = {"data4xfsdp2": {"data": 4, "fsdp": 2, "tensor": 1}, "data4xtensor2": {"data": 4, "fsdp": 1, "tensor": 2}}
    for mesh_name, axes in meshes.items():
        mesh = make_mesh(axes)
        context = AxisContext(mesh)
        place = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.device_put(x, replicated(mesh) if np.ndim(x) == 0 else batch_sharding(mesh)), tree
        )
        sharded_inputs, sharded_masks = place(inputs), place(masks)
        chunk_sizes = (0, 3) if mesh_name == "data4xfsdp2" else (3,)
        for chunk_size in chunk_sizes:
            for name, fn in losses(chunk_size, context).items():
                result = jax.jit(jax.value_and_grad(fn))(sharded_inputs, sharded_masks)
                results[f"{name}/{mesh_name}/chunk{chunk_size}"] = worst(result, references[name])

    # Per-device memory: the chunked backward holds [local x chunk] logits, the plain one [local x global].
    big, chunk_size = 4096, 64
    local = big // DEVICES
    mesh = make_mesh({"data": DEVICES})
    context = AxisContext(mesh)
    embeddings = jax.ShapeDtypeStruct((big, 16), np.float32, sharding=batch_sharding(mesh))
    scale = jax.ShapeDtypeStruct((), np.float32, sharding=replicated(mesh))
    for chunk in (0, chunk_size):
        grad_fn = jax.jit(jax.grad(lambda i, t, s: clip_loss(i, t, s, chunk_size=chunk, axis_context=context)[0], argnums=(0, 1, 2)))
        analysis = grad_fn.lower(embeddings, embeddings, scale).compile().memory_analysis()
        results[f"temp_bytes/chunk{chunk}"] = float(analysis.temp_size_in_bytes) if analysis is not None else -1.0
    results["local_logits_bytes"] = float(local * big * 4)
    results["local_block_bytes"] = float(local * chunk_size * 4)
    return results


def test_sharded_losses_equal_single_device():
    import process_harness

    # Long-CLIP's PCM term differentiates an SVD, which amplifies float reassociation: sharded == one device
    # within 1e-5 holds at XLA's default code generation (what training compiles), not at the session's -O0 /
    # elemental emitters (2.7x the tolerance), so this worker compiles without them (10 s more).
    env = dict(os.environ, XLA_FLAGS=process_harness.xla_flags(DEVICES, default_codegen=True), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    completed = subprocess.run(
        [sys.executable, __file__], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    cases = {key: value for key, value in results.items() if "/" in key and not key.startswith("temp_bytes")}
    assert len(cases) == 18, sorted(cases)
    failures = {key: value for key, value in cases.items() if value > 1.0}
    assert not failures, failures
    # memory_analysis() is available on the CPU backend of the pinned jax; its absence would be a regression.
    assert results["temp_bytes/chunk0"] >= 0, "compiled memory_analysis() returned nothing"
    assert results["temp_bytes/chunk0"] >= results["local_logits_bytes"]
    assert results["temp_bytes/chunk64"] < results["local_logits_bytes"] / 4, results


def test_mesh_axis_sizes_are_resolved_and_bad_ones_named():
    import pytest

    from geoalign_jax.parallel.mesh import resolve_axis_sizes

    assert resolve_axis_sizes({"data": -1, "fsdp": 2, "tensor": 1}, 8) == {"data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="'fsdp'"):
        resolve_axis_sizes({"data": -1, "fsdp": 0}, 8)
    with pytest.raises(ValueError, match="at most one"):
        resolve_axis_sizes({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="cannot use 8 devices"):
        resolve_axis_sizes({"data": -1, "fsdp": 3}, 8)


if __name__ == "__main__":
    print(json.dumps(_worker()))
