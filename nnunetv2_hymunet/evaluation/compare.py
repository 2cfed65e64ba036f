"""Compare several evaluated runs (output folders of `hymunet evaluate`): per-label tables, paired Wilcoxon
signed-rank tests per metric, box plots, and contour overlays of the worst cases.

Writes OUT/comparison.json, OUT/comparison.md, OUT/boxplots/<label>.png and, with --overlays,
OUT/overlays/<run>/<case>.png.
comparison.json: {runs: [{name, dir, n_cases}], units, labels, metrics,
                  table: {label: {run: {metric: {mean, median, std, n}, "pooled": {...}}}},
                  tests: [{label, metric, run_a, run_b, n, n_nonzero, median_difference, statistic, p_value, note}]}
Tests pair the cases both runs evaluated (matched by case id); a pair with a NaN or infinite value in either run is
left out and n counts the rest; n_nonzero of them have a nonzero difference (the ones scipy's default
zero_method="wilcox" ranks). median_difference is run_b - run_a.
"""

from __future__ import annotations

import itertools
import math
import os
import re

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.evaluation.evaluate import metric_header
from nnunetv2_hymunet.evaluation.outputs import write_json, write_output_folder, write_text

BOXPLOT_METRICS = ("dice", "iou", "precision", "recall", "hd", "hd95", "assd")


def load_run(run_dir: str) -> dict:
    import json

    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isfile(path):
        raise HyMUNetError(f"{run_dir}: no metrics.json (is it an output folder of 'hymunet evaluate'?)")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise HyMUNetError(f"{path}: cannot read: {e}") from None


def _run_names(run_dirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.normpath(d)) or d for d in run_dirs]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def _safe_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "label"


def paired_test(a: np.ndarray, b: np.ndarray) -> dict:
    """Two-sided Wilcoxon signed-rank test of b against a over finite pairs."""
    from scipy.stats import wilcoxon

    finite = np.isfinite(a) & np.isfinite(b)
    a, b = a[finite], b[finite]
    result = {
        "n": int(a.size),
        "n_nonzero": int(np.count_nonzero(b - a)),  # pairs the test ranks (scipy drops zero differences)
        "median_difference": float(np.median(b - a)) if a.size else float("nan"),
    }
    if a.size == 0:
        return {**result, "statistic": float("nan"), "p_value": float("nan"), "note": "no finite pairs"}
    if np.all(a == b):
        return {**result, "statistic": 0.0, "p_value": 1.0, "note": "identical values"}
    test = wilcoxon(b, a)
    return {**result, "statistic": float(test.statistic), "p_value": float(test.pvalue), "note": ""}


def _values_by_case(run: dict, label: str, metric: str) -> dict[str, float]:
    return {c["case"]: float(c["metrics"][label].get(metric, float("nan"))) for c in run["per_case"]}


