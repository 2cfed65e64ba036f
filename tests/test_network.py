"""HyMUNet: shapes for 2D / anisotropic 3D plans, hybrid knobs, gradients, backends, plans round trip, autocast."""

import copy

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network import HyMUNet
from nnunetv2_hymunet.network.mamba_layer import MambaLayer, from_sequence, scan_directions, to_sequence
from nnunetv2_hymunet.planning.architecture import hymunet_arch_kwargs, upgrade_plans
from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs as hymunet

ISIC_LIKE_FEATURES = (32, 64, 128, 256, 512, 512, 512, 512)  # what nnU-Net 2.8 plans for 1000x700 RGB (8 stages)


def plans_kwargs(dim, features, strides, n_conv=2, n_conv_decoder=2):
    """arch_kwargs the way nnU-Net's ExperimentPlanner writes them for PlainConvUNet (classes already imported)."""
    n = len(features)
    return dict(
        n_stages=n,
        features_per_stage=list(features),
        conv_op=nn.Conv2d if dim == 2 else nn.Conv3d,
        kernel_sizes=[[3] * dim] * n,
        strides=[list(s) for s in strides],
        n_conv_per_stage=[n_conv] * n,
        n_conv_per_stage_decoder=[n_conv_decoder] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
    )


STRIDES_2D = [[1, 1]] + [[2, 2]] * 5  # 6 stages, 256x256 patch
STRIDES_3D_ANISO = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2], [1, 2, 2]]  # 28x256x256 patch
STRIDES_3D_BRATS = [[1, 1, 1]] + [[2, 2, 2]] * 5  # BraTS 128^3 patch
TINY_2D = (4, 8, 8, 8, 8, 8)


def tiny_2d(**kw):
    return hymunet(input_channels=3, num_classes=2, **plans_kwargs(2, TINY_2D, STRIDES_2D), **kw)


def expected_ds_shapes(batch, classes, spatial, strides):
    shapes, size = [], list(spatial)
    for stride in strides[:-1]:
        size = [i // s for i, s in zip(size, stride)]
        shapes.append((batch, classes, *size))
    return shapes


def assert_deep_supervision_contract(net, x, expected):
    """DS on: one map per decoder level, highest resolution first; toggled off: the first of them, alone."""
    net.eval()
    net.decoder.deep_supervision = True
    with torch.no_grad():
        out = net(x)
    assert isinstance(out, list) and [tuple(o.shape) for o in out] == expected
    net.decoder.deep_supervision = False  # what the nnU-Net trainer does before validation
    with torch.no_grad():
        single = net(x)
    assert isinstance(single, torch.Tensor) and torch.equal(single, out[0])


def test_2d_plan_shapes():
    net = tiny_2d(deep_supervision=True)
    net.apply(net.initialize)
    assert_deep_supervision_contract(net, torch.randn(1, 3, 256, 256), expected_ds_shapes(1, 2, (256, 256), STRIDES_2D))


def test_2d_default_features_forward():
    kwargs = plans_kwargs(2, (32, 64, 128, 256, 512, 512), STRIDES_2D)
    net = hymunet(input_channels=3, num_classes=2, deep_supervision=False, **kwargs)
    net.apply(net.initialize)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 256))
    assert out.shape == (1, 2, 256, 256) and torch.isfinite(out).all()


def test_isic_like_plan_parameters_not_above_plain_conv_unet():
    kwargs = plans_kwargs(2, ISIC_LIKE_FEATURES, [[1, 1]] + [[2, 2]] * 7)
    n_hym = sum(p.numel() for p in hymunet(input_channels=3, num_classes=2, **kwargs).parameters())
    n_plain = sum(p.numel() for p in PlainConvUNet(input_channels=3, num_classes=2, **kwargs).parameters())
    assert n_hym <= n_plain


def test_3d_anisotropic_plan_shapes():
    net = hymunet(
        input_channels=1,
        num_classes=3,
        deep_supervision=True,
        n_mamba_stages=2,
        scan="cross",
        **plans_kwargs(3, (2, 4, 4, 8, 8, 8), STRIDES_3D_ANISO),
    )
    with torch.no_grad():
        out = net(torch.randn(1, 1, 28, 256, 256))
    assert [tuple(o.shape) for o in out] == expected_ds_shapes(1, 3, (28, 256, 256), STRIDES_3D_ANISO)


