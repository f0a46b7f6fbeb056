"""The CPU demo: the whole path on synthetic RS scenes, in about two minutes on a laptop CPU.

1. make the demo dataset through the real converters (records + manifest);
2. build a tiny CLIP (configs/demo.py: every multi-granular loss term on) and evaluate it untrained;
3. fit it for a few dozen steps on batches from the grain pipeline (a minimal loop: the trainer with
   checkpoints, sharding and preemption comes in a later issue);
4. save the parameters with orbax, export them to open_clip and Hugging Face, reload both in PyTorch and
   compare embeddings, import the open_clip export back (bit-exact);
5. evaluate the fitted model in JAX and through the open_clip export: the numbers must agree, and beat
   the untrained model.
Run it through `bash launch/demo.sh` (sets up .venv first). Exits 1 when a check fails.
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import shutil
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

from configs import common, demo  # noqa: E402
from geoalign_jax import tokenizer  # noqa: E402
from geoalign_jax.convert import __main__ as convert_cli  # noqa: E402
from geoalign_jax.data import pipeline  # noqa: E402
from geoalign_jax.eval import embed, evaluate  # noqa: E402
from geoalign_jax.losses import objective as objective_lib  # noqa: E402
from geoalign_jax.models import clip  # noqa: E402
from geoalign_jax import params_checkpoint as checkpoint  # noqa: E402
from make_demo_data import make_demo_data  # noqa: E402

TOLERANCE = 1e-4
PARITY_CAPTIONS = (
    "an aerial image of farmland with two red airplanes in the top left.",
    "a bridge crosses the river with two boats nearby!!",
)
HEADLINE = ("zeroshot/landcover/top1", "retrieval/demo/standard/mean_recall")


def _step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _prepare_out(out: pathlib.Path) -> bool:
    """Replaces an earlier demo run's folder; never deletes a folder this demo did not make."""
    marker = out / ".geoalign-demo"
    if out.exists() and any(out.iterdir()):
        if not marker.is_file():
            print(f"error: --out {out} is not empty and was not made by this demo; choose another folder",
                  file=sys.stderr)
            return False
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return True


def _fit(config, model_config, params, steps: int):
    """A minimal jitted optax loop over pipeline batches with the config's whole objective."""
    objective = functools.partial(objective_lib.make_objective(config.loss), model_config=model_config)
    optimizer = optax.adamw(_learning_rate(steps), weight_decay=0.01)

    @jax.jit
    def train_step(params, opt_state, batch, step):
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, step)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    terms = objective_lib.enabled_terms(common.check_config(config))
    opt_state = optimizer.init(params)
    iterator = pipeline.make_train_iterator(config.data)
    try:
        batch = next(iterator)
        host_metrics = pipeline.pop_host_metrics(batch)
        # Compile once ahead of time, and say what the step costs in memory before running it.
        compiled = train_step.lower(params, opt_state, batch, jnp.int32(0)).compile()
        memory = compiled.memory_analysis()
        if memory is not None:
            print(f"compiled train step: arguments {memory.argument_size_in_bytes / 2**20:.1f} MiB, "
                  f"temporaries {memory.temp_size_in_bytes / 2**20:.1f} MiB", flush=True)
        for step in range(steps):
            if step:
                batch = next(iterator)
                host_metrics = pipeline.pop_host_metrics(batch)
            params, opt_state, metrics = compiled(params, opt_state, batch, jnp.int32(step))
            if step % 10 == 0 or step == steps - 1:
                metrics = jax.device_get(metrics)  # the only host sync: for logging
                per_term = ", ".join(f"{name} {metrics[f'{name}/loss']:.3f}" for name in terms)
                print(f"step {step:3d}  loss {metrics['loss']:.3f}  ({per_term}; decode errors "
                      f"{host_metrics.get('decode_errors', 0)})", flush=True)
    finally:
        iterator.close()
    return params


