#!/usr/bin/env bash
# Sets up ./.venv (if needed) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
exec .venv/bin/python -m pytest -q "$@"
