"""FoldedNormSkip (the residual projection skip's InstanceNorm folded into its 1x1 conv) computes the plain
[AvgPool,] Conv1x1, InstanceNorm Sequential: outputs and all gradients in float64, close in float32; HyMUNet uses it
for every projection skip with such a norm, and the whole network still equals the plain formulation."""

import itertools

import numpy as np
import pytest
import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD
from torch import nn

from nnunetv2_hymunet.network.hybrid_encoder import HybridEncoder
from nnunetv2_hymunet.network.projection_skip import FoldedNormSkip, RecomputedSkip
from tests.test_network_equivalence import network_outputs_and_grads, small_randomised_hymunet

TOL64 = dict(rtol=1e-10, atol=1e-10)


def _plain_skip(dim, stride, affine, bias, dtype, channels_in=3, channels_out=5, norm_kwargs=None):
    conv_op, norm_op = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    torch.manual_seed(0)
    kwargs = {"eps": 1e-5, "affine": affine, **(norm_kwargs or {})}
    block = BasicBlockD(conv_op, channels_in, channels_out, 3, stride, False, norm_op, kwargs, None, None, nn.LeakyReLU)
    skip = block.skip.to(dtype)
    if bias:  # DNA builds the skip conv without one; a conv bias must still come out exact
        skip[-1].conv.bias = nn.Parameter(torch.randn(channels_out, dtype=dtype))
    with torch.no_grad():
        for p in skip.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return skip


