"""`hymunet plan`: presets, memory-driven batch/patch sizing, the written plans file, errors."""

import glob
import json
import os

import numpy as np
import pytest
from conftest import tiny_dataset_json, tiny_plans
from planner_inputs import write_planner_inputs

from nnunetv2_hymunet.cli import main as hymunet_main
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.planning.architecture import HYMUNET_CLASS_NAME
from nnunetv2_hymunet.planning.plans_writer import write_hymunet_plans
from nnunetv2_hymunet.planning.presets import bundled_preset_names, load_preset, validate_preset


def nnunet_2d_plans(dataset: str, n_training: int) -> dict:
    """nnU-Net's own 2d plan (ExperimentPlanner, PlainConvUNet) for the fingerprint on disk, as nnUNetPlans.json."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    plans = tiny_plans(patch_size=[64, 64])
    configuration = ExperimentPlanner(dataset).get_plans_for_configuration(
        [1.0, 1.0], [64.0, 64.0], "nnUNetPlans_2d", 64 * 64 * n_training, {}
    )
    configuration["batch_dice"] = True
    plans["configurations"]["2d"] = configuration
    recursive_fix_for_json_export(plans)
    return plans


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    """$nnUNet_raw / $nnUNet_preprocessed for Dataset900_Unit (1000 training images of 64 x 64 px): fingerprint,
    dataset.json, and the nnUNetPlans.json nnU-Net's ExperimentPlanner writes for them (2d: patch 64 x 64)."""
    root = tmp_path / "preprocessed"
    folder = root / "Dataset900_Unit"
    folder.mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    # ExperimentPlanner's own estimate otherwise runs `hostname` in a subprocess per call: forking this threaded
    # process has hung (the child stuck before exec)
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    dataset_json = dict(tiny_dataset_json(), numTraining=1000)
    write_planner_inputs(tmp_path / "raw", folder, tiny_plans(patch_size=[64, 64]), dataset_json)
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    (folder / "nnUNetPlans.json").write_text(json.dumps(nnunet_2d_plans("900", 1000)))
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


@pytest.mark.parametrize(
    "preset, message",
    [
        ({"hybrid_knob": {}}, "unknown key"),
        ({"hybrid_knobs": {"scan": "diagonal"}}, "scan"),
        ({"hybrid_knobs": {"d_sate": 16}}, "unknown HyMUNet knob 'd_sate'"),
        ({"configurations": {"2d": {"batch": 2}}}, r"configurations\.2d: unknown key"),
        ({"configurations": {"2d": {"patch_size": [64, "64"]}}}, "patch_size"),
        ({"gpu_memory_gb": -1}, "gpu_memory_gb"),
    ],
)
def test_preset_errors_name_the_file_and_key(preset, message):
    with pytest.raises(HyMUNetError, match=message) as info:
        validate_preset(preset, "my_preset.json")
    assert "my_preset.json" in str(info.value)


def test_writes_hymunet_plans_next_to_nnunet_plans(preprocessed):
    target, summary = write_hymunet_plans("900")
    assert target == str(preprocessed / "nnUNetHyMUNetPlans.json")
    plans = json.loads(open(target).read())
    source = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    configuration = plans["configurations"]["2d"]
    assert plans["plans_name"] == "nnUNetHyMUNetPlans"
    assert configuration["architecture"]["network_class_name"] == HYMUNET_CLASS_NAME
    assert configuration["data_identifier"] == source["configurations"]["2d"]["data_identifier"]
    assert (
        configuration["architecture"]["arch_kwargs"]["strides"]
        == source["configurations"]["2d"]["architecture"]["arch_kwargs"]["strides"]
    )
    # nnU-Net's loop with HyMUNet's estimate: the same topology and patch here, and as the Mamba stages cost memory,
    # a batch no larger than nnU-Net's for PlainConvUNet
    assert configuration["patch_size"] == source["configurations"]["2d"]["patch_size"] == [64, 64]
    assert 2 <= configuration["batch_size"] <= source["configurations"]["2d"]["batch_size"]
    assert summary["2d"]["hymunet"]["feature_map_elements"] > summary["2d"]["source"]["feature_map_elements"]
    assert [p for p in os.listdir(preprocessed) if p.startswith(".tmp")] == []

    # the stock nnU-Net machinery builds HyMUNet from it
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = configuration["architecture"]
    net = get_network_from_plans(
        arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 1, 2, deep_supervision=True
    )
    assert type(net).__name__ == "HyMUNet"


