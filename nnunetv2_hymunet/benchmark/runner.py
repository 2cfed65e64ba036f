"""Which stock nnU-Net commands a benchmark needs, which of them already ran, and running the rest.

A benchmark is datasets x models x folds; a model is a trainer plus a plans identifier. Every training is the
stock `nnUNetv2_train D C F -tr T -p P --npz` in a subprocess, so the results are exactly what a user gets by hand.
State lives only in nnU-Net's own result folders, which makes the runner resumable and idempotent:

- done: fold_F/checkpoint_final.pth and fold_F/validation/summary.json exist -> nothing runs;
- trained, not validated: checkpoint_final.pth only -> `nnUNetv2_train ... --val --npz`;
- interrupted: checkpoint_latest.pth only -> `nnUNetv2_train ... --c --npz` (continue training);
- otherwise: a fresh training.

With `--seeds`, every (dataset, model, fold) runs once per seed as the trainer copy `<Trainer>_bench_s<seed>`
(ext_trainers/benchmark_trainers.py seeds it), so each seed has its own result folder and the states above hold per
seed.
"""

import json
import os
import shlex
import time
from dataclasses import dataclass
from typing import Optional

from nnunetv2_hymunet.benchmark.long_range import LONG_RANGE_PLANS, SOURCE_PLANS
from nnunetv2_hymunet.benchmark.presets import read_plans
from nnunetv2_hymunet.benchmark.schedule import BENCH_SUFFIX, bench_trainer_name
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_write_text
from nnunetv2_hymunet.nnunet_ext_hook import ENV_VAR as EXT_TRAINER_VAR
from nnunetv2_hymunet.nnunet_ext_hook import with_ext_trainer_folder
from nnunetv2_hymunet.nnunet_tools import dataset_id, resolve_dataset, run_logged, shell_line

DEFAULT_PLANS = "nnUNetPlans"
# plans identifiers nnU-Net's planners write by default -> the planner that writes them (-pl)
PLANNER_FOR_PLANS = {
    "nnUNetPlans": "ExperimentPlanner",
    "nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM",
    "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL",
    "nnUNetResEncUNetXLPlans": "nnUNetPlannerResEncXL",
}
BENCH_TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ext_trainers")
DEFAULT_FOLDS = 5  # nnU-Net's split when the dataset has no splits_final.json yet


@dataclass(frozen=True)
class Model:
    trainer: str
    plans: str = DEFAULT_PLANS

    @property
    def label(self) -> str:
        return self.trainer if self.plans == DEFAULT_PLANS else f"{self.trainer}:{self.plans}"

    @staticmethod
    def parse(text: str) -> "Model":
        trainer, _, plans = text.partition(":")
        if not trainer:
            raise HyMUNetError(f"-tr {text!r}: expected TRAINER or TRAINER:PLANS")
        return Model(trainer, plans or DEFAULT_PLANS)


@dataclass(frozen=True)
class Run:
    dataset: str  # DatasetNNN_Name
    configuration: str
    model: Model
    fold: int
    trained_trainer: str  # model.trainer, or its benchmark copy (`_bench`, `_bench_s<seed>`)
    seed: Optional[int] = None

    @property
    def dataset_id(self) -> str:
        return str(dataset_id(self.dataset))

    @property
    def model_folder(self) -> str:
        from nnunetv2.paths import nnUNet_results

        if not nnUNet_results:
            raise HyMUNetError("nnUNet_results is not set: it must point at nnU-Net's results folder")
        return os.path.join(
            nnUNet_results, self.dataset, f"{self.trained_trainer}__{self.model.plans}__{self.configuration}"
        )

    @property
    def fold_folder(self) -> str:
        return os.path.join(self.model_folder, f"fold_{self.fold}")

    def state(self) -> str:
        fold = self.fold_folder
        final = os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
        if final and os.path.isfile(os.path.join(fold, "validation", "summary.json")):
            return "done"
        if final:
            return "validate"
        if os.path.isfile(os.path.join(fold, "checkpoint_latest.pth")):
            return "continue"
        return "train"

    def command(self, device: str, state: str = None) -> list:
        state = state or self.state()
        command = [
            "nnUNetv2_train",
            self.dataset_id,
            self.configuration,
            str(self.fold),
            "-tr",
            self.trained_trainer,
            "-p",
            self.model.plans,
            "--npz",
            "-device",
            device,
        ]
        if state == "validate":
            command.append("--val")
        elif state == "continue":
            command.append("--c")
        return command

    def describe(self) -> str:
        seed = f" seed {self.seed}" if self.seed is not None else ""
        return f"{self.dataset} {self.configuration} fold {self.fold} {self.model.label}{seed}"


