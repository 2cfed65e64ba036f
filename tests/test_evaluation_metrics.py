"""Per-case metrics against hand-computed values and an independent brute-force surface distance."""

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.evaluation.aggregate import describe, summarize
from nnunetv2_hymunet.evaluation.auc import N_BINS, auc_from_histograms, score_histograms
from nnunetv2_hymunet.evaluation.labels import targets_from_dataset_json, targets_from_values
from nnunetv2_hymunet.evaluation.metrics import (
    EmptyPolicy,
    _surface,
    compute_case_metrics,
    image_diagonal,
    overlap_from_counts,
)


def square(shape, top_left, size):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(t, t + size) for t in top_left)] = True
    return mask


def test_shifted_squares_hand_computed():
    ref = square((40, 40), (10, 10), 10)
    pred = square((40, 40), (10, 12), 10)  # shifted 2 px along axis 1
    m = compute_case_metrics(pred, ref)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (80, 20, 20, 1600 - 120)
    assert m["dice"] == pytest.approx(160 / 200)
    assert m["iou"] == pytest.approx(80 / 120)
    assert m["precision"] == pytest.approx(0.8) and m["recall"] == pytest.approx(0.8)
    assert m["specificity"] == pytest.approx((1600 - 120) / (1600 - 100))
    assert m["hd"] == pytest.approx(2.0)
    assert m["hd95"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    "spacing, shift_axis, expected_hd",
    [((1.0, 0.5), 1, 1.0), ((3.0, 1.0), 1, 2.0), ((3.0, 1.0), 0, 6.0), ((0.25, 7.0), 0, 0.5)],
)
def test_anisotropic_spacing_scales_distances(spacing, shift_axis, expected_hd):
    ref = square((40, 40), (10, 10), 10)
    corner = [10, 10]
    corner[shift_axis] += 2
    pred = square((40, 40), tuple(corner), 10)
    m = compute_case_metrics(pred, ref, spacing=spacing)
    assert m["hd"] == pytest.approx(expected_hd)
    assert m["dice"] == pytest.approx(0.8)  # overlap does not depend on spacing


def test_single_pixels_and_voxels():
    ref, pred = np.zeros((12, 12), bool), np.zeros((12, 12), bool)
    ref[5, 5], pred[5, 9] = True, True
    m = compute_case_metrics(pred, ref)
    assert m["dice"] == 0 and m["iou"] == 0 and m["precision"] == 0 and m["recall"] == 0
    assert m["hd"] == m["hd95"] == m["assd"] == pytest.approx(4.0)
    assert compute_case_metrics(pred, ref, spacing=(2.0, 3.0))["hd"] == pytest.approx(12.0)
    ref3, pred3 = np.zeros((6, 8, 5), bool), np.zeros((6, 8, 5), bool)
    ref3[1, 2, 3], pred3[4, 6, 3] = True, True
    assert compute_case_metrics(pred3, ref3)["hd95"] == pytest.approx(5.0)
    identical = compute_case_metrics(ref3, ref3)
    assert identical["dice"] == 1 and identical["hd"] == 0 and identical["assd"] == 0


def test_singleton_axis_is_dropped_like_nnunet_2d():
    """nnU-Net reads a PNG as (1, H, W) with spacing (999, 1, 1): same distances as the 2D array."""
    ref = square((30, 30), (5, 5), 12)
    pred = square((30, 30), (7, 6), 11)
    flat = compute_case_metrics(pred, ref, spacing=(1, 1))
    stacked = compute_case_metrics(pred[None], ref[None], spacing=(999, 1, 1))
    for key in ("hd", "hd95", "assd", "dice"):
        assert stacked[key] == pytest.approx(flat[key])
    assert flat["hd"] > 0


