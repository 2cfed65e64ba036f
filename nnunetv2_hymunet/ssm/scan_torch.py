"""Pure-PyTorch selective scan for any device: a two-level chunked scan with a recompute-based backward.

The sequence is cut into n_chunks chunks of T ~ sqrt(L) steps. The recurrence h_t = a_t h_{t-1} + x_t
(a_t = exp(delta_t A), x_t = delta_t u_t B_t) then costs about 3 sqrt(L) vectorised steps instead of L:
1. every chunk runs its T steps from a zero state at once (all chunks in parallel): the chunk's local end state;
2. the chunk start states are carried across chunks with the chunk's total decay exp(A * sum(delta)) (n_chunks steps);
3. every chunk runs its T steps again from its true start state, producing y.
Only products of decays (each <= 1 for A < 0) appear, never exp(-cumsum) ratios, so any delta / A is stable.
The backward runs the same scheme on the adjoint (a reverse scan of the same form) and recomputes the states and decays
of step 3 rather than having autograd keep every intermediate (two (b, d, L, N) tensors during the backward).
"""

import math

import torch


def _chunk_length(length: int) -> int:
    return max(1, math.ceil(math.sqrt(length)))


class _Layout:
    """Views of the inputs as (..., n_chunks, T) with the channel axis split into (groups, channels per group)."""

    def __init__(self, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups, n_state = B.shape[1], B.shape[2]
        self.batch, self.dim, self.length, self.groups, self.n_state = batch, dim, length, groups, n_state
        self.chunk = _chunk_length(length)
        self.n_chunks = math.ceil(length / self.chunk)
        self.pad = self.n_chunks * self.chunk - length
        # padded steps have delta = u = 0: decay 1 and no input, so the state passes through unchanged
        self.u = self._steps(u.reshape(batch, groups, dim // groups, length))  # (T, b, G, dg, nc)
        self.delta = self._steps(delta.reshape(batch, groups, dim // groups, length))
        self.A = A.reshape(groups, dim // groups, 1, n_state)  # broadcasts against (b, G, dg, nc, N)
        self.B = self._steps(B).unsqueeze(-3).transpose(-1, -2).contiguous()  # (T, b, G, 1, nc, N)
        self.C = self._steps(C).unsqueeze(-3).transpose(-1, -2).contiguous()

    def _steps(self, x):
        """(..., L) -> (T, ..., n_chunks), contiguous so each step is one contiguous slice."""
        if self.pad:
            x = torch.nn.functional.pad(x, (0, self.pad))
        x = x.reshape(*x.shape[:-1], self.n_chunks, self.chunk)
        return x.movedim(-1, 0).contiguous()

    def unsteps(self, x):
        """(T, b, G, dg, nc) -> (b, d, L)."""
        x = x.movedim(0, -1).reshape(self.batch, self.dim, self.n_chunks * self.chunk)
        return x[..., : self.length]

    def decay(self, t):
        return torch.exp(self.delta[t].unsqueeze(-1) * self.A)

    def input(self, t):
        return (self.delta[t] * self.u[t]).unsqueeze(-1) * self.B[t]

    def chunk_decay(self):
        """Product of the decays over each chunk, exp(A * sum(delta)): (b, G, dg, nc, N)."""
        return torch.exp(self.delta.sum(0).unsqueeze(-1) * self.A)


def _carry(local_end, chunk_decay, initial):
    """Start state of each chunk: s_0 = initial, s_{c+1} = chunk_decay_c s_c + local_end_c; returns (starts, end)."""
    starts = []
    state = initial
    for local_c, decay_c in zip(local_end.unbind(-2), chunk_decay.unbind(-2)):
        starts.append(state)
        state = decay_c * state + local_c
    return torch.stack(starts, dim=-2), state


class _ChunkedSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        lay = _Layout(u, delta, A, B, C)
        state = None
        for t in range(lay.chunk):  # 1. local end states from zero
            x_t = lay.input(t)
            state = x_t if state is None else torch.addcmul(x_t, lay.decay(t), state)
        chunk_decay = lay.chunk_decay()
        starts, last_state = _carry(state, chunk_decay, torch.zeros_like(state[..., 0, :]))  # 2.
        state = starts
        ys = []
        for t in range(lay.chunk):  # 3. the true states, and y
            state = torch.addcmul(lay.input(t), lay.decay(t), state)
            ys.append((state * lay.C[t]).sum(-1))
        ctx.save_for_backward(u, delta, A, B, C, starts)
        y = lay.unsteps(torch.stack(ys))
        return y, last_state.reshape(lay.batch, lay.dim, lay.n_state)

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, B, C, starts = ctx.saved_tensors
        lay = _Layout(u, delta, A, B, C)
        dy_steps = lay._steps(dy.reshape(lay.batch, lay.groups, lay.dim // lay.groups, lay.length))
        # adjoint g_t = dy_t C_t + a_{t+1} g_{t+1}; `incoming` holds a_{t+1} g_{t+1} (dlast past the last step)
        local = None
        for t in reversed(range(lay.chunk)):  # 1. each chunk's outgoing adjoint from a zero incoming one
            g = dy_steps[t].unsqueeze(-1) * lay.C[t]
            if local is not None:
                g = g + local
            local = lay.decay(t) * g
        chunk_decay = lay.chunk_decay()
        dlast = dlast.reshape(lay.batch, lay.groups, lay.dim // lay.groups, lay.n_state)
        flipped, _ = _carry(local.flip(-2), chunk_decay.flip(-2), dlast)  # 2. carried from the last chunk backwards
        incoming = flipped.flip(-2)
        states, decays = [starts], []  # 3. recompute the true states, then sweep the adjoint backwards through them
        for t in range(lay.chunk):
            decays.append(lay.decay(t))
            states.append(torch.addcmul(lay.input(t), decays[t], states[t]))
        du, ddelta, dB, dC = [], [], [], []
        dA = torch.zeros_like(starts)
        for t in reversed(range(lay.chunk)):
            delta_t, u_t, dy_t = lay.delta[t], lay.u[t], dy_steps[t]
            g = torch.addcmul(incoming, dy_t.unsqueeze(-1), lay.C[t])
            g_B = (g * lay.B[t]).sum(-1)
            incoming = decays[t] * g  # a_t g_t: the adjoint handed to step t - 1
            g_a_h = incoming * states[t]
            du.append(delta_t * g_B)
            ddelta.append(u_t * g_B + (g_a_h * lay.A).sum(-1))
            dA.addcmul_(g_a_h, delta_t.unsqueeze(-1))
            # sums over the channels of a group: (b, G, dg, nc, N) x (b, G, dg, nc) -> (b, G, nc, N)
            dB.append(torch.einsum("bgdcn,bgdc->bgcn", g, delta_t * u_t))
            dC.append(torch.einsum("bgdcn,bgdc->bgcn", states[t + 1], dy_t))
        # the lists were filled from the last step backwards
        du = lay.unsteps(torch.stack(du[::-1]))
        ddelta = lay.unsteps(torch.stack(ddelta[::-1]))
        dA = dA.sum((0, 3)).reshape(lay.dim, lay.n_state)
        dB = _unsteps_grouped(torch.stack(dB[::-1]), lay)
        dC = _unsteps_grouped(torch.stack(dC[::-1]), lay)
        return du, ddelta, dA, dB, dC


def _unsteps_grouped(x, lay):
    """(T, b, G, nc, N) -> (b, G, N, L)."""
    x = x.permute(1, 2, 4, 3, 0).reshape(lay.batch, lay.groups, lay.n_state, lay.n_chunks * lay.chunk)
    return x[..., : lay.length]


def selective_scan_core_torch(u, delta, A, B, C):
    """Same contract as `scan_reference.selective_scan_core_reference`."""
    return _ChunkedSelectiveScan.apply(u, delta, A, B, C)
