"""HyMUNet's design knobs (issue 12): direction merge, scan step range, MGF gate norm, layer scale, explicit Mamba
stages; identical conv weights with and without Mamba for a seed; the MGF formula written out."""

import pytest
import torch
from torch import nn

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.mamba_layer import MambaLayer
from nnunetv2_hymunet.network.mgf_skip import ChannelLayerNorm, MambaGuidedFusion
from nnunetv2_hymunet.planning.architecture import hymunet_from_unet_kwargs as hymunet
from nnunetv2_hymunet.ssm import Mamba
from tests.test_network import STRIDES_3D_BRATS, plans_kwargs, tiny_2d

EXPLICIT_DEFAULTS = dict(direction_merge="mean", gate_norm="instance", layer_scale=None, dt_min=0.001, dt_max=0.1)


def tiny_3d(**kw):
    return hymunet(input_channels=2, num_classes=3, **plans_kwargs(3, (2, 4, 4, 8, 8, 8), STRIDES_3D_BRATS), **kw)


def assert_every_parameter_gets_gradient(net, x):
    out = net(x)
    sum(o.square().mean() for o in (out if isinstance(out, list) else [out])).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_explicit_default_knobs_are_the_defaults_bit_for_bit():
    torch.manual_seed(3)
    default = tiny_2d(deep_supervision=True)
    torch.manual_seed(3)
    explicit = tiny_2d(deep_supervision=True, mamba_stages=[3, 4, 5], **EXPLICIT_DEFAULTS)
    a, b = default.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(2, 3, 64, 64)
    assert all(torch.equal(p, q) for p, q in zip(default(x), explicit(x)))
    assert all(type(f.gate_norm) is nn.InstanceNorm2d for f in default.decoder.fusions)
    assert all(
        layer.layer_scale is None and layer.direction_merge == "mean"
        for stage in default.encoder.stages
        for layer in stage.mamba_layers
    )


@pytest.mark.parametrize("build", [tiny_2d, tiny_3d], ids=["2d", "3d"])
@pytest.mark.parametrize("knobs", [{}, {"direction_merge": "separate", "layer_scale": 0.5, "mamba_stages": [0, 5]}])
def test_no_mamba_control_has_the_same_conv_weights_for_a_seed(build, knobs):
    """Building the Mamba layers (and what exists only with them) leaves the global RNG alone."""
    nets, after = [], []
    for kw in (knobs, {"n_mamba_stages": 0}):
        torch.manual_seed(7)
        nets.append(build(deep_supervision=True, **kw))
        after.append(torch.rand(3))
    hym, control = (n.state_dict() for n in nets)
    assert set(control) < set(hym) and all(".mamba_layers." in k for k in set(hym) - set(control))
    assert any("gate_conv" in k for k in control)
    assert all(torch.equal(hym[k], control[k]) for k in control)
    assert torch.equal(after[0], after[1])  # and what is drawn after construction is the same too
    for net in nets:  # what nnU-Net does after building the network
        torch.manual_seed(11)
        net.apply(net.initialize)
    hym, control = (n.state_dict() for n in nets)
    assert all(torch.equal(hym[k], control[k]) for k in control)


def test_mamba_layers_reproducible_and_distinct_per_stage():
    torch.manual_seed(5)
    a = tiny_2d(n_mamba_stages=6).state_dict()
    torch.manual_seed(5)
    b = tiny_2d(n_mamba_stages=6).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    w = [a[f"encoder.stages.{s}.mamba_layers.0.mamba.in_proj.weight"] for s in (3, 4)]  # both 8 channels
    assert w[0].shape == w[1].shape and not torch.equal(w[0], w[1])


