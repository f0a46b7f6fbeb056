"""One training step (forward, backward, AdamW) of geoalign-jax against open_clip's own PyTorch training step:
same architecture, weights, batch, image size and CLIP loss, on the same machine, in one run.

    .venv/bin/python tools/bench_step.py --model ViT-B-32-quickgelu --batch 32 --iters 3

Our side is what `python -m geoalign_jax.train` runs: the trainer's `build` / `initial_state` with a scene-only
CLIP loss (the schema defaults, train/config.py: AdamW b2 0.98, eps 1e-6, weight decay 0.2 with its mask, gradient
clipping at 1.0) and its compiled step (`train/step.py compile_step`, state donated). The open_clip side is
open_clip's training loop body (open_clip_train/train.py): `open_clip.CLIP` in train mode, `ClipLoss`,
`torch.optim.AdamW` with open_clip's two parameter groups, `clip_grad_norm_` (when clip_norm > 0) and the
logit-scale clamp, loaded with the same weights (`params_to_open_clip`). `--dtype bfloat16` runs our model in
bf16 compute (fp32 parameters) and open_clip under `torch.autocast(bfloat16)` (its `amp_bf16`).

Allocator: like `python -m geoalign_jax.train`, the command re-executes itself with tcmalloc preloaded when the
machine has it (geoalign_jax/host_allocator.py), so both sides run on the same allocator; GEOALIGN_ALLOCATOR=system
measures both on the system malloc. The JSON line names the allocator.

Device: both sides run on the device jax uses (torch on `cuda` when jax's backend is a GPU; jax then allocates
GPU memory as needed instead of taking 75% of it up front). The first-step losses must agree (relative 1e-4 in
float32, 5e-2 in bf16), or the command exits 1 without timing.

Timing: one untimed warm-up step each, then `--iters` steps of each side interleaved (ours, theirs, ours, ...)
so that load on a shared machine hits both alike; the medians are reported. Our compile time is reported
separately. FLOPs of the compiled step come from XLA's cost analysis (of the step compiled at the text length
bucket the batch takes: XLA counts the length switch at its full-length branch); MFU = FLOPs / step time / the
device's peak (the trainer's table, bf16 peaks of known accelerators), "peak unknown" elsewhere (CPUs).
`--profile DIR` also writes a jax profiler trace of one of our steps and a torch profiler table of one
open_clip step into DIR and prints the top ops of each. The last printed line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import sys
import time
from typing import Any, Callable

# Before jax starts a GPU client: by default it takes 75% of the device, and open_clip shares it here.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs/ of this checkout

from geoalign_jax import host_allocator
from geoalign_jax.convert.open_clip import open_clip_model_cfg, params_to_open_clip
from geoalign_jax.models.clip import CLIPConfig
from geoalign_jax.tokenizer import tokenize

# Real RS captions when the samples are there ($GEOALIGN_SHARED_DATA, as for the tests; default: shared/data
# beside the checkout); these stand in otherwise (RS-caption lengths, 15-20 tokens).
SAMPLES = pathlib.Path(os.environ.get("GEOALIGN_SHARED_DATA") or pathlib.Path(__file__).resolve().parents[2] / "shared" / "data")
RSITMD_CAPTIONS = SAMPLES / "captions" / "dataset_rsitmd.json"
CAPTIONS = (
    "many planes are parked near the terminal of an airport beside a long runway and green fields",
    "a dense residential area with red roofs and narrow streets",
    "a river crosses farmland with a bridge in the middle",
    "several storage tanks next to a harbour with ships",
)
LONG_CAPTION = " ".join(["a satellite image of a crowded harbour with ships, cranes, containers and storage tanks"] * 8)


def load_average() -> tuple[float, float, float]:
    return os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3


def batch_captions(batch: int, kind: str) -> tuple[list[str], str]:
    """`batch` captions and where they come from: "rs" = a seeded sample of RSITMD's captions (the built-in
    RS-like ones when the samples are absent), "long" = captions that fill the whole context."""
    if kind == "long":
        return [LONG_CAPTION] * batch, "long (every caption fills the context)"
    if RSITMD_CAPTIONS.is_file():
        with open(RSITMD_CAPTIONS, encoding="utf-8") as file:
            dataset = json.load(file)
        pool = [sentence["raw"] for image in dataset["images"] for sentence in image["sentences"]]
        picks = np.random.default_rng(0).choice(len(pool), size=batch, replace=False)
        return [pool[i] for i in picks], f"{RSITMD_CAPTIONS.name} (seeded sample)"
    return [CAPTIONS[i % len(CAPTIONS)] + f" {i}" for i in range(batch)], "built-in RS-like captions"


def make_batch(batch: int, image_size: int, context_length: int, captions: list[str]) -> dict[str, np.ndarray]:
    """Normalised random images [B, S, S, 3] and the captions' tokens [B, L]."""
    images = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3), dtype=np.float32)
    return {"image": images, "text": tokenize(captions, context_length).astype(np.int32)}


