"""`selective_scan_fn`: mamba_ssm's signature and semantics, dispatched to the best backend for the tensors.

Backends (environment variable HYMUNET_SCAN_BACKEND=auto|cuda|native|torch|reference, default auto):
- cuda: mamba_ssm's fused CUDA kernel; needs mamba_ssm's compiled extension and CUDA tensors.
- native: the fused CPU kernel in C, compiled on first use with the system C compiler (CPU tensors).
- torch: a chunked pure-PyTorch scan (any device).
- reference: the plain sequential loop (tests and benchmarks).
auto picks cuda for CUDA tensors when mamba_ssm imports; for CPU tensors native when it builds, else torch.
Asking for a backend that cannot run on the given tensors raises instead of silently falling back; a name outside
BACKENDS raises too.

FLOPs: `counting_scan_flops()` routes the scan's forward through the torch custom op `hymunet::selective_scan`,
whose FLOP formula (`selective_scan_flops`) is registered with torch.utils.flop_counter, so FlopCounterMode counts the
scan (it cannot see inside the backends) and fake or meta tensors get their output shapes without running it.
"""

import contextlib
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from nnunetv2_hymunet.errors import HyMUNetError

BACKENDS = ("auto", "cuda", "native", "torch", "reference")
ENV_VAR = "HYMUNET_SCAN_BACKEND"


