"""The one definition of the hybrid knobs (network/knobs.py) and the one translation from nnU-Net plans to HyMUNet's
explicit arch_kwargs (planning/architecture.py), which the planner, `hymunet plan`, the trainers and their ablation
variants share."""

import copy
import json

import pytest
from conftest import tiny_plans

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.knobs import KNOB_NAMES, HybridKnobs
from nnunetv2_hymunet.planning import architecture
from nnunetv2_hymunet.planning.architecture import HYMUNET_CLASS_NAME, hymunet_arch_kwargs, upgrade_plans
from nnunetv2_hymunet.planning.presets import validate_preset
from nnunetv2_hymunet.training import variants

PLAIN = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
DEFAULT_KNOBS = {
    "scan": "cross",
    "fusion": "mgf",
    "d_state": 16,
    "d_conv": 4,
    "expand": 2,
    "mamba_max_inner_channels": 512,
    "n_mamba_layers_per_stage": 1,
    "direction_merge": "mean",
    "dt_min": 0.001,
    "dt_max": 0.1,
    "gate_norm": "instance",
    "layer_scale": None,
}


def unet_kwargs(dim=2, n_stages=6):
    return tiny_plans(dim=dim, n_stages=n_stages, features=(4, 8, 8, 8, 8, 8, 8))["configurations"][
        "2d" if dim == 2 else "3d_fullres"
    ]["architecture"]["arch_kwargs"]


def test_knob_names_and_defaults():
    assert set(KNOB_NAMES) == set(DEFAULT_KNOBS) | {"n_mamba_stages", "mamba_stages"}
    knobs = HybridKnobs()
    assert {k: getattr(knobs, k) for k in DEFAULT_KNOBS} == DEFAULT_KNOBS
    assert knobs.stage_indices(6) == [3, 4, 5] and knobs.stage_indices(5) == [3, 4] and knobs.stage_indices(2) == [1]
    assert HybridKnobs(n_mamba_stages=0).stage_indices(6) == []
    assert HybridKnobs(mamba_stages=[4, 1]).mamba_stages == (1, 4)


@pytest.mark.parametrize(
    "knobs, match",
    [
        ({"scan": "diagonal"}, "knob scan='diagonal' is not one of flat, bidir, cross"),
        ({"fusion": "add"}, "knob fusion="),
        ({"direction_merge": "max"}, "knob direction_merge="),
        ({"gate_norm": "batch"}, "knob gate_norm="),
        ({"d_state": 0}, "knob d_state"),
        ({"d_conv": 2.5}, "knob d_conv"),
        ({"expand": 0.5}, "knob expand"),
        ({"expand": True}, "knob expand"),
        ({"mamba_max_inner_channels": 0}, "mamba_max_inner_channels"),
        ({"n_mamba_layers_per_stage": 0}, "n_mamba_layers"),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"dt_max": float("nan")}, "dt_min"),
        ({"layer_scale": -1.0}, "layer_scale"),
        ({"layer_scale": "1e-6"}, "layer_scale"),
        ({"n_mamba_stages": -1}, "n_mamba_stages"),
        ({"n_mamba_stages": True}, "n_mamba_stages"),
        ({"mamba_stages": [2, 2]}, "mamba_stages"),
        ({"mamba_stages": "3"}, "mamba_stages"),
        ({"mamba_stages": [1.5]}, "mamba_stages"),
        ({"d_sate": 16}, "unknown HyMUNet knob 'd_sate'"),
    ],
)
def test_bad_knobs_are_one_line_errors_naming_the_knob(knobs, match):
    with pytest.raises(HyMUNetError, match=match) as info:
        HybridKnobs.from_dict(knobs, "my.json: hybrid_knobs")
    assert str(info.value).startswith("my.json: hybrid_knobs: ") and "\n" not in str(info.value)


