"""`hymunet demo` pieces (fast): its data, stage runner, metrics and argument checks. The full demo run (about 8
minutes on 2 CPU cores) is measured by hand and reported in the README; the same stock-CLI chain is covered by
test_e2e_2d.py on a tiny dataset."""

import os
import sys

import numpy as np
import pytest
from PIL import Image

from nnunetv2_hymunet.cli import main as hymunet_main
from nnunetv2_hymunet.demo import DEMO_TRAINER, Progress, demo_environment, evaluate_predictions, run_stage
from nnunetv2_hymunet.demo_data import write_isic_like_dataset
from nnunetv2_hymunet.errors import HyMUNetError


def test_dataset_is_an_nnunet_raw_dataset_with_held_out_labels(tmp_path):
    folder = write_isic_like_dataset(str(tmp_path / "raw"), 990, "Demo", 5, 2, 48, 0, str(tmp_path / "test_labels"))
    assert sorted(os.listdir(os.path.join(folder, "imagesTr")))[0] == "case_0000_0000.png"
    assert len(os.listdir(os.path.join(folder, "labelsTr"))) == 5
    assert sorted(os.listdir(tmp_path / "test_labels")) == ["case_0005.png", "case_0006.png"]
    image = np.asarray(Image.open(os.path.join(folder, "imagesTr", "case_0000_0000.png")))
    mask = np.asarray(Image.open(os.path.join(folder, "labelsTr", "case_0000.png")))
    assert image.shape == (48, 48, 3) and mask.shape == (48, 48) and set(np.unique(mask)) == {0, 1}

    from batchgenerators.utilities.file_and_folder_operations import load_json

    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    assert dataset_json["numTraining"] == 5 and dataset_json["file_ending"] == ".png"
    assert len(dataset_json["channel_names"]) == 3


def test_metrics_of_predictions(tmp_path):
    reference = np.zeros((20, 20), np.uint8)
    reference[5:15, 5:15] = 1
    prediction = np.zeros_like(reference)
    prediction[5:15, 5:10] = 1
    for folder, array in (("ref", reference), ("pred", prediction)):
        os.makedirs(tmp_path / folder)
        Image.fromarray(array).save(tmp_path / folder / "a.png")
    (result,) = evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "ref"))
    assert result["dice"] == pytest.approx(2 * 50 / 150) and result["precision"] == 1.0
    assert result["iou"] == pytest.approx(0.5) and result["hd95"] == pytest.approx(5.0)
    os.remove(tmp_path / "pred" / "a.png")
    with pytest.raises(HyMUNetError, match="prediction missing"):
        evaluate_predictions(str(tmp_path / "pred"), str(tmp_path / "ref"))


def test_environment_isolates_the_users_nnunet_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/users/raw")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    env = demo_environment(str(tmp_path), 3, 4, "cpu")
    assert all(env[k].startswith(str(tmp_path)) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"))
    assert "nnUNet_n_proc_DA" not in env  # would crash nnUNetv2_plan_and_preprocess
    assert (env["HYMUNET_EPOCHS"], env["HYMUNET_ITERATIONS"], env["nnUNet_compile"]) == ("3", "4", "f")
    assert DEMO_TRAINER == "nnUNetTrainerHyMUNet_demo"


def test_a_failing_stage_reports_its_log(tmp_path, capsys):
    log = str(tmp_path / "stage.log")
    command = [sys.executable, "-c", "print('Epoch 0'); import sys; print('boom'); sys.exit(3)"]
    with pytest.raises(HyMUNetError, match="exit code 3") as info:
        run_stage(Progress(), "train", command, dict(os.environ), log)
    assert log in str(info.value) and "boom" in str(info.value)  # the log's tail is quoted in the error
    assert "boom" in open(log).read()


def test_workdir_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "something").write_text("x")
    assert hymunet_main(["demo", "--workdir", str(tmp_path), "--device", "cpu"]) == 1
    assert "not empty" in capsys.readouterr().err
