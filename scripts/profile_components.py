"""Per-component profile of HyMUNet (and PlainConvUNet) at an nnU-Net plan: what each part keeps for backward, and
what each part costs in time.

Memory (load-insensitive, measured with `torch.autograd.graph.saved_tensors_hooks` during one forward pass with
gradients): every tensor autograd saves for backward is attributed to the component running when it was saved (the
first one, if several save the same storage); a storage is counted once, parameters not at all. Components: the
conv blocks of each encoder stage, each Mamba layer (its shared part: LayerNorm, in_proj, z gate, out_proj) and each of
its scan directions (causal conv, x_proj, dt_proj, selective scan and the copies that lay the sequence out), and per
decoder level the transposed conv, the MGF gate, the conv blocks and the segmentation head. Saved bytes are what the
activation memory of a training step is made of (peak RSS adds parameters, gradients and transient buffers).

Time (meaningful on a quiet machine only; the load average is printed): each component is run alone, at the input
shape it gets inside the network, forward and forward + backward (medians over --repeats), and the whole training
step (forward with deep supervision, a loss over all outputs, backward).

Usage:
  python scripts/profile_components.py --plan isic-like-2d [--batch 2] [--patch 768 1024] [--no-time]
      [--variant NAME KEY=VALUE ...]   (HyMUNet knobs; repeatable; default: the default HyMUNet)
  python scripts/profile_components.py --plan brats-like-3d --forward-only   (inference forward, the 3D check)
"""

import argparse
import ast
import contextlib
import json
import os
import statistics
import sys
import time

import torch

from nnunetv2_hymunet.fs_safety import atomic_write_text

PLANS = ("isic-like-2d", "brats-like-3d")
NAN = float("nan")


def plan_arch(plan: str):
    """The built-in plan's (arch_kwargs, input channels, output channels, patch, batch), as bench_network reads it."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_network import plan_arch as read_plan

    return read_plan(plan)


def build(name: str, knobs: dict, kwargs, channels, classes):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs

    common = dict(input_channels=channels, num_classes=classes, deep_supervision=True)
    if name == "PlainConvUNet":
        net = PlainConvUNet(**common, **kwargs)
    else:
        net = hymunet_from_unet_kwargs(**common, **kwargs, **knobs)
    net.apply(net.initialize)
    return net


def components(net) -> dict:
    """{module: label} of the components to profile."""
    labels = {}
    for s, stage in enumerate(net.encoder.stages):
        if hasattr(stage, "mamba_layers"):
            labels[stage.blocks] = f"enc{s}.conv"
            for i, layer in enumerate(stage.mamba_layers):
                labels[layer] = f"enc{s}.mamba{i}"
        else:
            labels[stage] = f"enc{s}.conv"
    decoder = net.decoder
    for s in range(len(decoder.stages)):
        labels[decoder.transpconvs[s]] = f"dec{s}.up"
        if hasattr(decoder, "fusions") and len(list(decoder.fusions[s].parameters())):
            labels[decoder.fusions[s]] = f"dec{s}.mgf"
        labels[decoder.stages[s]] = f"dec{s}.conv"
        labels[decoder.seg_layers[s]] = f"dec{s}.seg"
    return labels


@contextlib.contextmanager
def labelled(net, stack: list, shapes: dict = None):
    """Push each component's label while it runs; label each scan direction too; record input shapes."""
    from nnunetv2_hymunet.network import mamba_layer

    handles = []
    for module, label in components(net).items():

        def pre(m, args, label=label):
            stack.append(label)
            if shapes is not None and label not in shapes:
                shapes[label] = [tuple(a.shape) for a in args if torch.is_tensor(a)]

        def post(m, args, out):
            stack.pop()  # returns None: a forward hook's return value would replace the output

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    original = getattr(mamba_layer, "direction_scan", None)  # absent in older versions: no per-direction labels

    def direction_scan(mamba, x_in, direction, spatial):
        perm, reverse = direction
        stack.append(f"{stack[-1]}.dir{''.join(map(str, perm))}{'r' if reverse else ''}")
        try:
            return original(mamba, x_in, direction, spatial)
        finally:
            stack.pop()

    if original is not None:
        mamba_layer.direction_scan = direction_scan
    try:
        yield
    finally:
        if original is not None:
            mamba_layer.direction_scan = original
        for h in handles:
            h.remove()


