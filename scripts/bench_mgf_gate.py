"""MGF gate benchmark: forward+backward of one MambaGuidedFusion per decoder level, current code against a baseline.

The levels are those of nnU-Net's ISIC 2D plan (features 32..512, patch 768x1024, batch 2; InstanceNorm affine,
eps 1e-5, as nnU-Net's plans set the gate's norm): level i has channels[i] channels at patch / 2^i. The baseline is
nnunetv2_hymunet/network/mgf_skip.py as of a git revision (default 5da65df, before the hand-written gate), loaded
from `git show` into its own module, with the same weights. Both run in one process, interleaved level by level and
round by round (the order alternating), on --threads threads; medians over --rounds rounds are reported, per level
and for all levels together, as forward and forward+backward seconds and the new/old ratio.

Also per level, once each: the bytes autograd saves for backward (saved_tensors_hooks, each storage counted once; E
and the output, which the encoder and the decoder conv keep anyway, are part of it), and the peak resident-set growth
above the level's inputs during the forward and during the backward (nnunetv2_hymunet.benchmark.profiling.
CpuPeakMemory: VmHWM after a /proc/self/clear_refs reset; the forward's includes its output, the backward's the
gradients it returns).

    OMP_NUM_THREADS=1 python scripts/bench_mgf_gate.py                 # the plan's full size, 3 rounds
    OMP_NUM_THREADS=1 python scripts/bench_mgf_gate.py --scale 0.25    # quick: patch 192x256
"""

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from nnunetv2_hymunet.benchmark.profiling import CpuPeakMemory
from nnunetv2_hymunet.network.mgf_skip import MambaGuidedFusion

REPO = Path(__file__).resolve().parents[1]
MODULE_PATH = "nnunetv2_hymunet/network/mgf_skip.py"


