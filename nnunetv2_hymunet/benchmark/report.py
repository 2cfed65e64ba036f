"""Evaluate each model's cross-validation predictions and build the benchmark report.

Per (dataset, model) the validation predictions of all requested folds are gathered (symbolic links) into one
cross-validation folder next to links to the matching `gt_segmentations`, and evaluated with the project's
evaluation API (`evaluate_folders`: per-image and pooled metrics). Per dataset, `compare_runs` gives the paired
Wilcoxon signed-rank tests and box plots. The report (report.md, linking the PNGs, and report.json)
has, per dataset and label: mean +- sample std of the per-image metrics, the pooled (one confusion matrix) Dice and
IoU, the paired test of every model against the reference model, and the efficiency columns of `hymunet profile`.

With several seeds (`hymunet benchmark run --seeds`), each (model, seed) is evaluated on its own and the report gives,
per model and metric, the mean ± sample sd across seeds of the per-seed case means, and a two-sided Wilcoxon
signed-rank test of the model against the reference over the pairs (seed, case). On the long-range task
(SynthOppositeKey2D) it adds blob-class accuracy (benchmark/long_range.py) next to Dice.
"""

import json
import math
import os
import shutil
import statistics

from nnunetv2_hymunet.benchmark.long_range import is_long_range_dataset, score_folder
from nnunetv2_hymunet.benchmark.presets import read_json_file
from nnunetv2_hymunet.benchmark.schedule import parse_bench_name
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_write_text

TABLE_METRICS = ("dice", "iou", "precision", "recall", "hd95")
TESTED_METRICS = ("dice", "hd95")
POOLED_METRICS = ("dice", "iou")
ABLATIONS = {"_noMamba": "the Mamba layers", "_noMGF": "the Mamba-Guided Fusion skips"}
BLOB_METRICS = {"accuracy": "blob-class accuracy", "fraction": "blob pixels of the right class"}
SIGNIFICANCE = 0.05


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "_-." else "_" for c in label)


def _link(source: str, target: str) -> None:
    try:
        os.symlink(source, target)
    except OSError:
        shutil.copy2(source, target)


def gather_crossval(runs: list, folder: str) -> tuple:
    """(pred_dir, ref_dir, dataset_json) with the validation cases of `runs` (one model, several folds)."""
    from nnunetv2.paths import nnUNet_preprocessed

    dataset = runs[0].dataset
    dataset_json = os.path.join(nnUNet_preprocessed, dataset, "dataset.json")
    ending = read_json_file(dataset_json, "dataset.json").get("file_ending")
    if not isinstance(ending, str):
        raise HyMUNetError(f"{dataset_json}: no file_ending")
    gt = os.path.join(nnUNet_preprocessed, dataset, "gt_segmentations")
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    pred_dir, ref_dir = os.path.join(folder, "pred"), os.path.join(folder, "ref")
    os.makedirs(pred_dir)
    os.makedirs(ref_dir)
    for run in runs:
        validation = os.path.join(run.fold_folder, "validation")
        for name in sorted(os.listdir(validation)):
            if not name.endswith(ending):
                continue
            reference = os.path.join(gt, name)
            if not os.path.isfile(reference):
                raise HyMUNetError(f"{os.path.join(validation, name)} has no reference {reference}")
            if os.path.exists(os.path.join(pred_dir, name)):
                raise HyMUNetError(f"case {name} is in the validation set of more than one fold of {run.model.label}")
            _link(os.path.join(validation, name), os.path.join(pred_dir, name))
            _link(reference, os.path.join(ref_dir, name))
    return pred_dir, ref_dir, dataset_json


