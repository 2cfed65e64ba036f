"""The memory/time optimisations of the Mamba layer and the MGF gate keep the network the same: outputs and gradients
against the previous implementation (kept here verbatim), in float64."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from nnunetv2_hymunet.network.hybrid_encoder import RecomputedSkip
from nnunetv2_hymunet.network.mamba_layer import MambaLayer
from nnunetv2_hymunet.network.mgf_skip import MambaGuidedFusion
from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs as hymunet
from tests.test_network import plans_kwargs

TOL = dict(rtol=1e-10, atol=1e-10)


def _to_sequence(feature_map, perm, reverse):
    permuted = feature_map.permute(0, 1, *(2 + a for a in perm)) if list(perm) != sorted(perm) else feature_map
    seq = permuted.flatten(2).transpose(1, 2)
    return seq.flip(1) if reverse else seq


def _from_sequence(seq, perm, reverse, spatial):
    if reverse:
        seq = seq.flip(1)
    batch, _, channels = seq.shape
    grid = seq.reshape(batch, *(spatial[a] for a in perm), channels)
    if list(perm) != sorted(perm):
        inverse = np.argsort(perm)
        grid = grid.permute(0, *(1 + int(a) for a in inverse), len(spatial) + 1)
    return grid


def previous_mamba_layer_forward(layer: MambaLayer, x: torch.Tensor) -> torch.Tensor:
    """MambaLayer.forward as of commit 60c2a30: the directions' sequences stacked through Mamba.forward."""
    x_c = x
    batch, channels, *spatial = x_c.shape
    n_tokens = math.prod(spatial)
    normed = layer.norm(x_c.flatten(2).transpose(1, 2))
    normed_map = normed.transpose(1, 2).reshape(batch, channels, *spatial)
    sequences = [_to_sequence(normed_map, perm, rev) for perm, rev in layer.directions]
    if layer.direction_merge == "separate":
        mixed = [mamba(seq) for mamba, seq in zip(layer.mambas, sequences)]
    else:
        mixed = layer.mamba(torch.cat(sequences, 0) if len(sequences) > 1 else sequences[0]).split(batch, 0)
    merged = None
    for (perm, rev), seq in zip(layer.directions, mixed):
        back = _from_sequence(seq, perm, rev, spatial)
        merged = back if merged is None else merged + back
    if len(layer.directions) > 1 and layer.direction_merge != "sum":
        merged = merged / len(layer.directions)
    if layer.layer_scale is not None:
        merged = merged * layer.layer_scale
    return x_c + merged.reshape(batch, n_tokens, channels).transpose(1, 2).reshape(x_c.shape)


def previous_mgf_forward(mgf: MambaGuidedFusion, skip, upsampled):
    gate = torch.sigmoid(mgf.gate_norm(mgf.gate_conv(upsampled)))
    return torch.cat((upsampled, skip * (gate + 1)), 1)


