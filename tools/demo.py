"""The CPU demo: the whole system on synthetic RS scenes, through the same commands a user runs.

1. write the demo data through the real `prepare` formats (tools/make_demo_data.py), unless OUT/data already holds it;
2. initialise the tiny CLIP of configs/demo.py (every loss term on), save it and evaluate it untrained
   (`python -m geoalign_jax.evaluate --checkpoint OUT/init ...`);
3. train it from that checkpoint with the trainer (`python -m geoalign_jax.train --config configs/demo.py:OUT/data
   --workdir OUT/run --config.init.kind=params ...`), which evaluates it every few steps;
4. evaluate the trained workdir, export it to open_clip and Hugging Face
   (`python -m geoalign_jax.convert export --params OUT/run ...`), reload both in PyTorch and compare their
   embeddings with JAX's, and evaluate the open_clip export in PyTorch;
5. plot the training curves (OUT/run/training_curves.png) and print a before/after table with chance levels.
Checks (exit status 1 when one fails): PyTorch embeddings equal JAX's (1e-4), JAX and PyTorch evaluations agree,
and every metric of the table ends well above chance and above the untrained model.

Run it through `bash launch/demo.sh` (sets up .venv first); OUT defaults to demo_out/. Arguments after `--`
go to the trainer (e.g. `-- --config.data.batch_size=16`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import time
from typing import Any, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tools"))

MARKER = ".geoalign-demo"
DATA_STAMP = "demo_data.json"
EMBEDDING_TOLERANCE = 1e-4
# Evaluations through JAX and through PyTorch may differ by a near-tie in a ranking, never by more.
METRIC_TOLERANCE = 1.0
# What "learned" means for each table row: at least this many times chance, and this many points above untrained.
MIN_CHANCE_FACTOR = 2.0
MIN_GAIN = 10.0
HEADLINE = (
    ("zeroshot/landcover/top1", "land-cover zero-shot top-1 (5 classes)"),
    ("retrieval/demo/standard/mean_recall", "retrieval mean recall, standard protocol"),
    ("retrieval/demo/skyscript/mean_recall", "retrieval mean recall, SkyScript protocol"),
)
PARITY_IMAGES = 8


def _stage(number: int, message: str) -> None:
    print(f"\n== {number}/5 {message}", flush=True)


def _show(command: Sequence[str]) -> None:
    """Prints a command as a user would type it from the repository root."""
    print("$ " + " ".join(shlex.quote(_relative(part)) for part in command), flush=True)


def _relative(text: str) -> str:
    for prefix in (str(REPO_ROOT) + os.sep,):
        text = text.replace(prefix, "")
    return text


def prepare_out(out: pathlib.Path) -> bool:
    """Clears an earlier demo run in `out` but keeps its data/; refuses a folder this demo did not make."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            print(f"error: --out {out} is not empty and was not made by this demo; choose another folder",
                  file=sys.stderr)
            return False
        for child in out.iterdir():
            if child.name not in ("data", MARKER):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    return True


def ensure_data(data_dir: pathlib.Path, sizes: dict[str, int]) -> dict[str, str]:
    """The demo data in `data_dir`: reused when it was written with the same sizes, else (re)written."""
    stamp = data_dir / DATA_STAMP
    folders = {"scenes": str(data_dir / "scenes"), "landcover": str(data_dir / "landcover")}
    complete = all((pathlib.Path(folder) / "manifest.json").is_file() for folder in folders.values())
    if complete and stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        print(f"reusing the demo data in {_relative(str(data_dir))} ({DATA_STAMP} matches)")
        return folders
    from make_demo_data import make_demo_data

    _show([sys.executable, "tools/make_demo_data.py", "--out", str(data_dir), "--overwrite",
           *(f"--{key.replace('_', '-')}={value}" for key, value in sizes.items())])
    stamp.unlink(missing_ok=True)
    written = make_demo_data(data_dir, overwrite=True, **sizes)
    stamp.write_text(json.dumps(sizes, indent=2, sort_keys=True))
    return {"scenes": written["scenes"], "landcover": written["landcover"]}