def load_revision(revision: str) -> types.ModuleType:
    """mgf_skip.py as of `revision`, as a module of its own."""
    source = subprocess.run(
        ["git", "show", f"{revision}:{MODULE_PATH}"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"mgf_skip_{revision}")
    module.__file__ = f"{revision}:{MODULE_PATH}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def build(cls, channels: int, gate_norm: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    mgf = cls(nn.Conv2d, channels, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, False, gate_norm)
    with torch.no_grad():
        for p in mgf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return mgf


def inputs(channels: int, shape, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    skip = torch.randn(batch, channels, *shape, generator=g).requires_grad_(True)
    up = torch.randn(batch, channels, *shape, generator=g).requires_grad_(True)
    grad = torch.randn(batch, 2 * channels, *shape, generator=g)
    return skip, up, grad


def step(mgf, skip, up, grad):
    """Seconds of the forward and of forward+backward."""
    mgf.zero_grad(set_to_none=True)
    skip.grad = up.grad = None
    t0 = time.perf_counter()
    out = mgf(skip, up)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def saved_bytes(mgf, skip, up) -> int:
    seen = {p.untyped_storage().data_ptr() for p in mgf.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = mgf(skip, up)
    del out
    return total


def peaks(meter: CpuPeakMemory, mgf, skip, up, grad):
    """MiB of resident-set growth at the peak of the forward and of the backward."""
    mgf.zero_grad(set_to_none=True)
    skip.grad = up.grad = None
    box = {}
    forward = meter.measure(lambda: box.setdefault("out", mgf(skip, up)))
    backward = meter.measure(lambda: box["out"].backward(grad))
    box.clear()
    mgf.zero_grad(set_to_none=True)
    skip.grad = up.grad = None
    return forward, backward


def max_abs_diff(a, b) -> float:
    return float((a - b).abs().max())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", default="32,64,128,256,512,512,512", help="channels per decoder level, top first")
    parser.add_argument("--patch", default="768,1024", help="spatial size of the top level")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the patch (0.25: quick run)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--levels", default=None, help="comma-separated level indices to run (default: all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--gate-norm", default="instance", choices=("instance", "none", "channel"))
    parser.add_argument("--baseline", default="5da65df", help="git revision of the baseline mgf_skip.py")
    parser.add_argument("--no-memory", action="store_true", help="skip the saved-bytes and peak measurements")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    channels = [int(c) for c in args.channels.split(",")]
    top = [max(1, round(int(s) * args.scale)) for s in args.patch.split(",")]
    levels = range(len(channels)) if args.levels is None else [int(i) for i in args.levels.split(",")]
    old_module = load_revision(args.baseline)
    impls = {"old": old_module.MambaGuidedFusion, "new": MambaGuidedFusion}

    cases = []
    for i in levels:
        shape = [max(1, s >> i) for s in top]
        mgfs = {name: build(cls, channels[i], args.gate_norm, seed=i) for name, cls in impls.items()}
        cases.append((i, channels[i], shape, mgfs))
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, "
        f"gate_norm {args.gate_norm}, baseline {args.baseline}, rounds {args.rounds}"
    )

    # agreement of the two (float32; one step each)
    for i, c, shape, mgfs in cases:
        skip, up, grad = inputs(c, shape, args.batch, seed=100 + i)
        results = {}
        for name, mgf in mgfs.items():
            step(mgf, skip, up, grad)
            results[name] = [skip.grad.clone(), up.grad.clone(), *(p.grad.clone() for p in mgf.parameters())]
            with torch.no_grad():
                results[name].append(mgf(skip, up))
        diffs = [max_abs_diff(a, b) / max(float(b.abs().max()), 1e-30) for a, b in zip(results["new"], results["old"])]
        print(f"# level {i}: max relative difference new vs old over output and all gradients {max(diffs):.1e}")

    times = {(i, name): [] for i, *_ in cases for name in impls}
    for r in range(args.rounds + 1):  # round 0 warms up
        for i, c, shape, mgfs in cases:
            skip, up, grad = inputs(c, shape, args.batch, seed=100 + i)
            order = list(impls) if (r + i) % 2 == 0 else list(impls)[::-1]
            for name in order:
                t = step(mgfs[name], skip, up, grad)
                if r:
                    times[(i, name)].append(t)
            del skip, up, grad

    def med(i, name, k):
        return statistics.median(t[k] for t in times[(i, name)])

    def total(name, k):
        return statistics.median(sum(times[(i, name)][r][k] for i, *_ in cases) for r in range(args.rounds))

    print("\n| level | C | H x W | fwd old s | fwd new s | fwd+bwd old s | fwd+bwd new s | new/old |")
    print("|---|---|---|---|---|---|---|---|")
    for i, c, shape, _ in cases:
        fo, fn, bo, bn = med(i, "old", 0), med(i, "new", 0), med(i, "old", 1), med(i, "new", 1)
        print(
            f"| {i} | {c} | {'x'.join(map(str, shape))} | {fo:.3f} | {fn:.3f} | {bo:.3f} | {bn:.3f} | {bn / bo:.2f} |"
        )
    fo, fn, bo, bn = total("old", 0), total("new", 0), total("old", 1), total("new", 1)
    print(f"| all | | | {fo:.3f} | {fn:.3f} | {bo:.3f} | {bn:.3f} | {bn / bo:.2f} |")
    print(f"\nsaved: fwd+bwd of all levels {bo - bn:.3f} s per step (median of {args.rounds} rounds, totals per round)")

    if args.no_memory:
        return
    meter = CpuPeakMemory()
    print("\n| level | saved for bwd old MiB | new MiB | fwd peak old MiB | new MiB | bwd peak old MiB | new MiB |")
    print("|---|---|---|---|---|---|---|")
    sums = [0.0] * 6
    for i, c, shape, mgfs in cases:
        skip, up, grad = inputs(c, shape, args.batch, seed=100 + i)
        row = [saved_bytes(mgfs["old"], skip, up) / 2**20, saved_bytes(mgfs["new"], skip, up) / 2**20]
        old_peaks, new_peaks = peaks(meter, mgfs["old"], skip, up, grad), peaks(meter, mgfs["new"], skip, up, grad)
        row += [old_peaks[0], new_peaks[0], old_peaks[1], new_peaks[1]]
        sums = [a + b for a, b in zip(sums, row)]
        print(f"| {i} | " + " | ".join(f"{v:.1f}" for v in row) + " |")
        del skip, up, grad
    print("| sum | " + " | ".join(f"{v:.1f}" for v in sums) + " |")
    print(f"# peak method: {meter.method}")


if __name__ == "__main__":
    sys.exit(main())