def _randomise(module):
    """Move every parameter away from its structured init (A_log = log(1..N), D = 1, norms 1/0) so each one matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def small_randomised_hymunet(n_mamba_stages: int, features):
    """A seeded 4-stage 2D HyMUNet (2 input channels, 3 classes, deep supervision on) in float64 with every parameter
    moved off its init (_randomise): the network the whole-network equivalence tests compare two code paths on."""
    torch.manual_seed(0)
    net = hymunet(
        input_channels=2,
        num_classes=3,
        deep_supervision=True,
        n_mamba_stages=n_mamba_stages,
        **plans_kwargs(2, features, [[1, 1], [2, 2], [2, 2], [2, 2]]),
    ).double()
    net.apply(net.initialize)
    _randomise(net)
    return net


def network_outputs_and_grads(net, x):
    """A network's outputs (deep supervision: a list) and every parameter's gradient under a seeded random probe."""
    net.zero_grad(set_to_none=True)
    out = net(x)
    torch.manual_seed(3)
    sum((o * torch.randn_like(o)).sum() for o in out).backward()
    return [o.detach() for o in out], {n: p.grad.clone() for n, p in net.named_parameters()}


def _outputs_and_grads(module, forward, inputs, probe_seed=2):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    module.zero_grad(set_to_none=True)
    out = forward(*inputs)
    torch.manual_seed(probe_seed)
    (out * torch.randn_like(out)).sum().backward()
    return out.detach(), [t.grad for t in inputs], {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_same(module, new_forward, old_forward, inputs):
    new = _outputs_and_grads(module, new_forward, inputs)
    old = _outputs_and_grads(module, old_forward, inputs)
    torch.testing.assert_close(new[0], old[0], **TOL)
    for g_new, g_old in zip(new[1], old[1]):
        torch.testing.assert_close(g_new, g_old, **TOL)
    assert new[2].keys() == old[2].keys()
    for name in new[2]:
        torch.testing.assert_close(new[2][name], old[2][name], **TOL, msg=name)


@pytest.mark.parametrize("scan, n_dims", [("flat", 2), ("bidir", 2), ("cross", 2), ("cross", 3), ("bidir", 3)])
@pytest.mark.parametrize("merge", ["mean", "sum", "separate"])
@pytest.mark.parametrize("layer_scale", [None, 0.5])
def test_mamba_layer_matches_previous_implementation(scan, n_dims, merge, layer_scale):
    torch.manual_seed(0)
    layer = MambaLayer(8, n_dims, scan, d_state=4, expand=2, direction_merge=merge, layer_scale=layer_scale).double()
    _randomise(layer)
    x = torch.randn(2, 8, *((5, 7) if n_dims == 2 else (3, 4, 5)), dtype=torch.float64)
    assert_same(layer, layer, lambda t: previous_mamba_layer_forward(layer, t), [x])


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("gate_norm", ["instance", "none", "channel"])
@pytest.mark.parametrize("channels", [6, 20])  # one chunk of gate channels and 8 + 8 + 4 where chunks apply
def test_mgf_matches_previous_implementation(dim, gate_norm, channels):
    conv_op, norm_op = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    mgf = MambaGuidedFusion(conv_op, channels, norm_op, {"eps": 1e-5, "affine": True}, True, gate_norm).double()
    _randomise(mgf)
    spatial = (6, 7) if dim == 2 else (3, 4, 5)
    skip, up = (torch.randn(2, channels, *spatial, dtype=torch.float64) for _ in range(2))
    assert_same(mgf, mgf, lambda s, u: previous_mgf_forward(mgf, s, u), [skip, up])
    with torch.no_grad():  # inference: the same fused path without autograd
        torch.testing.assert_close(mgf(skip, up), previous_mgf_forward(mgf, skip, up), **TOL)


def test_whole_network_matches_previous_implementation(monkeypatch):
    """Every Mamba layer, MGF gate and recomputed residual projection of a small 2D HyMUNet swapped back to the
    previous code: same outputs and gradients for every parameter (deep supervision on, as in training)."""
    net = small_randomised_hymunet(3, (4, 8, 8, 8))
    x = torch.randn(2, 2, 32, 24, dtype=torch.float64)

    assert any(isinstance(m, RecomputedSkip) for m in net.modules())
    new = network_outputs_and_grads(net, x)
    monkeypatch.setattr(MambaLayer, "forward", previous_mamba_layer_forward)
    monkeypatch.setattr(MambaGuidedFusion, "forward", previous_mgf_forward)
    monkeypatch.setattr(RecomputedSkip, "forward", nn.Sequential.forward)
    old = network_outputs_and_grads(net, x)
    for a, b in zip(new[0], old[0]):
        torch.testing.assert_close(a, b, **TOL)
    for name in new[1]:
        torch.testing.assert_close(new[1][name], old[1][name], **TOL, msg=name)


def test_mgf_under_autocast_matches_previous_implementation():
    """bf16 autocast as in training: D_up comes out of the transposed conv in bf16; the recomputed gate in backward
    runs under the same autocast state as the forward."""
    torch.manual_seed(0)
    up_conv = nn.ConvTranspose2d(8, 4, 2, 2)
    mgf = MambaGuidedFusion(nn.Conv2d, 4, nn.InstanceNorm2d, {"eps": 1e-5, "affine": True}, True)
    _randomise(mgf)
    skip, below = torch.randn(2, 4, 16, 12), torch.randn(2, 8, 8, 6)

    def run(fusion):
        for module in (up_conv, mgf):
            module.zero_grad(set_to_none=True)
        s, b = skip.clone().requires_grad_(True), below.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fusion(s, up_conv(b))
        torch.manual_seed(2)
        (out.float() * torch.randn(out.shape)).sum().backward()
        return [out, s.grad, b.grad, *(p.grad for p in (*up_conv.parameters(), *mgf.parameters()))]

    new = run(mgf)
    old = run(lambda s, u: previous_mgf_forward(mgf, s, u))
    assert new[0].dtype == old[0].dtype
    torch.testing.assert_close(new[0], old[0], rtol=0, atol=0)
    for a, b in zip(new[1:], old[1:]):  # bf16 sums: the gate's weight gradient is summed per sample here
        assert a.dtype == b.dtype and float((a - b).norm() / b.norm()) < 1e-2
