"""End to end: `hymunet benchmark run` on two tiny synthetic datasets x two trainers x one fold, through the stock
nnU-Net commands (plan_and_preprocess, train with --npz, validation), then evaluation and the report; a second
invocation must not train again."""

import json
import os
import subprocess
import sys
import time

import pytest

HYMUNET = [sys.executable, "-m", "nnunetv2_hymunet.cli"]


@pytest.mark.slow
def test_benchmark_end_to_end_is_resumable(tmp_path):
    env = {
        **os.environ,
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "res"),
        "OMP_NUM_THREADS": "1",
    }
    subprocess.run(
        [
            *HYMUNET,
            "benchmark",
            "make-suite",
            "-o",
            str(tmp_path / "raw"),
            "--size",
            "tiny",
            "--tasks",
            "SynthLesion2D",
            "SynthOppositeKey2D",
        ],
        env=env,
        check=True,
    )
    report_dir = tmp_path / "report"
    command = [
        *HYMUNET,
        "benchmark",
        "run",
        "-d",
        "971",
        "974",
        "-c",
        "2d",
        "-tr",
        "nnUNetTrainer",
        "nnUNetTrainerHyMUNet",
        "-f",
        "0",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--iterations",
        "2",
        "--val-iterations",
        "1",
        "--num-processes",
        "1",
        "--n-proc-da",
        "0",
        "--profile-repeats",
        "1",
        "--profile-threads",
        "1",
        "-o",
        str(report_dir),
    ]
    first = subprocess.run(command, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    ledger = [json.loads(line) for line in open(report_dir / "runs.jsonl")]
    assert sorted(e["action"] for e in ledger) == ["preprocess"] * 2 + ["train"] * 4
    report = (report_dir / "report.md").read_text()
    for text in (
        "Dataset971_SynthLesion2D",
        "Dataset974_SynthOppositeKey2D",
        "| nnUNetTrainerHyMUNet |",
        "### lesion",
        "### blob_key_bright",
        "### Blob-class accuracy",
        "Params (M)",
    ):
        assert text in report
    assert len(list((report_dir / "runs").glob("Dataset*/*/fold0.json"))) == 4  # one small summary per run
    images = [line[line.index("(") + 1 : -1] for line in report.splitlines() if line.startswith("![")]
    assert images and all((report_dir / image).is_file() for image in images)  # linked by relative path
    checkpoints = sorted((tmp_path / "res").glob("Dataset*/*__nnUNetPlans__2d/fold_0/checkpoint_final.pth"))
    assert len(checkpoints) == 4
    mtimes = [c.stat().st_mtime for c in checkpoints]

    start = time.time()
    second = subprocess.run(command, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    new_entries = [json.loads(line) for line in open(report_dir / "runs.jsonl")][len(ledger) :]
    assert [e["action"] for e in new_entries] == ["skip"] * 4
    assert [c.stat().st_mtime for c in checkpoints] == mtimes
    assert "train:" not in second.stdout and time.time() - start < 120
    assert (report_dir / "report.md").read_text().count("| nnUNetTrainer |") == report.count("| nnUNetTrainer |")
