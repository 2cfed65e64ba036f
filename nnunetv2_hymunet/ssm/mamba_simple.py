"""The Mamba-1 mixer with exactly mamba_ssm.Mamba's parameters, so one state_dict loads on every backend."""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunetv2_hymunet.ssm.selective_scan import selective_scan_fn


@functools.lru_cache(maxsize=None)
def causal_conv1d_kernel():
    """causal_conv1d's CUDA kernel, or None when it does not import."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


class Mamba(nn.Module):
    """Selective state-space mixer; input and output (batch, L, d_model).

    Same constructor, parameter names (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj), shapes and
    initialisation rules as mamba_ssm.modules.mamba_simple.Mamba. `use_fast_path` is accepted for signature
    compatibility and ignored (the backend follows the tensors' device, see selective_scan); `layer_idx` is kept as an
    attribute as in mamba_ssm, and `inference_params` of forward() is accepted and ignored (no inference cache).
    """

    def __init__(
        self,
        d_model,
        d_state=16,
        d_conv=4,
        expand=2,
        dt_rank="auto",
        dt_min=0.001,
        dt_max=0.1,
        dt_init="random",
        dt_scale=1.0,
        dt_init_floor=1e-4,
        conv_bias=True,
        bias=False,
        use_fast_path=True,
        layer_idx=None,
        device=None,
        dtype=None,
    ):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory_kwargs,
        )
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init={dt_init!r}")
        # dt ~ logU[dt_min, dt_max]; the bias is its inverse softplus so that softplus(bias) = dt at init
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1).contiguous()
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory_kwargs)

    def _causal_conv(self, x):
        seqlen = x.shape[-1]
        kernel = causal_conv1d_kernel() if x.is_cuda else None
        if kernel is not None and x.dtype != torch.float64:
            return kernel(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu")
        return self.act(self.conv1d(x)[..., :seqlen])

    def forward(self, hidden_states, inference_params=None):
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2*d_inner, L)
        # the scan's parameters in its compute dtype: float32 (as mamba_ssm), float64 for a float64 module
        scan_dtype = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_log.to(scan_dtype))
        x, z = xz.chunk(2, dim=1)
        x = self._causal_conv(x)
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, dt_rank + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan, before softplus
        B = B.transpose(1, 2).contiguous()
        C = C.transpose(1, 2).contiguous()
        y = selective_scan_fn(
            x, dt, A, B, C, self.D.to(scan_dtype), z=z, delta_bias=self.dt_proj.bias.to(scan_dtype), delta_softplus=True
        )
        return self.out_proj(y.transpose(1, 2))