def test_empty_policy_defaults_and_options():
    empty = np.zeros((20, 30), bool)
    blob = square((20, 30), (3, 3), 5)
    both = compute_case_metrics(empty, empty)
    assert both["dice"] == 1 and both["iou"] == 1 and both["hd"] == 0 and both["hd95"] == 0 and both["assd"] == 0
    nan_policy = EmptyPolicy.from_strings("nan", "diagonal")
    assert math.isnan(compute_case_metrics(empty, empty, policy=nan_policy)["dice"])
    for pred, ref in ((empty, blob), (blob, empty)):
        m = compute_case_metrics(pred, ref, spacing=(2.0, 1.0))
        assert m["dice"] == 0 and m["iou"] == 0 and m["precision"] == 0 and m["recall"] == 0
        assert m["hd95"] == m["hd"] == m["assd"] == pytest.approx(math.hypot(40, 30))
    assert compute_case_metrics(empty, blob, policy=EmptyPolicy.from_strings("one", "50"))["hd95"] == 50
    assert math.isinf(compute_case_metrics(empty, blob, policy=EmptyPolicy.from_strings("one", "inf"))["hd"])
    assert image_diagonal((155, 240, 240), (1, 1, 1)) == pytest.approx(373.1287, abs=1e-4)  # BraTS constant
    with pytest.raises(ValueError, match="one-empty"):
        EmptyPolicy.from_strings("one", "huge")


def test_valid_mask_excludes_voxels_outside_fov():
    ref = square((20, 20), (5, 5), 6)
    pred = ref.copy()
    pred[0:2, 0:2] = True  # false positives outside the field of view
    fov = np.ones((20, 20), bool)
    fov[:3, :3] = False
    inside = compute_case_metrics(pred, ref, valid=fov)
    assert inside["dice"] == 1 and inside["fp"] == 0 and inside["tn"] == 400 - 9 - 36
    assert compute_case_metrics(pred, ref)["fp"] == 4


def _independent_surface_points(mask, spacing):
    """Foreground voxels with a face neighbour outside the mask (padding = background), in physical units."""
    padded = np.pad(mask, 1)
    interior = padded.copy()
    for axis in range(mask.ndim):
        interior &= np.roll(padded, 1, axis) & np.roll(padded, -1, axis)
    surface = (padded & ~interior)[tuple(slice(1, -1) for _ in range(mask.ndim))]
    return np.argwhere(surface) * np.asarray(spacing)


def _brute_force(pred, ref, spacing):
    p, r = _independent_surface_points(pred, spacing), _independent_surface_points(ref, spacing)
    distances = cdist(p, r)
    d_pred, d_ref = distances.min(axis=1), distances.min(axis=0)
    return {
        "hd": max(d_pred.max(), d_ref.max()),
        "hd95": max(np.percentile(d_pred, 95), np.percentile(d_ref, 95)),
        "hd95_pooled": np.percentile(np.concatenate([d_pred, d_ref]), 95),
        "assd": np.concatenate([d_pred, d_ref]).mean(),
    }


def _random_blob(rng, shape, sigma, threshold):
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma) > threshold


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    "shape, spacing", [((28, 33), (1.0, 1.0)), ((30, 26), (0.7, 1.9)), ((10, 14, 12), (2.5, 1.0, 0.8))]
)
def test_distances_match_brute_force_on_random_shapes(seed, shape, spacing):
    rng = np.random.default_rng(seed)
    ref = _random_blob(rng, shape, 2.0, 0.02)
    pred = _random_blob(rng, shape, 2.0, 0.02) if seed % 2 else ref ^ (rng.random(shape) < 0.03)
    assert ref.any() and pred.any()
    cross = ndimage.generate_binary_structure(ref.ndim, 1)
    assert np.array_equal(_surface(ref), ref & ~ndimage.binary_erosion(ref, cross, border_value=0))
    expected = _brute_force(pred, ref, spacing)
    got = compute_case_metrics(pred, ref, spacing=spacing)
    pooled = compute_case_metrics(pred, ref, spacing=spacing, hd95_method="pooled")
    assert got["hd"] == pytest.approx(expected["hd"], rel=1e-9)
    assert got["hd95"] == pytest.approx(expected["hd95"], rel=1e-9)
    assert got["assd"] == pytest.approx(expected["assd"], rel=1e-9)
    assert pooled["hd95"] == pytest.approx(expected["hd95_pooled"], rel=1e-9)


