"""The trainer's config sections (train, optim, mesh, checkpoint, init, eval): every field documented once here,
with its default, and checked by `validate_trainer_config` (errors name the field).

`train/experiment.py` adds these sections to every experiment config; its `check_config` calls the validator.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from geoalign_jax.config_checks import is_int, is_number, require

INIT_KINDS = ("scratch", "params", "open_clip", "hf")
BEST_MODES = ("max", "min")
REMAT_POLICIES = ("none", "block")
# open_clip's weight-decay exemptions on our parameter paths (see `optim.no_decay`); tests/test_recipe_fidelity.py
# checks them against the rule applied to open_clip's own `named_parameters()`.
OPEN_CLIP_NO_DECAY = ("/bias$", "/scale$", "^visual/class_embedding$", "^logit_scale$", "^logit_bias$")


def default_train_config() -> ml_collections.ConfigDict:
    """`config.train`: the loop."""
    config = ml_collections.ConfigDict()
    config.num_steps = 10_000  # optimizer steps to run (each one global batch); the run ends at this step
    config.seed = 0  # parameter-init seed (the data order has its own seed, data.seed)
    config.log_every = 50  # metrics to console / metrics.jsonl / TensorBoard every this many steps
    # Gradient accumulation with the whole batch's objective (GradCache, train/grad_cache.py): the towers
    # encode this many micro-batches one at a time, every term is computed on the global batch (all its
    # negatives), then each micro-batch is re-encoded to pull its output gradient back. Activation memory
    # of one micro-batch, one more forward pass; gradients equal micro_batches = 1. Must divide the
    # per-process batch (data.batch_size / processes).
    config.micro_batches = 1
    config.remat = "none"  # "none" | "block": rematerialise each transformer block in the backward pass
    # A step whose loss or gradient norm is not finite is not applied (and counted); this many such steps
    # in a row stop the run with an error, the last good checkpoint untouched.
    config.max_consecutive_nonfinite = 10
    # Exponential moving average of the parameters for evaluation (eval.use_ema) and export (convert export
    # --ema), kept in the train state and checkpoints; e.g. 0.9999, warmed up as min(ema_decay, (1 + t) /
    # (10 + t)) after t updates (train/ema.py). 0 = none. Not the distillation teacher (loss.distill_*).
    config.ema_decay = 0.0
    return config


def default_optim_config() -> ml_collections.ConfigDict:
    """`config.optim`: AdamW with linear warm-up and cosine decay (optax)."""
    config = ml_collections.ConfigDict()
    config.learning_rate = 5e-5  # peak learning rate, reached after warmup_steps
    config.warmup_steps = 500  # linear warm-up from 0 over this many steps
    config.end_learning_rate_factor = 0.0  # cosine decays to learning_rate * this at train.num_steps
    config.b1 = 0.9  # AdamW's first-moment decay
    config.b2 = 0.98  # second-moment decay (open_clip's CLIP setting, as b1 and eps)
    config.eps = 1e-6  # added to the root of the second moment (open_clip; optax's default is 1e-8)
    config.weight_decay = 0.2  # decoupled (AdamW) decay, only on parameters not matched by no_decay
    # Regular expressions (re.search) on parameter paths like "visual/transformer/resblocks_0/ln_1/scale":
    # matching parameters get no weight decay. Default: open_clip's rule (its main.py, which FarSLIP's
    # main.py keeps: exempt when p.ndim < 2 or "bn"/"ln"/"bias"/"logit_scale" is in the name) written on our
    # paths: norms (scale/bias), all biases, the 1-D class embedding and the temperature / SigLIP bias.
    # Token and position embeddings, patch embedding and projections ARE decayed.
    config.no_decay = OPEN_CLIP_NO_DECAY
    config.clip_norm = 1.0  # clip the global gradient norm to this before AdamW; 0 = no clipping
    # Learning-rate multipliers: (regex on the parameter path, factor) pairs, the first match wins (unmatched:
    # 1.0), e.g. (("^text/", 0.1),) for a slower text tower, or on the command line
    # --config.optim.lr_multipliers='(("^text/", 0.1),)'. Applied on top of the layer-wise decay.
    config.lr_multipliers = ()
    # Frozen sub-trees: regexes on parameter paths; matching parameters are never updated and get no
    # optimizer state (e.g. ("^text/",) freezes the text tower, LiT style).
    config.frozen = ()
    # Fixed leading rows: (regex on the parameter path, n) pairs; the first n rows (axis 0) of a matching
    # parameter keep their initial values exactly (no gradient, no Adam moments, no decay) while the other
    # rows train. Long-CLIP's position scheme is (("^text/positional_embedding$", 20),): its model_longclip.py
    # adds a frozen stretched table for positions < 20 and a trainable copy for positions >= 20, and one
    # table whose first 20 rows are held is that sum, so checkpoints and exports hold it as one table.
    config.fixed_rows = ()
    # Layer-wise learning-rate decay (BEiT/ELECTRA): block i of a tower with L blocks gets
    # layer_decay ** (L + 1 - (i + 1)); its embeddings layer_decay ** (L + 1); head/final norm 1. 1.0 = off.
    config.layer_decay = 1.0
    return config


def default_mesh_config() -> ml_collections.ConfigDict:
    """`config.mesh`: device mesh axis sizes (one may be -1 = all remaining devices); see parallel/mesh.py."""
    config = ml_collections.ConfigDict()
    config.data = -1  # pure data parallelism (parameters replicated)
    config.fsdp = 1  # data parallelism with parameters + optimizer state sharded (FSDP / ZeRO-3)
    config.tensor = 1  # tensor parallelism over attention heads and MLP hidden units
    return config


def default_checkpoint_config() -> ml_collections.ConfigDict:
    """`config.checkpoint`: orbax checkpoints under WORKDIR/checkpoints."""
    config = ml_collections.ConfigDict()
    config.every_steps = 1000  # save every this many steps (and at the last step, and on SIGTERM)
    config.keep = 3  # keep the latest this many checkpoints
    # Also keep the best `keep_best` checkpoints by this evaluation metric (a key of the evaluation results,
    # e.g. "zeroshot/aid/top1"); "" = keep only the latest. Needs eval.tasks; evaluation steps are saved.
    config.best_metric = ""
    config.best_mode = "max"  # "max" | "min": which end of best_metric is better
    config.keep_best = 1
    config.async_save = True  # write checkpoints in a background thread while training goes on
    return config


def default_init_config() -> ml_collections.ConfigDict:
    """`config.init`: where the parameters of a fresh run come from (a resumed run reads its checkpoint)."""
    config = ml_collections.ConfigDict()
    # "scratch" (random, train.seed) | "params" (a geoalign-jax parameters checkpoint, a trainer workdir or
    # one step of it) | "open_clip" (a weights file or open_clip folder) | "hf" (a transformers CLIPModel folder).
    config.kind = "scratch"
    config.path = ""  # the checkpoint/file/folder for every kind but scratch
    # open_clip/hf only: the activation when the source does not say (None = from the source, else refused).
    config.quick_gelu = ml_collections.FieldReference(None, field_type=bool)
    # A 77-position checkpoint is Long-CLIP-stretched when the model's text context is 248 (automatic).
    return config


def default_eval_config() -> ml_collections.ConfigDict:
    """`config.eval`: evaluation during training through `geoalign_jax.eval.evaluate` (process 0), written to
    WORKDIR/eval/step_<N>/results.json with the provenance of every number. Before training, the tasks'
    images are checked against the run's own training shards (data.train_shards, data.train_split): how many
    and which also occur there is logged, and recorded in every results.json."""
    config = ml_collections.ConfigDict()
    config.tasks = ()  # tasks in the evaluate CLI's syntax, e.g. ("zeroshot:aid=/data/aid,split=test",)
    config.every_steps = 0  # evaluate every this many steps and at the end; 0 = never
    config.batch_size = 64  # evaluation batch
    # Evaluate without the task images that also occur in the training shards (exact or re-encoded copies);
    # the results say how many were left out. False: they are evaluated, and the results say how many.
    config.exclude_overlap = False
    # A task on a training split ("train*", "restval", or a manifest's only split) is refused when the config
    # is checked; True evaluates it anyway (results.json and the table mark it: not a test number).
    config.allow_train_split = False
    config.use_ema = False  # evaluate the EMA of the parameters (needs train.ema_decay > 0) instead of them
    return config


SECTIONS = {
    "train": default_train_config,
    "optim": default_optim_config,
    "mesh": default_mesh_config,
    "checkpoint": default_checkpoint_config,
    "init": default_init_config,
    "eval": default_eval_config,
}


def add_trainer_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds every trainer section with its defaults to `config` (in place; returned for chaining)."""
    for name, make in SECTIONS.items():
        config[name] = make()
    return config


