#!/usr/bin/env bash
# The main job on a CPU: sets up ./.venv (if needed) and runs the demo (tools/demo.py). Extra args go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
exec .venv/bin/python tools/demo.py "$@"