def evaluate_model(runs: list, evaluation_dir: str, num_workers: int = 1, log=print) -> dict:
    """metrics.json content for one model's folds, recomputed only when a fold's validation changed."""
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunetv2_hymunet.evaluation import evaluate_folders

    metrics_file = os.path.join(evaluation_dir, "metrics.json")
    newest = max(os.path.getmtime(os.path.join(r.fold_folder, "validation", "summary.json")) for r in runs)
    folds = sorted(r.fold for r in runs)
    long_range = is_long_range_dataset(os.path.join(nnUNet_preprocessed, runs[0].dataset, "dataset.json"))
    if os.path.isfile(metrics_file) and os.path.getmtime(metrics_file) >= newest:
        with open(metrics_file) as f:
            metrics = json.load(f)
        if metrics.get("benchmark_folds") == folds and ("blob_class" in metrics or not long_range):
            return metrics
    crossval = evaluation_dir + ".crossval"
    pred_dir, ref_dir, dataset_json = gather_crossval(runs, crossval)
    log(f"  evaluating {runs[0].dataset} {runs[0].model.label} (folds {folds})")
    metrics = evaluate_folders(
        ref_dir, pred_dir, evaluation_dir, dataset_json=dataset_json, num_workers=num_workers, npz=False
    )
    metrics["benchmark_folds"] = folds
    if long_range:
        metrics["blob_class"] = score_folder(pred_dir, ref_dir, dataset_json)
    atomic_write_text(metrics_file, json.dumps(metrics, indent=2))
    return metrics


# ---------------------------------------------------------------- report


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean_std(stats: dict, digits: int) -> str:
    if not stats or not _finite(stats.get("mean")):
        return "n/a"
    std = stats.get("std")
    return f"{stats['mean']:.{digits}f} ± {std:.{digits}f}" if _finite(std) else f"{stats['mean']:.{digits}f}"


def _p(test: dict) -> str:
    if not test or not _finite(test.get("p_value")):
        return "n/a"
    return f"{test['p_value']:.3g} (Δmed {test['median_difference']:+.3f}, n={test['n']})"


def _find_test(tests: list, label: str, metric: str, reference: str, other: str):
    """The test of `other` against `reference` (compare_runs tests each pair once; flip the sign if needed)."""
    for t in tests:
        if t["label"] != label or t["metric"] != metric:
            continue
        if t["run_a"] == reference and t["run_b"] == other:
            return t
        if t["run_a"] == other and t["run_b"] == reference:
            return {**t, "median_difference": -t["median_difference"]}
    return None


def _efficiency(profile: dict, trainer: str):
    if not profile:
        return None
    for m in profile["models"]:
        if m["model"] == trainer:
            return m
    return None


