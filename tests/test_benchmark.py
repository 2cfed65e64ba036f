"""Fast tests of the benchmark harness: run states, commands, Slurm script, report building, suite data."""

import json
import os

import numpy as np
import pytest
from conftest import fake_preprocessed_dataset

from nnunetv2_hymunet.benchmark import runner
from nnunetv2_hymunet.benchmark.report import build_report, dataset_section
from nnunetv2_hymunet.benchmark.study import run_benchmark
from nnunetv2_hymunet.benchmark.suite import make_suite, regions_case
from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.errors import HyMUNetError

DATASET = "Dataset961_Fake"


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    """A preprocessed dataset (plans + data folder + gt) and an empty results folder."""
    return fake_preprocessed_dataset(tmp_path, monkeypatch, DATASET)


def _fold(res, trainer, fold, *files):
    folder = res / DATASET / f"{trainer}__nnUNetPlans__2d" / f"fold_{fold}"
    (folder / "validation").mkdir(parents=True)
    for f in files:
        (folder / f).write_text("x")
    return folder


def test_run_states_follow_nnunet_result_files(nnunet_folders):
    res = nnunet_folders / "res"
    _fold(res, "A", 0, "checkpoint_final.pth", "validation/summary.json")
    _fold(res, "A", 1, "checkpoint_final.pth")
    _fold(res, "A", 2, "checkpoint_latest.pth")
    runs = runner.plan_runs(["961"], ["2d"], [runner.Model("A")], [0, 1, 2, 3], short_schedule=False)
    assert [r.state() for r in runs] == ["done", "validate", "continue", "train"]
    assert runs[1].command("cpu")[-1] == "--val"
    assert runs[2].command("cpu")[-1] == "--c"
    assert runs[3].command("cpu") == [
        "nnUNetv2_train",
        "961",
        "2d",
        "3",
        "-tr",
        "A",
        "-p",
        "nnUNetPlans",
        "--npz",
        "-device",
        "cpu",
    ]


def test_dry_run_lists_only_unfinished_work(nnunet_folders, capsys):
    res = nnunet_folders / "res"
    _fold(res, "nnUNetTrainer_bench", 0, "checkpoint_final.pth", "validation/summary.json")
    out = run_benchmark(
        ["961"],
        ["2d"],
        ["nnUNetTrainer", "nnUNetTrainerHyMUNet:nnUNetResEncUNetMPlans"],
        [0, 1],
        None,
        device="cpu",
        short_schedule={"HYMUNET_BENCH_EPOCHS": 2},
        num_processes=1,
        dry_run=True,
        log=print,
    )
    commands = out["commands"]
    # ResEnc M plans are missing -> planned with the ResEnc M planner; nnUNetPlans are preprocessed already
    assert commands[0].endswith("nnUNetv2_plan_and_preprocess -d 961 -c 2d -pl nnUNetPlannerResEncM -np 1 -npfp 1")
    train = [c for c in commands if "nnUNetv2_train" in c]
    assert len(train) == 3  # fold 0 of nnUNetTrainer is finished
    assert not any(" 961 2d 0 -tr nnUNetTrainer_bench " in c for c in train)
    assert any(" 961 2d 1 -tr nnUNetTrainer_bench -p nnUNetPlans " in c for c in train)
    assert any("-tr nnUNetTrainerHyMUNet_bench -p nnUNetResEncUNetMPlans" in c for c in train)
    assert all("HYMUNET_BENCH_EPOCHS=2" in c and runner.BENCH_TRAINER_FOLDER in c for c in train)
    assert capsys.readouterr().out.count("nnUNetv2_train") == 3
    assert not (nnunet_folders / "out").exists()


def test_slurm_script_has_one_task_per_pending_run(nnunet_folders):
    res = nnunet_folders / "res"
    _fold(res, "nnUNetTrainer", 1, "checkpoint_final.pth", "validation/summary.json")
    script = nnunet_folders / "jobs.sh"
    run_benchmark(
        ["961"],
        ["2d"],
        ["nnUNetTrainer"],
        [0, 1, 2],
        None,
        device="cuda",
        emit_slurm=str(script),
        slurm_options={"time_limit": "01:00:00", "gpus": 1, "cpus": 4, "partition": "gpu"},
        log=print,
    )
    text = script.read_text()
    assert "#SBATCH --array=0-1" in text and "#SBATCH --partition=gpu" in text and "#SBATCH --time=01:00:00" in text
    assert text.count("nnUNetv2_train 961 2d") == 2 and "nnUNetv2_train 961 2d 1 " not in text
    assert os.access(script, os.X_OK)
    _fold(res, "nnUNetTrainer", 0, "checkpoint_final.pth", "validation/summary.json")
    _fold(res, "nnUNetTrainer", 2, "checkpoint_final.pth", "validation/summary.json")
    with pytest.raises(HyMUNetError, match="nothing to submit"):
        run_benchmark(["961"], ["2d"], ["nnUNetTrainer"], [0, 1, 2], None, emit_slurm=str(script), log=print)


def test_bad_arguments_are_named(nnunet_folders):
    with pytest.raises(HyMUNetError, match="reference"):
        run_benchmark(["961"], ["2d"], ["A"], [0], None, reference="Z", dry_run=True, log=print)
    with pytest.raises(HyMUNetError, match="-d 999"):
        run_benchmark(["999"], ["2d"], ["A"], [0], None, dry_run=True, log=print)
    with pytest.raises(HyMUNetError, match="one per dataset"):
        run_benchmark(["961"], ["2d", "3d_fullres"], ["A"], [0], None, dry_run=True, log=print)
    assert main(["profile", "--plan", "isic-like-2d", "-d", "961"]) == 1
    assert main(["profile", "--plan", "no-such-plan"]) == 1


