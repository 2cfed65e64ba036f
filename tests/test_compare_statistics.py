"""`hymunet compare`'s paired tests against an outside truth, scipy.stats.wilcoxon on the paired cases: pairing by case
id (not by position), pairs with a NaN or infinite value dropped, the sign of the median difference (B - A)."""

import json
import math

import numpy as np
import pytest
from scipy.stats import wilcoxon

from nnunetv2_hymunet.evaluation.aggregate import summarize
from nnunetv2_hymunet.evaluation.compare import compare_runs
from nnunetv2_hymunet.evaluation.metrics import METRICS, EmptyPolicy

N_VOXELS = 400


def write_run(folder, values: dict, order: list, ref_voxels: dict) -> str:
    """A metrics.json as `hymunet evaluate` writes it, for one label "1"; values: {case: {metric: value}}."""
    folder.mkdir()
    policy = EmptyPolicy()
    per_case = []
    for case in order:
        tp = min(ref_voxels[case], 10)
        metrics = {m: float(values[case].get(m, 0.5)) for m in METRICS}
        counts = {"tp": tp, "fp": 3, "fn": ref_voxels[case] - tp, "tn": N_VOXELS - ref_voxels[case] - 3}
        per_case.append(
            {
                "case": case,
                "ref_file": f"/ref/{case}.png",
                "pred_file": f"/pred/{case}.png",
                "fov_file": None,
                "npz_file": None,
                "shape": [1, 20, 20],
                "spacing": [999.0, 1.0, 1.0],
                "n_voxels": N_VOXELS,
                "metrics": {"1": {**metrics, **counts}},
            }
        )
    run = {
        "schema_version": 1,
        "ref_dir": "/ref",
        "pred_dir": f"/pred/{folder.name}",
        "fov_dir": None,
        "dataset_json": None,
        "file_ending": ".png",
        "units": "px",
        "spacing_source": "files",
        "policy": {
            **policy.as_dict(),
            "hd95_method": "max_directed",
            "percentile": 95.0,
            "ignore_label": None,
            "fov": False,
        },
        "labels": [{"name": "1", "values": [1], "region": False, "channel": 1}],
        "warnings": [],
        "metrics": list(METRICS),
        "per_case": per_case,
        **summarize(per_case, ["1"], list(METRICS), policy),
    }
    # json writes NaN / Infinity tokens, as evaluate does
    (folder / "metrics.json").write_text(json.dumps(run))
    return str(folder)


@pytest.fixture
def paired(tmp_path):
    """20 cases; B better than A on Dice by about 0.03; B's file lists the cases in reverse order; a NaN Dice in A
    (case_03), an infinite HD95 in B (case_07)."""
    rng = np.random.default_rng(11)
    cases = [f"case_{i:02d}" for i in range(20)]
    ref_voxels = {c: int(rng.integers(20, 60)) for c in cases}
    dice_a = rng.uniform(0.6, 0.9, size=20)
    dice_b = dice_a + rng.normal(0.03, 0.04, size=20)
    hd95_a = rng.uniform(2, 9, size=20)
    hd95_b = hd95_a + rng.normal(-0.5, 1.0, size=20)
    dice_a[3] = np.nan
    hd95_b[7] = np.inf
    values_a = {c: {"dice": dice_a[i], "hd95": hd95_a[i]} for i, c in enumerate(cases)}
    values_b = {c: {"dice": dice_b[i], "hd95": hd95_b[i]} for i, c in enumerate(cases)}
    run_a = write_run(tmp_path / "A", values_a, cases, ref_voxels)
    run_b = write_run(tmp_path / "B", values_b, cases[::-1], ref_voxels)
    return run_a, run_b, (dice_a, dice_b, hd95_a, hd95_b)


def _test(result, metric):
    return next(t for t in result["tests"] if t["metric"] == metric and t["label"] == "1")


