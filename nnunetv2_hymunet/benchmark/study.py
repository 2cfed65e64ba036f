"""`hymunet benchmark run`: preprocess what is missing, train what is not finished, evaluate, profile, report."""

import json
import os
import sys
import time

from nnunetv2_hymunet.benchmark import runner
from nnunetv2_hymunet.benchmark.report import build_report, evaluate_model, safe_name
from nnunetv2_hymunet.errors import HyMUNetError


def _profile_dataset(dataset: str, configuration: str, plans: str, trainers: list, device: str, repeats: int,
                     output_dir: str, threads=None, log=print):
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
    result = profile_models(dataset_plan(dataset, configuration, plans), trainers, device=device, repeats=repeats,
                            threads=threads, log=log)
    write_profile_outputs(result, folder)
    return result


def run_benchmark(datasets, configurations, models, folds, output_dir, device="cpu", reference=None,
                  short_schedule=None, num_processes=None, n_proc_da=None, dry_run=False, emit_slurm=None,
                  train=True, profile=True, profile_repeats=3, profile_threads=None, slurm_options=None,
                  log=print) -> dict:
    """Returns {'commands': [...], 'report': paths or None, 'trained': [run descriptions]}."""
    models = [m if isinstance(m, runner.Model) else runner.Model.parse(m) for m in models]
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        raise HyMUNetError(f"-tr lists a model twice: {labels}")
    reference = reference or labels[0]
    if reference not in labels:
        raise HyMUNetError(f"--reference-trainer {reference!r} is not among the models {labels}")
    runs = runner.plan_runs(datasets, configurations, models, folds, bool(short_schedule))
    preprocess_env = runner.subprocess_environment(None, num_processes, None, training=False)
    train_env = runner.subprocess_environment(short_schedule, num_processes, n_proc_da, training=True)
    n_proc = num_processes or 1

    preprocessing, seen = [], set()
    for run in runs:
        key = (run.dataset, run.configuration, run.model.plans)
        if key not in seen:
            seen.add(key)
            command = runner.preprocessing_command(run.dataset, run.configuration, run.model.plans, n_proc)
            if command:
                preprocessing.append(command)
    pending = [r for r in runs if r.state() != "done"]
    commands = [runner.shell_line(c, preprocess_env) for c in preprocessing]
    commands += [runner.shell_line(r.command(device), train_env) for r in pending]

    if emit_slurm:
        runner.write_slurm_script(emit_slurm, runner.slurm_script(pending, device, train_env, preprocessing,
                                                                  **(slurm_options or {})))
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
        seconds = runner.execute(command, preprocess_env, os.path.join(logs, f"preprocess_D{command[2]}.log"), log)
        ledger.record(action="preprocess", command=runner.shell_line(command), seconds=round(seconds, 1))
    trained = []
    for run in runs:
        state = run.state()
        if state == "done":
            ledger.record(action="skip", run=run.describe(), reason="finished")
            continue
        if not train:
            ledger.record(action="skip", run=run.describe(), reason=f"--no-train ({state})")
            continue
        command = run.command(device, state)
        log(f"{state}: {run.describe()}")
        log_file = os.path.join(logs, safe_name(f"{run.dataset}__{run.model.label}__{run.configuration}__"
                                                f"fold{run.fold}") + ".log")
        seconds = runner.execute(command, train_env, log_file, log)
        trained.append(run.describe())
        ledger.record(action=state, run=run.describe(), command=runner.shell_line(command, train_env),
                      seconds=round(seconds, 1), schedule=short_schedule or "trainer default")
        log(f"  finished in {seconds:.0f} s")

    entries = []
    for dataset, configuration in dict.fromkeys((r.dataset, r.configuration) for r in runs):
        entry = _dataset_entry(dataset, configuration, [r for r in runs if r.dataset == dataset], models, output_dir,
                               device, profile, profile_repeats, profile_threads, n_proc, log)
        if entry:
            entries.append(entry)
    header = [f"Command: `{' '.join(sys.argv)}`",
              f"Models: {', '.join(labels)} (reference {reference}); short schedule: "
              f"{short_schedule or 'no (trainer defaults)'}; device {device}; "
              f"load average at report time {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}."]
    paths = build_report(entries, reference, output_dir, header) if entries else None
    if paths:
        log(f"report: {paths['md']}")
    return {"commands": commands, "report": paths, "trained": trained}


def _dataset_entry(dataset, configuration, runs, models, output_dir, device, profile, profile_repeats, profile_threads,
                   n_proc, log):
    from nnunetv2_hymunet.evaluation import compare_runs

    evaluation_root = os.path.join(output_dir, "evaluation", dataset)
    evaluated = []
    for model in models:
        model_runs = [r for r in runs if r.model == model]
        unfinished = [r for r in model_runs if r.state() != "done"]
        if unfinished:
            log(f"  {dataset} {model.label}: {len(unfinished)} fold(s) not finished, left out of the report")
            continue
        run_name = safe_name(model.label)
        metrics = evaluate_model(model_runs, os.path.join(evaluation_root, run_name), n_proc, log)
        evaluated.append({"label": model.label, "trainer": model_runs[0].trained_trainer, "run_name": run_name,
                          "plans": model.plans, "metrics": metrics})
    if not evaluated:
        return None
    comparison, boxplots = None, []
    if len(evaluated) > 1:
        comparison_dir = os.path.join(evaluation_root, "comparison")
        comparison = compare_runs([os.path.join(evaluation_root, m["run_name"]) for m in evaluated], comparison_dir)
        plots = os.path.join(comparison_dir, "boxplots")
        boxplots = [os.path.relpath(os.path.join(plots, f), output_dir) for f in sorted(os.listdir(plots))
                    if f.endswith(".png")] if os.path.isdir(plots) else []
    profile_result = None
    if profile:
        plans = {m["plans"] for m in evaluated}
        if len(plans) > 1:
            log(f"  {dataset}: models use different plans ({', '.join(sorted(plans))}); profiling each on its own")
        results = [_profile_dataset(dataset, configuration, p, [m["trainer"] for m in evaluated if m["plans"] == p],
                                    device, profile_repeats, output_dir, profile_threads, log) for p in sorted(plans)]
        profile_result = results[0] if len(results) == 1 else {**results[0],
                                                               "models": [m for r in results for m in r["models"]]}
    return {"dataset": dataset, "configuration": configuration, "models": evaluated, "comparison": comparison,
            "profile": profile_result, "boxplots": boxplots}
