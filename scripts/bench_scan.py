"""Selective-scan benchmark: time and peak memory of every CPU backend against the sequential reference.

For each (d_inner, L) cell a fresh subprocess warms every method up, then times forward (no_grad) and
forward+backward in interleaved rounds and reports medians. Peak memory is the RSS high-water mark of one call above
the RSS before it, measured by nnunetv2_hymunet.benchmark.profiling.CpuPeakMemory as `hymunet profile` does
(malloc_trim, then /proc/self/clear_refs resets VmHWM; tracemalloc does not see torch's allocations). Also measures
the first call (compilation) of native with an empty cache and with the cache.

`native` is the C kernel (compiled on first use, before any timing), `torch` the chunked pure-PyTorch scan.
`indexing_reference` re-does mamba_ssm's selective_scan_ref op sequence (index x[:, :, i] inside the loop), which is
what CPU users of mamba_ssm get today; its backward is O(L^2), so it only runs where it finishes in reasonable time.

    python scripts/bench_scan.py                       # full grid, markdown tables on stdout
    python scripts/bench_scan.py --dims 256 --lengths 256 --repeats 3
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from nnunetv2_hymunet.benchmark.profiling import CpuPeakMemory
from nnunetv2_hymunet.fs_safety import atomic_write_text

METHODS = ("reference", "native", "torch", "indexing_reference")
# indexing_reference: (mode -> largest L it runs at); its fwd+bwd at d=256, L=1024 takes ~45 s
INDEXING_LIMITS = {"fwd": 1024, "fwdbwd": 256}


def indexing_reference(u, delta, A, B, C):
    """mamba_ssm selective_scan_ref's op sequence for real A and (batch, N, L) B/C (reimplemented here)."""
    import torch

    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    delta_B_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((u.shape[0], u.shape[1], A.shape[1]))
    ys = []
    for i in range(u.shape[2]):
        x = delta_A[:, :, i] * x + delta_B_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    return torch.stack(ys, dim=2), x


def _core(method):
    if method == "indexing_reference":
        return lambda u, delta, A, B, C: indexing_reference(u, delta, A, B[:, 0], C[:, 0])
    if method == "reference":
        from nnunetv2_hymunet.ssm.scan_reference import selective_scan_core_reference as core
    elif method == "native":
        from nnunetv2_hymunet.ssm.scan_native import selective_scan_core_native as core
    else:
        from nnunetv2_hymunet.ssm.scan_torch import selective_scan_core_torch as core
    return core