def test_presets_check_every_knob_through_the_dataclass():
    # mamba_stages and the design knobs were not checked by the presets before (a KeyError for mamba_stages)
    validate_preset({"hybrid_knobs": {"mamba_stages": [3, 5], "gate_norm": "channel", "layer_scale": 0.1}}, "p.json")
    with pytest.raises(HyMUNetError, match=r"p\.json: configurations\.2d\.hybrid_knobs: knob gate_norm="):
        validate_preset({"configurations": {"2d": {"hybrid_knobs": {"gate_norm": "batch"}}}}, "p.json")


def test_stage_indices_checked_against_the_network():
    with pytest.raises(HyMUNetError, match="n_mamba_stages must be in 0..n_stages=6"):
        HybridKnobs(n_mamba_stages=7).stage_indices(6)
    with pytest.raises(HyMUNetError, match=r"mamba_stages must list stage indices in 0\.\.5"):
        HybridKnobs(mamba_stages=[6]).stage_indices(6)
    with pytest.raises(HyMUNetError, match="disagrees"):
        HybridKnobs(n_mamba_stages=2, mamba_stages=[1, 4]).stage_indices(6)
    assert HybridKnobs(n_mamba_stages=2, mamba_stages=[4, 5]).stage_indices(6) == [4, 5]


def test_overriding_either_stage_knob_replaces_both():
    plans = HybridKnobs(mamba_stages=[1, 4], scan="flat")
    assert plans.with_overrides({"n_mamba_stages": 0}).stage_indices(6) == []
    assert plans.with_overrides({"n_mamba_stages": 0}).scan == "flat"
    assert HybridKnobs(n_mamba_stages=1).with_overrides({"mamba_stages": [2]}).stage_indices(6) == [2]
    with pytest.raises(HyMUNetError, match="unknown HyMUNet knob 'sacn'"):
        plans.with_overrides({"sacn": "flat"})


@pytest.mark.parametrize("dim", [2, 3])
def test_explicit_layout_from_plain_conv_unet_plans(dim):
    kwargs = hymunet_arch_kwargs(PLAIN, unet_kwargs(dim))
    # 2 convs per stage = 1 residual block; the deepest half (stages 3-5) carry Mamba; the decoder levels their skips
    # feed (deepest first: stages 4 and 3) keep one conv of the plan's two
    assert kwargs["n_blocks_per_stage"] == [1] * 6
    assert kwargs["n_conv_per_stage_decoder"] == [1, 1, 2, 2, 2]
    assert kwargs["mamba_stages"] == [3, 4, 5]
    assert {k: kwargs[k] for k in DEFAULT_KNOBS} == DEFAULT_KNOBS
    assert "n_conv_per_stage" not in kwargs and "n_mamba_stages" not in kwargs
    assert set(kwargs) == {
        "n_stages",
        "features_per_stage",
        "conv_op",
        "kernel_sizes",
        "strides",
        "conv_bias",
        "norm_op",
        "norm_op_kwargs",
        "dropout_op",
        "dropout_op_kwargs",
        "nonlin",
        "nonlin_kwargs",
        "n_blocks_per_stage",
        "n_conv_per_stage_decoder",
        "mamba_stages",
        *DEFAULT_KNOBS,
    }
    three_convs = dict(unet_kwargs(dim, n_stages=5), n_conv_per_stage=[3] * 5, n_conv_per_stage_decoder=[3] * 4)
    kwargs = hymunet_arch_kwargs(PLAIN, three_convs)
    # 5 stages: the deepest two are hybrid; only the deepest decoder level is fed by a hybrid skip (stage 3)
    assert kwargs["n_blocks_per_stage"] == [2, 2, 2, 1, 1] and kwargs["n_conv_per_stage_decoder"] == [2, 3, 3, 3]
    assert kwargs["mamba_stages"] == [3, 4]