def saved_bytes(net, x) -> dict:
    """{label: bytes} that autograd keeps for backward after one forward pass (deep supervision on)."""
    from nnunetv2_hymunet.network.memory import saved_for_backward_bytes

    stack = []
    with labelled(net, stack):
        return saved_for_backward_bytes(net, x, label=lambda: stack[-1] if stack else "other")


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def component_times(net, x, repeats: int, forward_only: bool = False) -> dict:
    """{label: (forward s, forward + backward s)} of each component run alone at its in-network input shape
    (forward + backward is NaN with forward_only)."""
    shapes, stack = {}, []
    with torch.no_grad(), labelled(net, stack, shapes):
        net(x)
    results = {}
    for module, label in components(net).items():
        if label not in shapes:
            continue
        inputs = [torch.randn(s) for s in shapes[label]]

        def fwd(module=module, inputs=inputs):
            with torch.no_grad():
                module(*inputs)

        def fwd_bwd(module=module, inputs=inputs):
            ins = [t.requires_grad_(True) for t in inputs]
            out = module(*ins)
            out.backward(torch.ones_like(out))

        results[label] = (_median_time(fwd, repeats), NAN if forward_only else _median_time(fwd_bwd, repeats))
        if label.endswith(tuple(f"mamba{i}" for i in range(8))):
            results.update(direction_times(module, inputs[0], label, repeats, forward_only))
    return results


def direction_times(layer, x, label: str, repeats: int, forward_only: bool = False) -> dict:
    """Per scan direction: the layout copies alone, and the whole direction (copies, conv, scan) forward/backward."""
    from nnunetv2_hymunet.network.mamba_layer import direction_scan, from_sequence, to_sequence

    mamba = layer.mamba_modules[0]
    spatial = x.shape[2:]
    n_tokens = x[0, 0].numel()
    x_in = torch.randn(x.shape[0], n_tokens, mamba.d_inner)
    results = {}
    for direction in layer.directions:
        perm, reverse = direction
        name = f"{label}.dir{''.join(map(str, perm))}{'r' if reverse else ''}"

        def copies(direction=direction):
            seq = to_sequence(x_in.transpose(1, 2).unflatten(2, spatial), *direction)
            from_sequence(seq, *direction, spatial).flatten(2).transpose(1, 2).contiguous()

        def fwd(direction=direction):
            with torch.no_grad():
                direction_scan(mamba, x_in, direction, spatial)

        def fwd_bwd(direction=direction):
            xi = x_in.requires_grad_(True)
            out = direction_scan(mamba, xi, direction, spatial)
            out.backward(torch.ones_like(out))

        results[name + ".copies"] = (_median_time(copies, repeats), NAN)
        results[name] = (_median_time(fwd, repeats), NAN if forward_only else _median_time(fwd_bwd, repeats))
    return results


def forward_time(net, x, repeats: int) -> float:
    """The whole network's inference forward (no gradients, no deep supervision), as nnU-Net predicts."""
    net.eval()
    net.decoder.deep_supervision = False

    def forward():
        with torch.no_grad():
            net(x)

    try:
        return _median_time(forward, repeats)
    finally:
        net.decoder.deep_supervision = True


def in_network_forward_times(nets: dict, x, repeats: int) -> dict:
    """{model: {label: median s}} of each component inside the whole network's inference forward, the models run
    round-robin (one forward each per round, after a warm-up round), so a drift of the machine's speed hits them alike;
    "other" is what runs outside the components (PlainConvUNet's skip concatenation, HyMUNet's layer glue), "whole"
    the forward itself."""
    rounds = {name: [] for name in nets}
    handles, clocks = [], {}
    for name, net in nets.items():
        net.eval()
        net.decoder.deep_supervision = False
        for module, label in components(net).items():
            key = (name, label)

            def pre(m, args, key=key):
                clocks[key] = time.perf_counter()

            def post(m, args, out, key=key):
                clocks["elapsed"][key] = clocks["elapsed"].get(key, 0.0) + time.perf_counter() - clocks[key]

            handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        for r in range(repeats + 1):
            for name, net in nets.items():
                clocks["elapsed"] = {}
                start = time.perf_counter()
                with torch.no_grad():
                    net(x)
                whole = time.perf_counter() - start
                if r:  # round 0 warms up
                    times = {label: t for (_, label), t in clocks["elapsed"].items()}
                    rounds[name].append({**times, "other": whole - sum(times.values()), "whole": whole})
    finally:
        for h in handles:
            h.remove()
        for net in nets.values():
            net.decoder.deep_supervision = True
    return {
        name: {label: statistics.median(r[label] for r in per_round) for label in per_round[0]}
        for name, per_round in rounds.items()
    }


def step_time(net, x, repeats: int) -> float:
    def step():
        net.zero_grad(set_to_none=True)
        sum(o.float().square().mean() for o in net(x)).backward()

    net.train()
    return _median_time(step, repeats)


