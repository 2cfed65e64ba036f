"""AUC-ROC and AUC-PR (average precision) from predicted probabilities, per case and pooled over a dataset.

Scores in [0, 1] are counted into N_BINS equal bins per class (positives / negatives), so that the pooled value over
many cases (the DRIVE protocol: all FOV pixels of all test images) needs no concatenation of every pixel. Scores
in one bin count as ties: ROC AUC gives ties half credit (the Mann-Whitney convention, as sklearn), AP groups tied
scores into one threshold (as sklearn's average_precision_score). With 65536 bins the result equals the exact value
for scores on the bin grid and differs by far less than 1e-3 otherwise (tests compare against sklearn).
"""

from __future__ import annotations

import numpy as np

N_BINS = 2**16


def score_histograms(scores: np.ndarray, target: np.ndarray, valid: np.ndarray | None = None):
    """(histogram of positive scores, histogram of negative scores), int64 arrays of length N_BINS."""
    scores = np.asarray(scores, dtype=np.float64)
    target = np.asarray(target, dtype=bool)
    if valid is not None:
        scores, target = scores[valid], target[valid]
    bins = np.clip(np.rint(scores.ravel() * (N_BINS - 1)), 0, N_BINS - 1).astype(np.int64)
    target = target.ravel()
    positives = np.bincount(bins[target], minlength=N_BINS)
    negatives = np.bincount(bins[~target], minlength=N_BINS)
    return positives, negatives


def auc_from_histograms(positives: np.ndarray, negatives: np.ndarray) -> dict:
    """{"auc_roc", "auc_pr"}; NaN when one class is absent (the curve is undefined)."""
    n_pos, n_neg = int(positives.sum()), int(negatives.sum())
    if n_pos == 0 or n_neg == 0:
        return {"auc_roc": float("nan"), "auc_pr": float("nan")}
    # Walk thresholds from the highest score bin down.
    pos, neg = positives[::-1].astype(np.float64), negatives[::-1].astype(np.float64)
    pos_above = np.cumsum(pos) - pos
    auc_roc = float(np.sum(neg * (pos_above + 0.5 * pos)) / (n_pos * n_neg))
    tp, fp = np.cumsum(pos), np.cumsum(neg)
    at_threshold = pos > 0
    precision = tp[at_threshold] / (tp[at_threshold] + fp[at_threshold])
    auc_pr = float(np.sum(pos[at_threshold] / n_pos * precision))
    return {"auc_roc": auc_roc, "auc_pr": auc_pr}