def test_hd95_definitions_differ_for_nested_squares():
    """A prediction with a distant spurious blob holding 7% of its surface: the directed 95th percentile sees the
    blob, the pooled one (the blob is under 5% of both surfaces together) does not."""
    ref = square((100, 100), (10, 10), 40)
    pred = ref | square((100, 100), (80, 80), 4)
    directed = compute_case_metrics(pred, ref)["hd95"]
    pooled = compute_case_metrics(pred, ref, hd95_method="pooled")["hd95"]
    expected = _brute_force(pred, ref, (1, 1))
    assert directed == pytest.approx(expected["hd95"]) and pooled == pytest.approx(expected["hd95_pooled"])
    assert pooled < 1 and directed > 30


def test_pooled_counts_and_per_image_statistics():
    policy = EmptyPolicy()
    a = compute_case_metrics(square((10, 10), (0, 0), 4), square((10, 10), (0, 0), 4))
    b = compute_case_metrics(square((10, 10), (0, 0), 2), square((10, 10), (0, 0), 4))
    empty = compute_case_metrics(np.zeros((10, 10), bool), np.zeros((10, 10), bool))
    per_case = [{"metrics": {"1": m}} for m in (a, b, empty)]
    summary = summarize(per_case, ["1"], ["dice", "hd95"], policy)
    assert summary["per_label"]["1"]["dice"]["mean"] == pytest.approx((1 + 8 / 20 + 1) / 3)
    assert summary["per_label"]["1"]["dice"]["n"] == 3
    assert summary["pooled"]["1"]["dice"] == pytest.approx(2 * 20 / (2 * 20 + 0 + 12))
    assert summary["pooled"]["1"]["tn"] == a["tn"] + b["tn"] + 100
    assert summary["empty_cases"]["1"] == {"both_empty": 1, "reference_empty_only": 0, "prediction_empty_only": 0}
    assert describe([1.0, float("nan"), 3.0]) == {
        "mean": 2.0,
        "median": 2.0,
        "std": pytest.approx(math.sqrt(2)),
        "n": 2,
    }
    nan_policy = EmptyPolicy(both_empty_overlap=float("nan"))
    assert math.isnan(overlap_from_counts(0, 0, 0, 50, nan_policy)["dice"])


def test_auc_matches_sklearn():
    from sklearn import metrics  # scikit-learn is a dependency of nnunetv2

    rng = np.random.default_rng(0)
    target = rng.random(5000) < 0.3
    continuous = np.clip(rng.normal(0.35 + 0.3 * target, 0.2), 0, 1)
    on_grid = np.round(continuous * 4) / 4  # exactly on the histogram grid, with many ties
    for scores, tolerance in ((on_grid, 1e-12), (continuous, 1e-3)):
        got = auc_from_histograms(*score_histograms(scores, target))
        assert got["auc_roc"] == pytest.approx(metrics.roc_auc_score(target, scores), abs=tolerance)
        assert got["auc_pr"] == pytest.approx(metrics.average_precision_score(target, scores), abs=tolerance)
    assert N_BINS == 65536
    assert math.isnan(auc_from_histograms(*score_histograms(continuous, np.zeros(5000, bool)))["auc_roc"])


def test_targets_from_dataset_json_regions_labels_ignore():
    brats = {"labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}}
    targets, ignore = targets_from_dataset_json(brats)
    assert [(t.name, t.values, t.channel, t.is_region) for t in targets] == [
        ("whole tumor", (1, 2, 3), 0, True),
        ("tumor core", (2, 3), 1, True),
        ("enhancing tumor", (3,), 2, True),
    ]
    seg = np.array([0, 1, 2, 3])
    assert targets[1].mask(seg).tolist() == [False, False, True, True]
    targets, ignore = targets_from_dataset_json({"labels": {"background": 0, "vessel": 1, "ignore": 2}})
    assert [(t.name, t.channel) for t in targets] == [("vessel", 1)] and ignore == 2
    assert [t.name for t in targets_from_values([0, 4, 1, 4])] == ["1", "4"]
    with pytest.raises(HyMUNetError, match="labels"):
        targets_from_dataset_json({"name": "x"})