def parse_variant(items):
    name, knobs = items[0], {}
    for item in items[1:]:
        key, _, value = item.partition("=")
        try:
            knobs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            knobs[key] = value
    return name, knobs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", choices=PLANS, default="isic-like-2d")
    parser.add_argument("--batch", type=int, default=None, help="default: the plan's batch size")
    parser.add_argument("--patch", type=int, nargs="+", default=None, help="default: the plan's patch size")
    parser.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=None,
        metavar="NAME KEY=VALUE",
        help="a HyMUNet built with these knobs, e.g. --variant deep3 mamba_stages=[5,6,7]",
    )
    parser.add_argument("--no-time", action="store_true", help="saved bytes only (any load)")
    parser.add_argument(
        "--forward-only",
        action="store_true",
        help="time forward passes only: each component's, and the whole network's inference forward instead of the "
        "training step (the 3D plan's check)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    kwargs, channels, classes, patch, batch = plan_arch(args.plan)
    patch = tuple(args.patch or patch)
    batch = args.batch or batch
    variants = [("PlainConvUNet", {}), ("HyMUNet", {})] + [parse_variant(v) for v in (args.variant or [])]
    torch.manual_seed(0)
    x = torch.randn(batch, channels, *patch)
    print(
        f"plan {args.plan}, patch {patch}, batch {batch}, threads {args.threads}, load average {os.getloadavg()}",
        flush=True,
    )
    whole = "forward_s" if args.forward_only else "step_s"
    report = {}
    for name, knobs in variants:
        net = build(name, knobs, kwargs, channels, classes)
        saved = saved_bytes(net, x)
        entry = {
            "knobs": knobs,
            "saved_bytes": saved,
            "total_saved_bytes": sum(saved.values()),
            "conv_feature_map_size": int(net.compute_conv_feature_map_size(patch)) * batch,
        }
        if not args.no_time:
            entry["component_times"] = component_times(net, x, args.repeats, args.forward_only)
            entry[whole] = (forward_time if args.forward_only else step_time)(net, x, args.repeats)
        report[name] = entry
        del net
        print(f"{name} done, load average {os.getloadavg()}", flush=True)

    if args.forward_only and not args.no_time:
        nets = {name: build(name, knobs, kwargs, channels, classes) for name, knobs in variants}
        inside = in_network_forward_times(nets, x, args.repeats)
        del nets
        for name in report:
            report[name]["in_network_forward_s"] = inside[name]
        labels = sorted(set().union(*(set(t) for t in inside.values())) - {"other", "whole"}, key=_order)
        print("\n### Inside the network's forward, models round-robin (median s)\n")
        print("| component | " + " | ".join(inside) + " |")
        print("|---|" + "---|" * len(inside))
        for label in labels + ["other", "whole"]:
            cells = [f"{1e3 * t[label]:.0f} ms" if label in t else "–" for t in inside.values()]
            print(f"| {label} | " + " | ".join(cells) + " |")

    base = report["PlainConvUNet"]
    print(
        "\n| model | saved for backward (MiB) | ratio | compute_conv_feature_map_size ratio |"
        + ((" forward (s) | ratio |" if args.forward_only else " train step (s) | ratio |") if not args.no_time else "")
    )
    print("|---|---|---|---|" + ("---|---|" if not args.no_time else ""))
    for name, r in report.items():
        line = (
            f"| {name} {r['knobs'] or ''} | {r['total_saved_bytes'] / 2**20:.0f} | "
            f"{r['total_saved_bytes'] / base['total_saved_bytes']:.3f} | "
            f"{r['conv_feature_map_size'] / base['conv_feature_map_size']:.3f} |"
        )
        if not args.no_time:
            line += f" {r[whole]:.2f} | {r[whole] / base[whole]:.2f} |"
        print(line)
    for name, r in report.items():
        print(f"\n### {name} {r['knobs'] or ''}: per component\n")
        times = r.get("component_times", {})
        print("| component | saved (MiB) |" + (" fwd alone (ms) | fwd+bwd alone (ms) |" if times else ""))
        print("|---|---|" + ("---|---|" if times else ""))
        for label in sorted(set(r["saved_bytes"]) | set(times), key=_order):
            line = f"| {label} | {r['saved_bytes'].get(label, 0) / 2**20:.1f} |"
            if times:
                fwd, both = times.get(label, (float("nan"), float("nan")))
                line += f" {1e3 * fwd:.1f} | {1e3 * both:.1f} |"
            print(line)
    print(f"\nload average at the end {os.getloadavg()}")
    if args.json:
        atomic_write_text(
            args.json, json.dumps({"plan": args.plan, "patch": patch, "batch": batch, "results": report}, indent=1)
        )
    return 0


def _order(label: str):
    part = label.split(".")[0]
    kind = {"enc": 0, "dec": 1}.get(part[:3], 2)
    digits = "".join(c for c in part if c.isdigit())
    return kind, int(digits) if digits else 99, label


if __name__ == "__main__":
    sys.exit(main())