def _inputs(batch, dim, length, n_state):
    """Mamba-init-like inputs: delta = softplus(inv_softplus(dt) + noise), dt ~ logU[1e-3, 1e-1], A = -(1..N)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    dt = torch.exp(
        torch.rand(dim, generator=gen) * (torch.log(torch.tensor(0.1)) - torch.log(torch.tensor(1e-3)))
        + torch.log(torch.tensor(1e-3))
    )
    inv_dt = dt + torch.log(-torch.expm1(-dt))
    delta = torch.nn.functional.softplus(inv_dt[:, None] + 0.5 * torch.randn(batch, dim, length, generator=gen))
    u = torch.randn(batch, dim, length, generator=gen)
    A = -torch.arange(1, n_state + 1, dtype=torch.float32).repeat(dim, 1)
    B = torch.randn(batch, 1, n_state, length, generator=gen)
    C = torch.randn(batch, 1, n_state, length, generator=gen)
    return [x.requires_grad_() for x in (u, delta, A, B, C)]


def _call(core, inputs, mode):
    import torch

    if mode == "fwd":
        with torch.no_grad():
            core(*inputs)
    else:
        for x in inputs:
            x.grad = None
        y, last = core(*inputs)
        (y.sum() + last.sum()).backward()


def run_cell(dim, length, methods, repeats, batch=2, n_state=16):
    """Runs in a fresh process: returns {method: {mode: {"median_s", "times_s", "peak_mb"}}}."""
    import torch

    inputs = _inputs(batch, dim, length, n_state)
    active = {m: _core(m) for m in methods}
    modes = {
        m: [mode for mode in ("fwd", "fwdbwd") if m != "indexing_reference" or length <= INDEXING_LIMITS[mode]]
        for m in methods
    }
    result = {m: {} for m in methods}
    meter = CpuPeakMemory()  # the resident-set peak as `hymunet profile` measures it
    for method, core in active.items():  # warm-up; measure one call's peak memory
        for mode in modes[method]:
            _call(core, inputs, mode)
            peak = meter.measure(lambda: _call(core, inputs, mode))
            result[method][mode] = {"peak_mb": peak, "times_s": []}
    for _ in range(repeats):  # interleaved rounds
        for method, core in active.items():
            for mode in modes[method]:
                start = time.perf_counter()
                _call(core, inputs, mode)
                result[method][mode]["times_s"].append(time.perf_counter() - start)
    for method in methods:
        for entry in result[method].values():
            entry["median_s"] = statistics.median(entry["times_s"])
    result["threads"] = {"torch": torch.get_num_threads()}
    return result


def first_call_seconds(method):
    """Import + first fwd+bwd call (float32) in a fresh process with an empty kernel cache, then with the cache."""
    code = (
        "import time; t = time.perf_counter(); import sys; sys.argv = ['x']; "
        "from scripts.bench_scan import _inputs, _call, _core; "
        f"_call(_core({method!r}), _inputs(2, 64, 300, 16), 'fwdbwd'); print(time.perf_counter() - t)"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    times = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, HYMUNET_CACHE_DIR=cache, PYTHONPATH=root)
        for label in ("cold (empty cache)", "cached"):
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, check=True
            )
            times[label] = float(out.stdout.strip().splitlines()[-1])
    return times


def _fmt_cell(entry):
    return "–" if entry is None else f"{entry['median_s']:.3g} s \\| {entry['peak_mb']:.0f} MB"


def print_tables(results, dims, lengths, methods):
    for mode, title in (("fwd", "Forward (no_grad)"), ("fwdbwd", "Forward + backward")):
        print(f"\n#### {title}: median time \\| peak extra RSS\n")
        cols = [(d, L) for d in dims for L in lengths]
        print("| method | " + " | ".join(f"d={d} L={L}" for d, L in cols) + " |")
        print("|---" * (len(cols) + 1) + "|")
        for method in methods:
            cells = [_fmt_cell(results[(d, L)][method].get(mode)) for d, L in cols]
            print(f"| {method} | " + " | ".join(cells) + " |")
        for fast in ("native", "torch"):
            if fast not in methods:
                continue
            ratios = []
            for d, L in cols:
                ref, got = results[(d, L)]["reference"][mode], results[(d, L)][fast][mode]
                speedup = ref["median_s"] / got["median_s"]
                ratios.append(f"{speedup:.1f}× \\| {got['peak_mb'] / max(ref['peak_mb'], 1):.2f}")
            print(f"| **{fast}: speed-up \\| memory ratio vs reference** | " + " | ".join(ratios) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--cell", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: run one cell, print JSON
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(run_cell(args.cell[0], args.cell[1], args.methods, args.repeats)))
        return 0
    print(f"load average before: {os.getloadavg()}", flush=True)
    results = {}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for d in args.dims:
        for L in args.lengths:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--cell",
                str(d),
                str(L),
                "--repeats",
                str(args.repeats),
                "--methods",
                *args.methods,
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, cwd=root, env=dict(os.environ, PYTHONPATH=root)
            )
            results[(d, L)] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"done d={d} L={L} (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
    print(f"load average after: {os.getloadavg()}")
    print_tables(results, args.dims, args.lengths, args.methods)
    if "native" in args.methods:
        first = first_call_seconds("native")
        print(
            "\nnative import + first fwd+bwd call (float32, d=64, L=300): "
            + ", ".join(f"{k}: {v:.1f} s" for k, v in first.items())
        )
    if args.json:
        atomic_write_text(args.json, json.dumps({f"{d},{L}": v for (d, L), v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