def test_separate_directions_each_own_mamba_with_mamba_ssm_names():
    torch.manual_seed(0)
    net = tiny_2d(direction_merge="separate", deep_supervision=True)
    layer = net.encoder.stages[-1].mamba_layers[0]
    assert len(layer.mambas) == len(layer.directions) == 4 and not hasattr(layer, "mamba")
    names = set(Mamba(8, expand=2).state_dict())
    for i in range(4):
        prefix = f"encoder.stages.5.mamba_layers.0.mambas.{i}."
        assert {k[len(prefix) :] for k in net.state_dict() if k.startswith(prefix)} == names
    biases = [m.dt_proj.bias for m in layer.mambas]
    assert not torch.equal(biases[0], biases[1])  # per-direction step sizes
    assert_every_parameter_gets_gradient(net, torch.randn(1, 3, 64, 64))


def test_separate_with_equal_weights_is_mean_and_sum_is_n_times_mean():
    torch.manual_seed(0)
    mean = MambaLayer(6, 2, "cross", expand=1).double()
    summed = MambaLayer(6, 2, "cross", expand=1, direction_merge="sum").double()
    summed.load_state_dict(mean.state_dict())
    separate = MambaLayer(6, 2, "cross", expand=1, direction_merge="separate").double()
    separate.norm.load_state_dict(mean.norm.state_dict())
    for m in separate.mambas:
        m.load_state_dict(mean.mamba.state_dict())
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    ref = mean(x) - x
    torch.testing.assert_close(summed(x) - x, 4 * ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(separate(x) - x, ref, rtol=1e-10, atol=1e-12)


def test_dt_range_reaches_every_mamba():
    net = tiny_2d(dt_min=0.05, dt_max=0.2, direction_merge="separate")
    mambas = [m for stage in net.encoder.stages for layer in stage.mamba_layers for m in layer.mamba_modules]
    assert len(mambas) == 12
    for m in mambas:
        dt = torch.nn.functional.softplus(m.dt_proj.bias.detach())
        assert dt.min() >= 0.05 * (1 - 1e-5) and dt.max() <= 0.2 * (1 + 1e-5)
    default = tiny_2d().encoder.stages[-1].mamba_layers[0].mamba
    dt = torch.nn.functional.softplus(default.dt_proj.bias.detach())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize(
    "gate_norm, kind", [("instance", nn.InstanceNorm2d), ("none", nn.Identity), ("channel", ChannelLayerNorm)]
)
def test_gate_norm_choice(gate_norm, kind):
    torch.manual_seed(0)
    net = tiny_2d(gate_norm=gate_norm, deep_supervision=True)
    assert all(type(f.gate_norm) is kind for f in net.decoder.fusions)
    assert_every_parameter_gets_gradient(net, torch.randn(1, 3, 64, 64))


def test_channel_gate_norm_keeps_an_image_level_component():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(5).double()
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 3, 4, 6, dtype=torch.float64)
    mean = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight.view(1, 5, 1, 1, 1) + norm.bias.view(1, 5, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    constant = torch.randn(1, 5, 1, 1).expand(1, 5, 8, 8).double()  # an image-level signal, the same at every voxel
    nn.init.ones_(norm.weight)
    nn.init.zeros_(norm.bias)
    assert norm(constant).abs().amax() > 0.5
    assert nn.InstanceNorm2d(5)(constant).abs().amax() < 1e-6  # what the default gate norm does to it


def test_layer_scale():
    torch.manual_seed(0)
    net = tiny_2d(layer_scale=1e-2, deep_supervision=True)
    layers = [layer for stage in net.encoder.stages for layer in stage.mamba_layers]
    assert all(layer.layer_scale.shape == (8,) and torch.all(layer.layer_scale == 1e-2) for layer in layers)
    assert all(getattr(layer.layer_scale, "_no_weight_decay", False) for layer in layers)
    assert_every_parameter_gets_gradient(net, torch.randn(1, 3, 64, 64))
    plain = MambaLayer(6, 2, expand=1).double()
    scaled = MambaLayer(6, 2, expand=1, layer_scale=0.3).double()
    state = dict(plain.state_dict(), layer_scale=torch.linspace(0.1, 0.6, 6, dtype=torch.float64))
    scaled.load_state_dict(state)
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(
        scaled(x) - x, (plain(x) - x) * state["layer_scale"].view(1, 6, 1, 1), rtol=1e-10, atol=1e-12
    )


def test_mamba_stages_list():
    net = tiny_2d(mamba_stages=[4, 1])
    assert net.mamba_stages == [1, 4] and net.n_mamba_stages == 2
    assert [i for i, stage in enumerate(net.encoder.stages) if len(stage.mamba_layers)] == [1, 4]
    assert tiny_2d(mamba_stages=[4, 5], n_mamba_stages=2).mamba_stages == [4, 5]  # agreeing: fine
    assert tiny_2d(mamba_stages=[]).n_mamba_stages == 0
    with pytest.raises(HyMUNetError, match="disagrees"):
        tiny_2d(mamba_stages=[1, 4], n_mamba_stages=2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"direction_merge": "max"}, "direction_merge="),
        ({"dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
        ({"dt_min": 0.0}, "dt_min"),
        ({"dt_max": float("nan")}, "dt_min"),
        ({"layer_scale": -1.0}, "layer_scale"),
        ({"layer_scale": "1e-6"}, "layer_scale"),
        ({"gate_norm": "batch"}, "gate_norm="),
        ({"mamba_stages": [6]}, "mamba_stages"),
        ({"mamba_stages": [2, 2]}, "mamba_stages"),
        ({"mamba_stages": "3"}, "mamba_stages"),
        ({"mamba_stages": [1.5]}, "mamba_stages"),
        ({"n_mamba_stages": True}, "n_mamba_stages"),
    ],
)
def test_bad_knobs_raise(kwargs, match):
    with pytest.raises(HyMUNetError, match=match):
        tiny_2d(**kwargs)