def chance_level(key: str, metrics: dict[str, float]) -> float:
    """The expected value of a headline metric for a model that ranks at random (percent).

    Zero-shot top-1: 1 / classes. Retrieval mean recall: the mean over k in {1, 5, 10} and both directions of
    the chance that a random ranking puts a correct item in the top k (c = texts per image correct texts among
    T for an image query, one correct image among I for a text query)."""
    prefix = key.rsplit("/", 1)[0]
    if key.startswith("zeroshot/") and key.endswith("/top1"):
        classes = sum(1 for name in metrics if name.startswith(f"{prefix}/class/"))
        if not classes:
            raise ValueError(f"{prefix}: no per-class results to count the classes")
        return 100.0 / classes
    if key.startswith("retrieval/") and key.endswith("/mean_recall"):
        images, texts = int(metrics[f"{prefix}/num_images"]), int(metrics[f"{prefix}/num_texts"])
        per_image = max(1, round(texts / images))
        recalls = []
        for k in (1, 5, 10):
            recalls.append(1 - math.comb(texts - per_image, min(k, texts)) / math.comb(texts, min(k, texts)))
            recalls.append(min(k, images) / images)
        return 100.0 * sum(recalls) / len(recalls)
    raise ValueError(f"no chance level known for {key!r}")


def _evaluate(args: list[str], out: pathlib.Path) -> dict[str, float]:
    """The evaluate CLI in this process (the command is printed); returns the metrics it wrote."""
    from geoalign_jax.eval.__main__ import main as evaluate_main

    command = [sys.executable, "-m", "geoalign_jax.evaluate", *args, "--out", str(out), "--no-progress"]
    _show(command)
    if evaluate_main(command[3:]) != 0:
        raise RuntimeError(f"evaluation failed: {' '.join(command)}")
    return json.loads((out / "results.json").read_text())["metrics"]


def _export(run: pathlib.Path, fmt: str, out: pathlib.Path) -> None:
    from geoalign_jax.convert.__main__ import main as convert_main

    command = [sys.executable, "-m", "geoalign_jax.convert", "export", "--params", str(run), "--format", fmt,
               "--out", str(out)]
    _show(command)
    if convert_main(command[3:]) != 0:
        raise RuntimeError(f"export failed: {' '.join(command)}")


def _parity_inputs(scenes: str, image_size: int, context_length: int) -> tuple[Any, Any, list[str]]:
    """The first held-out scenes as model inputs, with their captions (real inputs, not noise)."""
    import numpy as np

    from geoalign_jax import tokenizer
    from geoalign_jax.data import sources
    from geoalign_jax.eval import preprocess

    source = sources.RecordSource.from_dir(scenes, "val")
    records = [source[i] for i in range(min(PARITY_IMAGES, len(source)))]
    images = np.stack([preprocess.preprocess_bytes(r["image"], image_size) for r in records])
    captions = [r["captions"][0] for r in records]
    return images, tokenizer.tokenize(captions, context_length), captions


