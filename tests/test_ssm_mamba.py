"""The Mamba mixer: mamba_ssm-compatible parameters and init, and the same outputs on every backend."""

import math

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_hymunet.ssm import Mamba
from nnunetv2_hymunet.ssm.selective_scan import ENV_VAR

BACKENDS = ["reference", "native", "torch"]

# mamba_ssm 2.3.2.post1 Mamba(d_model=256).state_dict(), in its own order (research/selective-scan-cpu.md, section 3)
MAMBA_SSM_STATE_DICT_256 = [
    ("A_log", (512, 16)),
    ("D", (512,)),
    ("in_proj.weight", (1024, 256)),
    ("conv1d.weight", (512, 1, 4)),
    ("conv1d.bias", (512,)),
    ("x_proj.weight", (48, 512)),
    ("dt_proj.weight", (512, 16)),
    ("dt_proj.bias", (512,)),
    ("out_proj.weight", (256, 512)),
]


def test_state_dict_matches_mamba_ssm():
    module = Mamba(256)
    state = module.state_dict()
    assert sorted(state) == sorted(k for k, _ in MAMBA_SSM_STATE_DICT_256)
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(MAMBA_SSM_STATE_DICT_256)
    assert sum(p.numel() for p in module.parameters()) == 437_760
    assert not list(module.buffers())


def test_initialisation_rules():
    torch.manual_seed(3)
    dt_min, dt_max, floor = 0.001, 0.1, 1e-4
    module = Mamba(64, d_state=8, dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor)
    expected_A_log = torch.log(torch.arange(1, 9, dtype=torch.float32)).repeat(module.d_inner, 1)
    assert torch.equal(module.A_log.detach(), expected_A_log)
    assert torch.equal(module.D.detach(), torch.ones(module.d_inner))
    dt = F.softplus(module.dt_proj.bias.detach().double())
    assert dt.min() >= max(dt_min, floor) * (1 - 1e-5) and dt.max() <= dt_max * (1 + 1e-5)
    assert dt.max() / dt.min() > 10, "dt should spread log-uniformly over [dt_min, dt_max]"
    bound = module.dt_rank**-0.5
    assert module.dt_proj.weight.abs().max() <= bound and module.dt_proj.weight.abs().max() > bound / 2
    assert module.A_log._no_weight_decay and module.D._no_weight_decay and module.dt_proj.bias._no_reinit
    assert module.dt_rank == math.ceil(64 / 16)


def forward_backward(module, x, backend, monkeypatch):
    monkeypatch.setenv(ENV_VAR, backend)
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = module(x)
    gen = torch.Generator().manual_seed(5)
    (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum().backward()
    return [out, x.grad] + [p.grad for _, p in module.named_parameters()]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_same_outputs_and_gradients_on_every_backend(dtype, tol, monkeypatch):
    torch.manual_seed(11)
    module = Mamba(32, d_state=8).to(dtype)
    with torch.no_grad():  # move off the init values so every parameter matters
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 77, 32, dtype=dtype)
    reference = forward_backward(module, x, "reference", monkeypatch)
    names = ["out", "dx"] + [n for n, _ in module.named_parameters()]
    for backend in ("native", "torch"):
        results = forward_backward(module, x, backend, monkeypatch)
        for name, got, ref in zip(names, results, reference):
            assert got is not None and torch.isfinite(got).all(), f"{backend} {name}"
            err = rel_err(got, ref)
            assert err <= tol, f"{backend} {dtype} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_network_level_usage(backend, monkeypatch):
    monkeypatch.setenv(ENV_VAR, backend)
    torch.manual_seed(0)
    module = Mamba(64)
    x = torch.randn(2, 300, 64, requires_grad=True)
    out = module(x)
    assert out.shape == (2, 300, 64) and out.dtype == torch.float32
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


def test_bf16_autocast_module(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "native")
    torch.manual_seed(1)
    module = Mamba(32)
    x = torch.randn(2, 50, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), module(x)) < 0.05  # bf16 projections, float32 recurrence


def test_matches_mamba_ssm_reference_path():
    """Only where mamba_ssm imports (GPU machines with the [cuda] extra); scripts/check_mamba_ssm_parity.py
    runs the same comparison on CPU in a scratch venv with stubbed CUDA modules."""
    simple = pytest.importorskip("mamba_ssm.modules.mamba_simple")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    torch.manual_seed(2)
    theirs = simple.Mamba(64, use_fast_path=False)
    ours = Mamba(64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 100, 64)
    saved = simple.causal_conv1d_fn, simple.selective_scan_fn
    simple.causal_conv1d_fn, simple.selective_scan_fn = None, selective_scan_ref
    try:
        expected = theirs(x)
    finally:
        simple.causal_conv1d_fn, simple.selective_scan_fn = saved
    assert rel_err(ours(x), expected) < 1e-5
