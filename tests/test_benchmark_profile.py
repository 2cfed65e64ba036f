"""`hymunet profile` on a tiny plan: every model is built through its trainer and measured."""

import json

import pytest

from nnunetv2_hymunet.benchmark.models import RESENC_M, build_training_network
from nnunetv2_hymunet.benchmark.presets import ProfilePlan, _configuration, _plans, preset_plan
from nnunetv2_hymunet.benchmark.profile_report import markdown_table, write_profile_outputs
from nnunetv2_hymunet.benchmark.profiling import count_flops, profile_models
from nnunetv2_hymunet.errors import HyMUNetError


def tiny_plan(patch=(32, 32)):
    configuration = _configuration(2, patch, 2, (1.0, 1.0), (4, 8, 16, 16), 1, "tiny_2d")
    plans = _plans("Dataset000_Tiny", "2d", configuration, "NaturalImage2DIO", (999.0, 1.0, 1.0), (1, *patch), 1)
    dataset_json = {
        "channel_names": {"0": "grey"},
        "labels": {"background": 0, "a": 1, "b": 2},
        "numTraining": 1,
        "file_ending": ".png",
    }
    return ProfilePlan(plans, "2d", dataset_json, "tiny test plan", (40, 48))


MODELS = ["nnUNetTrainer", RESENC_M, "nnUNetTrainerHyMUNet", "nnUNetTrainerHyMUNet_noMamba"]


@pytest.fixture(scope="module")
def profile_result():
    # one thread: the CPU is shared with other tests, and oversubscribed threads make tiny ops crawl
    return profile_models(
        tiny_plan(),
        MODELS,
        device="cpu",
        repeats=2,
        warmup=1,
        native_patch_size=(64, 64),
        case_shape=(32, 40),
        threads=1,
        log=lambda *a: None,
    )


def test_every_model_is_profiled(profile_result):
    models = {m["model"]: m for m in profile_result["models"]}
    assert list(models) == MODELS
    assert models["nnUNetTrainer"]["network_class"] == "PlainConvUNet"
    assert models[RESENC_M]["network_class"] == "ResidualEncoderUNet"
    assert models["nnUNetTrainerHyMUNet"]["network_class"] == "HyMUNet"
    for m in models.values():
        assert m["parameters"] > 0 and m["flops_counted"] > 0
        assert len(m["forward_ms"]) == 2 and len(m["step_ms"]) == 2 and m["step_ms_median"] > 0
        assert m["sliding_window"]["tiles"] >= 2 and m["sliding_window"]["seconds"] > 0
        # FLOPs at a 4x larger patch: about 4x (convolutions scale with the pixels; the scan a bit more)
        assert 3.5 < m["gflops_native_patch"] / m["gflops"] < 5
    # the selective scan is counted analytically, only where there are Mamba layers
    assert models["nnUNetTrainerHyMUNet"]["flops_scan_analytic"] > 0
    assert models["nnUNetTrainerHyMUNet_noMamba"]["flops_scan_analytic"] == 0
    assert models["nnUNetTrainer"]["flops_scan_analytic"] == 0
    assert models["nnUNetTrainerHyMUNet"]["parameters"] > models["nnUNetTrainerHyMUNet_noMamba"]["parameters"]
    assert profile_result["plan"]["num_outputs"] == 3


def test_flop_count_matches_a_hand_count():
    import torch

    conv = torch.nn.Conv2d(3, 5, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: 2 * (5 * 3 * 3 * 3) * 16 * 16
    assert count_flops(conv, (1, 3, 16, 16)) == {"counted": 2 * 135 * 256, "scan_analytic": 0}


def test_scan_flops_come_from_the_registered_formula():
    from nnunetv2_hymunet.ssm import Mamba
    from nnunetv2_hymunet.ssm.selective_scan import selective_scan_flops

    mamba = Mamba(d_model=8, d_state=4)
    flops = count_flops(mamba, (2, 10, 8))  # one scan call: batch 2, 10 tokens, with D, z, the step bias, softplus
    assert (
        flops["scan_analytic"]
        == selective_scan_flops(2, mamba.d_inner, 10, 4, D=True, z=True, delta_bias=True, delta_softplus=True)
        == 2 * mamba.d_inner * 10 * (7 * 4 + 10)
    )
    assert flops["counted"] > 0  # the projections, counted by FlopCounterMode as before


def test_networks_are_what_the_trainer_builds():
    network, trainer, n_in, n_out = build_training_network("nnUNetTrainerHyMUNet_noMGF", tiny_plan())
    assert trainer == "nnUNetTrainerHyMUNet_noMGF" and (n_in, n_out) == (1, 3)
    assert network.decoder.deep_supervision is True


def test_outputs_are_written(profile_result, tmp_path):
    paths = write_profile_outputs(profile_result, str(tmp_path))
    assert json.load(open(paths["json"]))["models"][0]["model"] == "nnUNetTrainer"
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(profile_result)
    assert table.count("\n") == 1 + len(MODELS) and "| 1.00 |" in table  # reference ratio


def test_presets_and_patch_override():
    brats = preset_plan("brats-like-3d")
    assert brats.configuration_dict["patch_size"] == [128, 128, 128]
    assert len(brats.configuration_dict["architecture"]["arch_kwargs"]["features_per_stage"]) == 6
    assert brats.with_patch_size((64, 64, 64)).configuration_dict["patch_size"] == [64, 64, 64]
    with pytest.raises(HyMUNetError, match="divisible"):
        brats.with_patch_size((50, 64, 64))
    with pytest.raises(HyMUNetError, match="3 values"):
        brats.with_patch_size((64, 64))
