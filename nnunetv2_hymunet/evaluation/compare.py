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
from nnunetv2_hymunet.evaluation.evaluate import SCHEMA_VERSION, metric_header
from nnunetv2_hymunet.evaluation.metrics import COUNT_KEYS, DISTANCE_METRICS
from nnunetv2_hymunet.evaluation.outputs import write_json, write_output_folder, write_text
from nnunetv2_hymunet.fs_safety import check_files_target, remove_stale_outputs

BOXPLOT_METRICS = ("dice", "iou", "precision", "recall", "hd", "hd95", "assd")


def load_run(run_dir: str) -> dict:
    """metrics.json of an evaluate output folder, after checking the parts compare reads."""
    import json

    path = os.path.join(run_dir, "metrics.json")
    if not os.path.isdir(run_dir):
        raise HyMUNetError(f"{run_dir}: not a folder (expected an output folder of 'hymunet evaluate')")
    if not os.path.isfile(path):
        raise HyMUNetError(f"{run_dir}: no metrics.json (is it an output folder of 'hymunet evaluate'?)")
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
    except (OSError, ValueError) as e:
        raise HyMUNetError(f"{path}: cannot read as JSON: {e}") from None
    problem = _schema_problem(run)
    if problem:
        raise HyMUNetError(f"{path}: not a metrics.json of 'hymunet evaluate' ({problem})")
    return run


def _schema_problem(run) -> str | None:
    """What is missing or malformed in a metrics.json (None when compare can read it)."""
    if not isinstance(run, dict):
        return "the top level is not an object"
    if run.get("schema_version") != SCHEMA_VERSION:
        return f"schema_version {run.get('schema_version')!r}, expected {SCHEMA_VERSION}"
    expected = {
        "units": str,
        "labels": list,
        "metrics": list,
        "per_case": list,
        "per_label": dict,
        "pooled": dict,
        "policy": dict,
    }
    for key, kind in expected.items():
        if not isinstance(run.get(key), kind):
            return f"'{key}' missing or not a {kind.__name__}"
    if not all(isinstance(m, str) for m in run["metrics"]):
        return "'metrics' must list metric names"
    names = []
    for label in run["labels"]:
        if (
            not isinstance(label, dict)
            or not isinstance(label.get("name"), str)
            or not isinstance(label.get("values"), list)
        ):
            return "every entry of 'labels' needs a name and values"
        names.append(label["name"])
        if label["name"] not in run["per_label"] or label["name"] not in run["pooled"]:
            return f"label {label['name']!r} missing from per_label or pooled"
        if not all(isinstance(run["per_label"][label["name"]].get(m), dict) for m in run["metrics"]):
            return f"per_label[{label['name']!r}] lacks some of the metrics"
    seen = set()
    for record in run["per_case"]:
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("case"), str)
            or not isinstance(record.get("metrics"), dict)
        ):
            return "every per_case entry needs a case id and metrics"
        if record["case"] in seen:
            return f"case {record['case']!r} appears twice"
        seen.add(record["case"])
        for name in names:
            values = record["metrics"].get(name)
            if not isinstance(values, dict):
                return f"case {record['case']!r} has no metrics for label {name!r}"
            for metric in run["metrics"] + ["tp", "fn"]:
                value = values.get(metric)
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    return f"case {record['case']!r}, label {name!r}: {metric} is {value!r}, not a number"
    return None


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


def _policy_text(run: dict, keys) -> str:
    return ", ".join(f"{k}={run['policy'].get(k)}" for k in keys)


