"""The convert CLI: geoalign-jax parameter checkpoints <-> open_clip / Hugging Face CLIP.

```
python -m geoalign_jax.convert export --params CKPT --format open_clip --out DIR
python -m geoalign_jax.convert export --params CKPT --format hf --out DIR
python -m geoalign_jax.convert import --src PATH --format open_clip --out CKPT [--quick-gelu | --no-quick-gelu]
                                      [--model NAME] [--stretch-text]
python -m geoalign_jax.convert import --src HF_DIR --format hf --out CKPT [--model NAME]
```
CKPT is a parameters checkpoint (`params_checkpoint.py`: model_config.json + an orbax tree under params/).
Exits with status 2 and a one-line message on bad input (wrong architecture, missing keys, no activation, a
missing, truncated or damaged weights file: see `pretrained.load_pretrained`).
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from typing import Sequence

from geoalign_jax import cli_logging
from geoalign_jax.convert import hf, infer_config, layout, open_clip
from geoalign_jax.error_text import one_line, run_main
from geoalign_jax.convert.pretrained import FORMATS, load_pretrained


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m geoalign_jax.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    export = commands.add_parser("export", help="parameters checkpoint -> open_clip local-dir folder or HF folder")
    export.add_argument("--params", required=True,  # a str: gs:// would not survive pathlib
                        help="geoalign-jax parameters checkpoint, trainer workdir (latest step) or one step of its checkpoints/")
    export.add_argument("--step", type=int, default=None,
                        help="with a trainer workdir: export this step (default: the newest step that reads back whole)")
    export.add_argument("--format", required=True, choices=FORMATS)
    export.add_argument("--out", required=True, type=pathlib.Path, help="output folder (must be absent or empty)")
    export.add_argument("--ema", action="store_true",
                        help="export the EMA of the parameters (a trainer checkpoint of a run with train.ema_decay > 0)")

    imp = commands.add_parser("import", help="open_clip state dict / folder or HF folder -> parameters checkpoint")
    imp.add_argument("--src", required=True, type=pathlib.Path,
                     help="open_clip: .safetensors/.pt/.bin/.pth file or open_clip folder; hf: CLIPModel folder")
    imp.add_argument("--format", required=True, choices=FORMATS)
    imp.add_argument("--out", required=True, type=pathlib.Path, help="parameters checkpoint directory to create")
    imp.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                     help="activation (cannot be read from weights). Default: the source's config "
                          "(open_clip_config.json quick_gelu, HF hidden_act), else a -quickgelu --model; "
                          "otherwise required")
    imp.add_argument("--model", default=None,
                     help="named architecture the weights must have (e.g. ViT-B-32, tiny); also fixes the heads")
    imp.add_argument("--stretch-text", action="store_true",
                     help="Long-CLIP-stretch the text position embedding (77 -> 248 positions) after import")
    return parser


def _check_out_dir(out: pathlib.Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder")


def run_export(params_path: str | pathlib.Path, fmt: str, out: pathlib.Path, *, step: int | None = None,
               ema: bool = False) -> list[pathlib.Path]:
    """Loads a parameters checkpoint (a trainer workdir: its newest intact step, or `step`; the step read is
    logged; `ema`: a trainer checkpoint's EMA weights) and writes it in `fmt`; returns the files written."""
    from geoalign_jax.params_checkpoint import load_params

    _check_out_dir(out)
    config, params = load_params(params_path, step=step, ema=ema)
    print(f"read {params_path}: {layout.summarize(config, params)}")
    exporter = open_clip.export_open_clip if fmt == "open_clip" else hf.export_hf
    return exporter(config, params, out)


def run_import(
    src: pathlib.Path, fmt: str, out: pathlib.Path, *, quick_gelu: bool | None, model: str | None, stretch_text: bool
) -> pathlib.Path:
    """Reads a PyTorch-format checkpoint and writes a parameters checkpoint; returns its path."""
    from geoalign_jax.params_checkpoint import save_params

    if out.exists():
        raise ValueError(f"--out {out} already exists; parameters checkpoints are never overwritten")
    config, params = load_pretrained(src, fmt, quick_gelu=quick_gelu, model=model)
    if stretch_text:
        config, params = infer_config.stretch_text_context(config, params)
    path = save_params(out, config, params)
    print(f"read {src}: {layout.summarize(config, params)}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    cli_logging.setup()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "export":
            written = run_export(args.params, args.format, args.out, step=args.step, ema=args.ema)
            for path in written:
                print(f"wrote {path}")
        else:
            path = run_import(
                args.src, args.format, args.out, quick_gelu=args.quick_gelu, model=args.model,
                stretch_text=args.stretch_text,
            )
            print(f"wrote parameters checkpoint {path}")
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {one_line(error, limit=4000)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