def _learning_rate(steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, 2e-3, warmup_steps=max(1, steps // 10), decay_steps=steps)


def _compare_with_torch(folder: pathlib.Path, fmt: str, images: np.ndarray, tokens: np.ndarray,
                        image_embedding: np.ndarray, text_embedding: np.ndarray) -> bool:
    import torch

    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    with torch.inference_mode():
        if fmt == "open_clip":
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            torch_image = model.encode_image(pixels)
            torch_text = model.encode_text(torch.from_numpy(tokens.astype(np.int64)))
        else:
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(folder)
            torch_image = model.get_image_features(pixel_values=pixels).pooler_output
            torch_text = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64))).pooler_output
    image_diff = float(np.abs(torch_image.numpy() - image_embedding).max())
    text_diff = float(np.abs(torch_text.numpy() - text_embedding).max())
    ok = max(image_diff, text_diff) <= TOLERANCE
    print(f"max |JAX - {fmt}|: image {image_diff:.2e}, text {text_diff:.2e} -> {'OK' if ok else 'MISMATCH'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "demo_out",
                        help="output folder (an earlier demo run's folder is replaced)")
    parser.add_argument("--steps", type=int, default=80, help="fitting steps")
    parser.add_argument("--num-train", type=int, default=512, help="training scenes to generate")
    args = parser.parse_args(argv)
    if not _prepare_out(args.out):
        return 2
    start = time.perf_counter()
    failures = 0

    _step("make the synthetic demo data (records through the JSONL and class-folder converters)")
    data = make_demo_data(args.out / "data", num_train=args.num_train, num_val=100, num_per_class=20,
                          image_size=64)
    for name, folder in data.items():
        manifest = json.loads((pathlib.Path(folder) / "manifest.json").read_text())
        print(f"{name}: " + ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items()))
    tasks = [f"zeroshot:landcover={data['landcover']}", f"retrieval:demo={data['scenes']},split=val,protocol=both"]

    config = demo.get_config()
    config.data.train_shards = data["scenes"]
    common.check_config(config)
    model_config = common.model_config(config)
    _step(f"build the tiny CLIP of configs/demo.py in JAX ({jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s)) and evaluate it untrained")
    params = clip.init_params(model_config, jax.random.key(0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{count:,} parameters; image {model_config.vision.image_size}px, "
          f"text context {model_config.text.context_length}")
    untrained = evaluate(model_config, params, tasks, progress=False)

    _step(f"fit {args.steps} steps, batch {config.data.batch_size}, all loss terms on")
    params = jax.device_get(_fit(config, model_config, params, args.steps))

    _step("save with orbax, export to open_clip and Hugging Face, reload in PyTorch")
    ckpt = checkpoint.save_params(args.out / "params", model_config, params)
    print(f"saved parameters checkpoint {ckpt}")
    tokens = tokenizer.tokenize(PARITY_CAPTIONS, model_config.text.context_length)
    size = model_config.vision.image_size
    images = np.random.default_rng(0).normal(size=(len(PARITY_CAPTIONS), size, size, 3)).astype(np.float32)
    image_embedding = np.asarray(clip.encode_image(model_config, params, jnp.asarray(images))[0])
    text_embedding = np.asarray(clip.encode_text(model_config, params, jnp.asarray(tokens))[0])
    for fmt in ("open_clip", "hf"):
        written = convert_cli.run_export(ckpt, fmt, args.out / fmt)
        print(f"wrote {len(written)} files to {args.out / fmt}")
        failures += not _compare_with_torch(args.out / fmt, fmt, images, tokens, image_embedding, text_embedding)
    reimported = convert_cli.run_import(args.out / "open_clip", "open_clip", args.out / "reimported",
                                        quick_gelu=None, model=None, stretch_text=False)
    _, params_back = checkpoint.load_params(reimported)
    exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)))
    failures += not exact
    print(f"JAX -> open_clip -> JAX bit-exact: {exact}")

    _step("evaluate the fitted model in JAX and through the open_clip export")
    fitted = evaluate(model_config, params, tasks, progress=False)
    through_torch = evaluate(None, None, tasks, embedder=embed.OpenClipEmbedder.from_dir(str(args.out / "open_clip")),
                             progress=False)
    print(f"{'metric':40s} {'untrained':>10s} {'fitted JAX':>11s} {'fitted open_clip':>17s}")
    for key in (k for k in fitted if k.endswith(("top1", "mean_recall"))):
        print(f"{key:40s} {untrained[key]:10.2f} {fitted[key]:11.2f} {through_torch[key]:17.2f}")
    agree = all(abs(fitted[k] - through_torch[k]) < 1e-6 for k in fitted)
    improved = all(fitted[k] > untrained[k] for k in HEADLINE)
    failures += (not agree) + (not improved)
    print(f"all {len(fitted)} metrics agree between JAX and open_clip: {agree}; fitted beats untrained: {improved}")

    print(f"\ndemo finished in {time.perf_counter() - start:.0f}s with {failures} failure(s); outputs in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