def trainer_config(model: str, batch: int, dtype: str, image_size: int | None):
    """The default experiment config (scene-only InfoNCE) for this model, batch and compute dtype."""
    from geoalign_jax.train import experiment

    config = experiment.get_config()
    config.model.name = model
    if dtype != "float32":
        config.model.overrides.dtype = dtype
    if image_size:
        config.model.overrides.vision_image_size = image_size
    config.data.batch_size = batch
    config.data.image_size = experiment.model_config(config).vision.image_size
    config.train.num_steps = 1_000_000  # the schedule's length only; far from its end
    config.optim.warmup_steps = 0
    return config


def taken_bucket_flops(config, longest_caption: int) -> tuple[int, float | None]:
    """(text length bucket this batch takes, FLOPs of the step at that length or None when it is the full
    context). XLA's cost analysis counts the text tower's length switch at its costliest (full-length) branch,
    so the FLOPs a batch of short captions executes come from the same step compiled for the bucket it takes
    (a batch of that length runs the tower without a switch)."""
    import copy

    from geoalign_jax.train import experiment
    from geoalign_jax.models import text as text_lib
    from geoalign_jax.train import loop
    from geoalign_jax.train import step as step_lib

    context = int(config.data.context_length)
    width = experiment.model_config(config).text.width
    buckets = text_lib.length_buckets(context) if width >= text_lib.MIN_BUCKETED_WIDTH else (context,)
    bucket = next(length for length in buckets if length >= longest_caption)
    if bucket == context:
        return bucket, None
    short = copy.deepcopy(config)
    short.data.context_length = bucket
    setup = loop.build(short)
    compiled = step_lib.compile_step(
        setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh
    )
    return bucket, compiled.flops


class OurStep:
    """The trainer's compiled step over its own state (donated, so each call feeds the previous state back)."""

    def __init__(self, config, batch: dict[str, np.ndarray]):
        from geoalign_jax.parallel import mesh as mesh_lib
        from geoalign_jax.train import loop
        from geoalign_jax.train import step as step_lib

        self.setup = loop.build(config)
        self.state = loop.initial_state(self.setup)
        self.initial_params = jax.device_get(self.state.params)  # before the first (donating) step
        start = time.perf_counter()
        self.compiled = step_lib.compile_step(
            self.setup.train_step, self.setup.abstract_state, self.setup.shardings, self.setup.batch_spec, self.setup.mesh
        )
        self.compile_s = time.perf_counter() - start
        sharding = mesh_lib.batch_sharding(self.setup.mesh)
        self.batch = {key: jax.device_put(batch[key], sharding) for key in self.setup.batch_spec}
        self.last_loss = float("nan")

    def __call__(self) -> None:
        self.state, metrics = self.compiled.run(self.state, self.batch)
        self.last_loss = float(metrics["loss"])  # also waits for the step to finish


