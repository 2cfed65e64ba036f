"""The MGF gate's hand-written path (1x1 conv as a matrix product, InstanceNorm's backward from its saved statistics,
scripts/bench_mgf_gate.py) equals plain autograd of the formula concat(D_up, E * (sigmoid(Norm(Conv1x1(D_up))) + 1)):
outputs and every gradient in float64, for every norm, with and without biases, 2D and 3D, batch 1 and 2."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_hymunet.network import mgf_skip
from nnunetv2_hymunet.network.mgf_skip import MambaGuidedFusion

TOL = dict(rtol=1e-10, atol=1e-10)


def formula(mgf: MambaGuidedFusion, skip, up):
    """Plain autograd of the formula, from the module's parameters (not its layers' forward)."""
    dim = up.dim() - 2
    h = (F.conv2d if dim == 2 else F.conv3d)(up, mgf.gate_conv.weight, mgf.gate_conv.bias)
    norm = mgf.gate_norm
    if isinstance(norm, nn.modules.instancenorm._InstanceNorm):
        axes = tuple(range(2, h.dim()))
        mean = h.mean(axes, keepdim=True)
        var = ((h - mean) ** 2).mean(axes, keepdim=True)
        h = (h - mean) / torch.sqrt(var + norm.eps)
        if norm.affine:
            shape = (1, -1) + (1,) * dim
            h = h * norm.weight.view(shape) + norm.bias.view(shape)
    elif isinstance(norm, mgf_skip.ChannelLayerNorm):
        mean = h.mean(1, keepdim=True)
        var = ((h - mean) ** 2).mean(1, keepdim=True)
        shape = (1, -1) + (1,) * dim
        h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)
    gate = 1 / (1 + torch.exp(-h))
    return torch.cat((up, skip * (gate + 1)), 1)


def build(dim, channels, gate_norm, conv_bias, affine=True, dtype=torch.float64):
    conv_op, norm_op = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    torch.manual_seed(0)
    mgf = MambaGuidedFusion(conv_op, channels, norm_op, {"eps": 1e-5, "affine": affine}, conv_bias, gate_norm)
    mgf = mgf.to(dtype)
    with torch.no_grad():
        for p in mgf.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return mgf


def outputs_and_grads(mgf, forward, skip, up):
    skip, up = (t.detach().clone().requires_grad_(True) for t in (skip, up))
    mgf.zero_grad(set_to_none=True)
    out = forward(skip, up)
    torch.manual_seed(5)
    (out * torch.randn(out.shape, dtype=torch.float64).to(out.dtype)).sum().backward()
    return out, [out.detach(), skip.grad, up.grad, *(p.grad for p in mgf.parameters())]


def spatial(dim):
    return (6, 7) if dim == 2 else (3, 4, 5)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize(
    "gate_norm, affine", [("instance", True), ("instance", False), ("none", True), ("channel", True)]
)
@pytest.mark.parametrize("conv_bias", [True, False])
def test_mgf_equals_autograd_of_formula(dim, batch, gate_norm, affine, conv_bias):
    mgf = build(dim, 5, gate_norm, conv_bias, affine)
    torch.manual_seed(1)
    skip = torch.randn(batch, 5, *spatial(dim), dtype=torch.float64)
    up = 2 + 3 * torch.randn(batch, 5, *spatial(dim), dtype=torch.float64)  # a mean far from 0: the centering matters
    out, new = outputs_and_grads(mgf, mgf, skip, up)
    explicit = gate_norm != "channel"
    assert (type(out.grad_fn).__name__ == "_ExplicitGatedSkipBackward") == explicit, type(out.grad_fn)
    _, old = outputs_and_grads(mgf, lambda s, u: formula(mgf, s, u), skip, up)
    assert len(new) == len(old) == 3 + len(list(mgf.parameters()))
    for i, (a, b) in enumerate(zip(new, old)):
        torch.testing.assert_close(a, b, **TOL, msg=f"tensor {i}")
    with torch.no_grad():  # inference: channels in chunks where the norm allows it
        torch.testing.assert_close(mgf(skip, up), formula(mgf, skip, up), **TOL)


@pytest.mark.parametrize("gate_norm", ["instance", "none"])
def test_inference_and_training_at_20_channels(gate_norm):
    """Without autograd the hand-written path computes the gate in the output's memory, all channels at once."""
    mgf = build(2, 20, gate_norm, True)
    skip, up = (torch.randn(2, 20, 9, 5, dtype=torch.float64) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(mgf(skip, up), formula(mgf, skip, up), **TOL)
    _, new = outputs_and_grads(mgf, mgf, skip, up)
    _, old = outputs_and_grads(mgf, lambda s, u: formula(mgf, s, u), skip, up)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, **TOL)


