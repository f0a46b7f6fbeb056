"""Data -> objective -> optimizer on the demo config: every loss term fed by the real pipeline learns.

This is the contract test between `data/` and `losses/`: the demo config turns every term on, the
batches come from the grain pipeline over records written by the converters, and a jitted optax step
over the whole objective must lower the loss on a fixed batch.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data_fixtures
from configs import demo
from geoalign_jax.train import experiment
from geoalign_jax.data import pipeline
from geoalign_jax.losses import objective as objective_lib
from geoalign_jax.models import clip


def test_demo_config_trains_every_term_from_pipeline_batches(tmp_path):
    make_demo_data = data_fixtures.load_demo_module().make_demo_data
    written = make_demo_data(tmp_path / "data", num_train=24, num_val=0, num_per_class=0, image_size=64)
    config = demo.get_config()
    config.data.train_shards = written["scenes"]
    config.data.batch_size = 8
    loss_config = experiment.check_config(config)
    model_config = experiment.model_config(config)

    iterator = pipeline.make_train_iterator(config.data, process_index=0, process_count=1)
    batch = next(iterator)
    assert pipeline.pop_host_metrics(batch) == {"decode_errors": 0}
    objective_lib.check_batch(loss_config, batch)  # every enabled term finds its inputs
    batch = jax.tree.map(jnp.asarray, batch)

    params = clip.init_params(model_config, jax.random.key(0))
    optimizer = optax.adam(1e-3)
    objective = functools.partial(objective_lib.make_objective(config.loss), model_config=model_config)

    @jax.jit
    def train_step(params, opt_state, batch, step):
        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    opt_state = optimizer.init(params)
    history = []
    for step in range(12):
        params, opt_state, metrics = train_step(params, opt_state, batch, step)
        history.append(jax.device_get(metrics))
    first, last = history[0], history[-1]
    terms = objective_lib.enabled_terms(loss_config)
    assert len(terms) == len(objective_lib.TERM_NAMES)  # the demo config exercises every term
    for record in history:
        assert all(np.isfinite(value) for value in record.values()), record
    assert last["loss"] < 0.8 * first["loss"], (first["loss"], last["loss"])
    for name in terms:
        assert last[f"{name}/loss"] < first[f"{name}/loss"], (name, first[f"{name}/loss"], last[f"{name}/loss"])
    iterator.close()
