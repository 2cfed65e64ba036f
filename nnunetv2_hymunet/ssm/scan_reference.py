"""The plain sequential selective-scan recurrence: the ground truth every fast backend is tested against.

It loops over the sequence with `unbind` (not `x[:, :, t]` indexing, which makes autograd's backward O(L^2)),
so it is also a fair baseline for the benchmarks.
"""

import torch


def selective_scan_core_reference(u, delta, A, B, C):
    """h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t ;  y_t = C_t . h_t.

    u, delta: (batch, dim, L); A: (dim, N); B, C: (batch, G, N, L) with G dividing dim, all in the compute dtype.
    Returns y (batch, dim, L) and the last state (batch, dim, N).
    """
    batch, dim, length = u.shape
    groups = B.shape[1]
    # (batch, G, N, L) -> (batch, dim or 1, L, N) so that every step broadcasts against the (batch, dim, N) state
    B_steps = B.repeat_interleave(dim // groups, dim=1) if groups > 1 else B
    C_steps = C.repeat_interleave(dim // groups, dim=1) if groups > 1 else C
    decay = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))  # (batch, dim, L, N)
    inputs = (delta * u).unsqueeze(-1) * B_steps.transpose(-1, -2)  # (batch, dim, L, N)
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for decay_t, input_t, c_t in zip(decay.unbind(2), inputs.unbind(2), C_steps.transpose(-1, -2).unbind(2)):
        state = decay_t * state + input_t
        ys.append((state * c_t).sum(-1))
    return torch.stack(ys, dim=-1), state