def trained_trainer_name(trainer: str, short_schedule: bool, seed: int = None, plans: str = DEFAULT_PLANS) -> str:
    """The class nnUNetv2_train gets: the trainer itself, or its benchmark copy for a short schedule, a seed, or
    nnUNetLongRangePlans (two-stage networks need the copy's deep-supervision fix)."""
    if seed is not None:
        return bench_trainer_name(trainer, seed)
    if short_schedule or plans == LONG_RANGE_PLANS:
        return trainer if trainer.endswith(BENCH_SUFFIX) else trainer + BENCH_SUFFIX
    return trainer


def available_folds(dataset: str) -> tuple:
    """(number of folds nnU-Net will train for the dataset, where that number comes from): splits_final.json's, or
    nnU-Net's default 5-fold split when it has not written one yet."""
    from nnunetv2.paths import nnUNet_preprocessed

    splits_file = os.path.join(nnUNet_preprocessed or "", dataset, "splits_final.json")
    if not nnUNet_preprocessed or not os.path.isfile(splits_file):
        return DEFAULT_FOLDS, "nnU-Net's default 5-fold split"
    try:
        with open(splits_file) as f:
            splits = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HyMUNetError(f"{splits_file}: cannot read the splits: {e}") from None
    if not isinstance(splits, list) or not splits:
        raise HyMUNetError(f"{splits_file}: expected a non-empty list of {{train, val}} splits")
    return len(splits), splits_file


def check_folds(folds, datasets) -> list:
    """-f values as ints; refuses duplicates and folds the datasets' splits do not have (nnU-Net would silently make
    a random split for them)."""
    folds = [int(f) for f in folds]
    if len(set(folds)) != len(folds):
        raise HyMUNetError(f"-f lists a fold twice: {folds}")
    for dataset in datasets:
        n, source = available_folds(dataset)
        bad = [f for f in folds if not 0 <= f < n]
        if bad:
            raise HyMUNetError(f"-f {' '.join(map(str, bad))}: {dataset} has folds 0..{n - 1} ({source})")
    return folds


def check_seeds(seeds) -> list:
    if seeds is None:
        return [None]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise HyMUNetError("--seeds needs at least one seed")
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise HyMUNetError(f"--seeds must be distinct non-negative integers, got {seeds}")
    return seeds


def plan_runs(datasets, configurations, models, folds, short_schedule: bool, seeds=None) -> list:
    """All runs, in dataset, seed, fold, model order (so partial results cover every model early)."""
    if len(configurations) not in (1, len(datasets)):
        raise HyMUNetError(
            f"-c: give one configuration for all datasets or one per dataset ({len(datasets)}), "
            f"got {len(configurations)}"
        )
    if not datasets or not models or not folds:
        raise HyMUNetError("need at least one dataset (-d), one trainer (-tr) and one fold (-f)")
    configurations = list(configurations) * (len(datasets) if len(configurations) == 1 else 1)
    names = [resolve_dataset(d) for d in datasets]
    folds = check_folds(folds, names)
    runs = []
    for name, configuration in zip(names, configurations):
        for seed in check_seeds(seeds):
            for fold in folds:
                for model in models:
                    runs.append(
                        Run(
                            name,
                            configuration,
                            model,
                            fold,
                            trained_trainer_name(model.trainer, short_schedule, seed, model.plans),
                            seed,
                        )
                    )
    return runs


