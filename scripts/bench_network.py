"""HyMUNet vs nnU-Net's PlainConvUNet and ResidualEncoderUNet on one nnU-Net plan: parameters, FLOPs, CPU time, memory.

The default plan is the one nnU-Net 2.8.1's ExperimentPlanner writes for an ISIC-2018-like dataset (RGB PNGs of
700 x 1000 px, spacing 1): 8 stages, features 32..512, patch 768 x 1024, batch 2. It was obtained by running
`nnUNetv2_plan_and_preprocess -d 999 -c 2d --no_pp` on four synthetic 700 x 1000 RGB PNGs (see docs/benchmarks.md).

Times are medians over --repeats rounds; in each round every model runs once (interleaved), so load changes on the
machine hit all models alike. Forward = inference (no grad, deep supervision off); train step = forward with deep
supervision on, a loss over all outputs, backward. FLOPs: `hymunet profile`'s count_flops (FlopCounterMode on fake
tensors; the selective scan through its registered formula, nnunetv2_hymunet.ssm.selective_scan.selective_scan_flops,
printed separately).
Peak memory is the peak RSS during a training step (forward pass with --forward-only) minus the RSS before it,
measured in a fresh subprocess per model after one warm-up step at a small patch (Linux: the peak is reset through
/proc/self/clear_refs; glibc returns blocks >= 128 KiB to the system at once, so the RSS follows the live tensors).
--plan brats-like-3d: the plan nnU-Net writes for BraTS (3d_fullres, 6 stages, 32..320 features, patch 128^3, batch 2).
Usage: python scripts/bench_network.py [--plan isic-like-2d] [--patch 768 1024] [--batch 2] [--repeats 3]
           [--forward-only] [--json out.json]
       python scripts/bench_network.py --side-by-side   (issue 13's numbers: the 2D plan's training step and the 3D
           plan's forward pass, PlainConvUNet vs HyMUNet, two rounds each; prints the markdown tables)
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

from nnunetv2_hymunet.fs_safety import atomic_write_text

RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6)  # nnUNetPlannerResEncM's n_blocks_per_stage, decoder 1 conv
PLANS = ("isic-like-2d", "brats-like-3d")

MODELS = {
    "PlainConvUNet": {},
    "ResEncUNet-M": {},
    "HyMUNet cross+mgf (default)": {"scan": "cross", "fusion": "mgf"},
    "HyMUNet flat+mgf": {"scan": "flat", "fusion": "mgf"},
    "HyMUNet bidir+mgf": {"scan": "bidir", "fusion": "mgf"},
    "HyMUNet cross+concat": {"scan": "cross", "fusion": "concat"},
    "HyMUNet Mamba on the deepest 3 stages": {"n_mamba_stages": 3},
    "HyMUNet no-Mamba (n_mamba_stages=0)": {"n_mamba_stages": 0},
}
SIDE_BY_SIDE = {  # plan -> (models, forward only)
    "isic-like-2d": (
        [
            "PlainConvUNet",
            "HyMUNet cross+mgf (default)",
            "HyMUNet Mamba on the deepest 3 stages",
            "HyMUNet no-Mamba (n_mamba_stages=0)",
        ],
        False,
    ),
    "brats-like-3d": (["PlainConvUNet", "HyMUNet cross+mgf (default)"], True),  # 6 stages: Mamba on the deepest 3
}


def plan_arch(plan: str):
    """(arch_kwargs with classes imported, input channels, output channels, patch, batch) of a built-in plan
    (nnunetv2_hymunet.benchmark.presets: what nnU-Net 2.8.1 writes for an ISIC-like and a BraTS-like dataset)."""
    from pydoc import locate

    from nnunetv2_hymunet.benchmark.presets import preset_plan

    profile_plan = preset_plan(plan)
    configuration = profile_plan.configuration_dict
    architecture = configuration["architecture"]
    kwargs = dict(architecture["arch_kwargs"])
    for key in architecture["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = locate(kwargs[key])
    dataset_json = profile_plan.dataset_json
    labels = dataset_json["labels"]
    classes = len(labels) - 1 if "regions_class_order" in dataset_json else len(labels)
    return (
        kwargs,
        len(dataset_json["channel_names"]),
        classes,
        tuple(configuration["patch_size"]),
        configuration["batch_size"],
    )


def build(name: str, plan: str = "isic-like-2d", deep_supervision: bool = True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs

    kwargs, input_channels, num_classes, _, _ = plan_arch(plan)
    common = dict(input_channels=input_channels, num_classes=num_classes, deep_supervision=deep_supervision)
    if name == "PlainConvUNet":
        net = PlainConvUNet(**common, **kwargs)
    elif name == "ResEncUNet-M":
        n = kwargs["n_stages"]
        kwargs.pop("n_conv_per_stage")
        kwargs.update(n_blocks_per_stage=list(RESENC_M_BLOCKS[:n]), n_conv_per_stage_decoder=[1] * (n - 1))
        net = ResidualEncoderUNet(**common, **kwargs)
    else:
        net = hymunet_from_unet_kwargs(**common, **kwargs, **MODELS[name])
    net.apply(net.initialize)
    return net


def train_step(net, x) -> None:
    net.zero_grad(set_to_none=True)
    outputs = net(x)
    sum(o.float().square().mean() for o in outputs).backward()


def forward_pass(net, x) -> None:
    net.eval()
    set_deep_supervision(net, False)
    with torch.no_grad():
        net(x)


def set_deep_supervision(net, on: bool) -> None:
    net.decoder.deep_supervision = on


def memory_probe(name: str, plan: str, patch, batch: int, forward_only: bool) -> None:
    """Run in a fresh process: peak RSS during the first training step (or forward pass) minus the RSS before it
    (MiB), as JSON.

    Measured by nnunetv2_hymunet.benchmark.profiling.CpuPeakMemory, as `hymunet profile` does: glibc returns blocks
    >= 128 KiB to the system at once (the RSS follows the live tensors), and the peak (VmHWM) is reset through
    /proc/self/clear_refs (Linux) so that building the model does not hide the step's. Before it, one warm-up step at
    a small patch.
    """
    from nnunetv2_hymunet.benchmark.profiling import CpuPeakMemory

    meter = CpuPeakMemory()
    net = build(name, plan)
    kwargs, channels = plan_arch(plan)[:2]
    x = torch.randn(batch, channels, *patch)
    # warm-up at the smallest patch with more than one bottleneck voxel: what the first call loads once (the scan
    # kernel's library, thread pools) is not activation memory
    small = [2 * math.prod(s[d] for s in kwargs["strides"]) for d in range(len(patch))]
    (forward_pass if forward_only else train_step)(net, torch.randn(1, channels, *small))
    net.zero_grad(set_to_none=True)
    if not forward_only:
        net.train()
        set_deep_supervision(net, True)
    peak = meter.measure(lambda: (forward_pass if forward_only else train_step)(net, x))
    print(json.dumps({"peak_rss_increase_mib": peak}))


def run(
    plan: str,
    patch,
    batch: int,
    repeats: int,
    threads: int,
    json_path: str = None,
    models=None,
    forward_only: bool = False,
    flops: bool = True,
) -> dict:
    from nnunetv2_hymunet.benchmark.profiling import count_flops
    from nnunetv2_hymunet.ssm import resolve_backend

    torch.set_num_threads(threads)
    backend = resolve_backend(torch.device("cpu"))
    print(
        f"plan {plan}, patch {patch}, batch {batch}, repeats {repeats}, threads {threads}, scan backend {backend}, "
        f"load average {os.getloadavg()}",
        flush=True,
    )
    torch.manual_seed(0)
    x = torch.randn(batch, plan_arch(plan)[1], *patch)
    names = list(models or MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown or "PlainConvUNet" not in names:
        raise SystemExit(f"--models must name PlainConvUNet and others from {list(MODELS)}; unknown: {unknown}")
    nets = {name: build(name, plan) for name in names}
    results = {name: {"params": sum(p.numel() for p in net.parameters())} for name, net in nets.items()}
    for name, net in nets.items():
        if flops:  # the scan through its registered FLOP formula (nnunetv2_hymunet.ssm.selective_scan), as in profile
            counted = count_flops(net, tuple(x.shape))
            results[name]["flops_counted"], results[name]["flops_scan"] = counted["counted"], counted["scan_analytic"]
        forward_pass(net, x)  # warm-up (scan kernel build / compilation, oneDNN primitives)
        if not forward_only:
            net.train()
            set_deep_supervision(net, True)
            train_step(net, x)
    fwd = {name: [] for name in names}
    step = {name: [] for name in names}
    for r in range(repeats):
        for name, net in nets.items():
            t = time.perf_counter()
            forward_pass(net, x)
            fwd[name].append(time.perf_counter() - t)
            if not forward_only:
                net.train()
                set_deep_supervision(net, True)
                t = time.perf_counter()
                train_step(net, x)
                step[name].append(time.perf_counter() - t)
        print(f"round {r + 1}/{repeats} done, load average {os.getloadavg()}", flush=True)
    for name in names:
        results[name]["forward_s"] = statistics.median(fwd[name])
        results[name]["forward_rounds_s"] = fwd[name]
        if not forward_only:
            results[name]["train_step_s"] = statistics.median(step[name])
            results[name]["train_step_rounds_s"] = step[name]
    del nets
    for name in names:
        probe = subprocess.run(
            [
                sys.executable,
                __file__,
                "--memory-probe",
                name,
                "--plan",
                plan,
                "--patch",
                *map(str, patch),
                "--batch",
                str(batch),
                "--threads",
                str(threads),
            ]
            + (["--forward-only"] if forward_only else []),
            capture_output=True,
            text=True,
            check=True,
        )
        results[name].update(json.loads(probe.stdout.strip().splitlines()[-1]))
    print_table(results, forward_only, flops)
    print_round_ratios(results, forward_only)
    print(f"\nload average at the end {os.getloadavg()}")
    if json_path:
        atomic_write_text(
            json_path,
            json.dumps(
                {
                    "plan": plan,
                    "patch": list(patch),
                    "batch": batch,
                    "threads": threads,
                    "backend": backend,
                    "results": results,
                },
                indent=1,
            ),
        )
    return results


def print_table(results: dict, forward_only: bool, flops: bool) -> None:
    base = results["PlainConvUNet"]
    memory = "forward" if forward_only else "step"
    columns = (
        ["model", "params (M)", "ratio"]
        + (["GFLOPs fwd (counted + scan)"] if flops else [])
        + ["fwd (s)", "ratio"]
        + ([] if forward_only else ["train step (s)", "ratio"])
        + [f"peak {memory} RSS +MiB", "ratio"]
    )
    print("\n| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, r in results.items():
        cells = [name, f"{r['params'] / 1e6:.2f}", f"{r['params'] / base['params']:.2f}"]
        if flops:
            cells.append(
                f"{(r['flops_counted'] + r['flops_scan']) / 1e9:.1f} ({r['flops_counted'] / 1e9:.1f} + "
                f"{r['flops_scan'] / 1e9:.2f})"
            )
        cells += [f"{r['forward_s']:.2f}", f"{r['forward_s'] / base['forward_s']:.2f}"]
        if not forward_only:
            cells += [f"{r['train_step_s']:.2f}", f"{r['train_step_s'] / base['train_step_s']:.2f}"]
        cells += [
            f"{r['peak_rss_increase_mib']:.0f}",
            f"{r['peak_rss_increase_mib'] / base['peak_rss_increase_mib']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def print_round_ratios(results: dict, forward_only: bool) -> None:
    """Each round's times and its ratio to PlainConvUNet in the same round: the models of one round ran back to
    back, so these ratios are not moved by the drift of this VM's speed between rounds that moves the medians."""
    base = results["PlainConvUNet"]
    for key, label in [("forward_rounds_s", "forward")] + ([] if forward_only else [("train_step_rounds_s", "step")]):
        print(
            f"\n{label} per round (s): "
            + "; ".join(f"{name} {', '.join(f'{t:.2f}' for t in r[key])}" for name, r in results.items())
        )
        for name, r in results.items():
            if r is base:
                continue
            ratios = [t / b for t, b in zip(r[key], base[key])]
            print(
                f"{label} ratio {name} / PlainConvUNet per round: {', '.join(f'{q:.3f}' for q in ratios)}; "
                f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}"
            )


