"""`hymunet evaluate` / `hymunet compare` end to end on generated PNG and NIfTI folders, and on bad input."""

import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.evaluation.auc import auc_from_histograms, score_histograms
from nnunetv2_hymunet.evaluation.evaluate import evaluate_folders
from nnunetv2_hymunet.evaluation.metrics import EmptyPolicy, compute_case_metrics


def write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_nifti(path, array, spacing_zyx):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    sitk.WriteImage(image, path)


def disk(shape, center, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def make_png_run(root, n_cases=4, seed=0):
    """References with labels 1 (large disk) and 2 (small disk; absent in case_001); predictions perturbed, case_002
    misses label 2 entirely, case_001 predicts no label 2 either (both empty)."""
    rng = np.random.default_rng(seed)
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir(parents=True)
    pred_dir.mkdir(parents=True)
    arrays = {}
    for i in range(n_cases):
        shape = (40, 48)
        ref = np.zeros(shape, np.uint8)
        ref[disk(shape, (20, 20), 9 + i)] = 1
        if i != 1:
            ref[disk(shape, (10, 38), 4)] = 2
        pred = np.zeros(shape, np.uint8)
        pred[disk(shape, (20 + rng.integers(-2, 3), 21), 9 + i)] = 1
        if i not in (1, 2):
            pred[disk(shape, (11, 38), 4)] = 2
        case = f"case_{i:03d}"
        write_png(ref_dir / f"{case}.png", ref)
        write_png(pred_dir / f"{case}.png", pred)
        arrays[case] = (ref, pred)
    return ref_dir, pred_dir, arrays


def test_evaluate_png_end_to_end_matches_direct_metrics(tmp_path, capsys):
    ref_dir, pred_dir, arrays = make_png_run(tmp_path)
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net writes such files into prediction folders
    out = tmp_path / "eval"
    assert main(["evaluate", str(ref_dir), str(pred_dir), "-o", str(out), "-q"]) == 0
    assert "distances in px" in capsys.readouterr().out
    result = json.loads((out / "metrics.json").read_text())
    assert result["units"] == "px" and [lab["name"] for lab in result["labels"]] == ["1", "2"]
    for record in result["per_case"]:
        ref, pred = arrays[record["case"]]
        for value in (1, 2):
            expected = compute_case_metrics(pred == value, ref == value)
            got = record["metrics"][str(value)]
            for key in ("dice", "iou", "hd", "hd95", "assd", "tp", "fp", "fn", "tn"):
                assert got[key] == pytest.approx(expected[key]), (record["case"], value, key)
    label2 = result["per_label"]["2"]
    assert result["empty_cases"]["2"] == {"both_empty": 1, "reference_empty_only": 0, "prediction_empty_only": 1}
    diagonal = math.hypot(40, 48)
    assert result["per_case"][2]["metrics"]["2"]["hd95"] == pytest.approx(diagonal)
    assert label2["dice"]["n"] == 4 and label2["dice"]["mean"] == pytest.approx(
        np.mean([r["metrics"]["2"]["dice"] for r in result["per_case"]])
    )
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and float(rows[0]["dice"]) == pytest.approx(result["per_case"][0]["metrics"]["1"]["dice"])
    summary = (out / "summary.md").read_text()
    assert "hd95 (px)" in summary and "pooled" in summary and "(mm)" not in summary

    nan_out = tmp_path / "eval_nan"
    evaluate_folders(ref_dir, pred_dir, nan_out, policy=EmptyPolicy(both_empty_overlap=float("nan")))
    nan_result = json.loads((nan_out / "metrics.json").read_text())
    assert nan_result["per_label"]["2"]["dice"]["n"] == 3  # the both-empty case is dropped, nnU-Net style
    assert nan_result["pooled"]["2"]["dice"] == pytest.approx(result["pooled"]["2"]["dice"])


def test_parallel_equals_serial(tmp_path):
    ref_dir, pred_dir, _ = make_png_run(tmp_path, n_cases=3)
    serial = evaluate_folders(ref_dir, pred_dir, tmp_path / "serial", num_workers=1)
    parallel = evaluate_folders(ref_dir, pred_dir, tmp_path / "parallel", num_workers=2)
    assert serial["per_case"] == parallel["per_case"]
    assert serial["per_label"] == parallel["per_label"] and serial["pooled"] == parallel["pooled"]


def test_evaluate_nifti_regions_with_spacing(tmp_path):
    ref_dir, pred_dir = tmp_path / "labelsTs", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    spacing = (3.0, 1.0, 0.5)  # z, y, x
    ref = np.zeros((8, 20, 20), np.uint8)
    ref[2:6, 5:15, 5:15] = 2  # edema
    ref[3:5, 8:12, 8:12] = 3  # enhancing
    pred = np.zeros_like(ref)
    pred[2:6, 5:15, 7:17] = 2  # edema shifted 2 voxels along x -> 1 mm
    pred[3:5, 8:12, 8:12] = 3
    write_nifti(str(ref_dir / "BraTS_001.nii.gz"), ref, spacing)
    write_nifti(str(pred_dir / "BraTS_001.nii.gz"), pred, spacing)
    dataset = {
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "file_ending": ".nii.gz",
    }
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    result = evaluate_folders(ref_dir, pred_dir, tmp_path / "out", dataset_json=tmp_path / "dataset.json")
    assert result["units"] == "mm" and result["per_case"][0]["spacing"] == pytest.approx(list(spacing))
    wt = result["per_case"][0]["metrics"]["whole tumor"]
    assert wt["hd"] == pytest.approx(1.0) and wt["dice"] == pytest.approx(0.8)
    assert result["per_case"][0]["metrics"]["enhancing tumor"]["dice"] == 1.0
    assert [lab["region"] for lab in result["labels"]] == [True, True, True]
    overridden = evaluate_folders(
        ref_dir, pred_dir, tmp_path / "out2", dataset_json=tmp_path / "dataset.json", spacing=[1.0, 2.0], units="um"
    )
    assert overridden["units"] == "um"
    assert overridden["per_case"][0]["metrics"]["whole tumor"]["hd"] == pytest.approx(4.0)


def test_fov_and_probabilities_auc(tmp_path):
    rng = np.random.default_rng(3)
    dirs = {name: tmp_path / name for name in ("ref", "pred", "fov")}
    for d in dirs.values():
        d.mkdir()
    all_scores, all_targets = [], []
    for i in range(2):
        shape = (30, 32)
        ref = (rng.random(shape) < 0.2).astype(np.uint8)
        probability = np.clip(0.3 + 0.4 * ref + rng.normal(0, 0.2, shape), 0, 1)
        pred = (probability > 0.5).astype(np.uint8)
        pred[:3, :3] = 1  # outside the FOV: must not count
        fov = np.zeros(shape, np.uint8)
        fov[3:, 3:] = 1
        for name, array in (("ref", ref), ("pred", pred), ("fov", fov * 255)):
            write_png(dirs[name] / f"img_{i}.png", array)
        probabilities = np.stack([1 - probability, probability])[:, None].astype(np.float32)  # (C, 1, H, W)
        np.savez_compressed(dirs["pred"] / f"img_{i}.npz", probabilities=probabilities)
        all_scores.append(probability[fov > 0])
        all_targets.append(ref[fov > 0] > 0)
    result = evaluate_folders(dirs["ref"], dirs["pred"], tmp_path / "out", fov_dir=dirs["fov"])
    assert result["metrics"][-2:] == ["auc_roc", "auc_pr"] and result["policy"]["fov"] is True
    expected = auc_from_histograms(*score_histograms(np.concatenate(all_scores), np.concatenate(all_targets)))
    assert result["pooled_auc"]["1"] == pytest.approx(expected)
    assert 0.8 < result["pooled_auc"]["1"]["auc_roc"] <= 1
    assert result["per_case"][0]["n_voxels"] == 27 * 29
    assert (
        result["pooled"]["1"]["tn"]
        + result["pooled"]["1"]["tp"]
        + result["pooled"]["1"]["fp"]
        + result["pooled"]["1"]["fn"]
        == 2 * 27 * 29
    )


def test_compare_runs_tables_tests_plots_overlays(tmp_path, capsys):
    ref_dir, pred_dir, _ = make_png_run(tmp_path / "a", seed=0)
    _, pred_dir_b, _ = make_png_run(tmp_path / "b", seed=1)
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    assert main(["evaluate", str(ref_dir), str(pred_dir), "-o", str(run_a), "-q"]) == 0
    assert main(["evaluate", str(ref_dir), str(pred_dir_b), "-o", str(run_b), "-q"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(run_a), str(run_b), "-o", str(out), "--overlays", "1"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    dice_test = next(t for t in result["tests"] if t["label"] == "1" and t["metric"] == "dice")
    assert dice_test["n"] == 4 and dice_test["run_a"] == "run_a" and dice_test["run_b"] == "run_b"
    assert 0 <= dice_test["p_value"] <= 1 or dice_test["note"] == "identical values"
    for png in ("boxplots/1.png", "boxplots/2.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / "overlays" / "run_a").glob("*.png"))) == 1
    assert "Wilcoxon" in (out / "comparison.md").read_text()


def _run_expecting_error(argv, capsys, must_mention, out):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert must_mention in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(f".{out.name}.tmp")]


def test_bad_inputs_fail_cleanly_naming_the_case(tmp_path, capsys):
    ref_dir, pred_dir, _ = make_png_run(tmp_path)
    out = tmp_path / "out"
    args = ["evaluate", str(ref_dir), str(pred_dir), "-o", str(out), "-q"]

    (pred_dir / "case_003.png").rename(tmp_path / "moved.png")
    _run_expecting_error(args, capsys, "case_003", out)
    (tmp_path / "moved.png").rename(pred_dir / "case_003.png")

    write_png(pred_dir / "case_999.png", np.zeros((40, 48)))
    _run_expecting_error(args, capsys, "case_999", out)
    (pred_dir / "case_999.png").unlink()

    write_png(pred_dir / "case_002.png", np.zeros((40, 40)))
    _run_expecting_error(args, capsys, "case_002", out)
    _run_expecting_error(args + ["--num-processes", "2"], capsys, "case_002", out)  # raised inside a worker

    (pred_dir / "case_001.png").write_bytes(b"this is not a png")
    _run_expecting_error(args, capsys, "case_001", out)

    _run_expecting_error(args[:-3] + ["--fov", str(tmp_path / "nowhere"), "-o", str(out)], capsys, "--fov", out)
    _run_expecting_error(["compare", str(ref_dir), str(pred_dir), "-o", str(out)], capsys, "metrics.json", out)


def test_ignore_label_excludes_voxels(tmp_path):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    ref = np.zeros((20, 20), np.uint8)
    ref[5:10, 5:10] = 1
    ref[15:, 15:] = 2  # ignore
    pred = (ref == 1).astype(np.uint8)
    pred[16:, 16:] = 1  # predicted inside the ignored area: not a false positive
    write_png(ref_dir / "a.png", ref)
    write_png(pred_dir / "a.png", pred)
    dataset = {"labels": {"background": 0, "vessel": 1, "ignore": 2}, "file_ending": ".png"}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    result = evaluate_folders(ref_dir, pred_dir, tmp_path / "out", dataset_json=tmp_path / "dataset.json")
    m = result["per_case"][0]["metrics"]["vessel"]
    assert m["dice"] == 1.0 and m["fp"] == 0 and m["hd95"] == 0 and m["tn"] == 400 - 25 - 25
    assert result["policy"]["ignore_label"] == 2
