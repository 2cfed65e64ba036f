"""An independent oracle for the Mamba mixer: mamba_ssm's Mamba-1 forward written out as plain loops in this file.

It shares nothing with the package's scan code (no selective_scan_fn wrapper, no delta_bias / softplus / D / z
handling, no core): only the module's parameters. Every CPU backend's forward and every gradient must match it.
"""

import math

import pytest
import torch

from nnunetv2_hymunet.ssm import Mamba
from nnunetv2_hymunet.ssm.selective_scan import ENV_VAR, resolve_backend


def _available_cpu_backends():
    names = ["reference", "torch", "native"]
    out = []
    for name in names:
        try:
            resolve_backend(torch.device("cpu"), name)
        except Exception:
            continue
        out.append(name)
    return out


def mamba_oracle(m: Mamba, x: torch.Tensor) -> torch.Tensor:
    """Mamba-1 on x (batch, L, d_model), step by step, following the paper's equations.

    in_proj -> (x, z); x = silu(causal depthwise conv(x)); (dt_low, B, C) = x_proj(x); dt = softplus(dt_proj(dt_low));
    h_t = exp(dt_t * A) * h_{t-1} + dt_t * B_t * x_t; y_t = <C_t, h_t> + D * x_t; out = out_proj(y * silu(z)).
    """
    batch, length, _ = x.shape
    silu = lambda v: v * torch.sigmoid(v)  # noqa: E731
    xz = x @ m.in_proj.weight.T
    xs, z = xz[..., : m.d_inner], xz[..., m.d_inner :]
    w = m.conv1d.weight[:, 0, :]  # (d_inner, k): tap k-1 multiplies the current token
    k = w.shape[1]
    conv = []
    for t in range(length):
        acc = m.conv1d.bias.expand(batch, -1)
        for j in range(k):
            source = t - (k - 1 - j)
            if source >= 0:
                acc = acc + w[:, j] * xs[:, source]
        conv.append(silu(acc))
    xs = torch.stack(conv, 1)  # (batch, L, d_inner)
    proj = xs @ m.x_proj.weight.T
    dt_low = proj[..., : m.dt_rank]
    B = proj[..., m.dt_rank : m.dt_rank + m.d_state]
    C = proj[..., m.dt_rank + m.d_state :]
    dt_raw = dt_low @ m.dt_proj.weight.T + m.dt_proj.bias
    dt = torch.log1p(torch.exp(dt_raw))  # softplus
    A = -torch.exp(m.A_log)  # (d_inner, N)
    h = torch.zeros(batch, m.d_inner, m.d_state, dtype=x.dtype)
    ys = []
    for t in range(length):
        dA = torch.exp(dt[:, t, :, None] * A)
        h = dA * h + dt[:, t, :, None] * B[:, t, None, :] * xs[:, t, :, None]
        ys.append((h * C[:, t, None, :]).sum(-1) + m.D * xs[:, t])
    y = torch.stack(ys, 1) * silu(z)
    return y @ m.out_proj.weight.T


@pytest.mark.parametrize("backend", _available_cpu_backends())
@pytest.mark.parametrize("length", [1, 7, 37])
def test_every_cpu_backend_matches_the_loop_oracle_forward_and_backward(backend, length, monkeypatch):
    monkeypatch.setenv(ENV_VAR, backend)
    torch.manual_seed(length)
    module = Mamba(12, d_state=5, d_conv=3, expand=2, dt_min=0.01, dt_max=0.5).double()
    with torch.no_grad():  # move every parameter off its structured init, so that no term can hide
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, length, 12, dtype=torch.float64, requires_grad=True)

    ours = module(x)
    grad_out = torch.randn_like(ours)
    ours_grads = torch.autograd.grad(ours, [x, *module.parameters()], grad_out)
    truth = mamba_oracle(module, x)
    truth_grads = torch.autograd.grad(truth, [x, *module.parameters()], grad_out)

    torch.testing.assert_close(ours, truth, rtol=1e-9, atol=1e-10)
    names = ["x"] + [n for n, _ in module.named_parameters()]
    for name, a, b in zip(names, ours_grads, truth_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=f"{backend}: gradient of {name}")


def test_the_oracle_itself_is_sensitive_to_each_term():
    # guards the oracle against being trivially equal to something: changing D, A or z's gate changes its output
    torch.manual_seed(0)
    module = Mamba(8, d_state=4, d_conv=2, expand=1).double()
    x = torch.randn(1, 9, 8, dtype=torch.float64)
    base = mamba_oracle(module, x)
    for name in ("D", "A_log", "dt_proj.bias"):
        with torch.no_grad():
            param = dict(module.named_parameters())[name]
            param.add_(0.5)
            changed = mamba_oracle(module, x)
            param.sub_(0.5)
        assert (changed - base).abs().max() > 1e-4, name
    assert math.isfinite(float(base.detach().abs().sum()))