def test_explicit_layout_from_resenc_plans():
    resenc = {k: v for k, v in unet_kwargs().items() if k != "n_conv_per_stage"}
    resenc.update(
        n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
        n_conv_per_stage_decoder=(1, 1, 1, 1, 1),
        block="BasicBlockD",
        stem_channels=None,
    )
    kwargs = hymunet_arch_kwargs(RESENC, resenc)
    assert kwargs["n_blocks_per_stage"] == [1, 3, 4, 1, 1, 1] and kwargs["n_conv_per_stage_decoder"] == [1] * 5
    assert "block" not in kwargs and "stem_channels" not in kwargs


def test_explicit_kwargs_are_a_fixed_point_and_json_round_trip():
    kwargs = hymunet_arch_kwargs(PLAIN, unet_kwargs(), {"scan": "bidir", "n_mamba_stages": 2})
    assert kwargs["mamba_stages"] == [4, 5] and kwargs["scan"] == "bidir"
    again = hymunet_arch_kwargs(HYMUNET_CLASS_NAME, json.loads(json.dumps(kwargs)))
    assert again == kwargs
    # an explicit HyMUNet plan is built as written: its layout is never reduced again
    custom = dict(kwargs, n_blocks_per_stage=[2, 1, 1, 3, 1, 1], n_conv_per_stage_decoder=[2, 2, 2, 2, 2])
    assert hymunet_arch_kwargs(HYMUNET_CLASS_NAME, custom) == custom


@pytest.mark.parametrize(
    "variant", [v for v in vars(variants).values() if isinstance(v, type) and getattr(v, "hybrid_knobs", None)]
)
def test_ablation_variants_rewrite_only_their_knobs(variant):
    base = hymunet_arch_kwargs(PLAIN, unet_kwargs())
    for plans in (base, hymunet_arch_kwargs(PLAIN, unet_kwargs(), {"mamba_stages": [1, 5], "scan": "bidir"})):
        rewritten = hymunet_arch_kwargs(HYMUNET_CLASS_NAME, plans, variant.hybrid_knobs)
        expected = dict(plans)
        for k, v in variant.hybrid_knobs.items():  # the knob rewritten, nothing else: as nnUNetTrainerBN's norm_op
            expected.update({"mamba_stages": list(range(6 - v, 6))} if k == "n_mamba_stages" else {k: v})
        assert rewritten == expected, variant.__name__
    assert hymunet_arch_kwargs(HYMUNET_CLASS_NAME, base, {"n_mamba_stages": 0})["mamba_stages"] == []


def test_unknown_variant_knob_is_refused():
    with pytest.raises(HyMUNetError, match="unknown HyMUNet knob 'fuson'"):
        hymunet_arch_kwargs(PLAIN, unet_kwargs(), {"fuson": "concat"})


def test_hymunet_0_1_0_plans_read_as_the_unet_plan_they_came_from():
    legacy = dict(unet_kwargs(), scan="flat", n_mamba_stages=2)  # hymunet 0.1.0 wrote HyMUNet with these
    expected = hymunet_arch_kwargs(PLAIN, unet_kwargs(), {"scan": "flat", "n_mamba_stages": 2})
    assert hymunet_arch_kwargs(HYMUNET_CLASS_NAME, legacy) == expected
    plans = tiny_plans(n_stages=6, features=(4, 8, 8, 8, 8, 8))
    plans["configurations"]["2d"]["architecture"] = {
        "network_class_name": HYMUNET_CLASS_NAME,
        "arch_kwargs": copy.deepcopy(legacy),
        "_kw_requires_import": ["conv_op"],
    }
    assert upgrade_plans(plans) == ["2d"] and upgrade_plans(plans) == []
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"] == expected


