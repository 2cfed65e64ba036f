"""compute_conv_feature_map_size (what nnU-Net-style planning fits to the GPU) tracks the memory HyMUNet really keeps
for backward, relative to PlainConvUNet; and the layers keep no more than that."""

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet

from nnunetv2_hymunet.network.memory import saved_for_backward_bytes
from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs as hymunet
from tests.test_network import ISIC_LIKE_FEATURES, STRIDES_3D_BRATS, plans_kwargs

ISIC_2D = dict(
    kwargs=plans_kwargs(2, ISIC_LIKE_FEATURES, [[1, 1]] + [[2, 2]] * 7), channels=3, classes=2, patch=(256, 256)
)  # the ISIC-like plan's network at a smaller patch (Mamba on 2x2..16x16 tokens)
BRATS_3D = dict(
    kwargs=plans_kwargs(3, (32, 64, 128, 256, 320, 320), STRIDES_3D_BRATS), channels=4, classes=3, patch=(64, 64, 64)
)  # the BraTS-like plan's network at 64^3 (Mamba on 2^3..8^3 tokens)
VARIANTS = {
    "default": {},
    "separate+layer_scale": {"direction_merge": "separate", "layer_scale": 1e-2},
    "noMamba": {"n_mamba_stages": 0},
    "concat, Mamba on stages 3-4": {"fusion": "concat", "mamba_stages": [3, 4]},
}


def _build(plan, knobs=None):
    common = dict(input_channels=plan["channels"], num_classes=plan["classes"], deep_supervision=True)
    torch.manual_seed(0)
    if knobs is None:
        return PlainConvUNet(**common, **plan["kwargs"])
    return hymunet(**common, **plan["kwargs"], **knobs)


def _cuda_activation_bytes(net, x) -> int:
    """Peak CUDA memory of a forward pass with gradients (what it keeps for backward and its transients)."""
    net = net.cuda().train()
    x = x.cuda()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = net(x)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    net.cpu()
    return peak


def _check_plan(plan, variants):
    x = torch.randn(1, plan["channels"], *plan["patch"])
    plain = _build(plan)
    plain_kept = sum(saved_for_backward_bytes(plain, x).values())
    plain_estimate = plain.compute_conv_feature_map_size(plan["patch"])
    plain_gpu = _cuda_activation_bytes(plain, x) if torch.cuda.is_available() else None
    ratios = {}
    for name in variants:
        hym = _build(plan, VARIANTS[name])
        measured = sum(saved_for_backward_bytes(hym, x).values()) / plain_kept
        estimated = hym.compute_conv_feature_map_size(plan["patch"]) / plain_estimate
        ratios[name] = (estimated, measured)
        assert abs(estimated / measured - 1) <= 0.2, (name, estimated, measured)
        if plain_gpu is not None:  # in addition to the CPU check above, never instead of it
            on_gpu = _cuda_activation_bytes(hym, x) / plain_gpu
            assert abs(estimated / on_gpu - 1) <= 0.2, (name, estimated, on_gpu)
    # the MGF gate, the Mamba layers' scans and the residual blocks' projections recompute in backward instead of
    # keeping full-size intermediates: what is left is the Mamba layers' token-wise part
    assert ratios["default"][1] <= 1.05, ratios


@pytest.mark.slow
def test_feature_map_size_tracks_measured_memory_2d():
    _check_plan(ISIC_2D, list(VARIANTS))


@pytest.mark.slow
def test_feature_map_size_tracks_measured_memory_3d():
    _check_plan(BRATS_3D, ["default", "separate+layer_scale"])