def _check_fields(config: ml_collections.ConfigDict, name: str) -> None:
    expected = set(SECTIONS[name]().keys())
    given = set(config[name].keys())
    unknown = sorted(given - expected)
    if unknown:
        raise ValueError(f"unknown config field {name}.{unknown[0]} (known: {sorted(expected)})")
    missing = sorted(expected - given)
    if missing:
        raise ValueError(f"config field {name}.{missing[0]} is missing (start from geoalign_jax.train.experiment.get_config())")


def _check_regexes(patterns: Any, field: str) -> None:
    import re

    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as error:
            raise ValueError(f"{field}: {pattern!r} is not a regular expression ({error})") from None


def validate_trainer_config(config: ml_collections.ConfigDict) -> None:
    """Checks every trainer field; raises ValueError naming the first bad one (e.g. "optim.warmup_steps")."""
    for name in SECTIONS:
        if name not in config:
            raise ValueError(f"config section {name!r} is missing (start from geoalign_jax.train.experiment.get_config())")
        _check_fields(config, name)
    train, optim, ckpt, init, evaluation = config.train, config.optim, config.checkpoint, config.init, config.eval
    for field in ("num_steps", "log_every", "micro_batches", "max_consecutive_nonfinite"):
        require(is_int(train[field]) and train[field] >= 1, f"train.{field}", train[field], "must be an int >= 1")
    require(is_int(train.seed), "train.seed", train.seed, "must be an int")
    require(train.remat in REMAT_POLICIES, "train.remat", train.remat, f"must be one of {REMAT_POLICIES}")
    require(is_number(train.ema_decay) and 0 <= train.ema_decay < 1, "train.ema_decay", train.ema_decay, "must be in [0, 1)")
    require(isinstance(evaluation.use_ema, bool), "eval.use_ema", evaluation.use_ema, "must be True or False")
    require(not evaluation.use_ema or train.ema_decay > 0, "eval.use_ema", evaluation.use_ema,
            "needs train.ema_decay > 0 (no EMA is kept)")
    batch = int(config.data.batch_size)
    require(
        batch % train.micro_batches == 0, "train.micro_batches", train.micro_batches,
        f"must divide data.batch_size ({batch})",
    )
    require(is_number(optim.learning_rate) and optim.learning_rate >= 0, "optim.learning_rate", optim.learning_rate, "must be >= 0")
    require(is_int(optim.warmup_steps) and optim.warmup_steps >= 0, "optim.warmup_steps", optim.warmup_steps, "must be an int >= 0")
    for field in ("end_learning_rate_factor", "weight_decay", "clip_norm"):
        require(is_number(optim[field]) and optim[field] >= 0, f"optim.{field}", optim[field], "must be a number >= 0")
    for field in ("b1", "b2"):
        require(is_number(optim[field]) and 0 <= optim[field] < 1, f"optim.{field}", optim[field], "must be in [0, 1)")
    require(is_number(optim.eps) and optim.eps > 0, "optim.eps", optim.eps, "must be > 0")
    require(is_number(optim.layer_decay) and 0 < optim.layer_decay <= 1, "optim.layer_decay", optim.layer_decay, "must be in (0, 1]")
    _check_regexes(optim.no_decay, "optim.no_decay")
    _check_regexes(optim.frozen, "optim.frozen")
    for pair in optim.lr_multipliers:
        require(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str), "optim.lr_multipliers",
            tuple(optim.lr_multipliers), "must be (regex, factor) pairs, e.g. ((\"^text/\", 0.1),)",
        )
        require(is_number(pair[1]) and pair[1] >= 0, f"optim.lr_multipliers[{pair[0]!r}]", pair[1], "must be a number >= 0")
    _check_regexes([pattern for pattern, _ in optim.lr_multipliers], "optim.lr_multipliers")
    for pair in optim.fixed_rows:
        require(
            isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str) and is_int(pair[1])
            and pair[1] >= 1, "optim.fixed_rows", tuple(optim.fixed_rows),
            "must be (regex, rows >= 1) pairs, e.g. ((\"^text/positional_embedding$\", 20),)",
        )
    _check_regexes([pattern for pattern, _ in optim.fixed_rows], "optim.fixed_rows")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        require(is_int(size) and (size >= 1 or size == -1), f"mesh.{axis}", size, "must be an int >= 1 or -1")
    require(
        sum(config.mesh[axis] == -1 for axis in ("data", "fsdp", "tensor")) <= 1, "mesh", config.mesh.to_dict(),
        "at most one axis may be -1",
    )
    require(is_int(ckpt.every_steps) and ckpt.every_steps >= 1, "checkpoint.every_steps", ckpt.every_steps, "must be an int >= 1")
    require(is_int(ckpt.keep) and ckpt.keep >= 1, "checkpoint.keep", ckpt.keep, "must be an int >= 1")
    require(is_int(ckpt.keep_best) and ckpt.keep_best >= 1, "checkpoint.keep_best", ckpt.keep_best, "must be an int >= 1")
    require(ckpt.best_mode in BEST_MODES, "checkpoint.best_mode", ckpt.best_mode, f"must be one of {BEST_MODES}")
    require(isinstance(ckpt.async_save, bool), "checkpoint.async_save", ckpt.async_save, "must be True or False")
    require(init.kind in INIT_KINDS, "init.kind", init.kind, f"must be one of {INIT_KINDS}")
    require(
        (init.kind == "scratch") == (not init.path), "init.path", init.path,
        "must be given for init.kind params/open_clip/hf and empty for scratch",
    )
    require(is_int(evaluation.every_steps) and evaluation.every_steps >= 0, "eval.every_steps", evaluation.every_steps, "must be an int >= 0")
    require(is_int(evaluation.batch_size) and evaluation.batch_size >= 1, "eval.batch_size", evaluation.batch_size, "must be an int >= 1")
    tasks = tuple(evaluation.tasks)
    require(
        bool(tasks) == (evaluation.every_steps > 0), "eval.every_steps", evaluation.every_steps,
        "must be > 0 exactly when eval.tasks are given",
    )
    for field in ("exclude_overlap", "allow_train_split"):
        require(isinstance(evaluation[field], bool), f"eval.{field}", evaluation[field], "must be True or False")
    prefixes = _check_eval_tasks(tasks, allow_train_split=evaluation.allow_train_split) if tasks else []
    require(
        not ckpt.best_metric or bool(tasks), "checkpoint.best_metric", ckpt.best_metric,
        "needs eval.tasks (the metric comes from the evaluation)",
    )
    # The metric's name within its task is known only after an evaluation (the loop checks it then).
    require(
        not ckpt.best_metric or any(str(ckpt.best_metric).startswith(prefix + "/") for prefix in prefixes),
        "checkpoint.best_metric", ckpt.best_metric,
        f"must be a metric of one of the eval.tasks, named <task>/<metric> with <task> one of {prefixes}",
    )


def _check_eval_tasks(tasks: tuple[str, ...], *, allow_train_split: bool) -> list[str]:
    """Each task parses, and names no training split unless allowed (reads the tasks' manifests, so a task
    the evaluation would refuse is refused now, not after `eval.every_steps` steps of training). Returns the
    tasks' metric prefixes ("zeroshot/aid")."""
    from geoalign_jax.eval import runner

    prefixes = []
    for task in tasks:
        try:
            spec = runner.parse_task(task)
            split, _, splits = runner.resolve_split(spec)
        except runner.TaskError as error:
            raise ValueError(f"eval.tasks: {error}") from None
        try:
            runner.split_guard(spec, split, splits, allow_train_split)
        except runner.TaskError as error:
            raise ValueError(f"eval.tasks: {error} (in the trainer's config: eval.allow_train_split = True)") from None
        prefixes.append(spec.prefix)
    return prefixes


def as_plain_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The whole config as JSON-friendly nested dicts/lists (for WORKDIR/config.json)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            return {str(key): plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        return value

    return plain(config)