@functools.lru_cache(maxsize=None)
def mamba_ssm_kernel():
    """mamba_ssm's CUDA selective_scan_fn, or None when its compiled extension does not import."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as cuda_selective_scan_fn
    except Exception:  # ImportError, or an ABI mismatch surfacing as OSError / ImportError "undefined symbol"
        return None
    return cuda_selective_scan_fn


@functools.lru_cache(maxsize=None)
def native_build_error():
    """None when the C kernel builds (or is already cached) and loads here, else why not."""
    from nnunetv2_hymunet.ssm import scan_native

    return scan_native.build_error()


def _checked_name(name: str) -> str:
    name = name.strip().lower() or "auto"
    if name not in BACKENDS:
        raise HyMUNetError(f"{ENV_VAR}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


def requested_backend() -> str:
    return _checked_name(os.environ.get(ENV_VAR, "auto"))


def resolve_backend(device: torch.device, requested: str = None) -> str:
    """The backend that will run for tensors on `device` (raises if `requested` is unknown or cannot run there)."""
    requested = _checked_name(requested) if requested else requested_backend()
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda" and mamba_ssm_kernel() is not None:
            return "cuda"
        if device.type == "cpu" and native_build_error() is None:
            return "native"
        return "torch"
    if requested == "cuda":
        if mamba_ssm_kernel() is None:
            raise HyMUNetError(
                f"{ENV_VAR}=cuda but mamba_ssm's CUDA kernel does not import "
                "(install the [cuda] extra on a machine with CUDA)"
            )
        if device.type != "cuda":
            raise HyMUNetError(f"{ENV_VAR}=cuda but the tensors are on {device}, not on a CUDA device")
    if requested == "native":
        if device.type != "cpu":
            raise HyMUNetError(f"{ENV_VAR}=native runs on CPU tensors only, got tensors on {device}")
        if native_build_error() is not None:
            raise HyMUNetError(f"{ENV_VAR}=native but the C kernel cannot be built here: {native_build_error()}")
    return requested


def _core_for(backend: str):
    if backend == "reference":
        from nnunetv2_hymunet.ssm.scan_reference import selective_scan_core_reference as core
    elif backend == "native":
        from nnunetv2_hymunet.ssm.scan_native import selective_scan_core_native as core
    else:
        from nnunetv2_hymunet.ssm.scan_torch import selective_scan_core_torch as core
    return core


def _as_grouped(x: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    """(batch, N, L) -> (batch, 1, N, L); (batch, G, N, L) stays, with G dividing dim."""
    if x.dim() == 3:
        return x.unsqueeze(1)
    if x.dim() == 4:
        if dim % x.shape[1]:
            raise ValueError(f"{name} has {x.shape[1]} groups, which does not divide dim={dim}")
        return x
    raise ValueError(f"{name} must be (batch, N, L) or (batch, G, N, L), got shape {tuple(x.shape)}")


def selective_scan_fn(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False
):
    """Selective scan (Mamba S6) with mamba_ssm's semantics.

    u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (batch, N, L) or (batch, G, N, L); D, delta_bias: (dim,).
    Returns out (batch, dim, L) in u's dtype, and the last state (batch, dim, N) in the compute dtype when
    return_last_state. The recurrence runs in float32 (float64 for float64 inputs), also under autocast.
    """
    if _counting and not (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    ):
        out, last_state = _counted_scan_op()(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus))
        return (out, last_state) if return_last_state else out
    return _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    backend = resolve_backend(u.device)
    if backend == "cuda":
        return mamba_ssm_kernel()(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if A.is_complex():
        raise ValueError("complex A is not supported")
    batch, dim, length = u.shape
    if delta.shape != u.shape or A.shape[0] != dim:
        raise ValueError(f"shape mismatch: u {tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}")
    compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=u.device.type, enabled=False):
        u_c = u.to(compute_dtype)
        delta_c = delta.to(compute_dtype)
        if delta_bias is not None:
            delta_c = delta_c + delta_bias.to(compute_dtype)[:, None]
        if delta_softplus:
            delta_c = F.softplus(delta_c)
        B_c = _as_grouped(B, "B", dim).to(compute_dtype)
        C_c = _as_grouped(C, "C", dim).to(compute_dtype)
        y, last_state = _core_for(backend)(u_c, delta_c, A.to(compute_dtype), B_c, C_c)
        if D is not None:
            y = y + u_c * D.to(compute_dtype)[:, None]
        if z is not None:
            y = y * F.silu(z.to(compute_dtype))
        out = y.to(u.dtype)
    return (out, last_state) if return_last_state else out


# ---------------------------------------------------------------- FLOP counting

_counting = False


def selective_scan_flops(
    batch: int,
    dim: int,
    length: int,
    d_state: int,
    D: bool = False,
    z: bool = False,
    delta_bias: bool = False,
    delta_softplus: bool = False,
) -> int:
    """Forward FLOPs of one selective scan call, a multiply, an add or an exp counting one FLOP.

    Per (batch, channel, token, state), 7: exp(delta * A) 2, B * (delta * u) 1, the state update
    x = exp(delta * A) * x + B * delta * u 2, the readout y += C * x 2. Per (batch, channel, token), up to 10:
    delta * u 1, + delta_bias 1, softplus 2 (exp, log1p), + D * u 2, * silu(z) 4 (exp, add, divide, multiply).
    """
    per_token = 1 + int(bool(delta_bias)) + 2 * int(bool(delta_softplus)) + 2 * int(bool(D)) + 4 * int(bool(z))
    return int(batch) * int(dim) * int(length) * (7 * int(d_state) + per_token)


@contextlib.contextmanager
def counting_scan_flops():
    """Inside, scan calls that need no gradient go through the custom op `hymunet::selective_scan`, so that
    torch.utils.flop_counter.FlopCounterMode counts them with `selective_scan_flops`. Not thread-safe: a profiler
    switch, not a runtime mode."""
    global _counting
    _counted_scan_op()  # registered once, on first use
    previous, _counting = _counting, True
    try:
        yield
    finally:
        _counting = previous


@functools.lru_cache(maxsize=None)
def _counted_scan_op():
    from torch.utils.flop_counter import register_flop_formula

    @torch.library.custom_op("hymunet::selective_scan", mutates_args=())
    def selective_scan_op(
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: Optional[torch.Tensor],
        z: Optional[torch.Tensor],
        delta_bias: Optional[torch.Tensor],
        delta_softplus: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, last_state = _selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True)
        return out, last_state

    @selective_scan_op.register_fake
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        compute_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        return torch.empty_like(u), u.new_empty((u.shape[0], u.shape[1], A.shape[1]), dtype=compute_dtype)

    @register_flop_formula(torch.ops.hymunet.selective_scan)
    def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, out_shape=None, **kwargs):
        # shapes, not tensors (flop_counter's shape_wrapper); None where an optional input is absent
        return selective_scan_flops(
            u[0], u[1], u[2], A[1], D is not None, z is not None, delta_bias is not None, delta_softplus
        )

    return selective_scan_op