def compare_with_torch(run: pathlib.Path, exports: dict[str, pathlib.Path], scenes: str) -> dict[str, float]:
    """Max |embedding difference| between JAX (the trained workdir) and each export reloaded in PyTorch."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    from geoalign_jax.models import clip
    from geoalign_jax.params_checkpoint import load_params

    config, params = load_params(run)
    images, tokens, _ = _parity_inputs(scenes, config.vision.image_size, config.text.context_length)
    jax_image = np.asarray(clip.encode_image(config, params, jnp.asarray(images))[0])
    jax_text = np.asarray(clip.encode_text(config, params, jnp.asarray(tokens))[0])
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
    ids = torch.from_numpy(tokens.astype(np.int64))
    differences = {}
    with torch.inference_mode():
        for fmt, folder in exports.items():
            if fmt == "open_clip":
                import open_clip

                model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
                torch_image, torch_text = model.encode_image(pixels), model.encode_text(ids)
            else:
                from transformers import CLIPModel

                model = CLIPModel.from_pretrained(folder)
                torch_image = model.get_image_features(pixel_values=pixels).pooler_output
                torch_text = model.get_text_features(input_ids=ids).pooler_output
            differences[fmt] = max(float(np.abs(torch_image.numpy() - jax_image).max()),
                                   float(np.abs(torch_text.numpy() - jax_text).max()))
            ok = differences[fmt] <= EMBEDDING_TOLERANCE
            print(f"PyTorch {fmt}: {len(images)} held-out images and captions, max |JAX - PyTorch| embedding "
                  f"difference {differences[fmt]:.1e} -> {'OK' if ok else 'MISMATCH'}")
    return differences


def build_table(untrained: dict[str, float], trained: dict[str, float], torch_metrics: dict[str, float]
                ) -> list[dict[str, Any]]:
    rows = []
    for key, label in HEADLINE:
        chance = chance_level(key, trained)
        learned = trained[key] >= MIN_CHANCE_FACTOR * chance and trained[key] >= untrained[key] + MIN_GAIN
        rows.append({"metric": key, "label": label, "chance": chance, "untrained": untrained[key],
                     "trained": trained[key], "trained_pytorch": torch_metrics[key], "learned": learned})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric (%) | chance | untrained | trained (JAX) | trained (open_clip export, PyTorch) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['label']} | {row['chance']:.1f} | {row['untrained']:.1f} | {row['trained']:.1f} | "
                     f"{row['trained_pytorch']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to the trainer (--config.FIELD=VALUE ...).")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "demo_out",
                        help="output folder (an earlier demo run's outputs are replaced; its data/ is reused)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: configs/demo.py's)")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="evaluate during training every this many steps (default: configs/demo.py's)")
    parser.add_argument("--num-train", type=int, default=1000, help="training scenes to generate")
    parser.add_argument("--num-val", type=int, default=100, help="held-out scenes (the retrieval test)")
    parser.add_argument("--num-per-class", type=int, default=20, help="land-cover images per class (zero-shot test)")
    parser.add_argument("--no-learning-check", action="store_true",
                        help="do not fail when a metric does not beat chance and the untrained model (short runs)")
    args = parser.parse_args(argv)
    out = args.out.absolute()
    if not prepare_out(out):
        return 2
    started = time.perf_counter()
    seconds: dict[str, float] = {}
    failures: list[str] = []

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        seconds[name] = round(now - since, 1)
        return now

    clock = started
    _stage(1, "demo data: synthetic aerial scenes with captions, long texts, regions and hard negatives")
    sizes = {"num_train": args.num_train, "num_val": args.num_val, "num_per_class": args.num_per_class,
             "image_size": 64, "seed": 0}
    data = ensure_data(out / "data", sizes)
    for name, folder in data.items():
        manifest = json.loads((pathlib.Path(folder) / "manifest.json").read_text())
        print(f"{_relative(folder)}: " + ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items()))
    clock = lap("data", clock)

    import jax

    from configs import demo
    from geoalign_jax.train import experiment
    from geoalign_jax.models import clip
    from geoalign_jax.params_checkpoint import save_params

    config = demo.get_config(str(out / "data"))
    tasks = list(config.eval.tasks)
    model_config = experiment.model_config(config)
    _stage(2, f"initialise the tiny CLIP of configs/demo.py ({jax.devices()[0].platform}) and evaluate it untrained")
    init_dir = out / "init"
    save_params(init_dir, model_config, clip.init_params(model_config, jax.random.key(int(config.train.seed))))
    print(f"saved the untrained parameters to {_relative(str(init_dir))}")
    untrained = _evaluate(["--checkpoint", str(init_dir), "--tasks", *tasks], out / "eval" / "untrained")
    clock = lap("untrained evaluation", clock)

    _stage(3, "train with the trainer (every loss term on, evaluated during training)")
    run = out / "run"
    command = [sys.executable, "-m", "geoalign_jax.train", "--config", f"configs/demo.py:{out / 'data'}",
               "--workdir", str(run), "--config.init.kind=params", f"--config.init.path={init_dir}"]
    if args.steps is not None:
        command.append(f"--config.train.num_steps={args.steps}")
    if args.eval_every is not None:
        command.append(f"--config.eval.every_steps={args.eval_every}")
    if not sys.stderr.isatty():
        command.append("--progress=false")
    command += trainer_args
    _show(command)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    if subprocess.run(command, cwd=REPO_ROOT, env=env).returncode != 0:
        print(f"error: training failed; its log is above (workdir {run})", file=sys.stderr)
        return 1
    clock = lap("training", clock)

    _stage(4, "evaluate the trained model; export to open_clip and Hugging Face; reload both in PyTorch")
    trained = _evaluate(["--checkpoint", str(run), "--tasks", *tasks], out / "eval" / "trained")
    exports = {"open_clip": out / "export" / "open_clip", "hf": out / "export" / "hf"}
    for fmt, folder in exports.items():
        _export(run, fmt, folder)
    differences = compare_with_torch(run, exports, data["scenes"])
    failures += [f"{fmt} embeddings differ by {diff:.1e}" for fmt, diff in differences.items()
                 if not diff <= EMBEDDING_TOLERANCE]
    torch_metrics = _evaluate(["--open-clip", str(exports["open_clip"]), "--backend", "open_clip", "--tasks", *tasks],
                              out / "eval" / "open_clip")
    disagreement = max(abs(trained[key] - torch_metrics[key]) for key in trained)
    print(f"JAX and PyTorch evaluations of the trained model: {len(trained)} metrics, largest difference "
          f"{disagreement:.2f} points")
    if disagreement > METRIC_TOLERANCE:
        failures.append(f"JAX and PyTorch evaluations differ by {disagreement:.2f} points")
    clock = lap("evaluation and export", clock)

    _stage(5, "training curves and the before/after table")
    from geoalign_jax.train.plots import plot_training_curves

    rows = build_table(untrained, trained, torch_metrics)
    curves = plot_training_curves(run, chance={row["metric"]: row["chance"] for row in rows},
                                  title="configs/demo.py: every loss term on (tiny CLIP, synthetic scenes)")
    lap("plots", clock)
    table = format_table(rows)
    print(table)
    if not args.no_learning_check:
        failures += [f"{row['label']}: {row['trained']:.1f} is not >= {MIN_CHANCE_FACTOR:g} x chance "
                     f"({row['chance']:.1f}) and >= untrained ({row['untrained']:.1f}) + {MIN_GAIN:g}"
                     for row in rows if not row["learned"]]
    total = time.perf_counter() - started
    places = {
        "demo data": out / "data",
        "untrained parameters": init_dir,
        "trainer workdir (config.json, metrics.jsonl, tb/, checkpoints/)": run,
        "training curves": curves,
        "evaluations (results.json, plots)": out / "eval",
        "open_clip export (open_clip 'local-dir:')": exports["open_clip"],
        "Hugging Face export (CLIPModel.from_pretrained)": exports["hf"],
        "this summary": out / "summary.json",
    }
    summary = {"seconds": {**seconds, "total": round(total, 1)}, "table": rows,
               "embedding_max_abs_difference": differences, "jax_vs_pytorch_max_metric_difference": disagreement,
               "failures": failures, "paths": {name: str(path) for name, path in places.items()},
               "trainer_command": command}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print("\nwhere everything went:")
    for name, path in places.items():
        print(f"  {name:66s} {_relative(str(path))}")
    print("times: " + ", ".join(f"{name} {value:.0f}s" for name, value in seconds.items()) + f"; total {total:.0f}s")
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    print(f"demo finished in {total:.0f}s with {len(failures)} failed check(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
