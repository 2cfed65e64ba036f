"""The torch side of the native (C) CPU kernel: it scans blocks of channels that share B and C; this module lays out
its inputs, splits the backward's work into parts and assembles the gradients from its partial sums."""

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


class BlockedScan(torch.autograd.Function):
    """Autograd for a blocked CPU kernel, given as an object with
    - `block`: lanes per block, and `threads()`: how many threads the kernel will use;
    - `forward(u, delta, A, Bt, Ct, save, y, last_state)`: fills y and last_state, returns the checkpoints (its own
      layout; only written when save);
    - `backward(u, delta, A, Bt, Ct, checkpoints, dy, dlast, du, ddelta, dA_per_batch, dB_parts, dC_parts)`: fills the
      gradient buffers (dB_parts, dC_parts: (batch, G, parts, L, N), one partial sum per part of a group's blocks).
    """

    @staticmethod
    def forward(ctx, kernel, u, delta, A, B, C):
        u, delta, A, Bt, Ct = forward_inputs(u, delta, A, B, C)
        batch, dim, length = u.shape
        save = any(ctx.needs_input_grad)
        y = u.new_empty(batch, dim, length)
        last_state = u.new_empty(batch, dim, A.shape[1])
        checkpoints = kernel.forward(u, delta, A, Bt, Ct, save, y, last_state)
        if save:
            ctx.kernel = kernel
            ctx.save_for_backward(u, delta, A, Bt, Ct, checkpoints)
        return y, last_state

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, Bt, Ct, checkpoints = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_state = Bt.shape[1], A.shape[1]
        parts = backward_parts(dim // groups, ctx.kernel.block, batch, groups, ctx.kernel.threads())
        du, ddelta = torch.empty_like(u), torch.empty_like(delta)
        dA_per_batch = u.new_empty(batch, dim, n_state)
        dB_parts = u.new_empty(batch, groups, parts, length, n_state)
        dC_parts = u.new_empty(batch, groups, parts, length, n_state)
        ctx.kernel.backward(
            u,
            delta,
            A,
            Bt,
            Ct,
            checkpoints,
            dy.contiguous(),
            dlast.contiguous(),
            du,
            ddelta,
            dA_per_batch,
            dB_parts,
            dC_parts,
        )
        return (None, *assemble_grads(du, ddelta, dA_per_batch, dB_parts, dC_parts))


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
