"""`hymunet plan`: presets, memory-driven batch/patch sizing, the written plans file, errors."""

import glob
import json
import os

import pytest
from conftest import tiny_dataset_json, tiny_plans

from nnunetv2_hymunet.cli import main as hymunet_main
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.planning.architecture import HYMUNET_CLASS_NAME
from nnunetv2_hymunet.planning.plans_writer import write_hymunet_plans
from nnunetv2_hymunet.planning.presets import bundled_preset_names, load_preset, validate_preset
from nnunetv2_hymunet.planning.sizing import REFERENCE_BATCH, REFERENCE_ELEMENTS, fit_batch_and_patch


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """A $nnUNet_preprocessed with Dataset900_Unit holding nnUNetPlans.json (2d, patch 64x64, batch 12)."""
    root = tmp_path / "preprocessed"
    folder = root / "Dataset900_Unit"
    folder.mkdir(parents=True)
    plans = tiny_plans(patch_size=[64, 64], n_stages=4, features=(16, 32, 64, 128), batch_size=12)
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(tiny_dataset_json()))
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return folder


def test_bundled_presets_are_valid_and_documented(tmp_path, monkeypatch):
    names = bundled_preset_names()
    assert set(names) >= {"isic2018_2d", "drive_2d", "brats_3d_fullres"}
    for name in names:
        preset = load_preset(name)
        assert preset["description"] and preset["_comment"]
    assert load_preset("isic2018_2d")["configurations"]["2d"]["patch_size"] == [256, 256]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "isic2018_2d").write_text(json.dumps({"gpu_memory_gb": 3}))  # a file of that name comes first
    assert load_preset("isic2018_2d") == {"gpu_memory_gb": 3}
    with pytest.raises(HyMUNetError, match="bundled: .*isic2018_2d"):
        load_preset("isic2018")


def test_top_level_plans_folder_is_no_second_copy():
    # plans/ only points at the packaged presets; JSON there would drift from what the wheel ships
    plans = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plans")
    assert glob.glob(os.path.join(plans, "*.json")) == []
    readme = open(os.path.join(plans, "README.md")).read()
    for name in bundled_preset_names():
        assert f"nnunetv2_hymunet/presets/{name}.json" in readme


@pytest.mark.parametrize("preset, message", [
    ({"hybrid_knob": {}}, "unknown key"),
    ({"hybrid_knobs": {"scan": "diagonal"}}, "scan"),
    ({"hybrid_knobs": {"d_sate": 16}}, "unknown HyMUNet knob 'd_sate'"),
    ({"configurations": {"2d": {"batch": 2}}}, r"configurations\.2d: unknown key"),
    ({"configurations": {"2d": {"patch_size": [64, "64"]}}}, "patch_size"),
    ({"gpu_memory_gb": -1}, "gpu_memory_gb"),
])
def test_preset_errors_name_the_file_and_key(preset, message):
    with pytest.raises(HyMUNetError, match=message) as info:
        validate_preset(preset, "my_preset.json")
    assert "my_preset.json" in str(info.value)


def test_sizing_shrinks_batch_then_patch():
    strides = [[1, 1], [2, 2], [2, 2]]  # total stride 4
    per_voxel = REFERENCE_ELEMENTS[2] / (128 * 128)  # so that 12 samples of 128^2 fill 8 GB

    def estimate(patch):
        return per_voxel * patch[0] * patch[1]

    assert fit_batch_and_patch(estimate, [128, 128], 12, strides, [128, 128], 8)[:2] == (12, [128, 128])
    assert fit_batch_and_patch(estimate, [128, 128], 12, strides, [128, 128], 4)[:2] == (6, [128, 128])
    batch, patch, _ = fit_batch_and_patch(estimate, [128, 128], 12, strides, [128, 256], 1)
    assert batch == 2 and patch[1] == 128 and patch[0] < 128 and patch[0] % 4 == 0  # axis 0 is the larger ratio
    assert 2 * estimate(patch) <= REFERENCE_ELEMENTS[2] / 8 * REFERENCE_BATCH[2]
    with pytest.raises(HyMUNetError, match="does not fit"):
        fit_batch_and_patch(estimate, [128, 128], 12, strides, [128, 128], 0.001)


def test_writes_hymunet_plans_next_to_nnunet_plans(preprocessed):
    target, summary = write_hymunet_plans("900")
    assert target == str(preprocessed / "nnUNetHyMUNetPlans.json")
    plans = json.loads(open(target).read())
    source = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["2d"]
    assert plans["plans_name"] == "nnUNetHyMUNetPlans"
    assert configuration["architecture"]["network_class_name"] == HYMUNET_CLASS_NAME
    assert configuration["data_identifier"] == source["configurations"]["2d"]["data_identifier"]
    assert configuration["architecture"]["arch_kwargs"]["strides"] == \
        source["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"]
    # the Mamba stages cost memory, so the planned batch of 12 cannot grow, and the estimate is above PlainConvUNet's
    assert configuration["batch_size"] <= 12
    assert summary["2d"]["hymunet"]["feature_map_elements"] > summary["2d"]["source"]["feature_map_elements"]
    assert [p for p in os.listdir(preprocessed) if p.startswith(".tmp")] == []

    # the stock nnU-Net machinery builds HyMUNet from it
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = configuration["architecture"]
    net = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2,
                                 deep_supervision=True)
    assert type(net).__name__ == "HyMUNet"


def test_smaller_gpu_target_gives_a_smaller_batch_and_presets_override(preprocessed, tmp_path):
    _, big = write_hymunet_plans("Dataset900_Unit", gpu_memory_gb=8)
    _, small = write_hymunet_plans("Dataset900_Unit", gpu_memory_gb=0.05)
    assert small["2d"]["hymunet"]["batch_size"] < big["2d"]["hymunet"]["batch_size"] or \
        small["2d"]["hymunet"]["patch_size"] != big["2d"]["hymunet"]["patch_size"]

    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"plans_name": "nnUNetHyMUNetFlatPlans", "hybrid_knobs": {"scan": "flat"},
                                  "configurations": {"2d": {"patch_size": [32, 32], "batch_size": 5}}}))
    target, _ = write_hymunet_plans("900", preset_path=str(preset))
    configuration = json.loads(open(target).read())["configurations"]["2d"]
    assert os.path.basename(target) == "nnUNetHyMUNetFlatPlans.json"
    assert (configuration["patch_size"], configuration["batch_size"]) == ([32, 32], 5)
    assert configuration["architecture"]["arch_kwargs"]["scan"] == "flat"

    preset.write_text(json.dumps({"configurations": {"2d": {"patch_size": [30, 32]}}}))
    with pytest.raises(HyMUNetError, match="divisible"):
        write_hymunet_plans("900", preset_path=str(preset))


def test_missing_source_plans_names_the_file_and_the_command(preprocessed, capsys):
    (preprocessed / "nnUNetPlans.json").unlink()
    assert hymunet_main(["plan", "-d", "900"]) == 1
    err = capsys.readouterr().err
    assert "nnUNetPlans.json" in err and "nnUNetv2_plan_and_preprocess -d Dataset900_Unit" in err
    assert not (preprocessed / "nnUNetHyMUNetPlans.json").exists()


def test_unknown_configuration_and_cli_output(preprocessed, capsys):
    assert hymunet_main(["plan", "-d", "900", "-c", "3d_fullres"]) == 1
    assert "available: 2d" in capsys.readouterr().err
    assert hymunet_main(["plan", "-d", "900", "-c", "2d", "--gpu-memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "HyMUNet batch" in out and "nnUNetHyMUNetPlans.json" in out
