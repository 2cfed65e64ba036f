"""Profile results as files: profile.json, profile.md (a Markdown table) and profile.png (parameters vs step time).

Every file is written to a temporary name beside its target and renamed, so an interrupted run leaves no half file.
"""

import json
import math
import os

from nnunetv2_hymunet.fs_safety import atomic_write_bytes, atomic_write_text


def _fmt(value, digits=1):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def markdown_table(result: dict) -> str:
    """The efficiency table; ratios are relative to the first model (measured in the same run)."""
    models = result["models"]
    reference = models[0]
    native = result["plan"].get("native_patch_size")
    header = ["Model", "Network", "Params (M)", "GFLOPs/patch", "of which scan"]
    if native:
        header.append(f"GFLOPs at {'x'.join(map(str, native))}")
    header += [
        "Forward ms",
        "Step ms",
        f"Step x {reference['model']}",
        "Peak mem fwd (MiB)",
        "Peak mem step (MiB)",
        "Sliding window s (tiles)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in models:
        window = m.get("sliding_window")
        row = [
            m["model"],
            m["network_class"],
            _fmt(m["parameters"] / 1e6, 2),
            _fmt(m["gflops"], 2),
            _fmt(m["flops_scan_analytic"] / 1e9, 3),
        ]
        if native:
            row.append(_fmt(m.get("gflops_native_patch"), 1))
        row += [
            _fmt(m["forward_ms_median"]),
            _fmt(m["step_ms_median"]),
            _fmt(m["step_ms_median"] / reference["step_ms_median"], 2),
            _fmt(m["peak_memory_forward_mib"], 0),
            _fmt(m["peak_memory_step_mib"], 0),
            f"{_fmt(window['seconds'], 2)} ({window['tiles']})" if window else "not run",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe_run(result: dict) -> str:
    plan, settings, machine = result["plan"], result["settings"], result["machine"]
    load = machine["load_average_before"]
    window = next((m["sliding_window"] for m in result["models"] if m.get("sliding_window")), None)
    parts = [
        f"Plan: {plan['source']} [{plan['configuration']}], patch {'x'.join(map(str, plan['patch_size']))}, "
        f"{plan['num_input_channels']} input channels, {plan['num_outputs']} outputs.",
        f"Batch {settings['batch_size']}; medians of {settings['repeats']} interleaved repeats after "
        f"{settings['warmup']} warm-up round(s).",
        f"Machine: {machine['device']}, {machine.get('gpu') or machine['processor'] or machine['platform']}, "
        f"{machine['torch_threads']} torch threads, torch {machine['torch']}, scan backend {machine['scan_backend']}; "
        f"load average before {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}.",
        f"FLOPs: {settings['flops_method']}. Memory: {settings['memory_method']}.",
    ]
    if window:
        parts.append(
            f"Sliding window: one random case of shape {'x'.join(map(str, window['case_shape']))}, "
            f"nnUNetPredictor ({settings['sliding_window']})."
        )
    return "\n".join(parts)


def scatter_png(result: dict) -> bytes:
    """Accuracy-free cost: parameters (x) vs training-step time (y), one labelled point per model."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=110)
    for m in result["models"]:
        x, y = m["parameters"] / 1e6, m["step_ms_median"]
        ax.scatter([x], [y], s=40)
        ax.annotate(m["model"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    plan = result["plan"]
    ax.set_xlabel("parameters (millions)")
    ax.set_ylabel(f"training step, median ms (batch {result['settings']['batch_size']})")
    ax.set_title(
        f"{plan['configuration']} patch {'x'.join(map(str, plan['patch_size']))} on {result['machine']['device']}",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_profile_outputs(result: dict, output_dir: str) -> dict:
    """Write profile.json / profile.md / profile.png into output_dir; returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {kind: os.path.join(output_dir, f"profile.{kind}") for kind in ("json", "md", "png")}
    atomic_write_text(paths["json"], json.dumps(result, indent=2))
    atomic_write_text(
        paths["md"], "# Efficiency profile\n\n" + describe_run(result) + "\n\n" + markdown_table(result) + "\n"
    )
    atomic_write_bytes(paths["png"], scatter_png(result))
    return paths
