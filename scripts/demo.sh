#!/usr/bin/env bash
# The main job on an embedded synthetic default: sets up .venv, then runs `hymunet demo`
# (synthetic ISIC-like data -> stock nnU-Net plan/train/predict with nnUNetTrainerHyMUNet -> metrics).
# Extra arguments go to `hymunet demo` (see `hymunet demo --help`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
venv="${HYMUNET_VENV:-$root/.venv}"
exec "$venv/bin/hymunet" demo "$@"