def test_plans_without_a_unet_layout_are_refused():
    with pytest.raises(HyMUNetError, match="has no n_stages"):
        hymunet_arch_kwargs("some.Transformer", {"patch_embed": 16})
    with pytest.raises(HyMUNetError, match="neither n_conv_per_stage nor n_blocks_per_stage"):
        hymunet_arch_kwargs(PLAIN, {k: v for k, v in unet_kwargs().items() if k != "n_conv_per_stage"})
    with pytest.raises(HyMUNetError, match="strides has 5 entries, expected 6"):
        hymunet_arch_kwargs(PLAIN, dict(unet_kwargs(), strides=unet_kwargs()["strides"][:5]))
    entry = architecture.hymunet_architecture(PLAIN, unet_kwargs())
    assert entry["network_class_name"] == HYMUNET_CLASS_NAME
    assert entry["_kw_requires_import"] == ["conv_op", "norm_op", "dropout_op", "nonlin"]


def hymunet_0_1_0(input_channels, num_classes, plan, knobs):
    """HyMUNet as 0.1.0 built it from a PlainConvUNet plan: its constructor's layout rules, written out here."""
    import torch

    from nnunetv2_hymunet.network.decoder import FusionUNetDecoder
    from nnunetv2_hymunet.network.hybrid_encoder import HybridEncoder

    n = plan["n_stages"]
    n_hybrid = max(1, n // 2)
    hybrid = [s >= n - n_hybrid for s in range(n)]
    blocks = [1 if hybrid[s] else max(1, -(-c // 2)) for s, c in enumerate(plan["n_conv_per_stage"])]
    decoder = [max(1, c - 1) if hybrid[n - 2 - s] else c for s, c in enumerate(plan["n_conv_per_stage_decoder"])]
    k = knobs.get("n_mamba_stages", n_hybrid)
    mamba = [s in knobs.get("mamba_stages", range(n - k, n)) for s in range(n)]
    net = torch.nn.Module()
    net.encoder = HybridEncoder(
        input_channels,
        plan["features_per_stage"],
        plan["conv_op"],
        plan["kernel_sizes"],
        plan["strides"],
        blocks,
        mamba,
        plan["conv_bias"],
        plan["norm_op"],
        plan["norm_op_kwargs"],
        None,
        None,
        plan["nonlin"],
        plan["nonlin_kwargs"],
        knobs.get("scan", "cross"),
        direction_merge=knobs.get("direction_merge", "mean"),
    )
    net.decoder = FusionUNetDecoder(net.encoder, num_classes, decoder, True, knobs.get("fusion", "mgf"))
    return net


@pytest.mark.parametrize(
    "dim, n_conv, knobs",
    [
        (2, 2, {}),
        (3, 2, {}),
        (2, 3, {"scan": "bidir", "n_mamba_stages": 2, "fusion": "concat"}),
        (3, 3, {"mamba_stages": [1, 5], "direction_merge": "separate"}),
    ],
)
def test_explicit_kwargs_build_the_0_1_0_network(dim, n_conv, knobs):
    """Same seed: the network built from the explicit kwargs has 0.1.0's state_dict keys, shapes and values."""
    import torch
    from torch import nn

    from nnunetv2_hymunet.network import HyMUNet

    plan = dict(
        n_stages=6,
        features_per_stage=[2, 4, 4, 8, 8, 8],
        conv_op=nn.Conv2d if dim == 2 else nn.Conv3d,
        kernel_sizes=[[3] * dim] * 6,
        strides=[[1] * dim] + [[2] * dim] * 5,
        n_conv_per_stage=[n_conv] * 6,
        n_conv_per_stage_decoder=[n_conv] * 5,
        conv_bias=True,
        norm_op=nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )
    torch.manual_seed(0)
    reference = hymunet_0_1_0(2, 3, plan, knobs)
    reference.apply(HyMUNet.initialize)
    torch.manual_seed(0)
    net = HyMUNet(input_channels=2, num_classes=3, deep_supervision=True, **hymunet_arch_kwargs(PLAIN, plan, knobs))
    net.apply(net.initialize)
    a, b = reference.state_dict(), net.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)
