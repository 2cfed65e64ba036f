"""Fused CPU selective scan compiled with numba.

Forward: one parallel task per (batch, channel); the N-vector state lives in a small local array and only the
output, the last state and a checkpoint of the state every CHUNK steps are written (never all (b, d, L, N) states).
Backward: per channel, chunks are visited in reverse; each chunk's states are recomputed from its checkpoint into
a CHUNK x N scratch buffer and the adjoint is swept backwards through it. dB and dC are sums over the channels of
a group; each parallel task owns a block of channels and its own partial (L, N) buffer, and the blocks are summed
afterwards, so the result is race-free and independent of thread scheduling.

Every step multiplies by exp(delta * A) directly (no exp(-cumsum) closed form), so any delta / A is stable.
Kernels are compiled per dtype (float32, float64) on first use and cached on disk (cache=True).
"""

import os
import threading

import numba
import numpy as np
import torch

if "NUMBA_THREADING_LAYER" not in os.environ:
    # numba would pick GNU OpenMP when present, and its OpenMP pool aborts the process on fork() (DataLoader
    # workers). The workqueue layer survives fork; it must not be entered by two threads at once (see _launch_lock).
    numba.config.THREADING_LAYER = "workqueue"

CHUNK = 64  # steps between forward checkpoints; the backward scratch buffer is CHUNK x N
_launch_lock = threading.Lock()  # numba's workqueue threading layer must not be entered by two threads at once

# exp(x) for a block of float64 values, written so that LLVM vectorises it (numba has no vector math library without
# SVML): x = k ln2 + r with |r| <= ln2/2, degree-12 Taylor polynomial for exp(r) (truncation error < 2e-16), and 2^k
# assembled in the exponent bits. Results below exp(-708) are returned as exp(-708) (~3e-308, an absolute error far
# below any representable state change); x > 709 gives inf and NaN stays NaN. Not fastmath: the rounding trick
# (x*log2e + 1.5*2^52) - 1.5*2^52 must not be reassociated away.
_LOG2E = 1.4426950408889634
_LN2_HI = 0.6931471803691238
_LN2_LO = 1.9082149292705877e-10
_ROUND_MAGIC = 6755399441055744.0  # 1.5 * 2^52: adding it rounds to an integer held in the low mantissa bits
_ROUND_MAGIC_BITS = 0x4338000000000000


@numba.njit(cache=True, nogil=True)
def _exp_block(x, out, k_scratch, scale_scratch):
    k_bits = k_scratch.view(np.int64)
    scale_bits = scale_scratch.view(np.int64)
    for i in range(x.shape[0]):
        xi = min(max(x[i], -708.0), 709.0)
        k = xi * _LOG2E + _ROUND_MAGIC
        k_scratch[i] = k
        k -= _ROUND_MAGIC
        r = (xi - k * _LN2_HI) - k * _LN2_LO
        p = 1.0 / 479001600.0
        p = p * r + 1.0 / 39916800.0
        p = p * r + 1.0 / 3628800.0
        p = p * r + 1.0 / 362880.0
        p = p * r + 1.0 / 40320.0
        p = p * r + 1.0 / 5040.0
        p = p * r + 1.0 / 720.0
        p = p * r + 1.0 / 120.0
        p = p * r + 1.0 / 24.0
        p = p * r + 1.0 / 6.0
        p = p * r + 0.5
        p = p * r + 1.0
        out[i] = p * r + 1.0
    for i in range(x.shape[0]):
        scale_bits[i] = (k_bits[i] - _ROUND_MAGIC_BITS + 1023) << 52
    for i in range(x.shape[0]):
        xi = x[i]
        out[i] = out[i] * scale_scratch[i] if xi <= 709.0 else (np.inf if xi > 709.0 else xi)


# The same construction in float32 for float32 inputs: twice the SIMD lanes and a degree-7 polynomial (truncation
# error < 1e-8 on |r| <= ln2/2, below float32 rounding). Inputs below -87 give exp(-87) (~1.6e-38, the smallest
# normal float32 range), x > 88 gives inf. Constants are float32 scalars so numba does not promote to float64.
_F32_LOG2E = np.float32(1.4426950408889634)
_F32_LN2_HI = np.float32(0.693359375)
_F32_LN2_LO = np.float32(-2.12194440e-4)
_F32_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
_F32_ROUND_MAGIC_BITS = np.int32(0x4B400000)
_F32_LOW, _F32_HIGH = np.float32(-87.0), np.float32(88.0)
_F32_ONE, _F32_INF = np.float32(1.0), np.float32(np.inf)
_F32_TAYLOR = tuple(np.float32(1.0 / f) for f in (5040.0, 720.0, 120.0, 24.0, 6.0, 2.0))