def _fake_metrics(dice_per_case, hd95_per_case, label="lesion"):
    per_case = [
        {"case": f"c{i}", "metrics": {label: {"dice": d, "iou": d / (2 - d), "hd95": h, "tp": 1, "fn": 0}}}
        for i, (d, h) in enumerate(zip(dice_per_case, hd95_per_case))
    ]

    def stats(values):
        return {
            "mean": float(np.mean(values)),
            "median": float(np.median(values)),
            "std": float(np.std(values, ddof=1)),
            "n": len(values),
        }

    dice = np.array(dice_per_case)
    return {
        "schema_version": 1,
        "units": "px",
        "labels": [{"name": label, "values": [1], "region": False}],
        "metrics": ["dice", "iou", "hd95"],
        "per_case": per_case,
        "per_label": {label: {"dice": stats(dice), "iou": stats(dice / (2 - dice)), "hd95": stats(hd95_per_case)}},
        "pooled": {label: {"dice": 0.5, "iou": 0.33}},
        "benchmark_folds": [0],
        "policy": {
            "both_empty_overlap": 1.0,
            "hd95_method": "max_directed",
            "percentile": 95.0,
            "ignore_label": None,
            "fov": False,
        },
    }


def test_report_from_fake_evaluated_runs(tmp_path):
    from nnunetv2_hymunet.evaluation import compare_runs

    rng = np.random.default_rng(0)
    base = rng.uniform(0.6, 0.8, 12)
    runs = {
        "nnUNetTrainer": base,
        "nnUNetTrainerHyMUNet": base + 0.05 + rng.uniform(0, 0.01, 12),
        "nnUNetTrainerHyMUNet_noMamba": base + 0.05 + rng.uniform(-0.01, 0.01, 12),
    }
    models = []
    for name, dice in runs.items():
        folder = tmp_path / "evaluation" / name
        folder.mkdir(parents=True)
        metrics = _fake_metrics(list(dice), list(10 * (1 - dice)))
        (folder / "metrics.json").write_text(json.dumps(metrics))
        models.append({"label": name, "trainer": name, "run_name": name, "plans": "nnUNetPlans", "metrics": metrics})
    comparison = compare_runs([str(tmp_path / "evaluation" / n) for n in runs], str(tmp_path / "comparison"))
    profile = {
        "plan": {"patch_size": [32, 32]},
        "settings": {"batch_size": 2, "repeats": 3},
        "machine": {"device": "cpu"},
        "models": [
            {"model": n, "parameters": 2e6 * (i + 1), "gflops": 1.5, "step_ms_median": 100.0 + i}
            for i, n in enumerate(runs)
        ],
    }
    entry = {
        "dataset": DATASET,
        "configuration": "2d",
        "models": models,
        "comparison": comparison,
        "profile": profile,
        "boxplots": [os.path.relpath(tmp_path / "comparison" / "boxplots" / "lesion.png", tmp_path)],
    }
    text = "\n".join(dataset_section(entry, "nnUNetTrainer"))
    row = next(line for line in text.splitlines() if line.startswith("| nnUNetTrainerHyMUNet |"))
    assert f"{np.mean(runs['nnUNetTrainerHyMUNet']):.4f} ± {np.std(runs['nnUNetTrainerHyMUNet'], ddof=1):.4f}" in row
    assert "| 4.00 | 1.50 | 101 |" in row  # efficiency columns of that model
    # 12 pairs, all better: the exact two-sided Wilcoxon p is 2 / 2**12
    assert f"{2 / 2**12:.3g}" in row
    assert "the Mamba layers" in text  # the HyMUNet vs _noMamba ablation finding is reported
    paths = build_report([entry], "nnUNetTrainer", str(tmp_path))
    assert set(paths) == {"md", "json"}  # no HTML copy: the Markdown links the plots by relative path
    assert f"]({entry['boxplots'][0]})" in open(paths["md"]).read()
    assert json.load(open(paths["json"]))["reference"] == "nnUNetTrainer"


def test_regions_case_is_nested():
    channels, label = regions_case(np.random.default_rng(0), 20)
    assert channels.shape == (4, 20, 20, 20)
    assert set(np.unique(label)) <= {0, 1, 2, 3} and all((label == v).any() for v in (1, 2, 3))
    # nested as in BraTS (labels of conversion/brats_labels.py): the necrotic core (1) never touches the background
    from scipy import ndimage

    assert not (ndimage.binary_dilation(label == 0) & (label == 1)).any()
    assert (label == 2).sum() > (label == 1).sum()  # the edema is the outer, larger shell


def test_make_suite_writes_nnunet_raw_datasets(tmp_path):
    folders = make_suite(str(tmp_path), first_id=981, size="tiny")
    assert [os.path.basename(f) for f in folders] == [
        "Dataset981_SynthLesion2D",
        "Dataset982_SynthRegions3D",
        "Dataset984_SynthOppositeKey2D",
    ]
    regions = json.load(open(os.path.join(folders[1], "dataset.json")))
    # the converter's BraTS convention (conversion/brats_labels.py): 1 NCR, 2 ED, 3 ET
    assert regions["regions_class_order"] == [2, 1, 3] and regions["labels"]["tumor core"] == [1, 3]
    assert regions["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert len(os.listdir(os.path.join(folders[1], "imagesTr"))) == 4 * regions["numTraining"]
    with pytest.raises(HyMUNetError, match="already exists"):
        make_suite(str(tmp_path), first_id=981, size="tiny", tasks=["SynthLesion2D"])