def dataset_section(entry: dict, reference: str) -> list:
    """Markdown lines for one dataset. entry: {dataset, configuration, models: [{label, trainer, run_name,
    metrics}], comparison (compare_runs result or None), profile (profile_models result or None), boxplots}."""
    models = entry["models"]
    run_name = {m["label"]: m["run_name"] for m in models}
    units = models[0]["metrics"].get("units", "")
    lines = [f"## {entry['dataset']} ({entry['configuration']})", ""]
    folds = sorted({f for m in models for f in m["metrics"].get("benchmark_folds", [])})
    lines.append(
        f"Cross-validation folds {folds}; {len(models[0]['metrics']['per_case'])} validation cases per model. "
        f"Per-image metrics: mean ± sample std over cases; pooled: one confusion matrix over all cases. "
        f"Distances in {units}. p: two-sided paired Wilcoxon signed-rank test against {reference} "
        "(Δmed = median of model - reference)."
    )
    if entry.get("profile"):
        p = entry["profile"]
        lines.append(
            f"Efficiency: patch {'x'.join(map(str, p['plan']['patch_size']))}, batch "
            f"{p['settings']['batch_size']}, {p['machine']['device']}, medians of {p['settings']['repeats']} "
            "interleaved repeats (`hymunet profile`)."
        )
    lines.append("")
    tests = entry["comparison"]["tests"] if entry.get("comparison") else []
    for label in [lab["name"] for lab in models[0]["metrics"]["labels"]]:
        header = ["Model"] + [f"{m} ({units})" if m == "hd95" else m for m in TABLE_METRICS]
        header += [f"pooled {m}" for m in POOLED_METRICS] + [f"p {m}" for m in TESTED_METRICS]
        header += ["Params (M)", "GFLOPs", "Step ms"]
        lines += [f"### {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for m in models:
            per_label = m["metrics"]["per_label"].get(label, {})
            pooled = m["metrics"].get("pooled", {}).get(label, {})
            row = [m["label"]]
            row += [_mean_std(per_label.get(k), 2 if k == "hd95" else 4) for k in TABLE_METRICS]
            row += [f"{pooled[k]:.4f}" if _finite(pooled.get(k)) else "n/a" for k in POOLED_METRICS]
            for k in TESTED_METRICS:
                row.append(
                    "reference"
                    if m["label"] == reference
                    else _p(_find_test(tests, label, k, run_name[reference], m["run_name"]))
                )
            eff = _efficiency(entry.get("profile"), m["trainer"])
            row += (
                [f"{eff['parameters'] / 1e6:.2f}", f"{eff['gflops']:.2f}", f"{eff['step_ms_median']:.0f}"]
                if eff
                else ["n/a"] * 3
            )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if all("blob_class" in m["metrics"] for m in models):  # one run per model: the test is over cases
        lines += blob_class_section([{**m, "seeds": {0: m["metrics"]}} for m in models], reference)
    lines += ablation_findings(entry, tests)
    for path in entry.get("boxplots", []):
        lines += [f"![box plots {os.path.basename(path)}]({path})", ""]
    return lines


def base_trainer(trainer: str) -> str:
    """The trainer a benchmark copy (`X_bench`, `X_bench_s3`) was made from; other names unchanged."""
    parsed = parse_bench_name(trainer)
    return parsed[0] if parsed else trainer


def verdict(with_part: float, without_part: float, p_value: float, higher_is_better: bool = True) -> str:
    """Did a part help? Only a significant paired test (p < 0.05) gives a direction, which the means decide."""
    if not (_finite(p_value) and p_value < SIGNIFICANCE) or with_part == without_part:
        return "made no significant difference"
    better = with_part > without_part if higher_is_better else with_part < without_part
    return "helped (significant)" if better else "hurt (significant)"


def ablation_pairs(models: list) -> list:
    """(model, its ablated twin, name of the removed part) for every pair present (same plans)."""
    pairs = []
    for m in models:
        for suffix, part in ABLATIONS.items():
            ablated = next(
                (
                    o
                    for o in models
                    if base_trainer(o["trainer"]) == base_trainer(m["trainer"]) + suffix
                    and o["plans"] == m["plans"]
                    and o["label"] != m["label"]
                ),
                None,
            )
            if ablated is not None:
                pairs.append((m, ablated, part))
    return pairs


def ablation_findings(entry: dict, tests: list) -> list:
    """One sentence per (model, its ablation) pair present: did the removed part help, per label, Dice?"""
    lines = []
    for m, ablated, part in ablation_pairs(entry["models"]):
        for label in [lab["name"] for lab in m["metrics"]["labels"]]:
            full = m["metrics"]["per_label"][label]["dice"]["mean"]
            without = ablated["metrics"]["per_label"][label]["dice"]["mean"]
            test = _find_test(tests, label, "dice", ablated["run_name"], m["run_name"])
            p = test["p_value"] if test and _finite(test.get("p_value")) else float("nan")
            lines.append(
                f"- {label}: {part} {verdict(full, without, p)}: mean Dice {m['label']} {full:.4f} vs "
                f"{ablated['label']} {without:.4f}, Wilcoxon p = {p:.3g}."
            )
    return (["**Ablations** (same plans, same folds):", ""] + lines + [""]) if lines else []


# ---------------------------------------------------------------- several seeds


def _label_values(metrics: dict, label: str, metric: str) -> tuple:
    """(per-seed mean as the evaluation aggregated it, {case: value})."""
    mean = metrics["per_label"].get(label, {}).get(metric, {}).get("mean")
    by_case = {c["case"]: c["metrics"].get(label, {}).get(metric) for c in metrics["per_case"]}
    return mean, {case: float(v) if _finite(v) else float("nan") for case, v in by_case.items()}


def _blob_values(metrics: dict, key: str) -> tuple:
    blob = metrics.get("blob_class")
    if not blob:
        return float("nan"), {}
    return blob[key], {c["case"]: float(c[key]) for c in blob["per_case"]}


def seed_statistics(model: dict, values) -> dict:
    """Per-seed means of one metric ({seed: mean}), their mean and sample sd, and the {(seed, case): value} pairs.
    `values(metrics) -> (seed mean, {case: value})`."""
    per_seed, pairs = {}, {}
    for seed, metrics in model["seeds"].items():
        mean, by_case = values(metrics)
        per_seed[seed] = mean
        pairs.update({(seed, case): v for case, v in by_case.items()})
    finite = [v for v in per_seed.values() if _finite(v)]
    return {
        "per_seed": per_seed,
        "pairs": pairs,
        "n_seeds": len(finite),
        "mean": float(sum(finite) / len(finite)) if finite else float("nan"),
        "sd": float(statistics.stdev(finite)) if len(finite) > 1 else float("nan"),
    }


def seeds_cases_test(reference: dict, other: dict) -> dict:
    """Wilcoxon signed-rank test of `other` against `reference` over the (seed, case) pairs both have (the evaluation's
    paired_test: finite pairs only, median_difference = other - reference)."""
    import numpy as np

    from nnunetv2_hymunet.evaluation.compare import paired_test

    keys = sorted(set(reference["pairs"]) & set(other["pairs"]), key=str)
    a = np.array([reference["pairs"][k] for k in keys], dtype=float)
    b = np.array([other["pairs"][k] for k in keys], dtype=float)
    return paired_test(a, b)


def _seeded(stats: dict, digits: int) -> str:
    if not _finite(stats["mean"]):
        return "n/a"
    sd = f" ± {stats['sd']:.{digits}f}" if _finite(stats["sd"]) else ""
    return f"{stats['mean']:.{digits}f}{sd}"


def seeded_metric_rows(models: list, reference: str, values_of, digits: int = 4) -> dict:
    """{model label: {"stats": seed_statistics, "test": test against the reference or None}} for one metric."""
    stats = {m["label"]: seed_statistics(m, values_of) for m in models}
    return {
        label: {
            "stats": s,
            "test": None if label == reference or reference not in stats else seeds_cases_test(stats[reference], s),
        }
        for label, s in stats.items()
    }


def seeded_dataset_section(entry: dict, reference: str) -> list:
    """Markdown lines for one dataset trained with several seeds. entry: {dataset, configuration, models: [{label,
    trainer, plans, seeds: {seed: metrics}}], profile}."""
    models = entry["models"]
    first = next(iter(models[0]["seeds"].values()))
    units = first.get("units", "")
    seeds = sorted({s for m in models for s in m["seeds"]})
    folds = sorted({f for m in models for metrics in m["seeds"].values() for f in metrics.get("benchmark_folds", [])})
    lines = [
        f"## {entry['dataset']} ({entry['configuration']})",
        "",
        f"Seeds {seeds}; cross-validation folds {folds}; {len(first['per_case'])} validation cases per seed. "
        "Per model and metric: mean ± sample sd across seeds of the per-seed case means. p: two-sided paired "
        f"Wilcoxon signed-rank test against {reference} on the pairs (seed, case) (Δmed = median of model - "
        f"reference over the pairs, n = pairs). Distances in {units}.",
        "",
    ]
    for label in [lab["name"] for lab in first["labels"]]:
        header = ["Model", "seeds"] + [f"{m} ({units})" if m == "hd95" else m for m in TABLE_METRICS]
        header += [f"p {m}" for m in TESTED_METRICS] + ["Params (M)", "GFLOPs", "Step ms"]
        lines += [f"### {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        rows = {
            k: seeded_metric_rows(models, reference, lambda metrics, k=k: _label_values(metrics, label, k))
            for k in TABLE_METRICS
        }
        for m in models:
            row = [m["label"], str(rows["dice"][m["label"]]["stats"]["n_seeds"])]
            row += [_seeded(rows[k][m["label"]]["stats"], 2 if k == "hd95" else 4) for k in TABLE_METRICS]
            row += ["reference" if m["label"] == reference else _p(rows[k][m["label"]]["test"]) for k in TESTED_METRICS]
            eff = _efficiency(entry.get("profile"), m["trainer"])
            row += (
                [f"{eff['parameters'] / 1e6:.2f}", f"{eff['gflops']:.2f}", f"{eff['step_ms_median']:.0f}"]
                if eff
                else ["n/a"] * 3
            )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    if all("blob_class" in metrics for m in models for metrics in m["seeds"].values()):
        lines += blob_class_section(models, reference)
    lines += seeded_ablation_findings(models, first)
    return lines


def blob_class_section(models: list, reference: str) -> list:
    rows = {
        k: seeded_metric_rows(models, reference, lambda metrics, k=k: _blob_values(metrics, k)) for k in BLOB_METRICS
    }
    lines = [
        "### Blob-class accuracy",
        "",
        "Per case: 1 when the majority foreground class predicted inside the reference blob is the blob's class, "
        "else 0 (chance: 0.5); and the fraction of blob pixels predicted with the right class.",
        "",
        "| Model | seeds | accuracy | per-seed accuracy | blob pixels right | p accuracy | p blob pixels right |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in models:
        accuracy = rows["accuracy"][m["label"]]
        per_seed = " / ".join(f"{v:.2f}" for _, v in sorted(accuracy["stats"]["per_seed"].items()))
        tests = ["reference" if m["label"] == reference else _p(rows[k][m["label"]]["test"]) for k in BLOB_METRICS]
        lines.append(
            f"| {m['label']} | {accuracy['stats']['n_seeds']} | {_seeded(accuracy['stats'], 3)} | {per_seed} "
            f"| {_seeded(rows['fraction'][m['label']]['stats'], 3)} | {' | '.join(tests)} |"
        )
    return lines + [""]


def seeded_ablation_findings(models: list, first_metrics: dict) -> list:
    """Per (model, ablated twin): did the removed part help? Dice per label, and blob-class accuracy when scored;
    the test is over (seed, case) pairs."""
    lines = []
    metrics = [
        (f"{lab['name']}: mean Dice", lambda m, n=lab["name"]: _label_values(m, n, "dice"))
        for lab in first_metrics["labels"]
    ]
    if "blob_class" in first_metrics:
        metrics.append(("blob-class accuracy", lambda m: _blob_values(m, "accuracy")))
    for m, ablated, part in ablation_pairs(models):
        for name, values in metrics:
            full, without = seed_statistics(m, values), seed_statistics(ablated, values)
            test = seeds_cases_test(without, full)
            lines.append(
                f"- {name}: {part} {verdict(full['mean'], without['mean'], test['p_value'])}: {m['label']} "
                f"{full['mean']:.4f} vs {ablated['label']} {without['mean']:.4f} (means across seeds), "
                f"Wilcoxon over {test['n']} (seed, case) pairs p = {test['p_value']:.3g}."
            )
    return (["**Ablations** (same plans, same folds, same seeds):", ""] + lines + [""]) if lines else []


def _json_model(model: dict) -> dict:
    if "seeds" not in model:
        metrics = model["metrics"]
        return {
            "label": model["label"],
            "per_label": metrics["per_label"],
            "pooled": metrics.get("pooled"),
            "folds": metrics.get("benchmark_folds"),
            "blob_class": metrics.get("blob_class"),
        }
    return {
        "label": model["label"],
        "seeds": {
            str(seed): {
                "per_label": metrics["per_label"],
                "folds": metrics.get("benchmark_folds"),
                "blob_class": metrics.get("blob_class"),
            }
            for seed, metrics in model["seeds"].items()
        },
    }


def build_report(entries: list, reference: str, output_dir: str, header_lines=()) -> dict:
    """Write report.md (images linked by relative path: any Markdown viewer shows them) and report.json into
    output_dir from evaluated dataset entries."""
    if not entries:
        raise HyMUNetError("no dataset has all requested folds finished: nothing to report")
    lines = ["# Benchmark report", "", *header_lines, ""]
    for entry in entries:
        lines += (
            seeded_dataset_section(entry, reference)
            if "seeds" in entry["models"][0]
            else dataset_section(entry, reference)
        )
    markdown = "\n".join(lines) + "\n"
    paths = {k: os.path.join(output_dir, f"report.{k}") for k in ("md", "json")}
    atomic_write_text(paths["md"], markdown)
    summary = [
        {
            "dataset": e["dataset"],
            "configuration": e["configuration"],
            "models": [_json_model(m) for m in e["models"]],
            "tests": e["comparison"]["tests"] if e.get("comparison") else [],
            "profile": e.get("profile"),
        }
        for e in entries
    ]
    atomic_write_text(paths["json"], json.dumps({"reference": reference, "datasets": summary}, indent=2))
    return paths