@numba.njit(cache=True, nogil=True)
def _exp_block32(x, out, k_scratch, scale_scratch):
    k_bits = k_scratch.view(np.int32)
    scale_bits = scale_scratch.view(np.int32)
    c7, c6, c5, c4, c3, c2 = _F32_TAYLOR
    for i in range(x.shape[0]):
        xi = min(max(x[i], _F32_LOW), _F32_HIGH)
        k = xi * _F32_LOG2E + _F32_ROUND_MAGIC
        k_scratch[i] = k
        k -= _F32_ROUND_MAGIC
        r = (xi - k * _F32_LN2_HI) - k * _F32_LN2_LO
        p = c7 * r + c6
        p = p * r + c5
        p = p * r + c4
        p = p * r + c3
        p = p * r + c2
        p = p * r + _F32_ONE
        out[i] = p * r + _F32_ONE
    for i in range(x.shape[0]):
        scale_bits[i] = np.int32((k_bits[i] - _F32_ROUND_MAGIC_BITS + np.int32(127)) << np.int32(23))
    for i in range(x.shape[0]):
        xi = x[i]
        out[i] = out[i] * scale_scratch[i] if xi <= _F32_HIGH else (_F32_INF if xi > _F32_HIGH else xi)


_KERNEL_FLAGS = dict(parallel=True, cache=True, nogil=True, fastmath={"contract", "reassoc"})


@numba.njit(cache=True, nogil=True)
def _chunk_decays(delta, A, b, d, t0, t1, x_scratch, decays, k_scratch, scale_scratch, exp_block):
    """decays[k*N + n] = exp(delta[b, d, t0 + k] * A[d, n]) for the steps t0..t1-1, in the inputs' dtype."""
    n_state = A.shape[1]
    count = (t1 - t0) * n_state
    for t in range(t0, t1):
        dt = delta[b, d, t]
        base = (t - t0) * n_state
        for n in range(n_state):
            x_scratch[base + n] = dt * A[d, n]
    exp_block(x_scratch[:count], decays[:count], k_scratch[:count], scale_scratch[:count])


