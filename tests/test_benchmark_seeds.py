"""`hymunet benchmark run --seeds`: seeded trainer copies, one result folder per seed, the seeds x cases report, the
ablation verdicts on data with a known direction, and the argument checks (trainers, folds, plans, schedule)."""

import json
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import fake_preprocessed_dataset
from scipy.stats import wilcoxon

from nnunetv2_hymunet.benchmark import runner
from nnunetv2_hymunet.benchmark.ext_trainers import benchmark_trainers
from nnunetv2_hymunet.benchmark.report import ablation_findings, dataset_section, seeded_dataset_section, verdict
from nnunetv2_hymunet.benchmark.schedule import SCHEDULE_ENV, bench_trainer_name, parse_bench_name
from nnunetv2_hymunet.benchmark.study import run_benchmark, run_summary, summary_path, write_run_summary
from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.nnunet_tools import read_schedule

DATASET = "Dataset962_Seeds"


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    fake_preprocessed_dataset(tmp_path, monkeypatch, DATASET)
    for variable in ("HYMUNET_BENCH_EPOCHS", "HYMUNET_BENCH_ITERATIONS", "HYMUNET_BENCH_VAL_ITERATIONS"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


# ---------------------------------------------------------------- trainer copies


def test_bench_names():
    assert bench_trainer_name("nnUNetTrainerHyMUNet", 3) == "nnUNetTrainerHyMUNet_bench_s3"
    assert bench_trainer_name("nnUNetTrainerHyMUNet_bench", 3) == "nnUNetTrainerHyMUNet_bench_s3"
    assert bench_trainer_name("nnUNetTrainer") == "nnUNetTrainer_bench"
    assert parse_bench_name("nnUNetTrainerHyMUNet_noMamba_bench_s12") == ("nnUNetTrainerHyMUNet_noMamba", 12)
    assert parse_bench_name("nnUNetTrainer_bench") == ("nnUNetTrainer", None)
    assert parse_bench_name("nnUNetTrainerHyMUNet") is None


def test_seeded_copies_of_any_trainer_are_found_by_name():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_5epochs

    from nnunetv2_hymunet.training import nnUNetTrainerHyMUNet

    for base, name in (
        (nnUNetTrainer, "nnUNetTrainer_bench_s7"),
        (nnUNetTrainerHyMUNet, "nnUNetTrainerHyMUNet_bench_s0"),
        (nnUNetTrainer_5epochs, "nnUNetTrainer_5epochs_bench_s2"),
    ):
        cls = getattr(benchmark_trainers, name)
        assert cls.__name__ == name and cls.__mro__[1] is base and cls.bench_seed == int(name.rsplit("_s", 1)[1])
        assert getattr(benchmark_trainers, name) is cls  # one class per name (pickling, a second lookup)
    assert benchmark_trainers.nnUNetTrainer_bench.bench_seed is None
    assert not hasattr(benchmark_trainers, "NoSuchTrainer_bench_s1")
    assert not hasattr(benchmark_trainers, "nnUNetTrainerHyMUNet")  # only copies live here


class _RecordingTrainer(benchmark_trainers.nnUNetTrainer):
    """Stands in for a base trainer: records what the generators give when the network would be built."""

    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        self.num_epochs, self.save_every, self.was_initialized = 1000, 50, False
        self.configuration_manager = SimpleNamespace(pool_op_kernel_sizes=plans.get("strides", [[1, 1], [2, 2]] * 2))
        self.enable_deep_supervision = True

    def initialize(self):
        self.draws = (random.random(), float(np.random.rand()), torch.rand(3).tolist())
        self.was_initialized = True


def test_seeded_copy_seeds_before_the_network_is_built(monkeypatch):
    monkeypatch.setenv("HYMUNET_BENCH_EPOCHS", "4")
    draws = []
    for seed in (5, 5, 6):
        cls = benchmark_trainers._bench_class(_RecordingTrainer, f"_RecordingTrainer_bench_s{seed}", seed)
        trainer = cls({}, "2d", 0, {})
        assert trainer.num_epochs == 4 and trainer.save_every == 4
        random.seed(99), np.random.seed(99), torch.manual_seed(99)  # whatever ran before must not matter
        trainer.initialize()
        draws.append(trainer.draws)
    assert draws[0] == draws[1] and draws[0] != draws[2]
    monkeypatch.setenv("HYMUNET_BENCH_EPOCHS", "ten")
    with pytest.raises(HyMUNetError, match="HYMUNET_BENCH_EPOCHS='ten': expected a positive integer"):
        cls({}, "2d", 0, {})


def test_two_stage_networks_train_without_deep_supervision():
    cls = benchmark_trainers._bench_class(_RecordingTrainer, "_RecordingTrainer_bench", None)
    assert not cls({"strides": [[1, 1], [2, 2]]}, "2d", 0, {}).enable_deep_supervision  # else 0/0: NaN loss
    assert cls({"strides": [[1, 1], [2, 2], [2, 2]]}, "2d", 0, {}).enable_deep_supervision


def test_copies_honour_omp_num_threads_on_the_cpu(monkeypatch):
    """nnUNetv2_train sets torch's CPU threads to the CPU count; side-by-side benchmark runs need OMP_NUM_THREADS."""
    cls = benchmark_trainers._bench_class(_RecordingTrainer, "_RecordingTrainer_bench", None)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        cls({}, "2d", 0, {}, torch.device("cpu"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        cls({}, "2d", 0, {}, torch.device("cuda"))  # not on a GPU: nnU-Net's own choice stands
        assert torch.get_num_threads() == 2
        for value in ("", "0", "two"):
            monkeypatch.setenv("OMP_NUM_THREADS", value)
            cls({}, "2d", 0, {}, torch.device("cpu"))
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_read_schedule():
    environ = {"HYMUNET_BENCH_EPOCHS": "3", "HYMUNET_BENCH_ITERATIONS": " "}
    assert read_schedule(SCHEDULE_ENV, environ) == {"num_epochs": 3}
    for bad in ("0", "-2", "1.5", "x"):
        with pytest.raises(HyMUNetError, match="HYMUNET_BENCH_VAL_ITERATIONS"):
            read_schedule(SCHEDULE_ENV, {"HYMUNET_BENCH_VAL_ITERATIONS": bad})


# ---------------------------------------------------------------- runs per seed


def _finish(res, trainer, fold, plans="nnUNetPlans"):
    folder = res / DATASET / f"{trainer}__{plans}__2d" / f"fold_{fold}"
    (folder / "validation").mkdir(parents=True)
    for f in ("checkpoint_final.pth", "validation/summary.json"):
        (folder / f).write_text("x")
    return folder


def test_seeds_get_their_own_result_folders_and_resume(nnunet_folders, capsys):
    res = nnunet_folders / "res"
    _finish(res, "nnUNetTrainer_bench_s1", 0)
    interrupted = res / DATASET / "nnUNetTrainerHyMUNet_bench_s2__nnUNetPlans__2d" / "fold_0"
    interrupted.mkdir(parents=True)
    (interrupted / "checkpoint_latest.pth").write_text("x")
    out = run_benchmark(
        ["962"],
        ["2d"],
        ["nnUNetTrainer", "nnUNetTrainerHyMUNet"],
        [0],
        None,
        seeds=[1, 2],
        num_processes=1,
        dry_run=True,
        log=print,
    )
    train = [c for c in out["commands"] if "nnUNetv2_train" in c]
    assert len(train) == 3  # seed 1 of nnUNetTrainer is finished: never retrained
    assert not any("-tr nnUNetTrainer_bench_s1 " in c for c in train)
    assert any("-tr nnUNetTrainerHyMUNet_bench_s1 " in c for c in train)
    assert any("-tr nnUNetTrainer_bench_s2 " in c and not c.endswith("--c") for c in train)
    assert any("-tr nnUNetTrainerHyMUNet_bench_s2 " in c and c.endswith("--c") for c in train)  # continues
    # the copies must be found (extTrainer folder), no short schedule was asked for
    assert all(runner.BENCH_TRAINER_FOLDER in c and "HYMUNET_BENCH" not in c for c in train)
    runs = runner.plan_runs(["962"], ["2d"], [runner.Model("nnUNetTrainer")], [0, 1], False, seeds=[4, 3])
    assert [(r.seed, r.fold) for r in runs] == [(4, 0), (4, 1), (3, 0), (3, 1)]
    assert len({r.fold_folder for r in runs}) == 4 and runs[0].describe().endswith("seed 4")
    with pytest.raises(HyMUNetError, match="--seeds"):
        runner.plan_runs(["962"], ["2d"], [runner.Model("A")], [0], False, seeds=[1, 1])


def test_unknown_trainers_and_folds_are_refused_naming_the_flag(nnunet_folders, capsys):
    with pytest.raises(HyMUNetError, match="^-tr NoSuchTrainer: no nnU-Net trainer class"):
        run_benchmark(["962"], ["2d"], ["nnUNetTrainer", "NoSuchTrainer"], [0], None, dry_run=True, log=print)
    for folds in ([9], [-1], [0, 5]):
        with pytest.raises(HyMUNetError, match=f"^-f {folds[-1]}: {DATASET} has folds 0..4"):
            run_benchmark(["962"], ["2d"], ["nnUNetTrainer"], folds, None, dry_run=True, log=print)
    with pytest.raises(HyMUNetError, match="twice"):
        run_benchmark(["962"], ["2d"], ["nnUNetTrainer"], [1, 1], None, dry_run=True, log=print)
    splits = nnunet_folders / "pre" / DATASET / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["a"], "val": ["b"]}] * 3))
    with pytest.raises(HyMUNetError, match=f"^-f 3: .* folds 0..2 .{splits}"):
        run_benchmark(["962"], ["2d"], ["nnUNetTrainer"], [3], None, dry_run=True, log=print)
    capsys.readouterr()
    # through the CLI: exit 1, one line naming the flag, nothing printed to stdout
    assert main(["benchmark", "run", "-d", "962", "-tr", "nnUNetTrainer", "-f", "7", "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert (
        "-f 7" in captured.err and len(captured.err.strip().splitlines()) == 1 and "nnUNetv2_train" not in captured.out
    )


def test_bad_schedule_environment_is_refused_before_training(nnunet_folders, monkeypatch):
    monkeypatch.setenv("HYMUNET_BENCH_ITERATIONS", "many")
    with pytest.raises(HyMUNetError, match="HYMUNET_BENCH_ITERATIONS='many'"):
        run_benchmark(["962"], ["2d"], ["nnUNetTrainer"], [0], None, seeds=[0], dry_run=True, log=print)


def test_corrupt_plans_are_named(nnunet_folders, capsys):
    plans = nnunet_folders / "pre" / DATASET / "nnUNetPlans.json"
    for text in ("{not json", "[1, 2]", '{"configurations": 3}', ""):
        plans.write_text(text)
        with pytest.raises(HyMUNetError, match=f"^{plans}: "):
            run_benchmark(["962"], ["2d"], ["nnUNetTrainer"], [0], None, dry_run=True, log=print)
        assert main(["profile", "-d", "962", "-c", "2d", "-tr", "nnUNetTrainer"]) == 1
        err = capsys.readouterr().err.strip()
        assert str(plans) in err and len(err.splitlines()) == 1
    plans.write_text(json.dumps({"configurations": {"2d": {"data_identifier": "x"}}}))  # no architecture
    assert main(["profile", "-d", "962", "-c", "2d", "-tr", "nnUNetTrainer"]) == 1
    assert "lacks a patch_size" in capsys.readouterr().err


def test_long_range_plans_always_train_benchmark_copies(nnunet_folders):
    model = runner.Model("nnUNetTrainerHyMUNet", "nnUNetLongRangePlans")
    runs = runner.plan_runs(["962"], ["2d"], [model, runner.Model("nnUNetTrainer")], [0], False)
    assert [r.trained_trainer for r in runs] == ["nnUNetTrainerHyMUNet_bench", "nnUNetTrainer"]


def test_long_range_plans_are_derived_after_planning(nnunet_folders):
    (nnunet_folders / "pre" / DATASET / "nnUNetPlans.json").unlink()
    commands = runner.preprocessing_commands(DATASET, "2d", "nnUNetLongRangePlans", 1)
    assert [c[0] for c in commands] == ["nnUNetv2_plan_and_preprocess", "hymunet"]
    assert commands[1] == ["hymunet", "benchmark", "long-range-plans", "-d", "962", "-c", "2d"]


# ---------------------------------------------------------------- report


def _metrics(dice: dict, label="x", blob=None) -> dict:
    """A metrics.json of the evaluation for cases {case: dice} (what evaluate_model returns)."""

    def stats(values):
        return {
            "mean": float(np.mean(values)),
            "median": float(np.median(values)),
            "std": float(np.std(values, ddof=1)),
            "n": len(values),
        }

    values = np.array(list(dice.values()))
    metrics = {
        "units": "px",
        "labels": [{"name": label, "values": [1]}],
        "benchmark_folds": [0],
        "per_case": [{"case": c, "metrics": {label: {"dice": d, "hd95": 10 * (1 - d)}}} for c, d in dice.items()],
        "per_label": {label: {"dice": stats(values), "hd95": stats(10 * (1 - values)), "iou": stats(values / 2)}},
    }
    if blob is not None:
        metrics["blob_class"] = {
            "accuracy": float(np.mean(list(blob.values()))),
            "fraction": 0.5,
            "per_case": [{"case": c, "accuracy": a, "fraction": 0.5} for c, a in blob.items()],
        }
    return metrics


def _seeded_models(shift_full: float, seed_count=3, cases=8, blob=False):
    """Reference nnUNetTrainer, HyM-UNet = _noMamba + shift_full per case (plus small noise), over seeds."""
    rng = np.random.default_rng(1)
    models = {"nnUNetTrainer": {}, "nnUNetTrainerHyMUNet": {}, "nnUNetTrainerHyMUNet_noMamba": {}}
    for seed in range(seed_count):
        base = rng.uniform(0.5, 0.7, cases)
        noise = rng.uniform(-0.002, 0.002, cases)
        dice = {
            "nnUNetTrainer": base,
            "nnUNetTrainerHyMUNet_noMamba": base + 0.1,
            "nnUNetTrainerHyMUNet": base + 0.1 + shift_full + noise,
        }
        for name in models:
            accuracy = {f"c{i}": float(dice[name][i] > 0.65) for i in range(cases)} if blob else None
            models[name][seed] = _metrics({f"c{i}": float(v) for i, v in enumerate(dice[name])}, blob=accuracy)
    return [
        {"label": name, "trainer": bench_trainer_name(name, 0), "plans": "nnUNetPlans", "seeds": seeds}
        for name, seeds in models.items()
    ]


def test_verdict():
    assert verdict(0.8, 0.7, 0.01) == "helped (significant)"
    assert verdict(0.7, 0.8, 0.01) == "hurt (significant)"
    assert verdict(0.8, 0.7, 0.2) == verdict(0.8, 0.7, float("nan")) == "made no significant difference"
    assert verdict(5.0, 7.0, 0.01, higher_is_better=False) == "helped (significant)"


@pytest.mark.parametrize(
    "shift, expected",
    [(0.05, "helped (significant)"), (-0.05, "hurt (significant)"), (0.0, "made no significant difference")],
)
def test_seeded_report_verdicts_follow_the_known_direction(shift, expected):
    models = _seeded_models(shift, blob=True)
    text = "\n".join(
        seeded_dataset_section({"dataset": DATASET, "configuration": "2d", "models": models}, "nnUNetTrainer")
    )
    finding = next(line for line in text.splitlines() if line.startswith("- x: mean Dice: the Mamba layers"))
    assert expected in finding and "Wilcoxon over 24 (seed, case) pairs" in finding
    assert "### Blob-class accuracy" in text and "blob-class accuracy: the Mamba layers" in text


def test_seeded_report_numbers():
    models = _seeded_models(0.05)
    text = "\n".join(
        seeded_dataset_section({"dataset": DATASET, "configuration": "2d", "models": models}, "nnUNetTrainer")
    )
    hym = models[1]
    per_seed = [np.mean([c["metrics"]["x"]["dice"] for c in m["per_case"]]) for m in hym["seeds"].values()]
    row = next(line for line in text.splitlines() if line.startswith("| nnUNetTrainerHyMUNet |"))
    assert f"| 3 | {np.mean(per_seed):.4f} ± {np.std(per_seed, ddof=1):.4f} |" in row
    # the paired test is scipy's Wilcoxon over the 3 x 8 (seed, case) pairs
    ref = [c["metrics"]["x"]["dice"] for m in models[0]["seeds"].values() for c in m["per_case"]]
    other = [c["metrics"]["x"]["dice"] for m in hym["seeds"].values() for c in m["per_case"]]
    p = wilcoxon(np.array(other) - np.array(ref)).pvalue
    assert f"{p:.3g} (Δmed +0.150, n=24)" in row
    assert "pairs (seed, case)" in text and "mean ± sample sd across seeds of the per-seed case means" in text


@pytest.mark.parametrize(
    "shift, expected",
    [(0.05, "helped (significant)"), (-0.05, "hurt (significant)"), (0.0, "made no significant difference")],
)
def test_single_run_verdicts_follow_the_known_direction(shift, expected):
    """The one-seed report's ablation sentences, from tests in compare_runs' format (its paired_test)."""
    from itertools import combinations

    from nnunetv2_hymunet.evaluation.compare import paired_test

    models = [
        {
            "label": m["label"],
            "trainer": m["label"],
            "run_name": m["label"],
            "plans": "nnUNetPlans",
            "metrics": m["seeds"][0],
        }
        for m in _seeded_models(shift, seed_count=1, cases=12)
    ]
    tests = []
    for a, b in combinations(models, 2):
        values = [np.array([c["metrics"]["x"]["dice"] for c in m["metrics"]["per_case"]]) for m in (a, b)]
        tests.append(
            {"label": "x", "metric": "dice", "run_a": a["run_name"], "run_b": b["run_name"], **paired_test(*values)}
        )
    entry = {"dataset": DATASET, "configuration": "2d", "models": models, "comparison": {"tests": tests}}
    findings = ablation_findings(entry, tests)
    assert len(findings) == 4 and "the Mamba layers" in findings[2] and expected in findings[2]
    assert findings[2] in dataset_section(entry, "nnUNetTrainer")


# ---------------------------------------------------------------- run summaries


def test_run_summary_is_small(nnunet_folders):
    from PIL import Image

    from nnunetv2_hymunet.benchmark.long_range import DATASET_KEY

    pre = nnunet_folders / "pre" / DATASET
    dataset_json = json.loads((pre / "dataset.json").read_text())
    (pre / "dataset.json").write_text(json.dumps({**dataset_json, DATASET_KEY: {"min_marker_distance_px": 41}}))
    run = runner.plan_runs(["962"], ["2d"], [runner.Model("nnUNetTrainerHyMUNet")], [0], True, seeds=[3])[0]
    fold = _finish(nnunet_folders / "res", run.trained_trainer, 0)
    epochs = 300
    torch.save(
        {
            "logging": {
                "train_losses": list(np.linspace(1, 0.1, epochs)),
                "val_losses": [0.5] * epochs,
                "ema_fg_dice": [0.8] * epochs,
                "epoch_start_timestamps": list(range(epochs)),
                "epoch_end_timestamps": [t + 2.5 for t in range(epochs)],
            }
        },
        fold / "checkpoint_final.pth",
    )
    label = np.zeros((16, 16), np.uint8)
    label[4:8, 4:8] = 2
    cases = [f"case_{i:03d}" for i in range(12)]
    for case in cases:
        Image.fromarray(label).save(pre / "gt_segmentations" / f"{case}.png")
        Image.fromarray(label).save(fold / "validation" / f"{case}.png")
    (fold / "validation" / "summary.json").write_text(
        json.dumps(
            {
                "foreground_mean": {"Dice": 0.9},
                "metric_per_case": [
                    {"reference_file": f"/x/{c}.png", "metrics": {"1": {"Dice": 0.5}, "2": {"Dice": 1.0}}}
                    for c in cases
                ],
            }
        )
    )
    out = nnunet_folders / "out"
    write_run_summary(run, str(out))
    path = summary_path(run, str(out))
    assert path.endswith(os.path.join("runs", DATASET, "nnUNetTrainerHyMUNet", "seed3_fold0.json"))
    summary = json.loads(open(path).read())
    assert summary["seed"] == 3 and summary["epochs"] == epochs and summary["seconds_per_epoch"][0] == 2.5
    assert summary["blob_class"]["accuracy"] == 1.0 and len(summary["validation"]["per_case"]) == 12
    assert os.path.getsize(path) < 40_000  # committed with the study
    assert run_summary(run)["curves"]["train_losses"][-1] == pytest.approx(0.1)


def test_run_summary_numbers_accept_numpy_and_tensor_scalars():
    """nnU-Net's logger holds np.float32 Dice values: they were written as None, so every curve came out empty."""
    from nnunetv2_hymunet.benchmark.study import _rounded

    values = [np.float32(0.5), np.float64(0.25), 1, torch.tensor(0.125), float("nan"), np.float32("inf"), None, "x"]
    assert _rounded(values) == [0.5, 0.25, 1.0, 0.125, None, None, None, None]
