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
  cpus="$("$venv/bin/python" - 2>/dev/null <<'EOF'
import math, os

n = len(os.sched_getaffinity(0))
why = [f"{n} CPUs in the affinity mask"]
quota = None
try:
    v2 = ["/sys/fs/cgroup/cpu.max"] + [
        "/sys/fs/cgroup" + line.strip()[3:] + "/cpu.max" for line in open("/proc/self/cgroup") if line.startswith("0::")
    ]
    v2 = [p for p in v2 if os.path.exists(p)]
    if v2:
        q, period = open(v2[0]).read().split()[:2]
        quota = None if q == "max" else (int(q), int(period))
    else:
        for d in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
            if os.path.exists(f"{d}/cpu.cfs_quota_us"):
                q = int(open(f"{d}/cpu.cfs_quota_us").read())
                quota = (q, int(open(f"{d}/cpu.cfs_period_us").read())) if q > 0 else None
                break
except (OSError, ValueError):
    why.append("cgroup quota unreadable")
if quota:
    n = min(n, max(1, math.ceil(quota[0] / quota[1])))
    why.append(f"cgroup CPU quota {quota[0]}/{quota[1]}")
elif len(why) == 1:
    why.append("no cgroup CPU quota")
print(n, ", ".join(why))
EOF
)" || cpus=""
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
