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

# torch starts one OpenMP thread per visible CPU. Under a cgroup CPU quota smaller than that, the threads spin against
# each other and every parallel op gets many times slower, so unless OMP_NUM_THREADS is set, use the CPUs this process
# may really run on: min(affinity mask, ceil(quota / period)). A probe that fails leaves OMP_NUM_THREADS unset.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cpus="$("$venv/bin/python" "$root/scripts/usable_cpus.py" 2>/dev/null)" || cpus=""
  visible="$(nproc 2>/dev/null)" || visible="?"
  if [[ "$cpus" =~ ^[1-9][0-9]*\  ]]; then
    export OMP_NUM_THREADS="${cpus%% *}"
    echo "[test] OMP_NUM_THREADS=$OMP_NUM_THREADS (${cpus#* }; nproc: $visible)"
  else
    echo "[test] OMP_NUM_THREADS left unset (could not count the usable CPUs)"
  fi
else
  echo "[test] OMP_NUM_THREADS=$OMP_NUM_THREADS (set by the caller)"
fi
"$venv/bin/python" -m pytest -ra "$@"