def test_3d_brats_like_strides_on_smaller_input():
    net = hymunet(
        input_channels=4, num_classes=4, deep_supervision=True, **plans_kwargs(3, (2, 4, 8, 8, 8, 8), STRIDES_3D_BRATS)
    )
    out = net(torch.randn(1, 4, 64, 64, 64))
    assert [tuple(o.shape) for o in out] == expected_ds_shapes(1, 4, (64, 64, 64), STRIDES_3D_BRATS)
    sum(o.float().mean() for o in out).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_input_sizes_nnunet_pads():
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    net = tiny_2d()
    image = torch.randn(1, 3, 70, 100)
    with pytest.raises(HyMUNetError, match="divisible by the total stride"):
        net(image)
    # the sliding-window predictor pads each image to at least the patch size, which the planner made divisible
    padded, slicer = pad_nd_image(image, (96, 128), "constant", {"value": 0}, return_slicer=True)
    assert tuple(padded.shape[2:]) == (96, 128)
    with torch.no_grad():
        out = net(padded)[tuple(slicer)]
    assert tuple(out.shape) == (1, 2, 70, 100)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 160)).shape == (1, 2, 32, 160)  # non-square, minimal edge


@pytest.mark.parametrize("n_mamba_stages", range(0, 7))
def test_n_mamba_stages_keeps_conv_topology(n_mamba_stages):
    net = tiny_2d(n_mamba_stages=n_mamba_stages)
    mamba_stages = [i for i, stage in enumerate(net.encoder.stages) if len(stage.mamba_layers)]
    assert mamba_stages == list(range(6 - n_mamba_stages, 6))
    conv_keys = {k: v.shape for k, v in net.state_dict().items() if ".mamba_layers." not in k}
    no_mamba = {k: v.shape for k, v in tiny_2d(n_mamba_stages=0).state_dict().items()}
    assert conv_keys == no_mamba  # n_mamba_stages only adds Mamba layers: the No-Mamba control is the same network
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 32)).shape == (1, 2, 64, 32)


@pytest.mark.parametrize("bad", [-1, 7, 2.5, "3"])
def test_n_mamba_stages_validated(bad):
    with pytest.raises(HyMUNetError, match="n_mamba_stages"):
        tiny_2d(n_mamba_stages=bad)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scan": "diagonal"}, "scan="),
        ({"fusion": "add"}, "fusion="),
        ({"n_blocks_per_stage": 1}, "both"),
    ],
)
def test_bad_knobs_raise(kwargs, match):
    with pytest.raises(HyMUNetError, match=match):
        tiny_2d(**kwargs)


def test_the_layout_is_explicit():
    """HyMUNet builds what its arguments say; a U-Net plan's n_conv_per_stage is for the one translation."""
    plan = plans_kwargs(2, TINY_2D, STRIDES_2D)
    with pytest.raises(HyMUNetError, match="n_conv_per_stage .*hymunet_arch_kwargs"):
        HyMUNet(input_channels=3, num_classes=2, **plan)
    explicit = hymunet_arch_kwargs("PlainConvUNet", plan)
    for key, value in (
        ("n_blocks_per_stage", None),
        ("n_blocks_per_stage", [1, 0, 1, 1, 1, 1]),
        ("n_conv_per_stage_decoder", [2] * 4),
        ("mamba_stages", [6]),
    ):
        with pytest.raises(HyMUNetError, match=key):
            HyMUNet(input_channels=3, num_classes=2, **dict(explicit, **{key: value}))
    custom = dict(
        explicit, n_blocks_per_stage=[2, 1, 3, 1, 2, 1], n_conv_per_stage_decoder=[3, 1, 2, 1, 1], mamba_stages=[0, 4]
    )
    net = HyMUNet(input_channels=3, num_classes=2, **custom)
    assert [len(stage.blocks.blocks) for stage in net.encoder.stages] == [2, 1, 3, 1, 2, 1]
    assert [len(stage.convs) for stage in net.decoder.stages] == [3, 1, 2, 1, 1]
    assert [i for i, stage in enumerate(net.encoder.stages) if len(stage.mamba_layers)] == [0, 4]


