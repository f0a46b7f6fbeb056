# shellcheck shell=bash
# Shared by the launch scripts (sourced, not run). Each script sets DRY_RUN=true|false before calling these.
#
# The rule of --dry-run: every command that changes something (creates a machine, copies files, installs,
# trains) is printed instead of run, one per line, quoted so that it can be pasted into a shell; read-only
# queries (gcloud ... describe, scontrol show hostnames, nvidia-smi) still run, because the commands that
# follow depend on their answers. Lines starting with '#' are notes.

# The comment block at the top of a script (after the shebang and any #SBATCH lines), as its --help.
usage_of() {  # FILE
  awk 'NR == 1 || /^#SBATCH/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

die() {
  echo "error: $*" >&2
  exit 2
}

note() {
  echo "# $*"
}

# Prints its arguments as one shell command line: words that need quoting are single-quoted.
quote_args() {
  local out="" word
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# A command that changes something: printed under --dry-run, otherwise echoed (as '+ command') and run.
run() {
  if [ "$DRY_RUN" = true ]; then
    quote_args "$@"
  else
    echo "+ $(quote_args "$@")" >&2
    "$@"
  fi
}

# The training command every launcher runs: the trainer resumes from the checkpoints in --workdir, so running
# the same command again after a preemption or a crash continues the run.
train_command() {  # PYTHON CONFIG WORKDIR [EXTRA...]
  local python="$1" config="$2" workdir="$3"
  shift 3
  # shellcheck disable=SC2034  # read by the sourcing script
  TRAIN_CMD=("$python" -m geoalign_jax.train --config "$config" --workdir "$workdir" "$@")
}

require_value() {  # FLAG VALUE
  [ -n "$2" ] || die "$1 is required (see --help)"
}
