"""`hymunet demo`: synthetic ISIC-like data -> stock nnU-Net plan / train / predict with HyM-UNet -> metrics.

The demo runs the very commands a user runs (`nnUNetv2_plan_and_preprocess`, `nnUNetv2_train -tr ...`,
`nnUNetv2_predict -tr ...`) as subprocesses, with nnUNet_raw / nnUNet_preprocessed / nnUNet_results pointing into
its own work folder, so the user's nnU-Net folders are never touched. The trainer is found the way a user's shell
finds it: through the nnUNet_extTrainer start-up hook installed with the package.
"""

import argparse
import os
import re
import shutil
import tempfile
import time

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.nnunet_tools import run_logged

DEMO_DATASET_ID = 990
DEMO_DATASET_NAME = "HyMUNetDemo"
DEMO_TRAINER = "nnUNetTrainerHyMUNet_demo"
DEFAULT_EPOCHS = 10
DEFAULT_ITERATIONS = 25

# nnU-Net output lines worth showing live; everything goes to the stage's log file
_INTERESTING = re.compile(
    r"^(Epoch \d+|train_loss|Pseudo dice|Epoch time|Mean Validation Dice|Predicting|"
    r"Plans were saved|Traceback|\w*Error)|Training done",
    re.IGNORECASE,
)
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ")


class Progress:
    def __init__(self):
        self.start = time.monotonic()

    def say(self, message: str) -> None:
        elapsed = time.monotonic() - self.start
        print(f"[{int(elapsed // 60):02d}:{elapsed % 60:04.1f}] {message}", flush=True)


def run_stage(progress: Progress, title: str, command: list, env: dict, log_path: str, show_live: bool = True):
    """Run one nnU-Net command, showing its key lines with elapsed time; the full output goes to `log_path`."""
    progress.say(f"{title}: {' '.join(os.path.basename(c) if i == 0 else c for i, c in enumerate(command))}")

    def show(line: str) -> None:
        line = _TIMESTAMP.sub("", line.rstrip())
        if show_live and line and _INTERESTING.search(line):
            progress.say(f"  {line}")

    seconds = run_logged(command, log_path, env, on_line=show, title=title)
    progress.say(f"{title}: done in {seconds:.0f} s")


def demo_environment(workdir: str, epochs: int, iterations: int, device: str) -> dict:
    env = dict(os.environ)
    env.update(
        {
            "nnUNet_raw": os.path.join(workdir, "nnUNet_raw"),
            "nnUNet_preprocessed": os.path.join(workdir, "nnUNet_preprocessed"),
            "nnUNet_results": os.path.join(workdir, "nnUNet_results"),
            "nnUNet_def_n_proc": "2",
            "nnUNet_compile": "f",
            "HYMUNET_EPOCHS": str(epochs),
            "HYMUNET_ITERATIONS": str(iterations),
            "PYTHONUNBUFFERED": "1",  # live progress from the subprocesses
        }
    )
    env.pop("nnUNet_n_proc_DA", None)  # 0 would crash plan_and_preprocess; set for training only
    return env


def evaluate_predictions(prediction_folder: str, reference_folder: str) -> list:
    import numpy as np
    from PIL import Image

    from nnunetv2_hymunet.evaluation.metrics import compute_case_metrics

    results = []
    for file_name in sorted(os.listdir(reference_folder)):
        prediction_path = os.path.join(prediction_folder, file_name)
        if not os.path.isfile(prediction_path):
            raise HyMUNetError(f"prediction missing for test case {file_name} in {prediction_folder}")
        reference = np.asarray(Image.open(os.path.join(reference_folder, file_name))) > 0
        prediction = np.asarray(Image.open(prediction_path)) > 0
        results.append(compute_case_metrics(prediction, reference))
    return results


