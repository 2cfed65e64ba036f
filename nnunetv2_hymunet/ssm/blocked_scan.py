"""What the native (C) and numba CPU kernels share on the torch side: they scan blocks of channels that share B and C,
so they take the same input layout, split the backward's work the same way and return the same partial gradients."""

import torch


def check_cpu_inputs(u: torch.Tensor, backend: str) -> None:
    if u.device.type != "cpu":
        raise ValueError(f"the {backend} scan runs on CPU tensors, got {u.device}")
    if u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the {backend} scan computes in float32 or float64, got {u.dtype}")


def forward_inputs(u, delta, A, B, C):
    """Detached, contiguous u, delta, A and B, C as (batch, G, L, N): the N values of one step are contiguous."""
    Bt = B.detach().transpose(-1, -2).contiguous()
    Ct = C.detach().transpose(-1, -2).contiguous()
    return u.detach().contiguous(), delta.detach().contiguous(), A.detach().contiguous(), Bt, Ct


def backward_parts(group_size: int, block: int, batch: int, groups: int, threads: int) -> int:
    """Parts per group for the backward: enough tasks to keep every thread busy; each part costs one (L, N) partial
    buffer for dB and dC, and a part holds at least one block."""
    return min(-(-group_size // block), max(1, -(-2 * threads // (batch * groups))))


def assemble_grads(du, ddelta, dA_per_batch, dB_parts, dC_parts):
    """(du, ddelta, dA, dB, dC) from the kernels' outputs: dA summed over the batch, dB / dC over the parts (a fixed
    order, so the result does not depend on thread scheduling) and back to (batch, G, N, L)."""
    dB = dB_parts.sum(2) if dB_parts.shape[2] > 1 else dB_parts[:, :, 0]
    dC = dC_parts.sum(2) if dC_parts.shape[2] > 1 else dC_parts[:, :, 0]
    return du, ddelta, dA_per_batch.sum(0), dB.transpose(-1, -2), dC.transpose(-1, -2)