def comparability(
    names: list[str], runs: list[dict], labels: list[str], metrics: list[str], common_cases: bool
) -> dict:
    """Refuse (HyMUNetError) what makes the runs incomparable as a whole; return {"not_comparable": {metric: reason},
    "notes": [...]} for what makes single metrics incomparable, and informational notes."""
    first_name, first = names[0], runs[0]
    notes, not_comparable = [], {}
    for name, run in zip(names[1:], runs[1:]):
        pair = f"{first_name} and {name}"
        for key, what in (("fov", "a field-of-view restriction"), ("ignore_label", "an ignore label")):
            if first["policy"].get(key) != run["policy"].get(key):
                raise HyMUNetError(
                    f"runs {pair} differ in {what} ({first['policy'].get(key)} vs "
                    f"{run['policy'].get(key)}): they scored different voxels; not comparable"
                )
        values = {lab["name"]: lab["values"] for lab in first["labels"]}
        for lab in run["labels"]:
            if lab["name"] in labels and values.get(lab["name"]) != lab["values"]:
                raise HyMUNetError(
                    f"runs {pair}: label {lab['name']!r} means values {values.get(lab['name'])} in "
                    f"one and {lab['values']} in the other; not comparable"
                )
        cases_a = {c["case"] for c in first["per_case"]}
        cases_b = {c["case"] for c in run["per_case"]}
        if cases_a != cases_b:
            only_a, only_b = sorted(cases_a - cases_b), sorted(cases_b - cases_a)
            detail = "; ".join(
                part
                for part in (
                    f"only in {first_name}: {', '.join(only_a[:5])}{' ...' if len(only_a) > 5 else ''}"
                    if only_a
                    else "",
                    f"only in {name}: {', '.join(only_b[:5])}{' ...' if len(only_b) > 5 else ''}" if only_b else "",
                )
                if part
            )
            if not common_cases:
                raise HyMUNetError(
                    f"runs {pair} evaluated different cases ({detail}); their means are not "
                    "comparable. Pass --common-cases to compare on the cases both have"
                )
            notes.append(
                f"{pair} evaluated different cases ({detail}); everything is computed on the "
                f"{len(cases_a & cases_b)} shared case(s) (--common-cases)"
            )
            if not cases_a & cases_b:
                raise HyMUNetError(f"runs {pair} share no case")
        by_case = {c["case"]: c for c in run["per_case"]}
        for record in first["per_case"]:
            other = by_case.get(record["case"])
            if other is None:
                continue
            if record.get("shape") != other.get("shape"):
                raise HyMUNetError(
                    f"runs {pair} were scored against different references: case {record['case']} "
                    f"has shape {record.get('shape')} in one and {other.get('shape')} in the other"
                )
            for label in labels:
                a, b = record["metrics"][label], other["metrics"][label]
                if a["tp"] + a["fn"] != b["tp"] + b["fn"]:
                    raise HyMUNetError(
                        f"runs {pair} were scored against different references: case {record['case']}, label "
                        f"{label!r} has {a['tp'] + a['fn']} reference voxels in {first_name} and "
                        f"{b['tp'] + b['fn']} in {name} (references {first.get('ref_dir')} vs {run.get('ref_dir')})"
                    )
            if record.get("spacing") != other.get("spacing"):
                for m in DISTANCE_METRICS:
                    not_comparable.setdefault(
                        m,
                        f"case {record['case']} was measured with spacing "
                        f"{record.get('spacing')} in {first_name} and "
                        f"{other.get('spacing')} in {name}",
                    )
        if first.get("ref_dir") != run.get("ref_dir"):
            notes.append(
                f"{pair} read their references from different folders ({first.get('ref_dir')}, "
                f"{run.get('ref_dir')}); they hold the same number of reference voxels per case and label"
            )
        for keys, affected, what in (
            (("hd95_method", "percentile"), ("hd95",), "HD95 definitions"),
            (("one_empty_distance",), DISTANCE_METRICS, "distances for one empty mask"),
            (("both_empty_overlap",), ("dice", "iou", "precision", "recall"), "overlap scores for both-empty cases"),
        ):
            if _policy_text(first, keys) != _policy_text(run, keys):
                for m in affected:
                    not_comparable.setdefault(
                        m,
                        f"different {what} ({first_name}: {_policy_text(first, keys)}; "
                        f"{name}: {_policy_text(run, keys)})",
                    )
    return {"not_comparable": {m: r for m, r in not_comparable.items() if m in metrics}, "notes": notes}


