"""`hymunet benchmark run`: preprocess what is missing, train what is not finished, evaluate, profile, report.

Every finished run also gets a small summary, OUTPUT/runs/<dataset>/<model>/[seed<S>_]fold<F>.json (validation
scores per case, training curves per epoch): what a study commits instead of nnU-Net's result folders.
"""

import json
import math
import os
import sys
import time

from nnunetv2_hymunet.benchmark import runner
from nnunetv2_hymunet.benchmark.report import build_report, evaluate_model, safe_name
from nnunetv2_hymunet.benchmark.schedule import SCHEDULE_ENV
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_write_text
from nnunetv2_hymunet.nnunet_tools import read_schedule


def _profile_dataset(
    dataset: str,
    configuration: str,
    plans: str,
    trainers: list,
    device: str,
    repeats: int,
    output_dir: str,
    threads=None,
    log=print,
):
    """profile_models on the dataset's plans, cached in OUTPUT/profile/ (recomputed when the model list changes)."""
    from nnunetv2_hymunet.benchmark.presets import dataset_plan
    from nnunetv2_hymunet.benchmark.profile_report import write_profile_outputs
    from nnunetv2_hymunet.benchmark.profiling import profile_models

    folder = os.path.join(output_dir, "profile", f"{dataset}__{plans}__{configuration}")
    cached = os.path.join(folder, "profile.json")
    if os.path.isfile(cached):
        with open(cached) as f:
            result = json.load(f)
        if [m["model"] for m in result["models"]] == trainers:
            return result
    result = profile_models(
        dataset_plan(dataset, configuration, plans), trainers, device=device, repeats=repeats, threads=threads, log=log
    )
    write_profile_outputs(result, folder)
    return result


def check_trainers(models) -> None:
    """Refuse, naming -tr, a trainer nnU-Net's search (its package, then the nnUNet_extTrainer folders) cannot find."""
    from nnunetv2_hymunet.benchmark.models import find_trainer_class

    for model in models:
        try:
            find_trainer_class(model.trainer)
        except HyMUNetError:
            raise HyMUNetError(
                f"-tr {model.trainer}: no nnU-Net trainer class of that name (searched "
                "nnunetv2.training.nnUNetTrainer and the nnUNet_extTrainer folders)"
            ) from None


