"""The evaluate CLI: ``python -m geoalign_jax.evaluate`` (or ``python -m geoalign_jax.eval``).

Examples::

    python -m geoalign_jax.evaluate --checkpoint runs/demo/params \\
        --tasks zeroshot:aid=/data/aid_records retrieval:rsicd=/data/rsicd_records,split=test,protocol=both \\
                regions:dota=/data/dota_records,methods=crop+roi --out eval_out
    python -m geoalign_jax.evaluate --open-clip exported_dir --backend open_clip --tasks ... --out ...
    python -m geoalign_jax.evaluate --suite farslip --benchmark-root /data/benchmarks --checkpoint ... --out out
    python -m geoalign_jax.evaluate --checkpoint ... --out out \
        --tasks zeroshot:nwpu=/data/benchmarks/nwpu/img_txt_pairs_train.csv,image_root=/data/benchmarks,split_by=farslip \
                retrieval:dgtrsd=/data/dgtrsd_records,text=long
    python -m geoalign_jax.evaluate --checkpoint ... --tasks ... --out ... \
        --train-data /data/rs5m_records '/data/extra/*.array_record' [--exclude-overlap]

Weights: exactly one of --checkpoint (geoalign-jax parameters), --open-clip (a weights file or an
open_clip folder), --hf (a transformers CLIPModel folder), --model NAME (random init; smoke tests).
Writes ``results.json`` (metrics, details and provenance: data hashes, protocol, templates, model
parameter hash, package versions) and PNG plots into --out and prints a table. A training split is
evaluated only with --allow-train-split; --train-data reports evaluation images also found in the
training data (exact or re-encoded copies), --exclude-overlap leaves them out.
"""
from __future__ import annotations

import argparse
import logging
import pathlib
import sys
import time
from typing import Any, Sequence

from geoalign_jax import cli_logging
from geoalign_jax.error_text import one_line, run_main

log = logging.getLogger("geoalign_jax.eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m geoalign_jax.evaluate",
        description="Zero-shot classification, image-text retrieval and region classification of a CLIP model.",
        epilog="Task syntax: KIND:NAME=PATH[,key=value...]; KIND in zeroshot, retrieval, regions, segmentation. Keys: "
               "split, limit, templates (farslip|rs|single|openai_imagenet), dataset (zero-shot class table), protocol "
               "(standard|skyscript|skyscript-raw|both), methods (crop+roi), text (retrieval: short|long, long = "
               "long_caption), split_by (farslip: a training split the paper's authors evaluate), and for CSV files "
               "classnames, image_root, caption_column; segmentation (SegEarth-OV protocol): crop, stride, logit_scale, "
               "cls_token_lambda, threshold, background, resize (N|NxM|none), dense (segearth|last), templates, "
               "window_batch. PATH: a record folder (manifest.json), for zeroshot a tree of class folders, or a "
               "FarSLIP/SkyScript CSV (zeroshot: filepath,label + classnames.txt; retrieval: filepath,title), for "
               "segmentation a folder of 'prepare segmentation'.")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="geoalign-jax parameters checkpoint, trainer workdir (latest step) or one step of its checkpoints/")
    parser.add_argument("--step", type=int, default=None,
                        help="with --checkpoint WORKDIR: read this step (default: the newest step that reads back whole)")
    weights.add_argument("--open-clip", "--open_clip", help="open_clip weights file or folder (open_clip_config.json + weights)")
    weights.add_argument("--hf", help="transformers CLIPModel folder (config.json + model.safetensors)")
    weights.add_argument("--model", help="named architecture with random weights (e.g. tiny), for smoke tests")
    parser.add_argument("--tasks", nargs="+", help="evaluation tasks (see below)")
    parser.add_argument("--suite", choices=("farslip", "geoalignclip", "dgtrs"),
                        help="run every task of a paper's tables found under --benchmark-root (instead of --tasks) "
                             "and write table.md beside results.json (eval/suites.py)")
    parser.add_argument("--benchmark-root", "--benchmark_root", help="data folder of --suite (layout: README)")
    parser.add_argument("--out", required=True, help="output folder for results.json and plots")
    parser.add_argument("--backend", choices=("jax", "open_clip"), default="jax",
                        help="embed with the JAX towers (default) or with open_clip in torch (needs --open-clip DIR)")
    parser.add_argument("--quick-gelu", "--quick_gelu", choices=("auto", "true", "false"), default="auto",
                        help="activation of imported open_clip weights when the source does not say")
    parser.add_argument("--batch-size", "--batch_size", type=int, default=64)
    parser.add_argument("--num-threads", "--num_threads", type=int, default=2, help="image decoding threads")
    parser.add_argument("--dense", choices=("last", "segearth"), default="last",
                        help="patch tokens for RoI region features (JAX backend): last layer or FarSLIP's SegEarth")
    parser.add_argument("--ties", choices=("pessimistic", "optimistic"), default="pessimistic")
    parser.add_argument("--seed", type=int, default=0, help="init seed for --model")
    parser.add_argument("--allow-train-split", "--allow_train_split", action="store_true",
                        help="evaluate a training split (split=train, or a manifest with only a train split); "
                             "refused otherwise, and marked in the table")
    parser.add_argument("--train-data", "--train_data", nargs="+", metavar="DIR_OR_GLOB",
                        help="training data (prepared folders or shard globs) to check the evaluation images "
                             "against: exact copies and re-encoded ones are reported per task")
    parser.add_argument("--train-split", "--train_split", default="train",
                        help="split of --train-data to check against (default train)")
    parser.add_argument("--exclude-overlap", "--exclude_overlap", action="store_true",
                        help="evaluate without the images found in --train-data (results say so)")
    parser.add_argument("--no-progress", "--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-plots", "--no_plots", action="store_true")
    parser.add_argument("--skip-bad-records", "--skip_bad_records", action="store_true",
                        help="skip records that cannot be read (damaged shards) and count them in results.json "
                             "(<task>/skipped/unreadable_records) instead of stopping with an error")
    return parser