class OpenClipStep:
    """open_clip_train's step body for one batch (no data loading, no scheduler call, no logging)."""

    def __init__(self, model_config: CLIPConfig, params, batch: dict[str, np.ndarray], optim, dtype: str):
        import math

        import open_clip
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        # The device our step runs on, so that the two sides share the hardware.
        self.device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
        self.model = open_clip.CLIP(**open_clip_model_cfg(model_config), output_dict=True)
        state = {key: torch.from_numpy(np.asarray(value, np.float32)) for key, value in params_to_open_clip(model_config, params).items()}
        self.model.load_state_dict(state)
        self.model.to(self.device).train()
        self.loss = open_clip.loss.ClipLoss()
        exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
        named = list(self.model.named_parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": float(optim.weight_decay)},
            ],
            lr=float(optim.learning_rate), betas=(float(optim.b1), float(optim.b2)), eps=float(optim.eps),
        )
        self.clip_norm = float(optim.clip_norm)
        self.max_logit_scale = math.log(100)
        self.images = torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).copy()).to(self.device)
        self.tokens = torch.from_numpy(batch["text"].astype(np.int64)).to(self.device)
        self.autocast = torch.autocast(self.device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
        self.last_loss = float("nan")

    def __call__(self) -> None:
        torch = self.torch
        self.optimizer.zero_grad()
        with self.autocast:
            out = self.model(self.images, self.tokens)
            losses = self.loss(**out, output_dict=True)
            total = sum(losses.values())
        total.backward()
        if self.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_norm, norm_type=2.0)
        self.optimizer.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, self.max_logit_scale)
        self.last_loss = float(total.detach())  # also waits for the step to finish (CPU or GPU)