@pytest.mark.parametrize("metric, drop", [("dice", 3), ("hd95", 7)])
def test_p_values_match_scipy_on_pairs_by_case_id(paired, tmp_path, metric, drop):
    run_a, run_b, (dice_a, dice_b, hd95_a, hd95_b) = paired
    a, b = (dice_a, dice_b) if metric == "dice" else (hd95_a, hd95_b)
    keep = np.isfinite(a) & np.isfinite(b)
    assert not keep[drop] and keep.sum() == 19
    expected = wilcoxon(b[keep], a[keep])
    result = compare_runs([run_a, run_b], str(tmp_path / "cmp"))
    test = _test(result, metric)
    assert test["n"] == 19 and test["n_nonzero"] == 19
    assert test["p_value"] == pytest.approx(expected.pvalue, rel=1e-12)
    assert test["statistic"] == pytest.approx(expected.statistic)
    assert test["median_difference"] == pytest.approx(np.median(b[keep] - a[keep]))
    # pairing by position (B's file lists the cases in reverse) would give another answer
    positional = wilcoxon(b[::-1][keep], a[keep]) if np.isfinite(b[::-1][keep]).all() else None
    assert positional is None or not math.isclose(positional.pvalue, expected.pvalue, rel_tol=1e-6)


def test_sign_of_the_median_difference_and_swapped_runs(paired, tmp_path):
    run_a, run_b, (dice_a, dice_b, _, _) = paired
    forward = _test(compare_runs([run_a, run_b], str(tmp_path / "ab")), "dice")
    backward = _test(compare_runs([run_b, run_a], str(tmp_path / "ba")), "dice")
    assert forward["median_difference"] > 0  # B is better: B - A is positive
    assert backward["median_difference"] == pytest.approx(-forward["median_difference"])
    assert backward["p_value"] == pytest.approx(forward["p_value"])


def test_known_direction_gives_the_exact_smallest_p(tmp_path):
    """B worse than A by 0.1 on every one of 12 cases: exact two-sided p = 2 / 2^12, median difference -0.1."""
    cases = [f"c{i}" for i in range(12)]
    dice = np.linspace(0.5, 0.9, 12)
    voxels = {c: 30 for c in cases}
    run_a = write_run(tmp_path / "A", {c: {"dice": d} for c, d in zip(cases, dice)}, cases, voxels)
    run_b = write_run(tmp_path / "B", {c: {"dice": d - 0.1} for c, d in zip(cases, dice)}, cases, voxels)
    test = _test(compare_runs([run_a, run_b], str(tmp_path / "cmp")), "dice")
    assert test["median_difference"] == pytest.approx(-0.1)
    assert test["p_value"] == pytest.approx(2 / 2**12)
    assert test["p_value"] == pytest.approx(wilcoxon(dice - 0.1, dice).pvalue)


def test_zero_differences_are_dropped_like_scipy(tmp_path):
    cases = [f"c{i}" for i in range(10)]
    a = np.array([0.5, 0.6, 0.7, 0.8, 0.55, 0.65, 0.75, 0.85, 0.9, 0.95])
    b = a + np.array([0.0, 0.0, 0.05, -0.02, 0.04, 0.03, 0.0, 0.06, -0.01, 0.02])
    voxels = {c: 30 for c in cases}
    run_a = write_run(tmp_path / "A", {c: {"dice": v} for c, v in zip(cases, a)}, cases, voxels)
    run_b = write_run(tmp_path / "B", {c: {"dice": v} for c, v in zip(cases, b)}, cases, voxels)
    test = _test(compare_runs([run_a, run_b], str(tmp_path / "cmp")), "dice")
    expected = wilcoxon(b, a)  # zero_method="wilcox": the three zero differences are dropped
    assert test["n"] == 10 and test["n_nonzero"] == 7
    assert test["p_value"] == pytest.approx(expected.pvalue)


def test_identical_runs_and_no_finite_pairs(tmp_path):
    cases = [f"c{i}" for i in range(6)]
    voxels = {c: 30 for c in cases}
    values = {c: {"dice": 0.1 * i, "hd95": math.inf} for i, c in enumerate(cases)}
    run_a = write_run(tmp_path / "A", values, cases, voxels)
    run_b = write_run(tmp_path / "B", values, cases, voxels)
    result = compare_runs([run_a, run_b], str(tmp_path / "cmp"))
    assert _test(result, "dice")["p_value"] == 1.0 and _test(result, "dice")["note"] == "identical values"
    hd95 = _test(result, "hd95")
    assert hd95["n"] == 0 and math.isnan(hd95["p_value"]) and hd95["note"] == "no finite pairs"