def test_smaller_gpu_target_gives_a_smaller_batch_and_presets_override(preprocessed, tmp_path):
    _, big = write_hymunet_plans("Dataset900_Unit", gpu_memory_gb=8)
    _, small = write_hymunet_plans("Dataset900_Unit", gpu_memory_gb=0.05)
    assert (
        small["2d"]["hymunet"]["batch_size"] < big["2d"]["hymunet"]["batch_size"]
        or small["2d"]["hymunet"]["patch_size"] != big["2d"]["hymunet"]["patch_size"]
    )

    preset = tmp_path / "p.json"
    preset.write_text(
        json.dumps(
            {
                "plans_name": "nnUNetHyMUNetFlatPlans",
                "hybrid_knobs": {"scan": "flat"},
                "configurations": {"2d": {"patch_size": [32, 32], "batch_size": 5}},
            }
        )
    )
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


def test_plans_file_is_explicit_and_the_trainer_derives_the_same_network(preprocessed):
    """-p nnUNetHyMUNetPlans (stock trainer) and -tr nnUNetTrainerHyMUNet -p nnUNetPlans build one network."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_hymunet.planning.architecture import hymunet_arch_kwargs
    from nnunetv2_hymunet.training.trainer import nnUNetTrainerHyMUNet

    target, _ = write_hymunet_plans("900")
    source = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["2d"]["architecture"]
    arch = json.loads(open(target).read())["configurations"]["2d"]["architecture"]
    kwargs = arch["arch_kwargs"]
    assert kwargs == hymunet_arch_kwargs(source["network_class_name"], source["arch_kwargs"])
    n_stages = kwargs["n_stages"]
    assert len(kwargs["n_blocks_per_stage"]) == n_stages and len(kwargs["n_conv_per_stage_decoder"]) == n_stages - 1
    assert kwargs["mamba_stages"] == list(range(n_stages - n_stages // 2, n_stages)) and kwargs["scan"] == "cross"
    assert "n_conv_per_stage" not in kwargs

    torch.manual_seed(0)
    planned = get_network_from_plans(
        arch["network_class_name"], kwargs, arch["_kw_requires_import"], 1, 2, deep_supervision=True
    )
    plans_manager = PlansManager(json.loads((preprocessed / "nnUNetPlans.json").read_text()))
    torch.manual_seed(0)
    trained = nnUNetTrainerHyMUNet.build_network_architecture(
        plans_manager, plans_manager.get_configuration("2d"), 1, 2, True
    )
    a, b = planned.state_dict(), trained.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_diff_of_two_plans_files_shows_the_knobs(preprocessed, tmp_path):
    import difflib

    write_hymunet_plans("900")
    preset = tmp_path / "flat.json"
    preset.write_text(
        json.dumps(
            {
                "plans_name": "nnUNetHyMUNetFlatPlans",
                "hybrid_knobs": {"scan": "flat", "n_mamba_stages": 1, "gate_norm": "channel"},
            }
        )
    )
    write_hymunet_plans("900", preset_path=str(preset))
    lines = [
        (preprocessed / f"{name}.json").read_text().splitlines()
        for name in ("nnUNetHyMUNetPlans", "nnUNetHyMUNetFlatPlans")
    ]
    changed = [
        line
        for line in difflib.unified_diff(*lines, lineterm="", n=0)
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    ]
    removed = [line[1:].strip() for line in changed if line.startswith("-")]
    added = [line[1:].strip() for line in changed if line.startswith("+")]
    assert '"scan": "cross",' in removed and '"scan": "flat",' in added
    assert '"gate_norm": "instance",' in removed and '"gate_norm": "channel",' in added
    # nothing else differs: the knobs, the written-out Mamba stages (one index per line), the names, the batch size
    keys = {line.split(":")[0].strip('"') for line in removed + added if ":" in line}
    assert keys <= {"scan", "gate_norm", "mamba_stages", "plans_name", "experiment_planner_used", "batch_size"}, changed
    assert all(":" in line or line.strip("[],") == "" or line.strip(",").isdigit() for line in removed + added)
    kwargs = [json.loads("\n".join(text))["configurations"]["2d"]["architecture"]["arch_kwargs"] for text in lines]
    assert kwargs[1]["mamba_stages"] == [kwargs[1]["n_stages"] - 1] != kwargs[0]["mamba_stages"]


def test_planner_sizes_with_hymunets_own_estimate(preprocessed):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from nnunetv2_hymunet.planning.planner import nnUNetPlannerHyMUNet

    planner = nnUNetPlannerHyMUNet("900")
    unet = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["2d"]["architecture"]
    hymunet = planner.hymunet_architecture(unet["arch_kwargs"])
    net = get_network_from_plans(
        hymunet["network_class_name"],
        hymunet["arch_kwargs"],
        hymunet["_kw_requires_import"],
        1,
        2,
        allow_init=False,
        deep_supervision=None,
    )  # nnU-Net estimates without DS
    estimate = planner.static_estimate_VRAM_usage(
        (64, 64), 1, 2, unet["network_class_name"], unet["arch_kwargs"], unet["_kw_requires_import"]
    )
    assert estimate == net.compute_conv_feature_map_size((64, 64))
    assert estimate != planner.estimate(unet, (64, 64))  # not PlainConvUNet's
    planner.knob_overrides = {"n_mamba_stages": 0, "fusion": "concat"}
    assert (
        planner.static_estimate_VRAM_usage(
            (64, 64), 1, 2, unet["network_class_name"], unet["arch_kwargs"], unet["_kw_requires_import"]
        )
        < estimate
    )
    assert planner.generate_data_identifier("2d") == "nnUNetPlans_2d"
    assert planner.generate_data_identifier("3d_lowres") == "nnUNetHyMUNetPlans_3d_lowres"


def test_nnunet_route_plan_experiment(preprocessed, tmp_path):
    """nnU-Net's own planning from the fingerprint (plan_experiment_dataset(..., nnUNetPlannerHyMUNet)); nnU-Net's
    -pl lookup only searches nnunetv2's package, so it does not find the planner (hymunet plan is the CLI route)."""
    import nnunetv2
    import SimpleITK as sitk
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    from nnunetv2_hymunet.planning.planner import nnUNetPlannerHyMUNet

    raw = tmp_path / "raw" / "Dataset900_Unit"
    (raw / "labelsTr").mkdir()
    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((1, 64, 64), np.float32)), str(raw / "imagesTr" / "case_0000.nii.gz")
    )
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 64, 64), np.uint8)), str(raw / "labelsTr" / "case.nii.gz"))
    plans = nnUNetPlannerHyMUNet("900").plan_experiment()
    written = json.loads((preprocessed / "nnUNetHyMUNetPlans.json").read_text())
    assert written["experiment_planner_used"] == "nnUNetPlannerHyMUNet" and list(plans["configurations"]) == ["2d"]
    configuration = written["configurations"]["2d"]
    assert configuration["data_identifier"] == "nnUNetPlans_2d"
    assert configuration["architecture"]["network_class_name"] == HYMUNET_CLASS_NAME
    assert {"n_blocks_per_stage", "mamba_stages", "scan"} <= set(configuration["architecture"]["arch_kwargs"])
    # the same topology and patch as nnU-Net's PlainConvUNet plan here (HyMUNet fits at that patch)
    source = json.loads((preprocessed / "nnUNetPlans.json").read_text())["configurations"]["2d"]
    assert configuration["patch_size"] == source["patch_size"]
    assert configuration["architecture"]["arch_kwargs"]["strides"] == source["architecture"]["arch_kwargs"]["strides"]
    # hymunet plan may replace what the planner wrote
    write_hymunet_plans("900")
    assert (
        recursive_find_python_class(
            os.path.join(nnunetv2.__path__[0], "experiment_planning"),
            "nnUNetPlannerHyMUNet",
            "nnunetv2.experiment_planning",
        )
        is None
    )


def test_plan_needs_what_nnunets_planners_read(preprocessed, tmp_path, capsys):
    (preprocessed / "dataset_fingerprint.json").unlink()
    assert hymunet_main(["plan", "-d", "900"]) == 1
    err = capsys.readouterr().err.strip()
    assert "dataset_fingerprint.json not found" in err and "nnUNetv2_plan_and_preprocess -d Dataset900_Unit" in err
    assert len(err.splitlines()) == 1 and not (preprocessed / "nnUNetHyMUNetPlans.json").exists()
