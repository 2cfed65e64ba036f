"""End to end through the stock nnU-Net commands (subprocesses), 2D: the user's commands with -tr HyM-UNet.

One tiny planned dataset is shared (conftest.planned_tiny_2d). The training is interrupted after its first
checkpoint and resumed with --c, then validated again with --val --npz, predicted with two scan backends and
passed to find_best_configuration. The -p nnUNetHyMUNetPlans route is exercised with nnU-Net's stock trainer.
"""

import os
import re
import subprocess
import threading

import numpy as np
import pytest
import torch
from conftest import executable, predict_command, run_cli
from PIL import Image

from nnunetv2_hymunet.cli import main as hymunet_main

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerHyMUNet_demo"
# 2 epochs of 2 iterations, a checkpoint after every epoch: interrupted after epoch 0, resumed for epoch 1
SCHEDULE = {"HYMUNET_EPOCHS": "2", "HYMUNET_ITERATIONS": "2", "HYMUNET_VAL_ITERATIONS": "1", "HYMUNET_SAVE_EVERY": "1"}
EPOCH_LINE = re.compile(r": Epoch (\d+)\s*$")


def _train_command(dataset: dict, *extra) -> list:
    return [executable("nnUNetv2_train"), str(dataset["id"]), "2d", "0", "-tr", TRAINER, "-device", "cpu", *extra]


def _epochs_started(output: str) -> list:
    return [int(m.group(1)) for line in output.splitlines() if (m := EPOCH_LINE.search(line))]


