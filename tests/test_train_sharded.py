"""The trainer's step on 8 simulated CPU devices: data x fsdp and fsdp x tensor meshes follow the 1-device run
step for step, FSDP divides the per-device parameter + optimizer bytes, and a checkpoint written on one mesh
restores on another (8 -> 1 and 1 -> 8).

The 8 devices need XLA_FLAGS before jax is imported, so the test runs this file as a subprocess worker
(`python tests/test_train_sharded.py DATA OUT`) and checks the JSON it writes.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 8
STEPS = 3
MESHES = {  # name -> (data, fsdp, tensor)
    "single": (1, 1, 1),
    "data2_fsdp4": (2, 4, 1),
    "fsdp4_tensor2": (1, 4, 2),
}


def _worker(data_dir: str, out: pathlib.Path) -> dict:
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import jax
    import numpy as np

    import train_fixtures
    from geoalign_jax.data import pipeline
    from geoalign_jax.parallel import mesh as mesh_lib
    from geoalign_jax.parallel import multihost
    from geoalign_jax.train import checkpoint as checkpoint_lib
    from geoalign_jax.train import loop
    from geoalign_jax.train import state as state_lib
    from geoalign_jax.train import step as step_lib

    assert jax.device_count() == DEVICES, jax.devices()
    from geoalign_jax.models import text as text_lib

    # The tiny text tower takes the length switch too (77 -> buckets 32, 77), so the switch on the global
    # batch's longest caption runs on every mesh and must follow the 1-device run like the rest of the step.
    text_lib.MIN_BUCKETED_WIDTH = 0
    iterator = pipeline.make_train_iterator(train_fixtures.tiny_config(data_dir).data)
    batches = [next(iterator) for _ in range(STEPS)]
    for batch in batches:
        pipeline.pop_host_metrics(batch)

    def setup_for(name: str):
        data, fsdp, tensor = MESHES[name]
        config = train_fixtures.tiny_config(data_dir, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor})
        devices = jax.devices()[: data * fsdp * tensor]
        return loop.build(config, devices=devices)

    report: dict = {"losses": {}, "initial_params_equal": {}, "specs": {}}
    reference_initial = None
    final_params = {}
    for name in MESHES:
        setup = setup_for(name)
        state = loop.initial_state(setup)
        initial = train_fixtures.flat(state.params)
        if reference_initial is None:
            reference_initial = initial
        report["initial_params_equal"][name] = all(
            np.array_equal(reference_initial[k], initial[k]) for k in reference_initial
        )
        report["specs"][name] = {
            "c_fc": list(state.params["visual"]["transformer"]["resblocks_0"]["mlp"]["c_fc"]["kernel"].sharding.spec),
            "query": list(state.params["visual"]["transformer"]["resblocks_0"]["attn"]["query"]["kernel"].sharding.spec),
        }
        compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
        sharding = mesh_lib.batch_sharding(setup.mesh)
        losses = []
        for batch in batches:
            state, metrics = compiled.run(state, multihost.host_batch_to_global(batch, sharding))
            losses.append(float(metrics["loss"]))
        report["losses"][name] = losses
        final_params[name] = train_fixtures.flat(state.params)
        if name == "fsdp4_tensor2":
            sharded_state, sharded_setup, whole_batch_flops = state, setup, compiled.flops
        if name == "single":
            single_state, single_setup = state, setup
    report["max_param_diff"] = {
        name: max(float(np.max(np.abs(final_params[name][k] - final_params["single"][k]))) for k in final_params["single"])
        for name in MESHES
    }

    # Per-device bytes of parameters + optimizer state: FSDP over all 8 devices vs replicated (data = 8).
    def state_bytes(data: int, fsdp: int) -> int:
        config = train_fixtures.tiny_config(data_dir, **{"mesh.data": data, "mesh.fsdp": fsdp})
        setup = loop.build(config)
        abstract = state_lib.with_shardings(setup.abstract_state, setup.shardings)
        return state_lib.per_device_bytes(abstract.params) + state_lib.per_device_bytes(abstract.opt_state)

    report["bytes"] = {"replicated": state_bytes(8, 1), "fsdp8": state_bytes(1, 8)}

    # Save on one mesh, restore on another; the values must come back bit for bit on the new shardings.
    def save_and_restore(state, setup_from, setup_to, folder: pathlib.Path) -> bool:
        checkpointer = checkpoint_lib.Checkpointer(folder, keep=1, async_save=False)
        checkpointer.save(state, iterator)
        target = state_lib.with_shardings(setup_to.abstract_state, setup_to.shardings)
        restored = checkpointer.restore(STEPS, target, iterator)
        checkpointer.close()
        on_target = all(
            leaf.sharding == sharding
            for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(setup_to.shardings))
        )
        expected, got = train_fixtures.flat(state), train_fixtures.flat(restored)
        return on_target and expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)

    # Gradient accumulation on the fsdp x tensor mesh: 2 micro-batches of 4 (strided rows, GradCache); the step's
    # loss and gradient are those of the whole batch of 8, evaluated on one device.
    import functools

    import optax

    from geoalign_jax.losses import objective as objective_lib

    config = train_fixtures.tiny_config(data_dir, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2,
                                                     "train.micro_batches": 2})
    setup = loop.build(config)
    state = loop.initial_state(setup)
    start_params = jax.device_get(state.params)
    compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
    _, metrics = compiled.run(state, multihost.host_batch_to_global(batches[0], mesh_lib.batch_sharding(setup.mesh)))
    objective = functools.partial(objective_lib.make_objective(config.loss), model_config=setup.model_config)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda params, batch: objective(params, batch, 0)[0]))
    whole_loss, whole_grads = loss_and_grad(start_params, batches[0])
    report["micro_batches"] = [float(metrics["loss"]), float(whole_loss)]
    report["micro_grad_norm"] = [float(metrics["grad_norm"]), float(optax.tree.norm(whole_grads))]
    # The same 8 examples per step in 2 micro-batches: about the FLOPs of the whole-batch step plus one more
    # forward pass (XLA counts a scan body once; compile_step must count both micro-batches).
    report["micro_flops"] = [compiled.flops, whole_batch_flops]

    report["restore_8_to_1"] = save_and_restore(sharded_state, sharded_setup, single_setup, out / "ckpt_8")
    report["restore_1_to_8"] = save_and_restore(single_state, single_setup, sharded_setup, out / "ckpt_1")
    iterator.close()
    return report


def test_sharded_steps_match_one_device_and_checkpoints_move_between_meshes(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import process_harness
    import train_fixtures

    data_dir = train_fixtures.make_data(tmp_path / "data")
    env = {**os.environ, "XLA_FLAGS": process_harness.xla_flags(DEVICES),
           "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__)), data_dir, str(out)], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())

    assert all(report["initial_params_equal"].values()), report["initial_params_equal"]
    single = report["losses"]["single"]
    for name in ("data2_fsdp4", "fsdp4_tensor2"):
        for step, (expected, got) in enumerate(zip(single, report["losses"][name])):
            assert abs(got - expected) <= 1e-4 * abs(expected), (name, step, expected, got)
        assert report["max_param_diff"][name] < 1e-4, report["max_param_diff"]
    # the rules table at work: embed over fsdp; MLP hidden units and heads over tensor
    # c_fc kernel [embed, mlp], query kernel [embed, heads, kv]
    assert report["specs"]["data2_fsdp4"] == {"c_fc": ["fsdp"], "query": ["fsdp"]}
    assert report["specs"]["fsdp4_tensor2"] == {"c_fc": ["fsdp", "tensor"], "query": ["fsdp", "tensor"]}
    ratio = report["bytes"]["fsdp8"] / report["bytes"]["replicated"]
    print(f"per-device params + optimizer state: replicated {report['bytes']['replicated']} B, "
          f"fsdp=8 {report['bytes']['fsdp8']} B (ratio {ratio:.4f})")
    assert ratio < 0.13, report["bytes"]  # 1/8 = 0.125, plus the few replicated scalars / indivisible leaves
    assert report["restore_8_to_1"] and report["restore_1_to_8"]
    got, expected = report["micro_batches"]
    assert abs(got - expected) <= 1e-4 * abs(expected), report["micro_batches"]
    got, expected = report["micro_grad_norm"]
    assert abs(got - expected) <= 1e-4 * abs(expected), report["micro_grad_norm"]
    micro_flops, whole_flops = report["micro_flops"]
    print(f"GFLOP per device and step: 2 micro-batches {micro_flops / 1e9:.4f}, whole batch {whole_flops / 1e9:.4f}")
    assert 1.15 <= micro_flops / whole_flops <= 1.5, report["micro_flops"]


if __name__ == "__main__":
    data_arg, out_arg = sys.argv[1], pathlib.Path(sys.argv[2])
    (out_arg / "report.json").write_text(json.dumps(_worker(data_arg, out_arg)))
