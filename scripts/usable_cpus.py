"""Prints "N why": the CPUs this process may really run on, min(affinity mask, ceil(cgroup CPU quota / period)), and
how that was found. scripts/test.sh exports it as OMP_NUM_THREADS; scripts/ci_environment.sh prints it."""

import math
import os


def cgroup_quota():
    """(quota, period) in microseconds, None when unlimited; raises OSError/ValueError when unreadable."""
    v2 = ["/sys/fs/cgroup/cpu.max"] + [
        "/sys/fs/cgroup" + line.strip()[3:] + "/cpu.max" for line in open("/proc/self/cgroup") if line.startswith("0::")
    ]
    v2 = [p for p in v2 if os.path.exists(p)]
    if v2:
        quota, period = open(v2[0]).read().split()[:2]
        return None if quota == "max" else (int(quota), int(period))
    for folder in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
        if os.path.exists(f"{folder}/cpu.cfs_quota_us"):
            quota = int(open(f"{folder}/cpu.cfs_quota_us").read())
            return (quota, int(open(f"{folder}/cpu.cfs_period_us").read())) if quota > 0 else None
    return None


def main() -> None:
    n = len(os.sched_getaffinity(0))
    why = [f"{n} CPUs in the affinity mask"]
    try:
        quota = cgroup_quota()
    except (OSError, ValueError):
        quota = None
        why.append("cgroup quota unreadable")
    if quota:
        n = min(n, max(1, math.ceil(quota[0] / quota[1])))
        why.append(f"cgroup CPU quota {quota[0]}/{quota[1]}")
    elif len(why) == 1:
        why.append("no cgroup CPU quota")
    print(n, ", ".join(why))


if __name__ == "__main__":
    main()
