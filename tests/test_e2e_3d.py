"""End to end through the stock nnU-Net commands, 3D (NIfTI volumes, 3d_fullres, anisotropic spacing)."""

import os

import numpy as np
import pytest
from conftest import predict_command, run_cli

pytestmark = pytest.mark.slow

TRAINER = "nnUNetTrainerHyMUNet_demo"


def test_3d_fullres_train_npz_predict_find_best(planned_tiny_3d, tmp_path):
    import SimpleITK as sitk

    dataset = planned_tiny_3d
    schedule = {"HYMUNET_EPOCHS": "1", "HYMUNET_ITERATIONS": "2", "HYMUNET_VAL_ITERATIONS": "1"}
    train_out = run_cli(
        ["nnUNetv2_train", str(dataset["id"]), "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu", "--npz"],
        dict(dataset["env"], nnUNet_n_proc_DA="0", **schedule),
    )
    assert "Mean Validation Dice" in train_out
    fold = os.path.join(dataset["results"], f"{TRAINER}__nnUNetPlans__3d_fullres", "fold_0")
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))
    assert any(f.endswith(".npz") for f in os.listdir(os.path.join(fold, "validation")))

    output = str(tmp_path / "pred")
    run_cli(
        predict_command(dataset, output, "3d_fullres", TRAINER),
        dataset["env"],
    )
    for name in os.listdir(os.path.join(dataset["raw"], "imagesTs")):
        image = sitk.ReadImage(os.path.join(dataset["raw"], "imagesTs", name))
        prediction = sitk.ReadImage(os.path.join(output, name.replace("_0000.nii.gz", ".nii.gz")))
        assert prediction.GetSize() == image.GetSize()
        np.testing.assert_allclose(prediction.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(prediction))) <= {0, 1}

    run_cli(
        [
            "nnUNetv2_find_best_configuration",
            str(dataset["id"]),
            "-c",
            "3d_fullres",
            "-tr",
            TRAINER,
            "-f",
            "0",
            "-np",
            "1",
        ],
        dataset["env"],
    )
    assert os.path.isfile(os.path.join(dataset["results"], "inference_information.json"))
