#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: create it with gcloud (or reuse it), put this checkout and its
# environment on every worker, and run the same train command on all workers (--worker=all), workdir on a bucket.
#
#   bash launch/tpu_pod.sh --name NAME --zone ZONE --accelerator-type v4-16 \
#       --config configs/farslip.py --workdir gs://BUCKET/runs/NAME [--project P] [--runtime-version V] \
#       [--queued] [--spot] [--code copy|git --repo URL [--ref COMMIT]] [--max-restarts N] [--dry-run] \
#       [-- --config.FIELD=VALUE ...]
#
# --queued asks through a queued resource (waits for capacity; --wait-minutes); --spot makes it a Spot TPU.
# --code copy (default) copies the files git tracks or would track, uncommitted changes included; --code git
# clones --repo on every worker and checks out --ref (default: this checkout's HEAD commit).
# Resuming: run the same command again. A READY TPU is reused, a preempted one is deleted and created again,
# the code is copied again, setup is a no-op when nothing changed, and the trainer continues from the last
# checkpoint in --workdir. With --max-restarts N this script does that itself after a preemption.
# --dry-run prints every command that would change something; gcloud's read-only describe queries still run.
# Training runs in the foreground of the ssh sessions: start this script inside tmux or screen.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$ROOT/launch/lib.sh"

name="" zone="" project="" accelerator="" runtime="tpu-ubuntu2204-base" queued=false spot=false
config="" workdir="" code="copy" repo="" ref="" remote_dir="geoalign-jax" python="python3.11"
max_restarts=0 wait_minutes=60 DRY_RUN=false extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --accelerator-type) accelerator="${2:?--accelerator-type needs a value}"; shift 2 ;;
    --runtime-version) runtime="${2:?--runtime-version needs a value}"; shift 2 ;;
    --queued) queued=true; shift ;;
    --spot) spot=true; shift ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --code) code="${2:?--code needs a value}"; shift 2 ;;
    --repo) repo="${2:?--repo needs a value}"; shift 2 ;;
    --ref) ref="${2:?--ref needs a value}"; shift 2 ;;
    --remote-dir) remote_dir="${2:?--remote-dir needs a value}"; shift 2 ;;
    --python) python="${2:?--python needs a value}"; shift 2 ;;
    --max-restarts) max_restarts="${2:?--max-restarts needs a value}"; shift 2 ;;
    --wait-minutes) wait_minutes="${2:?--wait-minutes needs a value}"; shift 2 ;;
    --dry-run) DRY_RUN=true; shift ;;
    -h|--help) usage_of "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
require_value --name "$name"
require_value --zone "$zone"
require_value --accelerator-type "$accelerator"
require_value --config "$config"
require_value --workdir "$workdir"
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// bucket path: every worker writes and resumes from it"
[ -f "$ROOT/${config%%:*}" ] || die "--config ${config%%:*} not found under $ROOT"
case "$code" in
  copy) git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1 || die "--code copy needs a git checkout (or use --code git)" ;;
  git) require_value --repo "$repo"; ref="${ref:-$(git -C "$ROOT" rev-parse HEAD)}" ;;
  *) die "--code must be copy or git, got $code" ;;
esac
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts must be a number, got $max_restarts"
command -v gcloud >/dev/null || [ "$DRY_RUN" = true ] || die "gcloud not found: install the Google Cloud CLI"

scope=(--zone="$zone")
[ -z "$project" ] || scope+=(--project="$project")
spot_flag=()
[ "$spot" = false ] || spot_flag=(--spot)
if [ "$queued" = true ]; then kind="queued resource"; else kind="TPU VM"; fi

# Read-only: the TPU's state ("" when it does not exist). Any other gcloud failure (no project set, no
# credentials, no such zone) stops the script with gcloud's own message: a TPU gcloud cannot describe is not
# "absent", and a dry run must not plan to create it.
tpu_state() {
  command -v gcloud >/dev/null || return 0
  local errors out status=0
  errors="$(mktemp)"
  if [ "$queued" = true ]; then
    out="$(gcloud compute tpus queued-resources describe "$name" "${scope[@]}" --format='value(state.state)' 2>"$errors")" || status=$?
  else
    out="$(gcloud compute tpus tpu-vm describe "$name" "${scope[@]}" --format='value(state)' 2>"$errors")" || status=$?
  fi
  local message
  message="$(tr '\n' ' ' < "$errors")"
  rm -f "$errors"
  if [ "$status" -ne 0 ]; then
    [[ "$message" =~ NOT_FOUND|"not found"|"was not found" ]] && return 0
    die "gcloud cannot describe $kind $name (exit status $status): ${message:-no message}"
  fi
  printf '%s\n' "$out"
}

