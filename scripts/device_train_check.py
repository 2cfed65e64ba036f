#!/usr/bin/env python
"""Train a few iterations of nnUNetTrainerHyMUNet next to nnUNetTrainer on the same plans, and compare step time.

For a GPU machine (AMP on, as nnU-Net trains on CUDA): it writes a small synthetic dataset into a temporary folder,
plans and preprocesses it with nnU-Net's API, then for each trainer builds the network from the same plans, runs
`warmup + iterations` of nnU-Net's own `train_step` (autocast + GradScaler on CUDA) on batches from nnU-Net's data
loader, and reports the median step time (data loading excluded), peak GPU memory, parameter count, whether every
loss was finite, and the scan backend in use. Installs nothing; touches no nnU-Net folders of the user.

    python scripts/device_train_check.py                       # 2D, 256 x 256, batch 12, 20 timed iterations
    python scripts/device_train_check.py --dim 3               # 3D, 128^3 volumes, batch 2
    python scripts/device_train_check.py --device cpu --iterations 2 --size 64     # smoke run without a GPU
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

TRAINERS = ("nnUNetTrainer", "nnUNetTrainerHyMUNet")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="default cuda")
    p.add_argument("--dim", type=int, default=2, choices=(2, 3), help="2D (RGB lesions) or 3D (MRI-like volumes)")
    p.add_argument("--size", type=int, default=None, help="image edge in voxels (default 256 in 2D, 128 in 3D)")
    p.add_argument(
        "--cases", type=int, default=8, help="synthetic training cases, at least 5 (nnU-Net's 5 folds; default 8)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="batch size written into the plans (default 12 in 2D, 2 in 3D, nnU-Net's usual values)",
    )
    p.add_argument("--iterations", type=int, default=20, help="timed iterations per trainer (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first (default 3)")
    p.add_argument("--trainers", nargs="+", default=list(TRAINERS), help=f"default: {' '.join(TRAINERS)}")
    p.add_argument("--compile", action="store_true", help="let nnU-Net torch.compile (off by default for both)")
    p.add_argument("--workdir", default=None, help="keep everything here instead of a temporary folder")
    p.add_argument("--output", default=None, help="write the results as JSON to this file")
    return p.parse_args(argv)


def prepare_dataset(workdir: str, dim: int, size: int, cases: int, batch_size: int) -> tuple:
    """Synthetic raw dataset -> nnU-Net fingerprint, plans and preprocessing (in this process)."""
    from nnunetv2_hymunet.demo_data import write_blob_volume_dataset, write_isic_like_dataset

    dataset_id = 995
    if dim == 2:
        write_isic_like_dataset(
            os.environ["nnUNet_raw"],
            dataset_id,
            "DeviceCheck",
            cases,
            0,
            size,
            0,
            os.path.join(workdir, "unused_test_labels"),
        )
        configuration = "2d"
    else:
        write_blob_volume_dataset(
            os.environ["nnUNet_raw"], dataset_id, "DeviceCheck", cases, 0, (size,) * 3, 0, spacing_zyx=(1.0, 1.0, 1.0)
        )
        configuration = "3d_fullres"
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    n_proc = max(1, min(8, os.cpu_count() or 1))
    extract_fingerprints([dataset_id], num_processes=n_proc, show_progress_bar=False)
    plan_experiments([dataset_id])
    plans_file = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset995_DeviceCheck", "nnUNetPlans.json")
    plans = load_json(plans_file)
    plans["configurations"][configuration]["batch_size"] = batch_size  # the 5 % dataset cap would force 2
    save_json(plans, plans_file, sort_keys=False)
    preprocess([dataset_id], configurations=(configuration,), num_processes=(n_proc,), show_progress_bar=False)
    return dataset_id, configuration


def time_trainer(trainer_name: str, dataset_id: int, configuration: str, device, warmup: int, iterations: int):
    import numpy as np
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    from nnunetv2_hymunet.ssm import resolve_backend

    trainer = get_trainer_from_args(str(dataset_id), configuration, 0, trainer_name, "nnUNetPlans", device=device)
    trainer.num_epochs = 1
    trainer.on_train_start()  # network, optimiser, loss, data loaders, deep supervision on
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_times, losses = [], []
    for i in range(warmup + iterations):
        batch = next(trainer.dataloader_train)
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(float(trainer.train_step(batch)["loss"]))
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            step_times.append(time.perf_counter() - start)
    network = trainer.network
    result = {
        "trainer": trainer_name,
        "network": type(network).__name__,
        "parameters": int(sum(p.numel() for p in network.parameters())),
        "batch_size": int(trainer.batch_size),
        "patch_size": [int(s) for s in trainer.configuration_manager.patch_size],
        "amp": cuda,
        "compiled": bool(trainer._do_i_compile()),
        "median_step_s": statistics.median(step_times),
        "min_step_s": min(step_times),
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 1024**3 if cuda else None,
        "losses_finite": bool(np.all(np.isfinite(losses))),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "scan_backend": resolve_backend(device) if type(network).__name__ == "HyMUNet" else None,
    }
    trainer.disable_checkpointing = True
    trainer.on_train_end()  # stops the data-augmentation workers
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cases < 5:
        print("--cases must be at least 5 (nnU-Net splits the training cases into 5 folds)", file=sys.stderr)
        return 1
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible; use --device cpu for a smoke run", file=sys.stderr)
        return 1
    size = args.size or (256 if args.dim == 2 else 128)
    batch_size = args.batch_size or (12 if args.dim == 2 else 2)
    workdir = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="hymunet_device_check_")
    for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[name] = os.path.join(workdir, name)  # nnU-Net 2.8 reads these lazily
        os.makedirs(os.environ[name], exist_ok=True)
    os.environ["nnUNet_compile"] = "t" if args.compile else "f"
    os.environ.setdefault("nnUNet_n_proc_DA", str(max(1, min(12, (os.cpu_count() or 2) - 2))))
    device = torch.device(args.device)
    try:
        started = time.perf_counter()
        dataset_id, configuration = prepare_dataset(workdir, args.dim, size, args.cases, batch_size)
        print(f"dataset ready in {time.perf_counter() - started:.0f} s", flush=True)
        results = [
            time_trainer(name, dataset_id, configuration, device, args.warmup, args.iterations)
            for name in args.trainers
        ]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(
        f"\n{configuration}, device {gpu}, torch {torch.__version__}, {args.iterations} timed iterations after "
        f"{args.warmup} warm-up"
    )
    print(
        f"{'trainer':<24}{'network':<16}{'params':>12}{'batch':>7}  {'patch':<16}{'median ms':>10}{'peak GB':>9}"
        f"  finite  backend"
    )
    for r in results:
        peak = f"{r['peak_memory_gb']:.2f}" if r["peak_memory_gb"] is not None else "-"
        print(
            f"{r['trainer']:<24}{r['network']:<16}{r['parameters']:>12,}{r['batch_size']:>7}  "
            f"{'x'.join(map(str, r['patch_size'])):<16}{r['median_step_s'] * 1000:>10.1f}{peak:>9}  "
            f"{str(r['losses_finite']):<6}  {r['scan_backend'] or '-'}"
        )
    by_name = {r["trainer"]: r for r in results}
    if "nnUNetTrainer" in by_name and "nnUNetTrainerHyMUNet" in by_name:
        ratio = by_name["nnUNetTrainerHyMUNet"]["median_step_s"] / by_name["nnUNetTrainer"]["median_step_s"]
        print(f"step time nnUNetTrainerHyMUNet / nnUNetTrainer: {ratio:.2f}x")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"device": gpu, "configuration": configuration, "results": results}, f, indent=2)
    return 0 if all(r["losses_finite"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main())
