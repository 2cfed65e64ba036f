#!/usr/bin/env bash
# Sets up .venv, checks lint and formatting with ruff, then runs the test suite. Extra arguments go to pytest
# (e.g. `-m "not slow"` for the fast unit tests only).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${HYMUNET_VENV:-$root/.venv}"
cd "$root"
"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .
"$venv/bin/python" -m pytest -ra "$@"