def run_demo(
    workdir: str = None,
    epochs: int = DEFAULT_EPOCHS,
    iterations: int = DEFAULT_ITERATIONS,
    keep: bool = False,
    num_train: int = 40,
    num_test: int = 10,
    size: int = 96,
    seed: int = 0,
    device: str = "auto",
) -> dict:
    """The whole demo; returns the mean metrics over the test images."""
    import numpy as np

    from nnunetv2_hymunet.demo_data import write_isic_like_dataset

    if epochs < 1 or iterations < 1:
        raise HyMUNetError("--epochs and --iterations must be positive")
    # checked here, not minutes later inside nnU-Net: 5-fold CV needs 5 training cases, the network a 32 px image
    for flag, value, low, high in (
        ("--train-cases", num_train, 5, 10000),
        ("--test-cases", num_test, 1, 10000),
        ("--size", size, 32, 2048),
        ("--seed", seed, 0, 2**32 - 1),
    ):
        if not low <= value <= high:
            raise HyMUNetError(f"{flag} must be in {low}..{high}, got {value}")
    if workdir is not None:
        from nnunetv2_hymunet.fs_safety import check_output_path

        workdir = check_output_path(workdir, "--workdir")
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    created = workdir is None
    if created:
        workdir = tempfile.mkdtemp(prefix="hymunet_demo_")
    elif os.path.exists(workdir) and os.listdir(workdir):
        raise HyMUNetError(f"--workdir {workdir} exists and is not empty; pick a new or empty folder")
    workdir = os.path.abspath(workdir)
    os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
    progress = Progress()
    try:
        env = demo_environment(workdir, epochs, iterations, device)
        test_labels = os.path.join(workdir, "test_labels")
        progress.say(f"work folder {workdir}; device {device}")
        raw_folder = write_isic_like_dataset(
            env["nnUNet_raw"], DEMO_DATASET_ID, DEMO_DATASET_NAME, num_train, num_test, size, seed, test_labels
        )
        progress.say(
            f"synthetic ISIC-like dataset: {num_train} training + {num_test} test images of {size}x{size} "
            f"px in {raw_folder}"
        )
        dataset = str(DEMO_DATASET_ID)
        logs = os.path.join(workdir, "logs")
        run_stage(
            progress,
            "plan and preprocess",
            ["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "2d", "-np", "2", "-npfp", "2"],
            env,
            os.path.join(logs, "plan_and_preprocess.log"),
        )
        train_env = dict(env, nnUNet_n_proc_DA="1" if device == "cpu" else "4")
        progress.say(
            f"training {DEMO_TRAINER} on fold 0: {epochs} epochs x {iterations} iterations, then nnU-Net's "
            "validation of the fold"
        )
        run_stage(
            progress,
            "train",
            ["nnUNetv2_train", dataset, "2d", "0", "-tr", DEMO_TRAINER, "-device", device],
            train_env,
            os.path.join(logs, "train.log"),
        )
        predictions = os.path.join(workdir, "predictions")
        run_stage(
            progress,
            "predict held-out images",
            [
                "nnUNetv2_predict",
                "-i",
                os.path.join(raw_folder, "imagesTs"),
                "-o",
                predictions,
                "-d",
                dataset,
                "-c",
                "2d",
                "-f",
                "0",
                "-tr",
                DEMO_TRAINER,
                "-device",
                device,
                "-npp",
                "1",
                "-nps",
                "1",
            ],
            env,
            os.path.join(logs, "predict.log"),
        )
        per_case = evaluate_predictions(predictions, test_labels)
        means = {k: float(np.mean([c[k] for c in per_case])) for k in ("dice", "iou", "precision", "hd95")}
        progress.say(
            f"test set ({len(per_case)} synthetic images, mean per image): Dice {means['dice']:.4f}  IoU "
            f"{means['iou']:.4f}  precision {means['precision']:.4f}  HD95 {means['hd95']:.2f} px"
        )
        if keep or not created:
            progress.say(f"kept {workdir} (model in nnUNet_results/, logs in logs/, predictions in predictions/)")
        return means
    finally:
        if created and not keep:
            shutil.rmtree(workdir, ignore_errors=True)


def demo(args: argparse.Namespace) -> int:
    run_demo(
        workdir=args.workdir,
        epochs=args.epochs,
        iterations=args.iterations,
        keep=args.keep,
        num_train=args.train_cases,
        num_test=args.test_cases,
        size=args.size,
        seed=args.seed,
        device=args.device,
    )
    return 0


def add_subparsers(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train and test HyM-UNet on synthetic ISIC-like images with the stock nnU-Net commands",
        description="Generates a small synthetic ISIC-like dataset, then runs nnUNetv2_plan_and_preprocess, "
        f"nnUNetv2_train -tr {DEMO_TRAINER} (fold 0) and nnUNetv2_predict on held-out images, and prints Dice, IoU, "
        "precision and HD95 (px). Uses its own nnUNet_raw/preprocessed/results under the work folder.",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="work folder (new or empty; default: a temporary folder, removed at the end unless --keep)",
    )
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"training epochs (default {DEFAULT_EPOCHS})")
    p.add_argument(
        "--iterations",
        type=int,
        default=DEFAULT_ITERATIONS,
        help=f"training iterations per epoch (default {DEFAULT_ITERATIONS})",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--train-cases", type=int, default=40, help="synthetic training images (default 40)")
    p.add_argument("--test-cases", type=int, default=10, help="synthetic held-out test images (default 10)")
    p.add_argument("--size", type=int, default=96, help="image edge in pixels (default 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the synthetic data (default 0)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="training/prediction device (default: cuda when available)",
    )
    p.set_defaults(func=demo)