def run_benchmark(
    datasets,
    configurations,
    models,
    folds,
    output_dir,
    device="cpu",
    reference=None,
    short_schedule=None,
    num_processes=None,
    n_proc_da=None,
    dry_run=False,
    emit_slurm=None,
    train=True,
    profile=True,
    profile_repeats=3,
    profile_threads=None,
    slurm_options=None,
    seeds=None,
    log=print,
) -> dict:
    """Returns {'commands': [...], 'report': paths or None, 'trained': [run descriptions]}."""
    models = [m if isinstance(m, runner.Model) else runner.Model.parse(m) for m in models]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise HyMUNetError(f"-tr lists a model twice: {labels}")
    reference = reference or labels[0]
    if reference not in labels:
        raise HyMUNetError(f"--reference-trainer {reference!r} is not among the models {labels}")
    runs = runner.plan_runs(datasets, configurations, models, folds, bool(short_schedule), seeds)
    check_trainers(models)
    bench_copies = any(r.trained_trainer != r.model.trainer for r in runs)
    preprocess_env = runner.subprocess_environment(None, num_processes, None, training=False)
    train_env = runner.subprocess_environment(
        short_schedule, num_processes, n_proc_da, training=True, bench_copies=bench_copies
    )
    if bench_copies:  # the copies read these from the environment: refuse bad values before any training starts
        read_schedule(SCHEDULE_ENV, {**os.environ, **train_env})
    n_proc = num_processes or 1

    preprocessing, seen = [], set()
    for key in dict.fromkeys((run.dataset, run.configuration, run.model.plans) for run in runs):
        for command in runner.preprocessing_commands(*key, n_proc):
            if tuple(command) not in seen:  # nnUNetLongRangePlans and nnUNetPlans may both need the planning
                seen.add(tuple(command))
                preprocessing.append(command)
    pending = [r for r in runs if r.state() != "done"]
    commands = [runner.shell_line(c, preprocess_env) for c in preprocessing]
    commands += [runner.shell_line(r.command(device), train_env) for r in pending]

    if emit_slurm:
        runner.write_slurm_script(
            emit_slurm, runner.slurm_script(pending, device, train_env, preprocessing, **(slurm_options or {}))
        )
        log(f"wrote {emit_slurm}: a job array of {len(pending)} training(s)")
        return {"commands": commands, "report": None, "trained": []}
    if dry_run:
        for line in commands:
            log(line)
        if not commands:
            log("# every run is finished; the report would be rebuilt from the existing results")
        return {"commands": commands, "report": None, "trained": []}

    ledger = runner.Ledger(output_dir)
    logs = os.path.join(output_dir, "logs")
    for command in preprocessing:
        log(f"preprocessing: {runner.shell_line(command)}")
        dataset_id = command[command.index("-d") + 1]
        seconds = runner.execute(command, preprocess_env, os.path.join(logs, f"preprocess_D{dataset_id}.log"))
        ledger.record(action="preprocess", command=runner.shell_line(command), seconds=round(seconds, 1))
    trained = []
    for run in runs:
        state = run.state()
        if state == "done":
            ledger.record(action="skip", run=run.describe(), reason="finished")
            write_run_summary(run, output_dir)
            continue
        if not train:
            ledger.record(action="skip", run=run.describe(), reason=f"--no-train ({state})")
            continue
        command = run.command(device, state)
        log(f"{state}: {run.describe()}")
        seed = f"seed{run.seed}__" if run.seed is not None else ""
        log_file = os.path.join(
            logs, safe_name(f"{run.dataset}__{run.model.label}__{run.configuration}__{seed}fold{run.fold}") + ".log"
        )
        seconds = runner.execute(command, train_env, log_file)
        trained.append(run.describe())
        ledger.record(
            action=state,
            run=run.describe(),
            command=runner.shell_line(command, train_env),
            seconds=round(seconds, 1),
            schedule=short_schedule or "trainer default",
        )
        log(f"  finished in {seconds:.0f} s")
        write_run_summary(run, output_dir)

    entries = []
    for dataset, configuration in dict.fromkeys((r.dataset, r.configuration) for r in runs):
        entry = _dataset_entry(
            dataset,
            configuration,
            [r for r in runs if r.dataset == dataset],
            models,
            output_dir,
            device,
            profile,
            profile_repeats,
            profile_threads,
            n_proc,
            log,
        )
        if entry:
            entries.append(entry)
    header = [
        f"Command: `{' '.join(sys.argv)}`",
        f"Models: {', '.join(labels)} (reference {reference}); seeds: "
        f"{' '.join(map(str, seeds)) if seeds is not None else 'not set (trainer defaults)'}; short schedule: "
        f"{short_schedule or 'no (trainer defaults)'}; device {device}; "
        f"load average at report time {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}.",
    ]
    paths = build_report(entries, reference, output_dir, header) if entries else None
    if paths:
        log(f"report: {paths['md']}")
    return {"commands": commands, "report": paths, "trained": trained}


def _dataset_entry(
    dataset, configuration, runs, models, output_dir, device, profile, profile_repeats, profile_threads, n_proc, log
):
    from nnunetv2_hymunet.evaluation import compare_runs

    evaluation_root = os.path.join(output_dir, "evaluation", dataset)
    seeds = list(dict.fromkeys(r.seed for r in runs))
    evaluated = []
    for model in models:
        per_seed, trainer = {}, None
        for seed in seeds:
            model_runs = [r for r in runs if r.model == model and r.seed == seed]
            unfinished = [r for r in model_runs if r.state() != "done"]
            what = f"{dataset} {model.label}" + (f" seed {seed}" if seed is not None else "")
            if unfinished:
                log(f"  {what}: {len(unfinished)} fold(s) not finished, left out of the report")
                continue
            run_name = safe_name(model.label) + (f"__s{seed}" if seed is not None else "")
            per_seed[seed] = (
                run_name,
                evaluate_model(model_runs, os.path.join(evaluation_root, run_name), n_proc, log),
            )
            trainer = trainer or model_runs[0].trained_trainer
        if not per_seed:
            continue
        entry = {"label": model.label, "trainer": trainer, "plans": model.plans}
        if seeds == [None]:
            entry.update(run_name=per_seed[None][0], metrics=per_seed[None][1])
        else:
            entry["seeds"] = {seed: metrics for seed, (_, metrics) in per_seed.items()}
        evaluated.append(entry)
    if not evaluated:
        return None
    comparison, boxplots = None, []
    if len(evaluated) > 1 and seeds == [None]:  # with seeds the report tests over (seed, case) pairs itself
        comparison_dir = os.path.join(evaluation_root, "comparison")
        comparison = compare_runs([os.path.join(evaluation_root, m["run_name"]) for m in evaluated], comparison_dir)
        plots = os.path.join(comparison_dir, "boxplots")
        boxplots = (
            [
                os.path.relpath(os.path.join(plots, f), output_dir)
                for f in sorted(os.listdir(plots))
                if f.endswith(".png")
            ]
            if os.path.isdir(plots)
            else []
        )
    profile_result = None
    if profile:
        plans = {m["plans"] for m in evaluated}
        if len(plans) > 1:
            log(f"  {dataset}: models use different plans ({', '.join(sorted(plans))}); profiling each on its own")
        results = [
            _profile_dataset(
                dataset,
                configuration,
                p,
                [m["trainer"] for m in evaluated if m["plans"] == p],
                device,
                profile_repeats,
                output_dir,
                profile_threads,
                log,
            )
            for p in sorted(plans)
        ]
        profile_result = (
            results[0] if len(results) == 1 else {**results[0], "models": [m for r in results for m in r["models"]]}
        )
    return {
        "dataset": dataset,
        "configuration": configuration,
        "models": evaluated,
        "comparison": comparison,
        "profile": profile_result,
        "boxplots": boxplots,
    }


