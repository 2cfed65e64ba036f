"""Segmentation evaluation: per-case metrics (Dice, IoU, precision, recall, specificity, HD, HD95, ASSD, AUC),
folder evaluation of nnU-Net predictions with per-image and pooled aggregation, and run comparison.

Python API (used by the benchmark harness): `evaluate_folders` (metrics.json schema in evaluate.py's docstring),
`compare_runs`, `compute_case_metrics`, `EmptyPolicy`. They are imported on first use, so that importing the
`hymunet` CLI (which loads evaluation.cli) stays free of numpy/scipy.
"""

import importlib

_API = {
    "evaluate_folders": "nnunetv2_hymunet.evaluation.evaluate",
    "compare_runs": "nnunetv2_hymunet.evaluation.compare",
    "compute_case_metrics": "nnunetv2_hymunet.evaluation.metrics",
    "EmptyPolicy": "nnunetv2_hymunet.evaluation.metrics",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