def load_weights(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(model config, params, description) from the weights option."""
    quick = {"auto": None, "true": True, "false": False}[args.quick_gelu]
    if args.checkpoint:
        from geoalign_jax.params_checkpoint import load_params_and_step

        # a trainer workdir without --step: the newest intact step, which results.json must name
        config, params, step = load_params_and_step(args.checkpoint, step=args.step)
        return config, params, f"checkpoint {args.checkpoint}" + (f" step {step}" if step is not None else "")
    if args.open_clip or args.hf:
        from geoalign_jax.convert.pretrained import load_pretrained

        fmt, src = ("open_clip", args.open_clip) if args.open_clip else ("hf", args.hf)
        config, params = load_pretrained(src, fmt, quick_gelu=quick)
        return config, params, f"{fmt} {src}"
    import jax

    from geoalign_jax.models import clip

    config = clip.get_model_config(args.model)
    return config, clip.init_params(config, jax.random.key(args.seed)), f"random {args.model} (seed {args.seed})"


def _unusable_out(out: pathlib.Path) -> str | None:
    """Why the results folder cannot be created (None: it can); a folder created to find out is removed again,
    so a refused or failed evaluation leaves nothing behind."""
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create it ({one_line(error)})"
    for folder in created:  # deepest first
        folder.rmdir()
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cli_logging.setup()

    from geoalign_jax.data import filesystem
    from geoalign_jax.eval import embed, overlap, plots, report, runner, suites

    if bool(args.tasks) == bool(args.suite):
        parser.error("give --tasks or --suite (with --benchmark-root), not both or neither")
    if args.suite and not args.benchmark_root:
        parser.error("--suite needs --benchmark-root")
    suite_skipped: dict[str, str] = {}
    try:
        if args.suite:
            tasks, suite_skipped = suites.discover(args.suite, args.benchmark_root)
            for prefix, why in suite_skipped.items():
                log.warning("suite %s: %s skipped: %s", args.suite, prefix, why)
        else:
            tasks = [runner.parse_task(text) for text in args.tasks]
    except runner.TaskError as error:
        parser.error(str(error))
    for task in tasks:
        if not filesystem.path(task.path).exists():
            parser.error(f"task {task.kind}:{task.name}: data path not found: {task.path}")
    if args.backend == "open_clip" and not (args.open_clip and pathlib.Path(args.open_clip).is_dir()):
        parser.error("--backend open_clip needs --open-clip pointing at an open_clip folder (local-dir layout)")
    if args.backend == "open_clip" and any(task.kind == "segmentation" for task in tasks):
        parser.error("segmentation tasks need the JAX backend (SegEarth-OV's dense last layer)")
    if args.backend == "open_clip" and args.dense != "last":
        parser.error("--dense segearth exists only for the JAX backend")
    if args.step is not None and not args.checkpoint:
        parser.error("--step needs --checkpoint (a trainer workdir)")
    if args.exclude_overlap and not args.train_data:
        parser.error("--exclude-overlap needs --train-data")
    unusable = _unusable_out(pathlib.Path(args.out))
    if unusable:  # before any work: an --out that cannot be written should not cost an evaluation
        print(f"error: --out {args.out}: {unusable}", file=sys.stderr)
        return 2
    try:  # before loading any weights: a refused training split should cost nothing
        for task in tasks:
            split, _, splits = runner.resolve_split(task)
            runner.split_guard(task, split, splits, args.allow_train_split)
    except runner.TaskError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    started = time.time()
    try:
        if args.backend == "open_clip":
            from geoalign_jax.convert.pretrained import check_weights_readable

            check_weights_readable(args.open_clip, "open_clip")  # a damaged file: named, not torch's traceback
            embedder = embed.OpenClipEmbedder.from_dir(args.open_clip, batch_size=args.batch_size)
            config, params, source = None, None, f"open_clip (torch) {args.open_clip}"
        else:
            config, params, source = load_weights(args)
            embedder = embed.JaxEmbedder(config, params, batch_size=args.batch_size, dense=args.dense)
    except (ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: cannot load the weights: {one_line(error, limit=4000)}", file=sys.stderr)
        return 2
    try:
        train_images = None
        if args.train_data:
            train_images = overlap.TrainImages.from_data(args.train_data, args.train_split)
            log.info("training data: %d images in %d shards", len(train_images), len(train_images.shard_paths))
        options = dict(embedder=embedder, batch_size=args.batch_size, progress=not args.no_progress, ties=args.ties,
                       num_threads=args.num_threads, dense=args.dense, allow_train_split=args.allow_train_split,
                       train_data=train_images, exclude_overlap=args.exclude_overlap,
                       skip_bad_records=args.skip_bad_records)
        if args.suite:
            suite_result = suites.run_suite(tasks, suite_skipped, model_config=config, params=params, **options)
            result, suite_skipped = suite_result.report, suite_result.skipped
        else:
            result = runner.run_tasks(config, params, tasks, **options)
    except (runner.TaskError, overlap.OverlapError) as error:
        print(f"error: {one_line(error, limit=4000)}", file=sys.stderr)
        return 2
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_info = {"weights": source, "backend": args.backend, "tasks": [f"{t.kind}:{t.name}={t.path}" for t in tasks]
                if args.suite else list(args.tasks), "suite": args.suite, "benchmark_root": args.benchmark_root,
                "suite_skipped": suite_skipped, "ties": args.ties,
                "batch_size": args.batch_size, "dense": args.dense, "skip_bad_records": args.skip_bad_records, "seconds": round(time.time() - started, 2),
                "model_config": config.to_dict() if config is not None else None,
                "allow_train_split": args.allow_train_split, "train_data": args.train_data,
                "train_split": args.train_split if args.train_data else None,
                "exclude_overlap": args.exclude_overlap}
    results_path = report.write_results(out / "results.json", result.metrics, result.details, run_info,
                                        provenance=result.provenance, notes=result.notes)
    print(report.format_table(result.metrics, result.notes))
    if args.suite:
        table = suites.format_tables(suites.get_suite(args.suite), result.metrics, suite_skipped, result.notes, source)
        (out / "table.md").write_text(table)
        log.info("wrote the %s tables to %s", args.suite, out / "table.md")
    written = [] if args.no_plots else plots.write_plots(result.details, out)
    log.info("wrote %s and %d plots to %s", results_path.name, len(written), out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