def _restricted(run: dict, cases: set, labels: list[str], metrics: list[str]) -> dict:
    """The run with only `cases`, its per-image statistics and pooled scores recomputed over them."""
    from nnunetv2_hymunet.evaluation.aggregate import summarize
    from nnunetv2_hymunet.evaluation.metrics import EmptyPolicy

    per_case = [c for c in run["per_case"] if c["case"] in cases]
    policy = EmptyPolicy(both_empty_overlap=float(run["policy"].get("both_empty_overlap", 1.0)))
    counts_ok = all(all(k in c["metrics"][lab] for k in COUNT_KEYS) for c in per_case for lab in labels)
    if not counts_ok:
        raise HyMUNetError(f"{run.get('ref_dir')}: per-case confusion counts missing; cannot restrict to common cases")
    summary = summarize(per_case, labels, metrics, policy)
    return {**run, "per_case": per_case, "per_label": summary["per_label"], "pooled": summary["pooled"]}


def compare_runs(
    run_dirs: list[str], out_dir: str, overlays: int = 0, metrics: list[str] | None = None, common_cases: bool = False
) -> dict:
    """Compare evaluate output folders; write OUT (see module docstring) and return comparison.json's content.

    Runs that scored different voxels, different references or (without common_cases) different cases are refused;
    metrics whose definitions differ between runs (HD95 method or percentile, empty-mask policy, spacing) get no
    p-value and are marked with the reason."""
    if len(run_dirs) < 2:
        raise HyMUNetError("compare needs at least two evaluated runs")
    if overlays < 0:
        raise HyMUNetError(f"--overlays must be 0 or more, got {overlays}")
    real = [os.path.realpath(d) for d in run_dirs]
    repeated = sorted({d for d, r in zip(run_dirs, real) if real.count(r) > 1})
    if repeated:
        raise HyMUNetError(f"run {repeated[0]} is given more than once")
    inputs = {f"run {d}": d for d in run_dirs}
    check_files_target(out_dir, ("comparison.json", "comparison.md"), "-o", inputs)
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
        common_metrics = list(dict.fromkeys(metrics))
    checks = comparability(names, runs, labels, common_metrics, common_cases)
    for name, run in zip(names, runs):  # say what the intersection leaves out
        dropped = [lab["name"] for lab in run["labels"] if lab["name"] not in labels]
        if dropped:
            checks["notes"].append(f"label(s) {', '.join(dropped)} of {name} are not in every run and not compared")
        dropped = [m for m in run["metrics"] if m not in common_metrics and metrics is None]
        if dropped:
            checks["notes"].append(f"metric(s) {', '.join(dropped)} of {name} are not in every run and not compared")
    if common_cases:
        shared = set.intersection(*({c["case"] for c in r["per_case"]} for r in runs))
        runs = [_restricted(r, shared, labels, [m for m in r["metrics"]]) for r in runs]

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
                test = {"label": label, "metric": metric, "run_a": name_a, "run_b": name_b, **paired_test(a, b)}
                if metric in checks["not_comparable"]:
                    test.update(
                        statistic=float("nan"),
                        p_value=float("nan"),
                        note=f"not comparable: {checks['not_comparable'][metric]}",
                    )
                tests.append(test)

    result = {
        "runs": [
            {"name": n, "dir": os.path.abspath(d), "n_cases": len(r["per_case"])}
            for n, d, r in zip(names, run_dirs, runs)
        ],
        "units": units,
        "labels": labels,
        "metrics": common_metrics,
        "common_cases_only": bool(common_cases),
        "not_comparable": checks["not_comparable"],
        "notes": checks["notes"],
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
    write_output_folder(out_dir, writers, command="compare", inputs=inputs)
    # plots of an earlier comparison in this folder (another run set, more overlays) would be mistaken for these
    remove_stale_outputs(os.path.abspath(out_dir), writers, ("boxplots", "overlays"))
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
    for metric, reason in result.get("not_comparable", {}).items():
        lines.append(f"\n**{metric} is NOT comparable between these runs:** {reason}. No p-value is given for it.")
    for note in result.get("notes", []):
        lines.append(f"\nNote: {note}.")
    for label in result["labels"]:
        lines += ["", f"## {label}", "", "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for metric in result["metrics"]:
            cells = []
            for name in names:
                s = result["table"][label][name][metric]
                cells.append(f"{fmt(s['mean'])} ± {fmt(s['std'])} (n={s['n']})")
            mark = " (NOT comparable)" if metric in result.get("not_comparable", {}) else ""
            lines.append(f"| {metric_header(metric, result['units'])}{mark} per-image | " + " | ".join(cells) + " |")
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
