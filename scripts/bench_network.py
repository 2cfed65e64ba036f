"""HyMUNet vs nnU-Net's PlainConvUNet and ResidualEncoderUNet on one nnU-Net plan: parameters, FLOPs, CPU time, memory.

The default plan is the one nnU-Net 2.8.1's ExperimentPlanner writes for an ISIC-2018-like dataset (RGB PNGs of
700 x 1000 px, spacing 1): 8 stages, features 32..512, patch 768 x 1024, batch 2. It was obtained by running
`nnUNetv2_plan_and_preprocess -d 999 -c 2d --no_pp` on four synthetic 700 x 1000 RGB PNGs (see docs/benchmarks.md).

Times are medians over --repeats rounds; in each round every model runs once (interleaved), so load changes on the
machine hit all models alike. Forward = inference (no grad, deep supervision off); train step = forward with deep
supervision on, a loss over all outputs, backward. FLOPs come from torch.utils.flop_counter.FlopCounterMode, which does
not see the selective scan (a custom autograd function); its cost is added analytically and printed separately.
Peak memory is the peak RSS during the first training step minus the RSS before it, measured in a fresh
subprocess per model (Linux: the peak is reset through /proc/self/clear_refs).
Usage: python scripts/bench_network.py [--patch 768 1024] [--batch 1] [--repeats 3] [--json out.json]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ISIC_LIKE_PLAN = {
    "n_stages": 8, "features_per_stage": [32, 64, 128, 256, 512, 512, 512, 512], "kernel_sizes": [[3, 3]] * 8,
    "strides": [[1, 1]] + [[2, 2]] * 7, "n_conv_per_stage": [2] * 8, "n_conv_per_stage_decoder": [2] * 7,
    "conv_bias": True, "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
    "dropout_op_kwargs": None, "nonlin_kwargs": {"inplace": True},
}
ISIC_LIKE_PATCH = (768, 1024)
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)  # nnUNetPlannerResEncM's n_blocks_per_stage, decoder 1 conv

MODELS = {
    "PlainConvUNet": {},
    "ResEncUNet-M": {},
    "HyMUNet cross+mgf (default)": {"scan": "cross", "fusion": "mgf"},
    "HyMUNet flat+mgf": {"scan": "flat", "fusion": "mgf"},
    "HyMUNet bidir+mgf": {"scan": "bidir", "fusion": "mgf"},
    "HyMUNet cross+concat": {"scan": "cross", "fusion": "concat"},
    "HyMUNet no-Mamba (n_mamba_stages=0)": {"n_mamba_stages": 0},
}


def build(name: str, input_channels: int = 3, num_classes: int = 2, deep_supervision: bool = True):
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from nnunetv2_hymunet.network import HyMUNet

    kwargs = dict(ISIC_LIKE_PLAN, conv_op=torch.nn.Conv2d, norm_op=torch.nn.InstanceNorm2d,
                  nonlin=torch.nn.LeakyReLU)
    common = dict(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision)
    if name == "PlainConvUNet":
        net = PlainConvUNet(**common, **kwargs)
    elif name == "ResEncUNet-M":
        n = kwargs["n_stages"]
        kwargs.pop("n_conv_per_stage")
        kwargs.update(n_blocks_per_stage=list(RESENC_M_BLOCKS[:n]), n_conv_per_stage_decoder=[1] * (n - 1))
        net = ResidualEncoderUNet(**common, **kwargs)
    else:
        net = HyMUNet(**common, **kwargs, **MODELS[name])
    net.apply(net.initialize)
    return net


def scan_flops(net, spatial, batch: int) -> int:
    """Analytic forward FLOPs of the selective scans: per direction, token, inner channel and state: exp(delta*A),
    two multiply-adds for the state update, one for the readout (~7 FLOPs); per token and inner channel: softplus,
    delta*u, D*u and the SiLU(z) gate (~10 FLOPs)."""
    from nnunetv2_hymunet.network.mamba_layer import MambaLayer

    total, size = 0, list(spatial)
    for stage, stride in zip(net.encoder.stages, net.encoder.strides):
        size = [i // s for i, s in zip(size, stride)]
        tokens = 1
        for i in size:
            tokens *= i
        for layer in stage.mamba_layers:
            assert isinstance(layer, MambaLayer)
            m = layer.mamba_modules[0]  # one per direction or shared: the same shapes
            total += batch * len(layer.directions) * tokens * m.d_inner * (7 * m.d_state + 10)
    return total


def count_flops(net, x) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        net(x)
    return counter.get_total_flops()


def train_step(net, x) -> None:
    net.zero_grad(set_to_none=True)
    outputs = net(x)
    sum(o.float().square().mean() for o in outputs).backward()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_probe(name: str, patch, batch: int) -> None:
    """Run in a fresh process: peak RSS during the first training step minus the RSS before it (MiB), as JSON.

    The peak (VmHWM) is reset first by writing 5 to /proc/self/clear_refs (Linux), so building the model does not
    hide the step's peak. Only the first step is measured: later steps reuse memory the allocator kept.
    """
    import torch

    net = build(name)
    x = torch.randn(batch, 3, *patch)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    train_step(net, x)  # the first step: activations plus the gradient buffers a training step needs
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_rss_increase_mib": (peak - before) / 1024}))


def run(patch, batch: int, repeats: int, threads: int, json_path: str = None, models=None) -> dict:
    import torch

    from nnunetv2_hymunet.ssm import resolve_backend

    torch.set_num_threads(threads)
    backend = resolve_backend(torch.device("cpu"))
    print(f"patch {patch}, batch {batch}, repeats {repeats}, threads {threads}, scan backend {backend}, "
          f"load average {os.getloadavg()}", flush=True)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, *patch)
    names = list(models or MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown or "PlainConvUNet" not in names:
        raise SystemExit(f"--models must name PlainConvUNet and others from {list(MODELS)}; unknown: {unknown}")
    nets = {name: build(name) for name in names}
    results = {name: {"params": sum(p.numel() for p in net.parameters())} for name, net in nets.items()}
    for name, net in nets.items():
        net.decoder.deep_supervision = False
        results[name]["flops_counted"] = count_flops(net, x)
        results[name]["flops_scan"] = scan_flops(net, patch, batch) if name.startswith("HyMUNet") else 0
        net.eval()
        with torch.no_grad():  # warm-up (numba compilation, oneDNN primitives)
            net(x)
        net.train()
        net.decoder.deep_supervision = True
        train_step(net, x)
    fwd = {name: [] for name in names}
    step = {name: [] for name in names}
    for r in range(repeats):
        for name, net in nets.items():
            net.eval()
            net.decoder.deep_supervision = False
            t = time.perf_counter()
            with torch.no_grad():
                net(x)
            fwd[name].append(time.perf_counter() - t)
            net.train()
            net.decoder.deep_supervision = True
            t = time.perf_counter()
            train_step(net, x)
            step[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{repeats} done, load average {os.getloadavg()}", flush=True)
    for name in names:
        results[name]["forward_s"] = statistics.median(fwd[name])
        results[name]["train_step_s"] = statistics.median(step[name])
    del nets
    for name in names:
        probe = subprocess.run([sys.executable, __file__, "--memory-probe", name, "--patch", *map(str, patch),
                                "--batch", str(batch), "--threads", str(threads)],
                               capture_output=True, text=True, check=True)
        results[name].update(json.loads(probe.stdout.strip().splitlines()[-1]))

    base = results["PlainConvUNet"]
    print("\n| model | params (M) | ratio | GFLOPs fwd (counted + scan) | fwd (s) | ratio | train step (s) | ratio "
          "| peak RSS +MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        gflops = (r["flops_counted"] + r["flops_scan"]) / 1e9
        print(f"| {name} | {r['params'] / 1e6:.2f} | {r['params'] / base['params']:.2f} | {gflops:.1f} "
              f"({r['flops_counted'] / 1e9:.1f} + {r['flops_scan'] / 1e9:.2f}) | {r['forward_s']:.2f} | "
              f"{r['forward_s'] / base['forward_s']:.2f} | {r['train_step_s']:.2f} | "
              f"{r['train_step_s'] / base['train_step_s']:.2f} | {r['peak_rss_increase_mib']:.0f} |")
    print(f"\nload average at the end {os.getloadavg()}")
    if json_path:
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"patch": list(patch), "batch": batch, "threads": threads, "backend": backend,
                       "results": results}, f, indent=1)
        os.replace(tmp, json_path)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--patch", type=int, nargs="+", default=list(ISIC_LIKE_PATCH),
                        help="spatial size (default: the planned ISIC-like patch 768 1024; must be divisible by 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--models", nargs="+", default=None, help=f"a subset of: {', '.join(MODELS)}")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:
        import torch

        torch.set_num_threads(args.threads)
        memory_probe(args.memory_probe, tuple(args.patch), args.batch)
        return 0
    if len(args.patch) != 2 or any(p % 128 for p in args.patch):
        parser.error(f"--patch must be two sizes divisible by 128 (the plan's total stride), got {args.patch}")
    run(tuple(args.patch), args.batch, args.repeats, args.threads, args.json, args.models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
