#!/usr/bin/env bash
# Creates (or updates) the project's virtual environment in .venv and installs the package with its test extra
# (pytest, ruff, and hatchling for the wheel test).
# Idempotent: a second run only re-checks the install. Override the location with HYMUNET_VENV.
# CPU machines get the matched torch/torchvision pair from scripts/constraints-cpu.txt; set
# HYMUNET_TORCH_CONSTRAINTS=none on a GPU machine that already has its CUDA torch in the venv.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${HYMUNET_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
constraints="${HYMUNET_TORCH_CONSTRAINTS:-$root/scripts/constraints-cpu.txt}"

if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating virtual environment $venv"
  "$python" -m venv "$venv"
fi
stamp="$venv/.hymunet-installed"
# Reinstall when the project's requirements changed since the last install.
want="$(cat "$root/pyproject.toml" "$root/scripts/constraints-cpu.txt" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import nnunetv2_hymunet" 2>/dev/null; then
  echo "[setup] environment up to date ($venv)"
  exit 0
fi
pip_args=(-q -e "$root[test]")
if [ "$constraints" != "none" ]; then pip_args=(-c "$constraints" "${pip_args[@]}"); fi
echo "[setup] installing nnunetv2-hymunet and its dependencies into $venv (first time: several minutes)"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install "${pip_args[@]}"
echo "$want" > "$stamp"
echo "[setup] done"
