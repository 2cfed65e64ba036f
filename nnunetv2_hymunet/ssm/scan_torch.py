"""Pure-PyTorch selective scan for any device (temporary sequential body; replaced by the chunked scan)."""

import torch


def selective_scan_core_torch(u, delta, A, B, C):
    """Same contract as `scan_reference.selective_scan_core_reference`."""
    batch, dim, length = u.shape
    groups = B.shape[1]
    B_steps = B.repeat_interleave(dim // groups, dim=1) if groups > 1 else B
    C_steps = C.repeat_interleave(dim // groups, dim=1) if groups > 1 else C
    state = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    du = delta * u
    for d_t, du_t, b_t, c_t in zip(delta.unbind(-1), du.unbind(-1), B_steps.unbind(-1), C_steps.unbind(-1)):
        state = torch.exp(d_t.unsqueeze(-1) * A) * state + du_t.unsqueeze(-1) * b_t
        ys.append((state * c_t).sum(-1))
    return torch.stack(ys, dim=-1), state