def test_non_contiguous_inputs_and_partial_requires_grad():
    """A transposed skip, and only D_up and the parameters requiring gradients."""
    mgf = build(2, 4, "instance", True)
    skip = torch.randn(2, 4, 7, 6, dtype=torch.float64).transpose(2, 3)
    up = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    results = []
    for forward in (mgf, lambda s, u: formula(mgf, s, u)):
        mgf.zero_grad(set_to_none=True)
        u = up.clone().requires_grad_(True)
        out = forward(skip, u)
        torch.manual_seed(5)
        (out * torch.randn_like(out)).sum().backward()
        results.append([out.detach(), u.grad, *(p.grad for p in mgf.parameters())])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)


def test_float32_close_to_float64():
    """The plan's dtype at a larger map: float32 agrees with the float64 formula to float32 rounding."""
    mgf64 = build(2, 16, "instance", False)
    mgf32 = copy.deepcopy(mgf64).float()
    torch.manual_seed(2)
    skip, up = torch.randn(2, 16, 64, 48, dtype=torch.float64), 1 + torch.randn(2, 16, 64, 48, dtype=torch.float64)
    _, new = outputs_and_grads(mgf32, mgf32, skip.float(), up.float())
    _, ref = outputs_and_grads(mgf64, lambda s, u: formula(mgf64, s, u), skip, up)
    for a, b in zip(new, ref):
        assert float((a.double() - b).norm() / b.norm()) < 1e-5


@pytest.mark.parametrize("gate_norm", ["instance", "none", "channel"])
def test_autocast_bf16_is_finite_and_close(gate_norm):
    """Under autocast the module's own layers run (bf16 conv): output and gradients finite and close to float32."""
    # InstanceNorm cancels the conv bias: its gradient is 0 but for rounding, too small to compare relatively
    mgf = build(2, 8, gate_norm, gate_norm != "instance", dtype=torch.float32)
    skip, up = torch.randn(2, 8, 16, 12), torch.randn(2, 8, 16, 12)

    def forward(s, u):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return mgf(s, u.to(torch.bfloat16).float())

    out, new = outputs_and_grads(mgf, forward, skip, up)
    assert type(out.grad_fn).__name__ == "_GatedSkipBackward"
    _, ref = outputs_and_grads(mgf, lambda s, u: formula(mgf, s, u.to(torch.bfloat16).float()), skip, up)
    for a, b in zip(new, ref):
        assert torch.isfinite(a).all()
        assert float((a.float() - b).norm() / b.norm()) < 5e-2


def test_autocast_inference_in_chunks_of_channels(monkeypatch):
    """Inference under autocast runs the module's layers in chunks of 8 + 8 + 4 output channels, sample by sample."""
    mgf = build(2, 20, "instance", False, dtype=torch.float32)
    skip, up = torch.randn(2, 20, 16, 12), torch.randn(2, 20, 16, 12)
    parts = []
    gate_channels = mgf_skip._gate_channels
    monkeypatch.setattr(mgf_skip, "_gate_channels", lambda m, u, part: parts.append(part) or gate_channels(m, u, part))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = mgf(skip, up.to(torch.bfloat16))
    assert [(p.start, p.stop) for p in parts] == [(0, 8), (8, 16), (16, 20)] * 2
    with torch.no_grad():
        ref = formula(mgf, skip, up.to(torch.bfloat16).float())
    assert torch.isfinite(out).all() and float((out.float() - ref).norm() / ref.norm()) < 2e-2


def test_running_statistics_use_plain_autograd():
    mgf = MambaGuidedFusion(nn.Conv2d, 4, nn.InstanceNorm2d, {"affine": True, "track_running_stats": True}).double()
    skip, up = (torch.randn(2, 4, 5, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = mgf(skip, up)
    assert type(out.grad_fn).__name__ == "CatBackward0"


def test_saves_only_skip_output_and_statistics():
    """Nothing of the gate's size is kept for backward: E, the output (both kept by their neighbours anyway) and
    InstanceNorm's per-channel mean and 1/std."""
    mgf = build(2, 6, "instance", False, dtype=torch.float32)
    skip, up = (torch.randn(2, 6, 20, 24, requires_grad=True) for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = mgf(skip, up)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([tuple(skip.shape), tuple(out.shape), (2, 2, 6)]), shapes