create_tpu() {
  if [ "$queued" = true ]; then
    run gcloud compute tpus queued-resources create "$name" --node-id="$name" "${scope[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$runtime" "${spot_flag[@]}"
  else
    run gcloud compute tpus tpu-vm create "$name" "${scope[@]}" --accelerator-type="$accelerator" \
      --version="$runtime" "${spot_flag[@]}"
  fi
}

delete_tpu() {
  if [ "$queued" = true ]; then
    run gcloud compute tpus queued-resources delete "$name" "${scope[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${scope[@]}" --quiet
  fi
}

wait_ready() {
  if [ "$DRY_RUN" = true ]; then
    note "then wait (up to $wait_minutes min) until the $kind is READY / ACTIVE"
    return
  fi
  local deadline=$((SECONDS + wait_minutes * 60)) state
  while true; do
    state="$(tpu_state)"
    case "$state" in
      READY|ACTIVE) return ;;
      FAILED|SUSPENDED|PREEMPTED|TERMINATED) die "$kind $name became $state while waiting for it" ;;
    esac
    [ "$SECONDS" -lt "$deadline" ] || die "$kind $name is still ${state:-absent} after $wait_minutes min (--wait-minutes)"
    sleep 30
  done
}

ensure_tpu() {
  local state
  state="$(tpu_state)"
  note "$kind $name: ${state:-absent}"
  case "$state" in
    READY|ACTIVE) note "reusing $name" ;;
    "") create_tpu; wait_ready ;;
    PREEMPTED|TERMINATED|SUSPENDING|SUSPENDED|FAILED)
      note "$name was $state: deleting it and creating it again (the run resumes from $workdir)"
      delete_tpu; create_tpu; wait_ready ;;
    STOPPED) run gcloud compute tpus tpu-vm start "$name" "${scope[@]}"; wait_ready ;;
    *) note "$name is $state"; wait_ready ;;
  esac
}

show_workers() {
  local workers=""
  if command -v gcloud >/dev/null; then
    workers="$(gcloud compute tpus tpu-vm describe "$name" "${scope[@]}" \
      --format='value(networkEndpoints[].ipAddress)' 2>/dev/null | tr ';,' '  ' || true)"
  fi
  if [ -n "$workers" ]; then
    note "workers: $workers"
  elif [ "$DRY_RUN" = true ]; then
    note "workers: known once the TPU exists (every command below runs on all of them)"
  else
    die "gcloud lists no workers for $name"
  fi
}

ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$name" "${scope[@]}" --worker=all --command="$1"
}

dir="$(quote_args "$remote_dir")"

push_code() {
  if [ "$code" = git ]; then
    ssh_all "if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $(quote_args "$repo") $dir; fi && git -C $dir checkout --quiet --force $(quote_args "$ref")"
    return
  fi
  local archive="${TMPDIR:-/tmp}/geoalign-code-$name.tgz"
  run bash -c "cd $(quote_args "$ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -czf $(quote_args "$archive")"
  run gcloud compute tpus tpu-vm scp "$archive" "$name:geoalign-code.tgz" "${scope[@]}" --worker=all
  # unpacked over the previous copy: its .venv (setup stays a no-op) and anything else there are kept
  ssh_all "mkdir -p $dir && tar -xzf geoalign-code.tgz -C $dir"
}

setup_all() {
  local py
  py="$(quote_args "$python")"
  ssh_all "cd $dir && (command -v $py >/dev/null || (sudo apt-get update -qq && sudo apt-get install -y -qq $py $py-venv)) && PYTHON=$py GEOALIGN_EXTRAS=tpu bash tools/setup_env.sh runtime"
}

train_all() {
  train_command .venv/bin/python "$config" "$workdir" "${extra[@]}"
  # jax finds the other workers through the TPU metadata; require makes a worker that cannot fail loudly
  ssh_all "cd $dir && GEOALIGN_DISTRIBUTED=require $(quote_args "${TRAIN_CMD[@]}")"
}

restarts=0
while true; do
  ensure_tpu
  show_workers
  push_code
  setup_all
  status=0
  train_all || status=$?
  if [ "$status" -eq 0 ]; then
    [ "$DRY_RUN" = false ] || note "if training fails on a $kind that is no longer READY and restarts are left (--max-restarts $max_restarts), all of the above runs again"
    exit 0
  fi
  state="$(tpu_state)"
  if [ "$restarts" -ge "$max_restarts" ] || [ "$state" = READY ] || [ "$state" = ACTIVE ]; then
    echo "error: training exited with status $status ($kind $name: ${state:-absent}); run this command again to resume from $workdir" >&2
    exit "$status"
  fi
  restarts=$((restarts + 1))
  note "$kind $name is ${state:-absent} (preempted): restart $restarts of $max_restarts"
done