def _boxplot(path: str, label: str, names: list[str], runs: list[dict], metrics: list[str], units: str) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state

    columns = min(4, len(metrics))
    rows = math.ceil(len(metrics) / columns)
    fig = Figure(figsize=(3.2 * columns, 3.0 * rows))
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, columns, i + 1)
        data = []
        for run in runs:
            values = np.array(list(_values_by_case(run, label, metric).values()), dtype=np.float64)
            data.append(values[np.isfinite(values)])
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=7)
        ax.set_title(metric_header(metric, units), fontsize=9)
    fig.suptitle(f"{label}: per-case values", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _worst_cases(run: dict, n: int) -> list[dict]:
    labels = [lab["name"] for lab in run["labels"]]

    def mean_dice(case):
        values = [case["metrics"][lab]["dice"] for lab in labels]
        values = [v for v in values if not math.isnan(v)]
        return np.mean(values) if values else math.inf

    return sorted(run["per_case"], key=mean_dice)[:n]


def _overlay(path: str, run: dict, case: dict) -> None:
    from matplotlib.figure import Figure
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_file_ending

    from nnunetv2_hymunet.evaluation.labels import Target

    reader = determine_reader_writer_from_file_ending(run["file_ending"], verbose=False)()
    segs = []
    for key in ("ref_file", "pred_file"):
        try:
            segs.append(np.rint(reader.read_seg(case[key])[0][0]).astype(np.int32))
        except Exception as e:
            raise HyMUNetError(f"overlay of case {case['case']}: cannot read {case[key]}: {e}") from None
    ref, pred = segs
    # The slice along the first axis with the most foreground in either mask (2D images have one slice).
    foreground = ((ref > 0) | (pred > 0)).reshape(ref.shape[0], -1).sum(axis=1)
    index = int(np.argmax(foreground))
    ref, pred = ref[index], pred[index]
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(ref > 0, cmap="gray", vmin=0, vmax=3, interpolation="nearest")
    colors = ["tab:green", "tab:orange", "tab:cyan", "tab:purple", "tab:olive"]
    for i, label in enumerate(run["labels"]):
        target = Target(label["name"], tuple(label["values"]), label["channel"], label["region"])
        color = colors[i % len(colors)]
        for mask, style in ((target.mask(ref), "solid"), (target.mask(pred), "dashed")):
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[color], linestyles=style, linewidths=1)
    dice = ", ".join(f"{lab['name']} {case['metrics'][lab['name']]['dice']:.3f}" for lab in run["labels"])
    ax.set_title(f"{case['case']} (slice {index}) - Dice {dice}\nreference solid, prediction dashed", fontsize=8)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def compare_runs(run_dirs: list[str], out_dir: str, overlays: int = 0, metrics: list[str] | None = None) -> dict:
    """Compare evaluate output folders; write OUT (see module docstring) and return comparison.json's content."""
    if len(run_dirs) < 2:
        raise HyMUNetError("compare needs at least two evaluated runs")
    runs = [load_run(d) for d in run_dirs]
    names = _run_names(run_dirs)
    units = {run["units"] for run in runs}
    if len(units) > 1:
        raise HyMUNetError(f"runs report distances in different units ({', '.join(sorted(units))}); not comparable")
    units = units.pop()
    labels = [lab["name"] for lab in runs[0]["labels"] if all(lab["name"] in r["per_label"] for r in runs[1:])]
    if not labels:
        raise HyMUNetError("the runs share no label")
    common_metrics = [m for m in runs[0]["metrics"] if all(m in r["metrics"] for r in runs[1:])]
    if metrics is not None:
        unknown = sorted(set(metrics) - set(common_metrics))
        if unknown:
            raise HyMUNetError(f"--metrics: {', '.join(unknown)} not evaluated in every run ({common_metrics})")
        common_metrics = list(metrics)

    table = {
        label: {
            name: {**{m: run["per_label"][label][m] for m in common_metrics}, "pooled": run["pooled"][label]}
            for name, run in zip(names, runs)
        }
        for label in labels
    }
    tests = []
    for (name_a, run_a), (name_b, run_b) in itertools.combinations(zip(names, runs), 2):
        for label in labels:
            for metric in common_metrics:
                values_a, values_b = _values_by_case(run_a, label, metric), _values_by_case(run_b, label, metric)
                cases = sorted(set(values_a) & set(values_b))
                a = np.array([values_a[c] for c in cases], dtype=np.float64)
                b = np.array([values_b[c] for c in cases], dtype=np.float64)
                tests.append({"label": label, "metric": metric, "run_a": name_a, "run_b": name_b, **paired_test(a, b)})

    result = {
        "runs": [
            {"name": n, "dir": os.path.abspath(d), "n_cases": len(r["per_case"])}
            for n, d, r in zip(names, run_dirs, runs)
        ],
        "units": units,
        "labels": labels,
        "metrics": common_metrics,
        "table": table,
        "tests": tests,
    }
    writers = {
        "comparison.json": lambda p: write_json(p, result),
        "comparison.md": lambda p: write_text(p, comparison_markdown(result)),
    }
    plotted = [m for m in BOXPLOT_METRICS if m in common_metrics] or common_metrics
    for label in labels:
        writers[f"boxplots/{_safe_filename(label)}.png"] = lambda p, label=label: _boxplot(
            p, label, names, runs, plotted, units
        )
    for name, run in zip(names, runs):
        for case in _worst_cases(run, overlays):
            writers[f"overlays/{_safe_filename(name)}/{_safe_filename(case['case'])}.png"] = (
                lambda p, run=run, case=case: _overlay(p, run, case)
            )
    write_output_folder(out_dir, writers)
    return result


def comparison_markdown(result: dict) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) and math.isfinite(v) else str(v)

    names = [r["name"] for r in result["runs"]]
    lines = [
        "# Comparison",
        "",
        "Runs: " + ", ".join(f"{r['name']} ({r['n_cases']} cases)" for r in result["runs"]) + ".",
    ]
    for label in result["labels"]:
        lines += ["", f"## {label}", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for metric in result["metrics"]:
            cells = []
            for name in names:
                s = result["table"][label][name][metric]
                cells.append(f"{fmt(s['mean'])} ± {fmt(s['std'])} (n={s['n']})")
            lines.append(f"| {metric_header(metric, result['units'])} per-image | " + " | ".join(cells) + " |")
        for metric in ("dice", "iou"):
            if metric in result["metrics"]:
                cells = [fmt(result["table"][label][name]["pooled"][metric]) for name in names]
                lines.append(f"| {metric} pooled | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Paired Wilcoxon signed-rank tests (two-sided; difference = B - A):",
            "",
            "| metric | A | B | n (nonzero) | median diff | p |",
            "|---|---|---|---|---|---|",
        ]
        for t in result["tests"]:
            if t["label"] == label:
                lines.append(
                    f"| {t['metric']} | {t['run_a']} | {t['run_b']} | {t['n']} ({t['n_nonzero']}) | "
                    f"{fmt(t['median_difference'])} | {fmt(t['p_value'])} {t['note']} |"
                )
    lines.append("")
    return "\n".join(lines)