def test_every_knob_3d_shapes_and_gradients():
    torch.manual_seed(0)
    net = tiny_3d(
        deep_supervision=True,
        direction_merge="separate",
        gate_norm="channel",
        layer_scale=0.1,
        dt_min=0.01,
        dt_max=0.5,
        mamba_stages=[3, 5],
    )
    assert len(net.encoder.stages[5].mamba_layers[0].mambas) == 6
    assert_every_parameter_gets_gradient(net, torch.randn(1, 2, 64, 64, 64))


def _instance_norm(h, weight, bias, eps):
    axes = tuple(range(2, h.dim()))
    mean = h.mean(axes, keepdim=True)
    var = ((h - mean) ** 2).mean(axes, keepdim=True)
    shape = (1, -1) + (1,) * (h.dim() - 2)
    return (h - mean) / torch.sqrt(var + eps) * weight.view(shape) + bias.view(shape)


@pytest.mark.parametrize("dim", [2, 3])
def test_mgf_is_its_formula(dim):
    """E' = E * sigmoid(Norm(Conv1x1(D_up))) + E, output concat(D_up, E'), with every op written out here."""
    torch.manual_seed(0)
    conv_op, norm_op = (nn.Conv2d, nn.InstanceNorm2d) if dim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    mgf = MambaGuidedFusion(conv_op, 4, norm_op, {"eps": 1e-5, "affine": True}, conv_bias=True).double()
    for p in mgf.parameters():
        nn.init.normal_(p)
    spatial = (6, 5) if dim == 2 else (3, 4, 5)
    skip = torch.randn(2, 4, *spatial, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 4, *spatial, dtype=torch.float64, requires_grad=True)
    w = mgf.gate_conv.weight.reshape(4, 4)
    h = torch.einsum("oc,bc...->bo...", w, up) + mgf.gate_conv.bias.view((1, 4) + (1,) * dim)
    gate = 1 / (1 + torch.exp(-_instance_norm(h, mgf.gate_norm.weight, mgf.gate_norm.bias, 1e-5)))
    expected = torch.cat((up, skip * gate + skip), 1)
    out = mgf(skip, up)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    probe = torch.randn_like(out)
    params = [skip, up, *mgf.parameters()]
    got = torch.autograd.grad((out * probe).sum(), params)
    want = torch.autograd.grad((expected * probe).sum(), params)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
