#!/usr/bin/env bash
# Prints the facts about this machine that a slow, hanging or failing CI run needs (CPUs this process may really use,
# CPU quota, memory, disk, home, compiler, python, torch). Diagnostic only: every probe is guarded and the script
# always exits 0. Run by .ci/run before the tests; `bash scripts/ci_environment.sh` anywhere else.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" || root="."
venv="${HYMUNET_VENV:-$root/.venv}"
python="python3"
if [ -x "$venv/bin/python" ]; then python="$venv/bin/python"; fi

show() { printf '[ci-env] %-10s %s\n' "$1" "${2:-?}"; }
first() { "$@" 2>/dev/null | head -n 1; }      # first output line of a command, empty when it fails
free_on() { df -Ph "$1" 2>/dev/null | awk 'NR == 2 {print $4}'; }

show "date" "$(first date -u '+%Y-%m-%d %H:%M:%S UTC')"
show "machine" "$(first uname -m), kernel $(first uname -r)"
nproc_note=""
if [ -n "${OMP_NUM_THREADS:-}" ]; then nproc_note=" (nproc follows OMP_NUM_THREADS=$OMP_NUM_THREADS)"; fi
affinity="$(first "$python" -c 'import os; print(len(os.sched_getaffinity(0)))')"
show "cpus" "nproc $(first nproc)$nproc_note, nproc --all $(first nproc --all), sched_getaffinity ${affinity:-?}"
usable="$(first "$python" "$root/scripts/usable_cpus.py")"
show "cpus used" "${usable:-?} (scripts/usable_cpus.py)"
model="$(first grep -m1 -E '^(model name|Model|cpu model)' /proc/cpuinfo)"
flags=" $(first grep -m1 -E '^(flags|Features)' /proc/cpuinfo | cut -d: -f2-) "
has() { case "$flags" in *" $1 "*) echo "$1 yes" ;; *) echo "$1 no" ;; esac; }
show "cpu model" "${model#*: }; $(has avx2), $(has avx512f), $(has fma)"
show "memory" "$(awk '/^MemTotal/ {t = $2} /^MemAvailable/ {a = $2}
  END {if (t) printf "%.1f GiB total, %.1f GiB available", t / 1048576, a / 1048576}' /proc/meminfo 2>/dev/null)"
show "disk free" "repo $(free_on "$root"), /tmp $(free_on /tmp)"
home_state="NOT writable or missing"
if [ -n "${HOME:-}" ] && probe_file="$(mktemp "$HOME/.ci-env-probe.XXXXXX" 2>/dev/null)"; then
  rm -f "$probe_file" && home_state="writable"
fi
show "user" "uid $(first id -u), HOME=${HOME:-<unset>} ($home_state)"
show "TMPDIR" "${TMPDIR:-<unset>}"
gcc_version="$(first gcc --version)"
show "gcc" "${gcc_version:-not found}"
python_version="$(first "$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
show "python" "${python_version:-$python not found}"
torch_info="$(first "$python" -c 'import torch; print(torch.__version__, "get_num_threads():", torch.get_num_threads())')"
show "torch" "${torch_info:-not importable with $python (scripts/test.sh sets up the venv)}"
exit 0
