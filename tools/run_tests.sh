#!/usr/bin/env bash
# Sets up ./.venv (if needed) and runs the whole test suite. Extra arguments go to pytest.
# pytest-xdist runs one test file per worker process, one worker per core (at most 4: every worker holds its
# own JAX and compiles); a file's module fixtures are built once. `-n 0` (an extra argument) runs serially.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
exec .venv/bin/python -m pytest -q -n auto --maxprocesses 4 --dist loadfile "$@"