def _rounded(values, digits: int = 4) -> list:
    """Rounded numbers; None for anything not a finite number (JSON has no NaN). nnU-Net's logger holds numpy scalars
    (np.float32 is no Python float) and may hold 0-d tensors: anything float() accepts counts."""
    out = []
    for v in values:
        try:
            number = float(v)
        except (TypeError, ValueError, RuntimeError):
            number = math.nan
        out.append(round(number, digits) if math.isfinite(number) else None)
    return out


def run_summary(run) -> dict:
    """What one finished run produced, small enough to commit: nnU-Net's validation scores per case and the training
    curves per epoch (from checkpoint_final.pth's log)."""
    import torch
    from nnunetv2.paths import nnUNet_preprocessed

    from nnunetv2_hymunet.benchmark.long_range import is_long_range_dataset, score_folder
    from nnunetv2_hymunet.benchmark.presets import read_json_file

    validation = read_json_file(os.path.join(run.fold_folder, "validation", "summary.json"), "validation summary")
    checkpoint = torch.load(
        os.path.join(run.fold_folder, "checkpoint_final.pth"), map_location="cpu", weights_only=False
    )
    logging = checkpoint.get("logging", {})
    starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    dataset_json = os.path.join(nnUNet_preprocessed, run.dataset, "dataset.json")
    ending = read_json_file(dataset_json, "dataset.json").get("file_ending", "")
    per_case = [
        {
            "case": os.path.basename(c.get("reference_file", ""))[: -len(ending) or None],
            "dice": {label: _rounded([m.get("Dice")])[0] for label, m in c.get("metrics", {}).items()},
        }
        for c in validation.get("metric_per_case", [])
    ]
    summary = {
        "dataset": run.dataset,
        "configuration": run.configuration,
        "model": run.model.label,
        "trainer": run.trained_trainer,
        "plans": run.model.plans,
        "fold": run.fold,
        "seed": run.seed,
        "epochs": len(logging.get("train_losses", [])),
        "seconds_per_epoch": _rounded([e - s for s, e in zip(starts, ends)], 1),
        "curves": {k: _rounded(logging.get(k, [])) for k in ("train_losses", "val_losses", "ema_fg_dice")},
        "validation": {
            "foreground_mean_dice": _rounded([validation.get("foreground_mean", {}).get("Dice")])[0],
            "per_case": per_case,
        },
    }
    if is_long_range_dataset(dataset_json):
        scores = score_folder(
            os.path.join(run.fold_folder, "validation"),
            os.path.join(nnUNet_preprocessed, run.dataset, "gt_segmentations"),
            dataset_json,
        )
        summary["blob_class"] = {
            "accuracy": scores["accuracy"],
            "fraction": round(scores["fraction"], 4),
            "per_case": [{**c, "fraction": round(c["fraction"], 4)} for c in scores["per_case"]],
        }
    return summary


def summary_path(run, output_dir: str) -> str:
    seed = f"seed{run.seed}_" if run.seed is not None else ""
    return os.path.join(output_dir, "runs", run.dataset, safe_name(run.model.label), f"{seed}fold{run.fold}.json")


def write_run_summary(run, output_dir: str) -> None:
    """OUTPUT/runs/...json of a finished run, (re)written when missing or older than its validation."""
    path = summary_path(run, output_dir)
    validation = os.path.join(run.fold_folder, "validation", "summary.json")
    if os.path.isfile(path) and os.path.getmtime(path) >= os.path.getmtime(validation):
        return
    atomic_write_text(path, json.dumps(run_summary(run), indent=1) + "\n")