def test_bad_plan_lengths_raise():
    kwargs = plans_kwargs(2, TINY_2D, STRIDES_2D)
    kwargs["strides"] = kwargs["strides"][:-1]
    with pytest.raises(HyMUNetError, match="strides has 5 entries"):
        hymunet(input_channels=3, num_classes=2, **kwargs)
    kwargs = plans_kwargs(2, TINY_2D, STRIDES_2D)
    kwargs["kernel_sizes"] = [[3, 3, 3]] * 6
    with pytest.raises(HyMUNetError, match="does not match the 2D conv_op"):
        hymunet(input_channels=3, num_classes=2, **kwargs)


@pytest.mark.parametrize("scan", ["flat", "bidir", "cross"])
@pytest.mark.parametrize("fusion", ["mgf", "concat"])
def test_every_scan_and_fusion_2d(scan, fusion):
    net = tiny_2d(scan=scan, fusion=fusion, deep_supervision=True)
    out = net(torch.randn(1, 3, 64, 64))
    assert len(out) == 5 and all(torch.isfinite(o).all() for o in out)
    n_directions = {"flat": 1, "bidir": 2, "cross": 4}[scan]
    assert all(len(layer.directions) == n_directions for stage in net.encoder.stages for layer in stage.mamba_layers)
    has_gate = any("gate_conv" in k for k in net.state_dict())
    assert has_gate == (fusion == "mgf")