@pytest.fixture(scope="module")
def resumed_training(planned_tiny_2d):
    """Train, kill the process right after the first checkpoint, resume with --c until it finishes."""
    dataset = planned_tiny_2d
    env = dict(dataset["env"], nnUNet_n_proc_DA="0", **SCHEDULE)
    model = os.path.join(dataset["results"], f"{TRAINER}__nnUNetPlans__2d")
    fold = os.path.join(model, "fold_0")
    proc = subprocess.Popen(
        _train_command(dataset), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    first_output, latest_at_kill = [], False
    try:
        for line in proc.stdout:
            first_output.append(line)
            if EPOCH_LINE.search(line) and EPOCH_LINE.search(line).group(1) == "1":
                # epoch 0 ended, and on_epoch_end wrote checkpoint_latest.pth before "Epoch 1" was printed
                latest_at_kill = os.path.isfile(os.path.join(fold, "checkpoint_latest.pth"))
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
        watchdog.cancel()
    killed_before_the_end = not os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    resumed_output = run_cli(_train_command(dataset, "--c"), env)
    return {
        "dataset": dataset,
        "model": model,
        "fold": fold,
        "first_output": "".join(first_output),
        "latest_at_kill": latest_at_kill,
        "killed_before_the_end": killed_before_the_end,
        "resumed_output": resumed_output,
    }


@pytest.fixture(scope="module")
def default_backend_prediction(resumed_training, tmp_path_factory):
    dataset = resumed_training["dataset"]
    output = str(tmp_path_factory.mktemp("pred_default"))
    run_cli(
        predict_command(dataset, output, "2d", TRAINER, "--save_probabilities"),
        dataset["env"],
    )
    return output


def test_training_resumes_from_its_checkpoint_with_c(resumed_training):
    r = resumed_training
    assert _epochs_started(r["first_output"]) == [0, 1]
    assert r["latest_at_kill"] and r["killed_before_the_end"]
    resumed = _epochs_started(r["resumed_output"])
    assert resumed == [1], resumed
    assert os.path.isfile(os.path.join(r["fold"], "checkpoint_final.pth"))
    assert "Mean Validation Dice" in r["resumed_output"]
    checkpoint = torch.load(os.path.join(r["fold"], "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER and checkpoint["current_epoch"] == 2
    assert any("mamba" in key for key in checkpoint["network_weights"])


def test_val_npz_predict_and_find_best_configuration(resumed_training, default_backend_prediction):
    dataset, fold = resumed_training["dataset"], resumed_training["fold"]
    run_cli(_train_command(dataset, "--val", "--npz"), dict(dataset["env"], nnUNet_n_proc_DA="0"))
    validation = os.path.join(fold, "validation")
    validated = sorted(f[:-4] for f in os.listdir(validation) if f.endswith(".png"))
    assert validated and validated == sorted(f[:-4] for f in os.listdir(validation) if f.endswith(".npz"))
    assert os.path.isfile(os.path.join(validation, "summary.json"))

    test_images = sorted(os.listdir(os.path.join(dataset["raw"], "imagesTs")))
    predicted = sorted(f for f in os.listdir(default_backend_prediction) if f.endswith(".png"))
    assert predicted == [f.replace("_0000.png", ".png") for f in test_images]
    for name in predicted:
        mask = np.asarray(Image.open(os.path.join(default_backend_prediction, name)))
        assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1}

    output = run_cli(
        ["nnUNetv2_find_best_configuration", str(dataset["id"]), "-c", "2d", "-tr", TRAINER, "-f", "0", "-np", "1"],
        dataset["env"],
    )
    instructions = os.path.join(dataset["results"], "inference_instructions.txt")
    assert os.path.isfile(os.path.join(dataset["results"], "inference_information.json")), output
    assert TRAINER in open(instructions).read()


def test_a_checkpoint_predicts_the_same_with_another_scan_backend(
    resumed_training, default_backend_prediction, tmp_path, monkeypatch
):
    # nnU-Net's predictor in this process (saves a CLI start-up); the CLI prediction used the default backend
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from nnunetv2_hymunet.ssm import resolve_backend

    monkeypatch.delenv("HYMUNET_SCAN_BACKEND", raising=False)
    assert resolve_backend(torch.device("cpu")) != "reference"  # training and the CLI prediction used a fast one
    monkeypatch.setenv("HYMUNET_SCAN_BACKEND", "reference")
    dataset = resumed_training["dataset"]
    output = str(tmp_path / "pred_reference")
    os.makedirs(output)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False)
    predictor.initialize_from_trained_model_folder(resumed_training["model"], use_folds=(0,))
    predictor.predict_from_files_sequential(os.path.join(dataset["raw"], "imagesTs"), output, save_probabilities=True)
    names = sorted(f for f in os.listdir(default_backend_prediction) if f.endswith(".npz"))
    assert names and names == sorted(f for f in os.listdir(output) if f.endswith(".npz"))
    for name in names:
        ours = np.load(os.path.join(output, name))["probabilities"]
        theirs = np.load(os.path.join(default_backend_prediction, name))["probabilities"]
        # float32 backends differ by rounding (~1e-7 relative in the scan); a tiny, barely trained network can amplify
        # that at single pixels (2e-4 seen), so bound the worst pixel loosely and the typical one tightly
        np.testing.assert_allclose(ours, theirs, atol=2e-3)
        assert np.abs(ours - theirs).mean() < 1e-5


def test_stock_trainer_trains_and_predicts_hymunet_through_the_plans_route(planned_tiny_2d, tmp_path, monkeypatch):
    dataset = planned_tiny_2d
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_compile"):
        monkeypatch.setenv(key, dataset["env"][key])
    assert hymunet_main(["plan", "-d", str(dataset["id"]), "-c", "2d"]) == 0  # in-process: one CLI start-up less
    assert os.path.isfile(os.path.join(dataset["preprocessed"], "nnUNetHyMUNetPlans.json"))
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    trainer = get_trainer_from_args(
        str(dataset["id"]), "2d", 0, "nnUNetTrainer", "nnUNetHyMUNetPlans", device=torch.device("cpu")
    )
    assert type(trainer) is nnUNetTrainer  # nnU-Net's own class, unchanged
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = 1, 2, 1
    trainer.run_training()
    assert type(trainer.network).__name__ == "HyMUNet"

    output = str(tmp_path / "pred")
    run_cli(
        predict_command(dataset, output, "2d", "nnUNetTrainer", "-p", "nnUNetHyMUNetPlans"),
        dataset["env"],
    )
    assert len([f for f in os.listdir(output) if f.endswith(".png")]) == len(
        os.listdir(os.path.join(dataset["raw"], "imagesTs"))
    )