def interleaved_times(
    runs: dict[str, Callable[[], None]], iters: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """One untimed call of each, then `iters` rounds calling each once in turn; wall seconds and process CPU
    seconds (all threads) per call. CPU time shows how much of the machine a side got on a loaded host."""
    for run in runs.values():
        run()
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def profile_steps(ours: OurStep, theirs: OpenClipStep | None, out_dir: str, top: int) -> None:
    """A jax trace of one of our steps (open it in TensorBoard/xprof or Perfetto) with its time per kind of
    XLA op, and the torch profiler's table of one open_clip step (open_clip_ops.txt); prints both."""
    os.makedirs(out_dir, exist_ok=True)
    hlo = ours.compiled.run.as_text()
    with open(os.path.join(out_dir, "step_hlo.txt"), "w", encoding="utf-8") as handle:
        handle.write(hlo)
    with jax.profiler.trace(out_dir):
        ours()
    print(f"jax trace of one step and its optimised HLO (step_hlo.txt) written under {out_dir}")
    print_op_times(op_durations_ms(out_dir), hlo_instructions(hlo), top)
    if theirs is not None:
        import torch.profiler

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            theirs()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)
        with open(os.path.join(out_dir, "open_clip_ops.txt"), "w", encoding="utf-8") as handle:
            handle.write(table)
        print(table)


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (\w[\w-]*)\((.*)$")


def hlo_instructions(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (kind, source op name) for every instruction of an optimised HLO module; kind is
    the fusion's library (`__ynn_fusion`, ...) or XLA fusion kind (`kLoop`, ...) or the opcode."""
    found: dict[str, tuple[str, str]] = {}
    for line in hlo.splitlines():
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode, rest = match.groups()
        library = re.search(r'"kind":"(\w+)"', rest)
        fusion = re.search(r"kind=(\w+)", rest)
        kind = library.group(1) if library else (fusion.group(1) if opcode == "fusion" and fusion else opcode)
        op_name = re.search(r'op_name="([^"]*)"', rest)
        found[name] = (kind, op_name.group(1) if op_name else "")
    return found


def op_durations_ms(trace_dir: str) -> dict[str, float]:
    """Summed duration of every trace event of the newest trace under `trace_dir`, by event name (XLA's
    CPU runtime names each op's event after its HLO instruction)."""
    import glob

    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    totals: dict[str, float] = {}
    for plane in ProfileData.from_file(files[-1]).planes if files else ():
        for line in plane.lines:
            for event in line.events:
                totals[event.name] = totals.get(event.name, 0.0) + event.duration_ns / 1e6
    return totals


def print_op_times(durations: dict[str, float], instructions: dict[str, tuple[str, str]], top: int) -> None:
    """Time per (pass, op kind, source op): pass is forward, backward (`transpose(jvp(...))`) or the rest
    (optimizer, loss); source op is the last two parts of the jax op name, blocks merged. Ops that XLA runs
    concurrently both count their whole duration, so the total can exceed the step's wall time."""
    groups: dict[tuple[str, str, str], list[float | int]] = {}
    for name, ms in durations.items():
        if name not in instructions:
            continue
        kind, op_name = instructions[name]
        phase = "backward" if "transpose(jvp(" in op_name else "forward" if "jvp(" in op_name else "rest"
        source = "/".join(re.sub(r"resblocks_\d+", "resblocks_*", op_name).split("/")[-2:])
        entry = groups.setdefault((phase, kind, source), [0.0, 0])
        entry[0] += ms
        entry[1] += 1
    total = sum(ms for ms, _ in groups.values())
    by_phase: dict[str, float] = {}
    for (phase, _, _), (ms, _) in groups.items():
        by_phase[phase] = by_phase.get(phase, 0.0) + ms
    print(f"XLA op time {total:.0f} ms: " + ", ".join(f"{phase} {ms:.0f} ms" for phase, ms in sorted(by_phase.items())))
    print(f"{'ms':>8} {'share':>6} {'ops':>5}  pass / op kind / source op")
    for (phase, kind, source), (ms, count) in sorted(groups.items(), key=lambda item: -item[1][0])[:top]:
        print(f"{ms:8.1f} {ms / total:6.1%} {count:5d}  {phase} / {kind} / {source}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32-quickgelu", help="tiny, ViT-B-32, ViT-B-16 (optionally -quickgelu), ...")
    parser.add_argument("--batch", type=int, default=32, help="global batch")
    parser.add_argument("--iters", type=int, default=3, help="timed steps per side (median reported)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--image-size", type=int, default=0, help="image size (0 = the model's)")
    parser.add_argument("--captions", default="rs", choices=("rs", "long"),
                        help="rs: real RS captions (RSITMD sample); long: captions that fill the context")
    parser.add_argument("--skip-open-clip", action="store_true", help="time only our step")
    parser.add_argument("--profile", default="", help="also profile one step of each side into this folder")
    parser.add_argument("--top", type=int, default=25, help="rows of the --profile tables")
    args = parser.parse_args(argv)
    if argv is None:  # a command line: the allocator the trainer's CLI uses, for both sides
        host_allocator.use_tcmalloc()
    loaded = host_allocator.loaded_tcmalloc()
    allocator = loaded or ("unknown allocator" if loaded == "" else "system malloc")

    load_before = load_average()
    config = trainer_config(args.model, args.batch, args.dtype, args.image_size or None)
    captions, caption_source = batch_captions(args.batch, args.captions)
    batch = make_batch(args.batch, config.data.image_size, config.data.context_length, captions)
    longest_caption = int(batch["text"].argmax(axis=1).max()) + 1  # tokens up to the last EOT of the batch
    ours = OurStep(config, batch)
    model_config = ours.setup.model_config
    runs: dict[str, Callable[[], None]] = {"geoalign": ours}
    theirs = None
    if not args.skip_open_clip:
        theirs = OpenClipStep(model_config, ours.initial_params, batch, config.optim, args.dtype)
        runs["open_clip"] = theirs
    # The first losses (same weights, same batch) must agree: both sides compute the same thing.
    first_losses = {}
    for name, run in runs.items():
        run()
        first_losses[name] = run.last_loss
    if theirs is not None:
        tolerance = 1e-4 if args.dtype == "float32" else 5e-2
        gap = abs(first_losses["geoalign"] - first_losses["open_clip"]) / abs(first_losses["open_clip"])
        if not gap <= tolerance:
            print(f"error: first-step losses differ: geoalign {first_losses['geoalign']:.6f}, open_clip "
                  f"{first_losses['open_clip']:.6f} (relative {gap:.2e} > {tolerance:g}): the two steps do not "
                  "compute the same thing, so their times do not compare", file=sys.stderr)
            return 1
    times, cpu_times = interleaved_times(runs, args.iters)
    if args.profile:
        profile_steps(ours, theirs, args.profile, args.top)
    load_after = load_average()

    device = jax.devices()[0]
    from geoalign_jax.train.metrics import peak_flops

    # Compiled after the timing, so that it does not load the machine during it.
    text_bucket, bucket_flops = taken_bucket_flops(config, longest_caption)
    flops = bucket_flops or ours.compiled.flops  # what this batch executes
    peak = peak_flops(device)
    result: dict[str, Any] = {
        "model": args.model, "batch": args.batch, "image_size": model_config.vision.image_size, "dtype": args.dtype,
        "iters": args.iters, "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "devices": jax.device_count(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "allocator": allocator,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "compile_s": round(ours.compile_s, 2),
        "geoalign_s": float(np.median(times["geoalign"])),
        "geoalign_times": [round(t, 4) for t in times["geoalign"]],
        "geoalign_cpu_s": float(np.median(cpu_times["geoalign"])),
        "first_loss_geoalign": first_losses["geoalign"],
        "captions": caption_source, "longest_caption_tokens": longest_caption,
        "text_bucket": text_bucket, "step_flops": flops, "step_flops_full_length": ours.compiled.flops,
    }
    if flops:
        result["geoalign_tflops_per_s"] = flops / result["geoalign_s"] / 1e12
    if flops and peak:
        result["mfu"] = flops / result["geoalign_s"] / peak
        result["peak_flops"] = peak
    else:
        result["mfu"] = None
        result["peak_flops"] = "peak unknown"
    if theirs is not None:
        import torch

        result.update(
            open_clip_s=float(np.median(times["open_clip"])),
            open_clip_times=[round(t, 4) for t in times["open_clip"]],
            open_clip_cpu_s=float(np.median(cpu_times["open_clip"])),
            first_loss_open_clip=first_losses["open_clip"],
            torch=torch.__version__,
        )
        result["ratio"] = result["geoalign_s"] / result["open_clip_s"]

    print(f"model {args.model}, batch {args.batch}, {model_config.vision.image_size} px, {args.dtype}, "
          f"{args.iters} timed steps per side (median, interleaved)")
    print(f"captions: {caption_source}, the longest {longest_caption} of {config.data.context_length} tokens "
          f"(text bucket {text_bucket})")
    print(f"jax {jax.__version__} on {result['device']} ({jax.device_count()} device(s)); {os.cpu_count()} CPU cores, "
          f"{platform.processor() or platform.machine()}, {allocator}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; our compile {ours.compile_s:.1f} s")
    print(f"first-step loss: geoalign {first_losses['geoalign']:.6f}"
          + (f", open_clip {first_losses['open_clip']:.6f}" if theirs is not None else ""))
    line = f"step: geoalign {result['geoalign_s']:.3f} s"
    if theirs is not None:
        line += f", open_clip {result['open_clip_s']:.3f} s, ratio {result['ratio']:.2f}"
    if flops:
        line += f"; {flops / 1e9:.4g} GFLOP/step, {result['geoalign_tflops_per_s'] * 1e3:.4g} GFLOP/s"
        if bucket_flops:
            line += f" ({ours.compiled.flops / 1e9:.4g} GFLOP at full caption length)"
    line += f"; MFU {result['mfu']:.1%}" if result["mfu"] is not None else "; MFU: peak unknown"
    print(line)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
