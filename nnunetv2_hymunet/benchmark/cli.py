"""`hymunet profile` and `hymunet benchmark {run,make-suite}`: argument parsing only; the work is in the modules
next to this one (profiling.py, study.py, suite.py)."""

import os

from nnunetv2_hymunet.benchmark.schedule import SCHEDULE_ENV
from nnunetv2_hymunet.errors import HyMUNetError


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_profile(args) -> int:
    from nnunetv2_hymunet.benchmark.models import DEFAULT_MODELS
    from nnunetv2_hymunet.benchmark.presets import dataset_plan, preset_plan
    from nnunetv2_hymunet.benchmark.profile_report import describe_run, markdown_table, write_profile_outputs
    from nnunetv2_hymunet.benchmark.profiling import profile_models

    if (args.plan is None) == (args.dataset is None):
        raise HyMUNetError("give either --plan NAME (built-in) or -d DATASET -c CONFIGURATION")
    if args.plan:
        plan = preset_plan(args.plan)
    else:
        if not args.configuration:
            raise HyMUNetError("-d needs -c CONFIGURATION (e.g. 2d, 3d_fullres)")
        plan = dataset_plan(args.dataset, args.configuration, args.plans)
    native = None
    if args.patch_size:
        native = plan.configuration_dict["patch_size"]
        plan = plan.with_patch_size(args.patch_size)
    result = profile_models(
        plan,
        args.trainers or list(DEFAULT_MODELS),
        device=args.device or _default_device(),
        batch_size=args.batch_size,
        repeats=args.repeats,
        warmup=args.warmup,
        case_shape=args.case_shape,
        sliding_window=not args.no_sliding_window,
        native_patch_size=native,
        threads=args.threads,
    )
    print()
    print(describe_run(result))
    print()
    print(markdown_table(result))
    if args.output:
        paths = write_profile_outputs(result, args.output)
        print("\nwrote " + ", ".join(paths.values()))
    return 0


def run_benchmark_command(args) -> int:
    from nnunetv2_hymunet.benchmark.study import run_benchmark

    schedule = None
    values = (args.epochs, args.iterations, args.val_iterations)
    if any(v is not None for v in values):
        if any(v is None or v < 1 for v in values):
            raise HyMUNetError("--epochs, --iterations and --val-iterations go together, each a positive integer")
        schedule = dict(zip(SCHEDULE_ENV, values))
    if not args.output and not (args.dry_run or args.emit_slurm):
        raise HyMUNetError("-o/--output DIR is required (where logs, evaluations and the report go)")
    slurm = {
        "time_limit": args.slurm_time,
        "gpus": args.slurm_gpus,
        "cpus": args.slurm_cpus,
        "partition": args.slurm_partition,
    }
    run_benchmark(
        args.dataset,
        args.configuration,
        args.trainers,
        args.folds,
        os.path.abspath(args.output) if args.output else None,
        device=args.device or _default_device(),
        reference=args.reference_trainer,
        short_schedule=schedule,
        num_processes=args.num_processes,
        n_proc_da=args.n_proc_da,
        dry_run=args.dry_run,
        emit_slurm=args.emit_slurm,
        train=not args.no_train,
        profile=not args.no_profile,
        profile_repeats=args.profile_repeats,
        profile_threads=args.profile_threads,
        slurm_options=slurm,
        seeds=args.seeds,
    )
    return 0


def run_long_range_plans(args) -> int:
    from nnunetv2_hymunet.benchmark.long_range import write_long_range_plans

    if args.stages is not None and args.stages < 2:
        raise HyMUNetError(f"--stages {args.stages}: need at least 2")
    write_long_range_plans(args.dataset, args.configuration, args.plans, args.stages)
    return 0


def run_make_suite(args) -> int:
    from nnunetv2_hymunet.benchmark.suite import TASKS, make_suite
    from nnunetv2_hymunet.conversion.raw_dataset import resolve_output_root

    folders = make_suite(
        resolve_output_root(args.output), args.first_id, args.size, args.tasks or TASKS, args.overwrite, args.seed
    )
    for folder in folders:
        print(folder)
    return 0


