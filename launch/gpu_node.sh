#!/usr/bin/env bash
# Train on one GPU node: one process that uses all local GPUs (or those of --gpus) through one jax mesh.
#
#   bash launch/gpu_node.sh --config configs/farslip.py --workdir runs/farslip-s1 [--gpus 0,1,2,3] \
#       [--no-setup] [--dry-run] [-- --config.FIELD=VALUE ...]
#
# Sets up ./.venv with the gpu extra (jax[cuda12], same jax version) unless --no-setup, lists the GPUs with
# nvidia-smi, then trains. Resuming: run the same command again; the trainer continues from the last
# checkpoint in --workdir. GEOALIGN_DISTRIBUTED=off keeps jax from taking a surrounding SLURM/MPI allocation
# for a multi-process job (use launch/gpu_slurm.sbatch for several nodes).
# --dry-run prints every command that would change something; the nvidia-smi query still runs.
# GEOALIGN_PYTHON overrides the interpreter (default .venv/bin/python).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

config="" workdir="" gpus="" setup=true DRY_RUN=false extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --gpus) gpus="${2:?--gpus needs a value}"; shift 2 ;;
    --no-setup) setup=false; shift ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h|--help) usage_of "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_value --config "$config"
require_value --workdir "$workdir"
[ -f "$ROOT/${config%%:*}" ] || die "--config ${config%%:*} not found under $ROOT"
[ -z "$gpus" ] || [[ "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must be a comma-separated list of GPU indices, got $gpus"
cd "$ROOT"

if [ "$setup" = true ]; then
  run env GEOALIGN_EXTRAS=gpu bash tools/setup_env.sh runtime
fi

if command -v nvidia-smi >/dev/null; then
  listed="$(nvidia-smi --query-gpu=index,name --format=csv,noheader)"
  note "GPUs on $(hostname): $(echo "$listed" | grep -c .)"
  while read -r gpu; do note "  $gpu"; done <<< "$listed"
  if [ -n "$gpus" ]; then note "using GPUs $gpus"; else note "using all of them"; fi
elif [ "$DRY_RUN" = true ]; then
  note "nvidia-smi not found: cannot list the GPUs here"
else
  die "nvidia-smi not found: no NVIDIA GPU driver on this machine"
fi

train_command "${GEOALIGN_PYTHON:-.venv/bin/python}" "$config" "$workdir" "${extra[@]}"
environment=(GEOALIGN_DISTRIBUTED=off)
[ -z "$gpus" ] || environment+=(CUDA_VISIBLE_DEVICES="$gpus")
run env "${environment[@]}" "${TRAIN_CMD[@]}"
