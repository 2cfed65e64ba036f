"""Dataset-level numbers from per-case metrics: per-image statistics (mean / median / std over cases, the nnU-Net and
HyM-UNet paper style) and pooled scores (one confusion matrix summed over all cases, the VM-UNet family style).

Both use the same empty-mask policy: a case where reference and prediction are empty scores 1 per case (counted in
the mean) or NaN (dropped by the NaN-aware mean, nnU-Net style); its confusion matrix holds only TN, so it does not
move pooled Dice / IoU, and a pooled matrix with TP+FP+FN == 0 gets the same value as such a case.
"""

from __future__ import annotations

import math

import numpy as np

from nnunetv2_hymunet.evaluation.metrics import COUNT_KEYS, OVERLAP_METRICS, EmptyPolicy, overlap_from_counts


def describe(values) -> dict:
    """mean / median / sample std (ddof=1) / n over the non-NaN values; inf propagates into mean and std."""
    array = np.asarray([v for v in values if not (isinstance(v, float) and math.isnan(v))], dtype=np.float64)
    n = int(array.size)
    if n == 0:
        return {"mean": float("nan"), "median": float("nan"), "std": float("nan"), "n": 0}
    with np.errstate(invalid="ignore"):
        std = float(np.std(array, ddof=1)) if n > 1 else 0.0
    return {"mean": float(np.mean(array)), "median": float(np.median(array)), "std": std, "n": n}


def summarize(per_case: list[dict], target_names: list[str], metric_names: list[str], policy: EmptyPolicy) -> dict:
    """{"per_label", "pooled", "foreground_mean", "empty_cases"} from evaluate's per-case records."""
    per_label, pooled, empty_cases = {}, {}, {}
    for name in target_names:
        rows = [case["metrics"][name] for case in per_case]
        per_label[name] = {m: describe([row[m] for row in rows if m in row]) for m in metric_names}
        counts = {k: int(sum(row[k] for row in rows)) for k in COUNT_KEYS}
        pooled[name] = {**overlap_from_counts(**counts, policy=policy), **counts}
        n_ref = [row["tp"] + row["fn"] for row in rows]
        n_pred = [row["tp"] + row["fp"] for row in rows]
        empty_cases[name] = {
            "both_empty": sum(r == 0 and p == 0 for r, p in zip(n_ref, n_pred)),
            "reference_empty_only": sum(r == 0 and p > 0 for r, p in zip(n_ref, n_pred)),
            "prediction_empty_only": sum(r > 0 and p == 0 for r, p in zip(n_ref, n_pred)),
        }
    foreground_mean = {}
    for m in metric_names:
        means = [per_label[name][m]["mean"] for name in target_names]
        foreground_mean[m] = float(np.nanmean(means)) if not all(math.isnan(v) for v in means) else float("nan")
    pooled_mean = {
        m: float(np.nanmean([pooled[name][m] for name in target_names]))
        if not all(math.isnan(pooled[name][m]) for name in target_names)
        else float("nan")
        for m in OVERLAP_METRICS
    }
    return {
        "per_label": per_label,
        "pooled": pooled,
        "foreground_mean": foreground_mean,
        "pooled_foreground_mean": pooled_mean,
        "empty_cases": empty_cases,
    }