@numba.njit(**_KERNEL_FLAGS)
def _forward_kernel(u, delta, A, Bt, Ct, group_size, chunk, save_checkpoints, y, last_state, checkpoints,
                    exp_block):
    """u, delta (b, d, L); A (d, N); Bt, Ct (b, G, L, N) -> y (b, d, L), last_state (b, d, N), checkpoints."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    for task in numba.prange(batch * dim):
        b = task // dim
        d = task % dim
        g = d // group_size
        h = np.zeros(n_state, dtype=u.dtype)
        x_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        decays = np.empty(chunk * n_state, dtype=u.dtype)
        k_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        scale_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        for t0 in range(0, length, chunk):
            t1 = min(t0 + chunk, length)
            if save_checkpoints:
                checkpoints[b, d, t0 // chunk, :] = h  # state before step t0
            _chunk_decays(delta, A, b, d, t0, t1, x_scratch, decays, k_scratch, scale_scratch, exp_block)
            for t in range(t0, t1):
                dtu = delta[b, d, t] * u[b, d, t]
                base = (t - t0) * n_state
                acc = h[0] * 0
                for n in range(n_state):
                    hn = decays[base + n] * h[n] + dtu * Bt[b, g, t, n]
                    h[n] = hn
                    acc += hn * Ct[b, g, t, n]
                y[b, d, t] = acc
        last_state[b, d, :] = h


@numba.njit(**_KERNEL_FLAGS)
def _backward_kernel(u, delta, A, Bt, Ct, dy, dlast, checkpoints, group_size, chunk, blocks_per_group,
                     du, ddelta, dA_per_batch, dB_blocks, dC_blocks, exp_block):
    """Adjoint sweep. dA_per_batch (b, d, N); dB_blocks, dC_blocks (b, G, blocks_per_group, L, N), zero-filled."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    n_chunks = checkpoints.shape[2]
    block_size = (group_size + blocks_per_group - 1) // blocks_per_group
    for task in numba.prange(batch * groups * blocks_per_group):
        b = task // (groups * blocks_per_group)
        g = (task // blocks_per_group) % groups
        blk = task % blocks_per_group
        d_start = g * group_size + blk * block_size
        d_stop = min(d_start + block_size, (g + 1) * group_size)
        n_dims = max(d_stop - d_start, 0)
        states = np.empty((chunk + 1, n_state), dtype=u.dtype)
        x_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        decays = np.empty(chunk * n_state, dtype=u.dtype)
        k_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        scale_scratch = np.empty(chunk * n_state, dtype=u.dtype)
        # adjoint carried into the chunk from the future, a_{t+1} * g_{t+1} (+ dlast at the end); one row per channel
        adjoint = np.empty((n_dims, n_state), dtype=u.dtype)
        grad_A = np.zeros((n_dims, n_state), dtype=u.dtype)
        for i in range(n_dims):
            adjoint[i, :] = dlast[b, d_start + i, :]
        # chunks outermost so this block's (chunk, N) slice of dB/dC stays in cache across its channels
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            t1 = min(t0 + chunk, length)
            for i in range(n_dims):
                d = d_start + i
                _chunk_decays(delta, A, b, d, t0, t1, x_scratch, decays, k_scratch, scale_scratch, exp_block)
                states[0, :] = checkpoints[b, d, c, :]
                for t in range(t0, t1):
                    k = t - t0
                    dtu = delta[b, d, t] * u[b, d, t]
                    for n in range(n_state):
                        states[k + 1, n] = decays[k * n_state + n] * states[k, n] + dtu * Bt[b, g, t, n]
                for t in range(t1 - 1, t0 - 1, -1):
                    k = t - t0
                    dt = delta[b, d, t]
                    ut = u[b, d, t]
                    dyt = dy[b, d, t]
                    dtu = dt * ut
                    sum_gB = dt * 0
                    sum_Agah = dt * 0
                    for n in range(n_state):
                        a = decays[k * n_state + n]
                        gn = adjoint[i, n] + dyt * Ct[b, g, t, n]
                        dC_blocks[b, g, blk, t, n] += dyt * states[k + 1, n]
                        dB_blocks[b, g, blk, t, n] += gn * dtu
                        sum_gB += gn * Bt[b, g, t, n]
                        gah = gn * a * states[k, n]
                        sum_Agah += A[d, n] * gah
                        grad_A[i, n] += dt * gah
                        adjoint[i, n] = a * gn
                    du[b, d, t] = dt * sum_gB
                    ddelta[b, d, t] = ut * sum_gB + sum_Agah
        for i in range(n_dims):
            dA_per_batch[b, d_start + i, :] = grad_A[i, :]


def _exp_block_for(dtype: torch.dtype):
    return _exp_block32 if dtype == torch.float32 else _exp_block


def _num_threads() -> int:
    """Follow torch's intra-op thread setting (which users and nnU-Net already tune) without exceeding numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _launch(kernel, *args):
    with _launch_lock:
        numba.set_num_threads(_num_threads())
        kernel(*args)


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().contiguous().numpy()


class _NumbaSelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        batch, dim, length = u.shape
        groups = B.shape[1]
        Bt = B.detach().transpose(-1, -2).contiguous()  # (b, G, L, N): the N values of one step are contiguous
        Ct = C.detach().transpose(-1, -2).contiguous()
        u = u.detach().contiguous()
        delta = delta.detach().contiguous()
        A = A.detach().contiguous()
        save = any(ctx.needs_input_grad)
        n_chunks = (length + CHUNK - 1) // CHUNK if save else 1
        y = u.new_empty(batch, dim, length)
        last_state = u.new_empty(batch, dim, A.shape[1])
        checkpoints = u.new_empty(batch, dim, n_chunks, A.shape[1])
        _launch(_forward_kernel, u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), dim // groups, CHUNK,
                save, y.numpy(), last_state.numpy(), checkpoints.numpy(), _exp_block_for(u.dtype))
        if save:
            ctx.save_for_backward(u, delta, A, Bt, Ct, checkpoints)
        return y, last_state

    @staticmethod
    def backward(ctx, dy, dlast):
        u, delta, A, Bt, Ct, checkpoints = ctx.saved_tensors
        batch, dim, length = u.shape
        groups, n_state = Bt.shape[1], A.shape[1]
        group_size = dim // groups
        # enough blocks per group to keep every thread busy; each block costs one (L, N) partial buffer for dB and dC
        blocks_per_group = min(group_size, max(1, -(-2 * _num_threads() // (batch * groups))))
        du = torch.empty_like(u)
        ddelta = torch.empty_like(delta)
        dA_per_batch = u.new_empty(batch, dim, n_state)
        dB_blocks = u.new_zeros(batch, groups, blocks_per_group, length, n_state)
        dC_blocks = u.new_zeros(batch, groups, blocks_per_group, length, n_state)
        _launch(_backward_kernel, u.numpy(), delta.numpy(), A.numpy(), Bt.numpy(), Ct.numpy(), _np(dy), _np(dlast),
                checkpoints.numpy(), group_size, CHUNK, blocks_per_group, du.numpy(), ddelta.numpy(),
                dA_per_batch.numpy(), dB_blocks.numpy(), dC_blocks.numpy(), _exp_block_for(u.dtype))
        dB = dB_blocks.sum(2).transpose(-1, -2) if blocks_per_group > 1 else dB_blocks[:, :, 0].transpose(-1, -2)
        dC = dC_blocks.sum(2).transpose(-1, -2) if blocks_per_group > 1 else dC_blocks[:, :, 0].transpose(-1, -2)
        return du, ddelta, dA_per_batch.sum(0), dB, dC


def selective_scan_core_numba(u, delta, A, B, C):
    """Same contract as `scan_reference.selective_scan_core_reference` (CPU tensors, float32 or float64)."""
    if u.device.type != "cpu":
        raise ValueError(f"the numba scan runs on CPU tensors, got {u.device}")
    if u.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"the numba scan computes in float32 or float64, got {u.dtype}")
    return _NumbaSelectiveScan.apply(u, delta, A, B, C)