def _run(module, x, forward=None):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = (forward or module)(x)
    torch.manual_seed(2)
    (out * torch.randn_like(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def _assert_same(new, old, **tol):
    torch.testing.assert_close(new[0], old[0], **tol)
    torch.testing.assert_close(new[1], old[1], **tol)
    assert new[2].keys() == old[2].keys()
    for name in new[2]:
        torch.testing.assert_close(new[2][name], old[2][name], **tol, msg=name)


def _input(dim, batch, dtype, channels=3):
    torch.manual_seed(1)
    spatial = (6, 10) if dim == 2 else (4, 6, 8)
    # an offset and correlated channels, as image intensities have
    x = torch.randn(batch, channels, *spatial, dtype=dtype)
    return 3 * x + x[:, :1] + 2


@pytest.mark.parametrize(
    "dim, stride, affine, bias, batch", list(itertools.product([2, 3], [1, 2], *[[True, False]] * 2, [1, 2]))
)
def test_folded_skip_matches_plain_sequential_float64(dim, stride, affine, bias, batch):
    plain = _plain_skip(dim, stride, affine, bias, torch.float64)
    folded = FoldedNormSkip(*plain)
    assert folded.state_dict().keys() == plain.state_dict().keys()
    x = _input(dim, batch, torch.float64)
    _assert_same(_run(folded, x), _run(plain, x), **TOL64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), plain(x), **TOL64)


@pytest.mark.parametrize("dim, stride", [(2, 1), (2, 2), (3, 2)])
def test_folded_skip_close_in_float32(dim, stride):
    plain = _plain_skip(dim, stride, True, False, torch.float32, channels_in=8, channels_out=16)
    folded = FoldedNormSkip(*plain)
    x = _input(dim, 2, torch.float32, channels=8)
    _assert_same(_run(folded, x), _run(plain, x), rtol=1e-4, atol=1e-4)


def test_folded_skip_under_autocast_is_the_recomputed_skip():
    plain = _plain_skip(2, 2, True, False, torch.float32)
    folded, recomputed = FoldedNormSkip(*plain), RecomputedSkip(*plain)
    x = _input(2, 2, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        new, old = _run(folded, x), _run(recomputed, x)
    _assert_same(new, old, rtol=0, atol=0)


def test_folded_skip_follows_layers_swapped_after_construction():
    """The receptive-field measurement swaps every spatial norm for identity after the network is built: the skip
    must then run its own (changed) layers instead of failing to find its InstanceNorm."""
    plain = _plain_skip(2, 2, True, False, torch.float64)
    folded = FoldedNormSkip(*plain)
    for module in list(folded.modules()):
        if hasattr(module, "norm"):
            module.norm = nn.Identity()
            module.all_modules = nn.Sequential(
                *[nn.Identity() if isinstance(m, nn.InstanceNorm2d) else m for m in module.all_modules]
            )
    x = _input(2, 2, torch.float64)
    _assert_same(_run(folded, x), _run(RecomputedSkip(*folded), x), rtol=0, atol=0)


def _encoder(norm_op=nn.InstanceNorm2d, norm_kwargs=None):
    torch.manual_seed(0)
    return HybridEncoder(
        3, (4, 8, 8, 16), nn.Conv2d, [[3, 3]] * 4, [[1, 1], [2, 2], [2, 2], [2, 2]], [1, 1, 1, 1], [False] * 4,
        conv_bias=True, norm_op=norm_op, norm_op_kwargs=norm_kwargs or {"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True},
    )  # fmt: skip


def test_encoder_folds_only_instance_norm_without_running_stats():
    skips = [stage.blocks.blocks[0].skip for stage in _encoder().stages]
    # 3->4, 4->8 strided, 8->8 strided (a pool only: nothing to fold), 8->16 strided
    assert [type(s) for s in skips] == [FoldedNormSkip, FoldedNormSkip, RecomputedSkip, FoldedNormSkip]
    for norm_op, kwargs in [
        (nn.InstanceNorm2d, {"eps": 1e-5, "affine": True, "track_running_stats": True}),
        (nn.BatchNorm2d, {"eps": 1e-5, "affine": True}),
    ]:  # running statistics: neither folded nor recomputed (that would update them twice); the pool-only skip is
        skips = [stage.blocks.blocks[0].skip for stage in _encoder(norm_op, kwargs).stages]
        assert [type(s) for s in skips] == [nn.Sequential, nn.Sequential, RecomputedSkip, nn.Sequential]


def test_folded_skip_keeps_only_its_input():
    """What autograd keeps for backward: the skip's input (which the block's first conv keeps anyway) and per-sample
    statistics of a few numbers per channel; so compute_conv_feature_map_size counts nothing for it."""
    plain = _plain_skip(2, 2, True, False, torch.float32, channels_in=8, channels_out=16)
    folded = FoldedNormSkip(*plain)
    x = torch.randn(2, 8, 32, 48, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        folded(x)
    params = {p.untyped_storage().data_ptr() for p in folded.parameters()}
    others = sum(n for ptr, n in kept.items() if ptr != x.untyped_storage().data_ptr() and ptr not in params)
    assert x.untyped_storage().data_ptr() in kept and others <= 4 * 2 * (16 * 3 + 8 + 8 * 8)
    enc = _encoder()
    assert any(isinstance(m, FoldedNormSkip) for m in enc.modules())
    expected, spatial = np.int64(0), [32, 24]
    for stage, stride in zip(enc.stages, enc.strides):
        out = [i // j for i, j in zip(spatial, stride)]
        block = stage.blocks.blocks[0]  # DNA's count less each projection skip's output
        expected += block.compute_conv_feature_map_size(spatial) - block.output_channels * int(np.prod(out))
        spatial = out
    assert enc.compute_conv_feature_map_size((32, 24)) == expected


def test_hymunet_uses_folded_skips_and_matches_plain(monkeypatch):
    """Every projection skip of a small 2D HyMUNet with a conv is a FoldedNormSkip; swapped back to the plain
    Sequential forward: the same outputs and gradients for every parameter, in float64 (deep supervision on)."""
    net = small_randomised_hymunet(2, (4, 8, 8, 16))
    x = torch.randn(2, 2, 32, 24, dtype=torch.float64) * 2 + 1
    skips = [m for m in net.modules() if isinstance(m, RecomputedSkip)]
    assert sum(isinstance(s, FoldedNormSkip) for s in skips) == 3
    assert all(isinstance(s, FoldedNormSkip) for s in skips if any(isinstance(c, nn.Conv2d) for c in s.modules()))

    new = network_outputs_and_grads(net, x)
    monkeypatch.setattr(FoldedNormSkip, "forward", nn.Sequential.forward)
    monkeypatch.setattr(RecomputedSkip, "forward", nn.Sequential.forward)
    old = network_outputs_and_grads(net, x)
    for a, b in zip(new[0], old[0]):
        torch.testing.assert_close(a, b, **TOL64)
    assert new[1].keys() == old[1].keys()
    for name in new[1]:
        torch.testing.assert_close(new[1][name], old[1][name], **TOL64, msg=name)