def add_subparsers(subparsers) -> None:
    p = subparsers.add_parser(
        "profile",
        help="parameters, FLOPs, latency, peak memory and sliding-window time of nnU-Net and HyM-UNet "
        "networks on a plan",
        description="Builds every model through its trainer's build_network_architecture on one plan (a dataset's "
        "plans or a built-in one) and measures it side by side, interleaved, in one process.",
    )
    source = p.add_argument_group("plan (one of)")
    source.add_argument("--plan", help="built-in plan: isic-like-2d or brats-like-3d")
    source.add_argument("-d", "--dataset", help="dataset id or name (reads $nnUNet_preprocessed/DatasetX/PLANS.json)")
    p.add_argument("-c", "--configuration", help="configuration of the dataset's plans (2d, 3d_fullres, ...)")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument(
        "-tr",
        "--trainers",
        nargs="+",
        help="trainer class names and/or ResEncM (default: nnUNetTrainer "
        "ResEncM nnUNetTrainerHyMUNet nnUNetTrainerHyMUNet_noMGF "
        "nnUNetTrainerHyMUNet_noMamba)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    p.add_argument("--batch-size", type=int, help="default: the plan's on CUDA, at most 2 on CPU")
    p.add_argument(
        "--patch-size",
        type=int,
        nargs="+",
        help="override the plan's patch size (FLOPs at the plan's own patch are reported too)",
    )
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument(
        "--case-shape",
        type=int,
        nargs="+",
        help="image shape for the sliding-window timing (default: the plan's median image size)",
    )
    p.add_argument("--no-sliding-window", action="store_true", help="skip the sliding-window timing")
    p.add_argument("--threads", type=int, help="torch CPU threads during the measurement (default: torch's)")
    p.add_argument("-o", "--output", help="folder for profile.json, profile.md, profile.png")
    p.set_defaults(func=run_profile)

    b = subparsers.add_parser(
        "benchmark",
        help="train, evaluate and compare models across datasets with the stock "
        "nnU-Net commands; make the synthetic benchmark suite",
    )
    commands = b.add_subparsers(dest="benchmark_command", metavar="{run,make-suite,long-range-plans}", required=True)
    r = commands.add_parser(
        "run",
        help="run (resumably) datasets x trainers x folds and build the report",
        description="Preprocesses datasets that are not, trains every (dataset, trainer, fold) that is not finished "
        "with nnUNetv2_train ... --npz, evaluates the cross-validation predictions, profiles the networks "
        "and writes OUTPUT/report.{md,json}. Rerunning skips finished folds.",
    )
    r.add_argument("-d", "--dataset", nargs="+", required=True, help="dataset ids or names")
    r.add_argument(
        "-c",
        "--configuration",
        nargs="+",
        default=["2d"],
        help="one configuration for all datasets, or one per dataset (default 2d)",
    )
    r.add_argument(
        "-tr",
        "--trainers",
        nargs="+",
        required=True,
        help="trainer class names, optionally TRAINER:PLANS (e.g. nnUNetTrainer:nnUNetResEncUNetMPlans)",
    )
    r.add_argument(
        "-f",
        "--folds",
        nargs="+",
        type=int,
        default=[0, 1, 2, 3, 4],
        help="default 0 1 2 3 4 (must exist in the dataset's splits)",
    )
    r.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        help="repeat every (dataset, trainer, fold) once per seed, as the seeded trainer copy "
        "<Trainer>_bench_s<seed> (own result folder); the report gives mean ± sd across seeds and "
        "paired tests over (seed, case) pairs",
    )
    r.add_argument("--reference-trainer", help="model the others are tested against (default: the first -tr)")
    r.add_argument("-o", "--output", help="report folder (also logs/, evaluation/, profile/, runs.jsonl)")
    r.add_argument(
        "--device",
        choices=("cpu", "cuda", "mps"),
        help="passed to nnUNetv2_train -device (default: cuda when available)",
    )
    r.add_argument("--epochs", type=int, help="short schedule: train <Trainer>_bench copies with this many epochs")
    r.add_argument("--iterations", type=int, help="short schedule: training iterations per epoch")
    r.add_argument("--val-iterations", type=int, help="short schedule: validation iterations per epoch")
    r.add_argument(
        "-np",
        "--num-processes",
        type=int,
        help="nnUNet_def_n_proc for nnU-Net subprocesses and -np for preprocessing (default: nnU-Net's)",
    )
    r.add_argument("--n-proc-da", type=int, help="nnUNet_n_proc_DA for training (0: augmentation in the main process)")
    r.add_argument("--dry-run", action="store_true", help="print the commands that would run, run nothing")
    r.add_argument("--emit-slurm", metavar="FILE", help="write a Slurm job array of the pending trainings and stop")
    r.add_argument("--slurm-time", default="72:00:00")
    r.add_argument("--slurm-gpus", type=int, default=1)
    r.add_argument("--slurm-cpus", type=int, default=8)
    r.add_argument("--slurm-partition")
    r.add_argument("--no-train", action="store_true", help="only evaluate and report what is finished")
    r.add_argument("--no-profile", action="store_true", help="leave the efficiency columns out")
    r.add_argument("--profile-repeats", type=int, default=3)
    r.add_argument("--profile-threads", type=int, help="torch CPU threads while profiling (default: torch's)")
    r.set_defaults(func=run_benchmark_command)

    s = commands.add_parser(
        "make-suite",
        help="write the synthetic benchmark datasets (nnU-Net raw format)",
        description="SynthLesion2D (ISIC-like, id first), SynthRegions3D (BraTS-like regions, "
        "first+1) and SynthOppositeKey2D (first+3: a blob's class is given by the "
        "marker opposite it through the image centre, out of a conv-only network's "
        "reach with the plans nnUNetLongRangePlans).",
    )
    s.add_argument("-o", "--output", help="nnU-Net raw folder (default $nnUNet_raw)")
    s.add_argument("--first-id", type=int, default=971, help="dataset id of the first task (default 971)")
    s.add_argument("--size", choices=("small", "tiny"), default="small")
    s.add_argument("--tasks", nargs="+", help="subset of SynthLesion2D SynthRegions3D SynthOppositeKey2D")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true", help="replace datasets with the same ids")
    s.set_defaults(func=run_make_suite)

    lr = commands.add_parser(
        "long-range-plans",
        help="derive nnUNetLongRangePlans (network cut below the blob-marker distance) from nnUNetPlans",
        description="Writes $nnUNet_preprocessed/DATASET/nnUNetLongRangePlans.json: the dataset's nnUNetPlans "
        "(same preprocessing) with the network cut to the deepest number of stages whose conv-only "
        "receptive field is smaller than the minimum blob-marker distance of the long-range task; prints "
        "the receptive field (analytic and measured on the conv-only trainers' networks).",
    )
    lr.add_argument("-d", "--dataset", required=True, help="dataset id or name (planned with nnUNetPlans)")
    lr.add_argument("-c", "--configuration", default="2d", help="default 2d")
    lr.add_argument("-p", "--plans", default="nnUNetPlans", help="plans to cut (default nnUNetPlans)")
    lr.add_argument(
        "--stages",
        type=int,
        help="number of stages (default: the deepest below the dataset's minimum blob-marker distance)",
    )
    lr.set_defaults(func=run_long_range_plans)
