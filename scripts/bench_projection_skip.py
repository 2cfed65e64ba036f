"""Projection-skip benchmark (issue 13): forward+backward of the two full-resolution residual projection skips of
nnU-Net's ISIC 2D plan (features 32, 64, ..., patch 768x1024, batch 2, InstanceNorm affine eps 1e-5), RecomputedSkip
(the checkpointed [avg-pool,] 1x1 conv, InstanceNorm) against FoldedNormSkip (the norm folded into the conv).

    stage 0: input (2, 3, 768, 1024), 3 -> 32, no pool
    stage 1: input (2, 32, 768, 1024), avg-pool 2, 32 -> 64

Both run in one process on the same weights and inputs, interleaved per round (the order alternating); medians over
--rounds rounds of the forward and forward+backward seconds, and the new/old ratio. Also the bytes autograd saves for
backward (saved_tensors_hooks, each storage counted once; the skip's input x is listed apart, as the block's first
conv keeps it anyway).

    python scripts/bench_projection_skip.py                  # one thread, 3 rounds, the plan's size
    python scripts/bench_projection_skip.py --scale 0.25     # quick: patch 192x256
"""

import argparse
import statistics
import time

import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn

from nnunetv2_hymunet.network.projection_skip import FoldedNormSkip, RecomputedSkip

SKIPS = {"stage 0": (3, 32, 1), "stage 1": (32, 64, 2)}  # channels in, out, stride


def build(channels_in: int, channels_out: int, stride: int):
    torch.manual_seed(0)
    block = BasicBlockD(
        nn.Conv2d, channels_in, channels_out, 3, stride, True, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True},
        None, None, nn.LeakyReLU, {"inplace": True},
    )  # fmt: skip
    with torch.no_grad():
        for p in block.skip.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return {"old": RecomputedSkip(*block.skip), "new": FoldedNormSkip(*block.skip)}


def step(skip, x, grad):
    skip.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    out = skip(x)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t0


def saved_bytes(skip, x):
    """(bytes saved for backward other than x's storage and the parameters, whether x's storage was saved)."""
    exclude = {p.untyped_storage().data_ptr() for p in skip.parameters()}
    x_ptr = x.untyped_storage().data_ptr()
    seen, found_x = set(), [False]

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key == x_ptr:
            found_x[0] = True
        elif key not in exclude:
            seen.add((key, t.untyped_storage().nbytes()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = skip(x)
    del out
    return sum(n for _, n in seen), found_x[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scale", type=float, default=1.0, help="patch side factor (1: 768x1024)")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    patch = (round(768 * args.scale), round(1024 * args.scale))
    print(f"threads {args.threads}, patch {patch}, batch {args.batch}, {args.rounds} rounds; torch {torch.__version__}")
    for name, (c_in, c_out, stride) in SKIPS.items():
        skips = build(c_in, c_out, stride)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, c_in, *patch, generator=g).requires_grad_(True)
        grad = torch.randn(args.batch, c_out, *(p // stride for p in patch), generator=g)
        with torch.no_grad():
            diff = (skips["new"](x) - skips["old"](x)).abs().max().item()
        times = {k: [] for k in skips}
        for r in range(args.rounds + 1):  # round 0: warm-up, not counted
            for k in list(skips) if r % 2 == 0 else list(skips)[::-1]:
                t = step(skips[k], x, grad)
                if r > 0:
                    times[k].append(t)
        print(f"{name}: input {tuple(x.shape)}, {c_in} -> {c_out}, stride {stride}; max |new - old| {diff:.2e}")
        med = {}
        for k in skips:
            fwd = statistics.median(t[0] for t in times[k])
            total = statistics.median(t[1] for t in times[k])
            med[k] = (fwd, total)
            nbytes, keeps_x = saved_bytes(skips[k], x)
            print(
                f"  {k} ({type(skips[k]).__name__}): forward {fwd:.3f} s, forward+backward {total:.3f} s; "
                f"saved for backward {nbytes / 2**10:.1f} KiB{' + its input x' if keeps_x else ''}"
            )
        print(
            f"  new/old: forward {med['new'][0] / med['old'][0]:.2f}, "
            f"forward+backward {med['new'][1] / med['old'][1]:.2f}"
        )


if __name__ == "__main__":
    main()
