"""The CPU demo: a tiny CLIP in JAX, saved with orbax, exported to open_clip and Hugging Face, reloaded there,
and evaluated on the synthetic demo data (zero-shot + retrieval) in JAX and in open_clip.

Run it through `bash launch/demo.sh` (sets up .venv first). Every step prints what it did and the
numbers that show it worked; the run fails (exit 1) when an export does not reproduce the JAX model.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from geoalign_jax import tokenizer  # noqa: E402
from geoalign_jax.convert import __main__ as convert_cli  # noqa: E402
from geoalign_jax.eval import embed, evaluate  # noqa: E402
from geoalign_jax.models import clip  # noqa: E402
from geoalign_jax.train import checkpoint  # noqa: E402

TOLERANCE = 1e-4
FALLBACK_CAPTIONS = [
    "many buildings and green trees are around a playground.",
    "a bridge crosses the river with two boats nearby!!",
    "several storage tanks stand beside a parking lot with 12 cars.",
]


def _step(message: str) -> None:
    print(f"\n== {message}", flush=True)


def _captions(shared: pathlib.Path) -> list[str]:
    path = shared / "rsicd_sample" / "dataset_rsicd.json"
    if not path.is_file():
        print(f"({path} not found: using built-in captions)")
        return FALLBACK_CAPTIONS
    images = json.loads(path.read_text())["images"]
    return [image["sentences"][0]["raw"] for image in images[:8]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "demo_out", help="output folder (replaced)")
    parser.add_argument("--model", default="tiny", help="named architecture (tiny, ViT-B-32, ...)")
    parser.add_argument("--shared", type=pathlib.Path, default=REPO_ROOT.parent / "shared" / "data")
    args = parser.parse_args(argv)
    marker = args.out / ".geoalign-demo"
    if args.out.exists() and any(args.out.iterdir()):
        if not marker.is_file():
            print(f"error: --out {args.out} is not empty and was not made by this demo; choose another folder",
                  file=sys.stderr)
            return 2
        shutil.rmtree(args.out)  # an earlier demo run's outputs
    args.out.mkdir(parents=True, exist_ok=True)
    marker.touch()
    start = time.perf_counter()

    _step(f"build a {args.model} CLIP in JAX ({jax.devices()[0].platform}, {jax.device_count()} device(s))")
    config = clip.get_model_config(args.model)
    params = clip.init_params(config, jax.random.key(0))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"{count:,} parameters; image {config.vision.image_size}px, text context {config.text.context_length}")

    ckpt = args.out / "params"
    checkpoint.save_params(ckpt, config, params)
    print(f"saved parameters checkpoint {ckpt}")

    captions = _captions(args.shared)
    tokens = tokenizer.tokenize(captions, config.text.context_length)
    size = config.vision.image_size
    images = np.random.default_rng(0).normal(size=(len(captions), size, size, 3)).astype(np.float32)
    image_embedding, _ = clip.encode_image(config, params, images)
    text_embedding, _ = clip.encode_text(config, params, tokens)
    print(f"encoded {len(captions)} images and captions, e.g. {captions[0]!r}")

    import torch

    failures = 0
    for fmt in ("open_clip", "hf"):
        _step(f"export to {fmt} and reload it in PyTorch")
        folder = args.out / fmt
        for path in convert_cli.run_export(ckpt, fmt, folder):
            print(f"wrote {path}")
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
        image_diff = float(np.abs(torch_image.numpy() - np.asarray(image_embedding)).max())
        text_diff = float(np.abs(torch_text.numpy() - np.asarray(text_embedding)).max())
        ok = max(image_diff, text_diff) <= TOLERANCE
        failures += not ok
        print(f"max |JAX - {fmt}|: image {image_diff:.2e}, text {text_diff:.2e} -> {'OK' if ok else 'MISMATCH'}")

    _step("import the open_clip export back into JAX")
    reimported = args.out / "reimported"
    convert_cli.run_import(args.out / "open_clip", "open_clip", reimported, quick_gelu=None, model=None,
                           stretch_text=False)
    _, params_back = checkpoint.load_params(reimported)
    exact = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_back)))
    failures += not exact
    print(f"JAX -> open_clip -> JAX bit-exact: {exact}")

    _step("make the synthetic demo data (records through the JSONL and class-folder converters)")
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    from make_demo_data import make_demo_data

    data = make_demo_data(args.out / "data", num_train=64, num_val=40, num_per_class=8, image_size=64)
    for name, folder in data.items():
        manifest = json.loads((pathlib.Path(folder) / "manifest.json").read_text())
        print(f"{name}: " + ", ".join(f"{split} {info['count']}" for split, info in manifest["splits"].items()))
    tasks = [f"zeroshot:landcover={data['landcover']}", f"retrieval:demo={data['scenes']},split=val,protocol=both"]

    _step("evaluate the (untrained) model in JAX and as the open_clip export: the numbers must agree")
    jax_metrics = evaluate(config, params, tasks, progress=False)
    torch_metrics = evaluate(None, None, tasks, embedder=embed.OpenClipEmbedder.from_dir(str(args.out / "open_clip")),
                             progress=False)
    shown = [k for k in jax_metrics if k.endswith(("top1", "mean_recall"))]
    for key in shown:
        print(f"{key:45s} JAX {jax_metrics[key]:6.2f}   open_clip {torch_metrics[key]:6.2f}")
    agree = all(abs(jax_metrics[k] - torch_metrics[k]) < 1e-6 for k in jax_metrics)
    failures += not agree
    print(f"all {len(jax_metrics)} metrics agree: {agree}")

    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s with {failures} failure(s); outputs in {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