def side_by_side(repeats: int, threads: int, json_path: str = None) -> None:
    """Issue 13's check: the ISIC-like 2D plan's training step and the BraTS-like 3D plan's forward pass at their
    native patch and batch, PlainConvUNet vs HyMUNet."""
    everything = {}
    for plan, (models, forward_only) in SIDE_BY_SIDE.items():
        _, _, _, patch, batch = plan_arch(plan)
        print(
            f"\n## {plan}: patch {'x'.join(map(str, patch))}, batch {batch}, "
            f"{'forward pass (inference)' if forward_only else 'training step'}\n",
            flush=True,
        )
        everything[plan] = run(
            plan, patch, batch, repeats, threads, models=models, forward_only=forward_only, flops=False
        )
    if json_path:
        atomic_write_text(json_path, json.dumps(everything, indent=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=PLANS, default="isic-like-2d")
    parser.add_argument(
        "--patch",
        type=int,
        nargs="+",
        default=None,
        help="spatial size (default: the plan's: 768 1024, or 128 128 128; divisible by the total stride)",
    )
    parser.add_argument("--batch", type=int, default=None, help="default: the plan's batch size (2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--models", nargs="+", default=None, help=f"a subset of: {', '.join(MODELS)}")
    parser.add_argument("--forward-only", action="store_true", help="time and measure the forward pass only")
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="issue 13's numbers for both plans at their native size (--repeats default 2 here)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _, _, _, plan_patch, plan_batch = plan_arch(args.plan)
    patch, batch = tuple(args.patch or plan_patch), args.batch or plan_batch
    if args.memory_probe:
        torch.set_num_threads(args.threads)
        memory_probe(args.memory_probe, args.plan, patch, batch, args.forward_only)
        return 0
    if args.side_by_side:
        repeats = args.repeats if "--repeats" in (argv or sys.argv) else 2
        side_by_side(repeats, args.threads, args.json)
        return 0
    if len(patch) != len(plan_patch):
        parser.error(f"--patch needs {len(plan_patch)} sizes for {args.plan}, got {list(patch)}")
    run(args.plan, patch, batch, args.repeats, args.threads, args.json, args.models, args.forward_only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
