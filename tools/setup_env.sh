#!/usr/bin/env bash
# Creates ./.venv and installs what geoalign-jax needs; re-running is a no-op while the requirement
# files are unchanged. Usage: [GEOALIGN_EXTRAS=gpu|tpu|torch,...] bash tools/setup_env.sh [runtime|test]
# (default: test). GEOALIGN_EXTRAS adds pyproject.toml's extras on top: gpu (jax[cuda12]), tpu (jax[tpu] + gcsfs),
# torch (importing .pt/.bin checkpoints), all pinned to the same jax as requirements.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
extras="${GEOALIGN_EXTRAS:-}"
case "$kind" in
  runtime) req=requirements.txt ;;
  test) req=requirements-test.txt ;;
  *) echo "usage: $0 [runtime|test]" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.installed-$kind-$(cat requirements.txt "$req" pyproject.toml <(echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing $req${extras:+ and extras [$extras]} (first run takes a few minutes)"
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$req"
  if [ -n "$extras" ]; then
    .venv/bin/python -m pip install --quiet -e ".[$extras]"
  else
    .venv/bin/python -m pip install --quiet --no-deps -e .
  fi
  touch "$stamp"
fi
echo "[setup] .venv ready ($kind${extras:+, extras $extras})"