@pytest.mark.parametrize("scan, n_directions", [("flat", 1), ("bidir", 2), ("cross", 6)])
def test_every_scan_3d(scan, n_directions):
    net = hymunet(
        input_channels=1,
        num_classes=2,
        scan=scan,
        deep_supervision=False,
        **plans_kwargs(3, (2, 4, 4, 4), [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
    )
    layer = net.encoder.stages[-1].mamba_layers[0]
    assert len(layer.directions) == n_directions
    with torch.no_grad():
        assert net(torch.randn(1, 1, 8, 16, 24)).shape == (1, 2, 8, 16, 24)


def test_scan_sequences_round_trip_and_orders():
    grid = torch.arange(6.0).reshape(1, 1, 2, 3)  # rows [0 1 2], [3 4 5]
    directions = scan_directions("cross", 2)
    assert directions[0] == ((0, 1), False)  # raster first
    sequences = {d: to_sequence(grid, *d)[0, 0].tolist() for d in directions}
    assert sequences[((0, 1), False)] == [0, 1, 2, 3, 4, 5]
    assert sequences[((0, 1), True)] == [5, 4, 3, 2, 1, 0]
    assert sequences[((1, 0), False)] == [0, 3, 1, 4, 2, 5]  # column-major
    assert sequences[((1, 0), True)] == [5, 2, 4, 1, 3, 0]
    volume = torch.randn(2, 3, 2, 3, 4)
    for perm, rev in scan_directions("cross", 3):
        seq = to_sequence(volume, perm, rev)
        assert seq.shape == (2, 3, 24)
        assert torch.equal(from_sequence(seq, perm, rev, volume.shape[2:]), volume)


@pytest.mark.parametrize(
    "scan, sees_later_row, sees_raster_end", [("flat", False, False), ("bidir", True, True), ("cross", True, True)]
)
def test_scan_receptive_field(scan, sees_later_row, sees_raster_end):
    """Mamba is causal along each sequence: which inputs reach the first voxel's output tells the order used."""
    torch.manual_seed(0)
    layer = MambaLayer(4, 2, scan=scan, expand=1)
    x = torch.randn(1, 4, 3, 5, requires_grad=True)
    layer(x)[0, :, 0, 0].sum().backward()
    grad = x.grad[0].abs().sum(0)
    assert (grad[1, 0] > 0) == sees_later_row  # next row, first column: right after (0,0) in column-major order
    assert (grad[2, 4] > 0) == sees_raster_end
    if scan == "flat":
        assert grad.flatten()[1:].abs().sum() == 0


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    net = tiny_2d(deep_supervision=True)
    out = net(torch.randn(1, 3, 64, 64))
    sum(o.square().mean() for o in out).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    zero = [n for n, p in net.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not missing and not zero, (missing, zero)
    net.zero_grad(set_to_none=True)
    net.apply(net.initialize)  # zero-inits residual blocks' last norms; gradients must still reach everything
    sum(o.square().mean() for o in net(torch.randn(1, 3, 64, 64))).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_initialize_keeps_mamba_init():
    net = tiny_2d()
    before = {
        k: v.clone()
        for k, v in net.state_dict().items()
        if k.endswith(("A_log", ".D", "dt_proj.bias", "dt_proj.weight", "conv1d.weight"))
    }
    assert len(before) == 5 * 3
    conv_before = net.encoder.stages[0].blocks.blocks[0].conv1.conv.weight.clone()
    net.apply(net.initialize)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(conv_before, net.encoder.stages[0].blocks.blocks[0].conv1.conv.weight)
    assert float(net.encoder.stages[0].blocks.blocks[0].conv2.norm.weight.detach().abs().sum()) == 0.0


def test_state_dict_loads_across_scan_backends(monkeypatch):
    from nnunetv2_hymunet.ssm.selective_scan import native_build_error

    torch.manual_seed(0)
    kwargs = plans_kwargs(2, (4, 8, 8, 8), [[1, 1], [2, 2], [2, 2], [2, 2]])
    x = torch.randn(1, 3, 32, 32)
    monkeypatch.setenv("HYMUNET_SCAN_BACKEND", "reference")
    saved = hymunet(input_channels=3, num_classes=2, n_mamba_stages=3, **kwargs)
    saved.eval()
    with torch.no_grad():
        reference = saved(x)
    state = copy.deepcopy(saved.state_dict())
    backends = ["torch"] + (["native"] if native_build_error() is None else [])
    for backend in backends:
        monkeypatch.setenv("HYMUNET_SCAN_BACKEND", backend)
        loaded = hymunet(input_channels=3, num_classes=2, n_mamba_stages=3, **kwargs)
        loaded.load_state_dict(state)
        loaded.eval()
        with torch.no_grad():
            out = loaded(x)
        torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-5, msg=f"backend {backend}")


def test_get_network_from_plans_plain_and_resenc_style():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = {
        "n_stages": 4,
        "features_per_stage": [4, 8, 8, 8],
        "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 4,
        "strides": [[1, 1], [2, 2], [2, 2], [2, 2]],
        "n_conv_per_stage": [2] * 4,
        "n_conv_per_stage_decoder": [2] * 3,
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "scan": "bidir",
        "fusion": "mgf",
        "n_mamba_stages": 1,
    }
    req_import = ["conv_op", "norm_op", "dropout_op", "nonlin"]
    net = get_network_from_plans(
        "nnunetv2_hymunet.network.HyMUNet",
        hymunet_arch_kwargs("HyMUNet", copy.deepcopy(arch_kwargs)),
        req_import,
        3,
        2,
        allow_init=True,
        deep_supervision=True,
    )
    assert isinstance(net, HyMUNet) and net.decoder.deep_supervision and net.scan == "bidir"
    assert net.encoder.conv_op is nn.Conv2d and net.encoder.norm_op is nn.InstanceNorm2d
    assert len(net(torch.randn(1, 3, 32, 32))) == 3

    resenc = {k: v for k, v in arch_kwargs.items() if k != "n_conv_per_stage"}
    resenc.update(n_blocks_per_stage=[1, 3, 4, 6], n_conv_per_stage_decoder=[1, 1, 1])
    net = get_network_from_plans(
        "nnunetv2_hymunet.network.HyMUNet",
        hymunet_arch_kwargs("ResidualEncoderUNet", resenc),
        req_import,
        3,
        2,
        allow_init=True,
        deep_supervision=False,
    )
    assert [len(stage.blocks.blocks) for stage in net.encoder.stages] == [1, 3, 1, 1]  # deepest half: one block
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)


def test_stock_trainer_builds_it_from_a_plans_file():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = {
        "dataset_name": "Dataset999_Test",
        "plans_name": "nnUNetHyMUNetPlans",
        "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
        "original_median_shape_after_transp": [1, 64, 64],
        "image_reader_writer": "NaturalImage2DIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "x",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "configurations": {
            "2d": {
                "data_identifier": "nnUNetPlans_2d",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [64, 64],
                "median_image_size_in_voxels": [64, 64],
                "spacing": [1.0, 1.0],
                "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {},
                "resampling_fn_seg_kwargs": {},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {},
                "batch_dice": True,
                "architecture": {
                    "network_class_name": "nnunetv2_hymunet.network.HyMUNet",
                    "arch_kwargs": {
                        "n_stages": 3,
                        "features_per_stage": [4, 8, 8],
                        "conv_op": "torch.nn.modules.conv.Conv2d",
                        "kernel_sizes": [[3, 3]] * 3,
                        "strides": [[1, 1], [2, 2], [2, 2]],
                        "n_conv_per_stage": [2] * 3,
                        "n_conv_per_stage_decoder": [2] * 2,
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                        "norm_op_kwargs": {"eps": 1e-5, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
            }
        },
    }
    # a plans file of hymunet 0.1.0 (n_conv_per_stage: the layout left to the network) is refused by the network,
    # and upgrade_plans writes out the same network's explicit layout
    with pytest.raises(HyMUNetError, match="upgrade_plans"):
        nnUNetTrainer.build_network_architecture(
            PlansManager(plans), PlansManager(plans).get_configuration("2d"), 1, 2, True
        )
    assert upgrade_plans(plans) == ["2d"]
    plans_manager = PlansManager(plans)
    net = nnUNetTrainer.build_network_architecture(plans_manager, plans_manager.get_configuration("2d"), 1, 2, True)
    assert isinstance(net, HyMUNet)
    assert [tuple(o.shape) for o in net(torch.randn(1, 1, 64, 64))] == [(1, 2, 64, 64), (1, 2, 32, 32)]


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    net = tiny_2d(deep_supervision=True)
    seen = []
    for stage in net.encoder.stages:
        for layer in stage.mamba_layers:
            for proj in (layer.mamba.in_proj, layer.mamba.x_proj, layer.mamba.out_proj):
                proj.register_forward_hook(lambda m, inp, out: seen.append((inp[0].dtype, out.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(torch.randn(2, 3, 64, 64))
        loss = sum(o.float().square().mean() for o in out)
    assert all(o.dtype == torch.bfloat16 and torch.isfinite(o).all() for o in out)
    assert len(seen) == 3 * (1 + 4 + 1)  # per Mamba stage: in_proj, each direction's x_proj, out_proj
    assert all(d == (torch.float32, torch.float32) for d in seen)  # Mamba runs in float32
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_compute_conv_feature_map_size():
    kwargs = plans_kwargs(2, (32, 64, 128, 256, 512, 512), STRIDES_2D)
    plain = PlainConvUNet(input_channels=3, num_classes=2, **kwargs).compute_conv_feature_map_size((256, 256))
    sizes = [
        hymunet(input_channels=3, num_classes=2, n_mamba_stages=k, **kwargs).compute_conv_feature_map_size((256, 256))
        for k in (0, 3, 6)
    ]
    assert sizes[0] < sizes[1] < sizes[2]
    # the same conv maps (the residual projections and the MGF gates recompute instead of keeping theirs), and one
    # decoder conv fewer at the hybrid levels (tests/test_network_memory.py checks the estimate against measurement)
    assert 0.9 * plain < sizes[0] < 1.1 * plain
    net3d = hymunet(input_channels=1, num_classes=2, **plans_kwargs(3, (2, 4, 4, 8, 8, 8), STRIDES_3D_ANISO))
    assert net3d.compute_conv_feature_map_size((28, 256, 256)) > 0
    with pytest.raises(HyMUNetError, match="spatial size only"):
        net3d.compute_conv_feature_map_size((1, 28, 256, 256))
    assert isinstance(sizes[0], (int, np.integer))