def preprocessing_commands(dataset: str, configuration: str, plans: str, num_processes: int) -> list:
    """The commands that make (dataset, configuration, plans) trainable; empty when it already is.
    nnUNetLongRangePlans are derived from nnUNetPlans (`hymunet benchmark long-range-plans`), planned first if
    needed."""
    from nnunetv2.paths import nnUNet_preprocessed

    if not nnUNet_preprocessed:
        raise HyMUNetError("nnUNet_preprocessed is not set: it must point at nnU-Net's preprocessed folder")
    folder = os.path.join(nnUNet_preprocessed, dataset)
    number = str(dataset_id(dataset))
    plans_file = os.path.join(folder, plans + ".json")
    n = str(num_processes)
    if not os.path.isfile(plans_file):
        if plans == LONG_RANGE_PLANS:
            return preprocessing_commands(dataset, configuration, SOURCE_PLANS, num_processes) + [
                ["hymunet", "benchmark", "long-range-plans", "-d", number, "-c", configuration]
            ]
        if plans not in PLANNER_FOR_PLANS:
            raise HyMUNetError(
                f"{plans_file} does not exist and {plans!r} is not a plans name a stock planner writes "
                f"({', '.join(PLANNER_FOR_PLANS)}) nor {LONG_RANGE_PLANS}: create it first (e.g. "
                "hymunet plan)"
            )
        return [
            [
                "nnUNetv2_plan_and_preprocess",
                "-d",
                number,
                "-c",
                configuration,
                "-pl",
                PLANNER_FOR_PLANS[plans],
                "-np",
                n,
                "-npfp",
                n,
            ]
        ]
    configurations = read_plans(plans_file)["configurations"]
    if configuration not in configurations:
        raise HyMUNetError(
            f"{plans_file} has no configuration {configuration!r} (it has: {', '.join(sorted(configurations))})"
        )
    identifier = configurations[configuration].get("data_identifier")
    data = os.path.join(folder, identifier) if identifier else None
    if data and os.path.isdir(data) and os.listdir(data) and os.path.isdir(os.path.join(folder, "gt_segmentations")):
        return []
    return [["nnUNetv2_preprocess", "-d", number, "-c", configuration, "-plans_name", plans, "-np", n]]


def subprocess_environment(
    short_schedule: dict = None,
    num_processes: int = None,
    n_proc_da: int = None,
    training: bool = True,
    bench_copies: bool = None,
) -> dict:
    """Variables the runner sets for nnU-Net subprocesses (on top of the caller's environment). bench_copies (default:
    whether there is a short schedule): the trainings use the benchmark trainer copies, so nnU-Net must find them."""
    env = {}
    if bench_copies or (bench_copies is None and short_schedule):
        env[EXT_TRAINER_VAR] = with_ext_trainer_folder(BENCH_TRAINER_FOLDER, os.environ.get(EXT_TRAINER_VAR))
    if short_schedule:
        env.update({k: str(v) for k, v in short_schedule.items()})
    if num_processes is not None:
        env["nnUNet_def_n_proc"] = str(num_processes)
    if training and n_proc_da is not None:  # never for planning: 0 makes nnU-Net's planner crash
        env["nnUNet_n_proc_DA"] = str(n_proc_da)
    return env


def execute(command: list, env: dict, log_file: str) -> float:
    """Run an nnU-Net command (with `env` on top of this environment), appending its output to log_file; seconds
    taken. A failure raises, naming the log."""
    return run_logged(command, log_file, {**os.environ, **env}, append=True)


class Ledger:
    """OUTPUT/runs.jsonl: one JSON line per action the runner took or skipped (what ran, how long)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "runs.jsonl")
        os.makedirs(output_dir, exist_ok=True)

    def record(self, **entry) -> None:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def entries(self) -> list:
        if not os.path.isfile(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]


def slurm_script(
    runs: list,
    device: str,
    env: dict,
    preprocessing: list,
    job_name: str = "hymunet-benchmark",
    time_limit: str = "72:00:00",
    gpus: int = 1,
    cpus: int = 8,
    partition: str = None,
) -> str:
    """A Slurm job array with one task per pending training (preprocessing listed as a step to run first)."""
    if not runs:
        raise HyMUNetError("--emit-slurm: every run is already finished; nothing to submit")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array=0-{len(runs) - 1}",
        f"#SBATCH --time={time_limit}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --output={job_name}-%A_%a.log",
    ]
    if gpus:
        lines.append(f"#SBATCH --gres=gpu:{gpus}")
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "#",
        "# Generated by `hymunet benchmark run --emit-slurm`: one array task per pending nnU-Net training.",
        "# nnUNet_raw / nnUNet_preprocessed / nnUNet_results must be set in the submitting environment.",
        "# Afterwards rerun the same `hymunet benchmark run` command (without --emit-slurm) to evaluate and",
        "# report; finished folds are skipped.",
    ]
    if preprocessing:
        lines.append("# Run this preprocessing ONCE before submitting (the array does not do it):")
        lines += [f"#   {shell_line(c)}" for c in preprocessing]
    lines += ["set -euo pipefail"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append("COMMANDS=(")
    lines += [f"  {shlex.quote(shell_line(run.command(device)))}" for run in runs]
    lines += [
        ")",
        'echo "task ${SLURM_ARRAY_TASK_ID}: ${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
        'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"',
        "",
    ]
    return "\n".join(lines)


def write_slurm_script(path: str, text: str) -> None:
    atomic_write_text(path, text)
    os.chmod(path, 0o755)
