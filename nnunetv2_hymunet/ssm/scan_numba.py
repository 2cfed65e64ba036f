"""Fused CPU selective scan compiled with numba: the fallback for machines where the C kernel (scan_native.c) cannot
be built (optional: pip install 'nnunetv2-hymunet[numba]'; without it such machines use the torch scan). Same
algorithm, one pass per array written (numba cannot tell LLVM that its scratch arrays do not alias).

Channels are scanned in blocks of BLOCK that share B and C (one group). A block's state is an (N, BLOCK) plane, so
every inner loop runs over contiguous channels and LLVM vectorises it without reductions across vector lanes (a
per-channel loop over the N states would reduce across lanes at every step for y_t = C_t . h_t).

Forward: one parallel task per (batch, group, block). The sequence is processed in chunks of CHUNK steps through small
(CHUNK, N, BLOCK) scratch planes; only the output, the last state and the state before every chunk (a checkpoint) are
written, never all (b, d, L, N) states.
Backward: each task owns a part of a group's blocks and visits the chunks in reverse; a chunk's decays and states are
recomputed from its checkpoint and the adjoint is swept backwards through them. dB and dC are sums over the channels
of a group: each part accumulates its blocks' contributions in a private (CHUNK, N, BLOCK) buffer, reduces it over the
lanes into its own (L, N) buffer, and the parts are summed afterwards, so the result is race-free and independent of
thread scheduling.

Every step multiplies by exp(delta * A) directly (no exp(-cumsum) closed form), so any delta / A is stable.
Kernels are compiled per dtype (float32, float64) on first use and cached on disk (cache=True) under
$HYMUNET_CACHE_DIR/numba (default ~/.cache/nnunetv2_hymunet/numba) unless NUMBA_CACHE_DIR is set.
"""

import os
import threading

import numba
import numpy as np
import torch
from numba.extending import overload

from nnunetv2_hymunet.ssm.blocked_scan import BlockedScan, check_cpu_inputs
from nnunetv2_hymunet.ssm.scan_native import cache_dir

if not os.environ.get("NUMBA_CACHE_DIR"):
    # numba caches beside the source by default, i.e. inside the installed package; follow $HYMUNET_CACHE_DIR like the
    # C kernel. Set before the decorators below, which pick their cache folder (numba keys it by source path there).
    numba.config.CACHE_DIR = str(cache_dir() / "numba")

CHUNK = 16  # steps between forward checkpoints; scratch planes are CHUNK x N x BLOCK (32 KB in float32 for N=16)
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


_KERNEL_FLAGS = dict(parallel=True, cache=True, nogil=True, fastmath={"contract"})
_HELPER_FLAGS = dict(cache=True, nogil=True, fastmath={"contract"})
# Channels scanned together (lanes). The recurrence is one elementwise FMA loop over a flat (N * BLOCK) plane (with
# dt u B_t precomputed); the other loops run over BLOCK contiguous lanes. 32 lanes = 4 AVX2 float32 vectors per row;
# 16 was slower, 64 no faster within the noise of this machine.
BLOCK = 32


# Hot loops index 1-D row views with the bare loop variable: an index computed from a runtime stride (k * block + w)
# is signed, numba wraps negative indices for it, and that check alone makes those loops ~5x slower.


@numba.njit(**_HELPER_FLAGS)
def _load_block(src, b, d0, width, t0, steps, out):
    """out[k, w] = src[b, d0 + w, t0 + k] for w < width (lanes >= width keep their zeros)."""
    for w in range(width):
        column = src[b, d0 + w, t0 : t0 + steps]
        for k in range(steps):
            out[k, w] = column[k]


@numba.njit(**_HELPER_FLAGS)
def _store_block(values, b, d0, width, t0, steps, dst):
    for w in range(width):
        column = dst[b, d0 + w, t0 : t0 + steps]
        for k in range(steps):
            column[k] = values[k, w]


@numba.njit(**_HELPER_FLAGS)
def _load_A(A, d0, width, out):
    """out[n, w] = A[d0 + w, n]; lanes >= width get 0 (decay 1, which keeps their zero state zero)."""
    out[:] = 0
    for w in range(width):
        for n in range(A.shape[1]):
            out[n, w] = A[d0 + w, n]


@numba.njit(**_HELPER_FLAGS)
def _chunk_inputs(dt, dtu, A_block, Bt, b, g, t0, steps, x, x_in):
    """x[k, n] = dt[k] * A[n] (to be exponentiated) and x_in[k, n] = dt[k] u[k] B[t0 + k, n], rows of block lanes."""
    for k in range(steps):
        dt_k, dtu_k = dt[k], dtu[k]
        for n in range(A_block.shape[0]):
            bn = Bt[b, g, t0 + k, n]
            a_n, x_kn, x_in_kn = A_block[n], x[k, n], x_in[k, n]
            for w in range(a_n.shape[0]):
                x_kn[w] = dt_k[w] * a_n[w]
                x_in_kn[w] = dtu_k[w] * bn


@numba.njit(**_HELPER_FLAGS)
def _chunk_states(decays, x_in, steps, states):
    """states[k + 1] = decays[k] * states[k] + x_in[k] for k < steps, elementwise on flat (N * block) planes."""
    for k in range(steps):
        for n in range(states.shape[1]):
            a, x, h, h_next = decays[k, n], x_in[k, n], states[k, n], states[k + 1, n]
            for w in range(h.shape[0]):
                h_next[w] = a[w] * h[w] + x[w]


def _exp_block_any(x, out, k_scratch, scale_scratch):
    """exp for a block in x's dtype; resolved at compile time (a function passed as an argument would get a new type
    in every process and defeat numba's on-disk cache)."""
    raise NotImplementedError("only callable from numba-compiled code")


@overload(_exp_block_any, jit_options=dict(cache=True, nogil=True))
def _exp_block_any_impl(x, out, k_scratch, scale_scratch):
    if x.dtype == numba.types.float32:
        return lambda x, out, k_scratch, scale_scratch: _exp_block32(x, out, k_scratch, scale_scratch)
    return lambda x, out, k_scratch, scale_scratch: _exp_block(x, out, k_scratch, scale_scratch)


@numba.njit(**_HELPER_FLAGS)
def _exp_chunk(x, decays, k_scratch, scale_scratch, steps):
    _exp_block_any(x[:steps].ravel(), decays[:steps].ravel(), k_scratch[:steps].ravel(), scale_scratch[:steps].ravel())


@numba.njit(**_HELPER_FLAGS)
def _chunk_scratch(like, chunk, n_state, block):
    """The buffers `_chunk_scan` works in, in like's dtype: dt, ut (zeroed: lanes beyond a block's width stay 0), dtu,
    x, x_in, decays, k_scratch, scale_scratch and states (zeroed: the state before the first step)."""
    dtype = like.dtype
    planes = [np.empty((chunk, n_state, block), dtype=dtype) for _ in range(5)]
    return (
        np.zeros((chunk, block), dtype=dtype),
        np.zeros((chunk, block), dtype=dtype),
        np.empty((chunk, block), dtype=dtype),
        planes[0],
        planes[1],
        planes[2],
        planes[3],
        planes[4],
        np.zeros((chunk + 1, n_state, block), dtype=dtype),
    )


@numba.njit(**_HELPER_FLAGS)
def _chunk_scan(
    u, delta, A_block, Bt, b, g, d0, width, t0, steps, dt, ut, dtu, x, x_in, decays, k_scratch, scale_scratch, states
):
    """Loads the block's delta and u for steps t0..t0+steps-1 into dt, ut (and dtu = dt * u), computes the decays and
    advances states[0] (the state before step t0) into states[1..steps]. Shared by the forward and the backward's
    recomputation, so both see bit-identical states."""
    _load_block(delta, b, d0, width, t0, steps, dt)
    _load_block(u, b, d0, width, t0, steps, ut)
    for k in range(steps):
        dtu_k, dt_k, u_k = dtu[k], dt[k], ut[k]
        for w in range(dtu_k.shape[0]):
            dtu_k[w] = dt_k[w] * u_k[w]
    _chunk_inputs(dt, dtu, A_block, Bt, b, g, t0, steps, x, x_in)
    _exp_chunk(x, decays, k_scratch, scale_scratch, steps)
    _chunk_states(decays, x_in, steps, states)


@numba.njit(**_KERNEL_FLAGS)
def _forward_kernel(u, delta, A, Bt, Ct, group_size, chunk, block, save_checkpoints, y, last_state, checkpoints):
    """u, delta (b, d, L); A (d, N); Bt, Ct (b, G, L, N) -> y (b, d, L), last_state (b, d, N), checkpoints."""
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    blocks_per_group = (group_size + block - 1) // block
    for task in numba.prange(batch * groups * blocks_per_group):
        b = task // (groups * blocks_per_group)
        g = (task // blocks_per_group) % groups
        d0 = g * group_size + (task % blocks_per_group) * block
        width = min(block, (g + 1) * group_size - d0)
        dt, ut, dtu, x, x_in, decays, k_scratch, scale_scratch, states = _chunk_scratch(u, chunk, n_state, block)
        y_block = np.empty((chunk, block), dtype=u.dtype)
        A_block = np.empty((n_state, block), dtype=u.dtype)
        _load_A(A, d0, width, A_block)
        for t0 in range(0, length, chunk):
            steps = min(chunk, length - t0)
            if save_checkpoints:
                for w in range(width):
                    for n in range(n_state):
                        checkpoints[b, d0 + w, t0 // chunk, n] = states[0, n, w]  # state before step t0
            _chunk_scan(
                u,
                delta,
                A_block,
                Bt,
                b,
                g,
                d0,
                width,
                t0,
                steps,
                dt,
                ut,
                dtu,
                x,
                x_in,
                decays,
                k_scratch,
                scale_scratch,
                states,
            )
            # y_t = C_t . h_t, accumulated over n into one row of block lanes per step
            y_block[:] = 0
            for k in range(steps):
                y_k = y_block[k]
                for n in range(n_state):
                    cn = Ct[b, g, t0 + k, n]
                    h = states[k + 1, n]
                    for w in range(block):
                        y_k[w] += h[w] * cn
            _store_block(y_block, b, d0, width, t0, steps, y)
            states[0] = states[steps]
        for w in range(width):
            for n in range(n_state):
                last_state[b, d0 + w, n] = states[0, n, w]


@numba.njit(**_KERNEL_FLAGS)
def _backward_kernel(
    u,
    delta,
    A,
    Bt,
    Ct,
    dy,
    dlast,
    checkpoints,
    group_size,
    chunk,
    block,
    parts_per_group,
    du,
    ddelta,
    dA_per_batch,
    dB_parts,
    dC_parts,
):
    """Adjoint sweep. dA_per_batch (b, d, N); dB_parts, dC_parts (b, G, parts_per_group, L, N).

    A task owns one part of a group's channel blocks; chunks are visited outermost, in reverse, so that the part's
    (chunk, N, block) dB / dC accumulators stay in cache across its blocks. The backward pass is split into loops
    that each write one buffer, so that LLVM vectorises every one of them.
    """
    batch, dim, length = u.shape
    n_state = A.shape[1]
    groups = Bt.shape[1]
    n_chunks = checkpoints.shape[2]
    blocks_per_group = (group_size + block - 1) // block
    blocks_per_part = (blocks_per_group + parts_per_group - 1) // parts_per_group
    for task in numba.prange(batch * groups * parts_per_group):
        b = task // (groups * parts_per_group)
        g = (task // parts_per_group) % groups
        part = task % parts_per_group
        first_block = part * blocks_per_part
        n_blocks = max(min(first_block + blocks_per_part, blocks_per_group) - first_block, 0)
        dt, ut, dtu, x, x_in, decays, k_scratch, scale_scratch, states = _chunk_scratch(u, chunk, n_state, block)
        dyt = np.zeros((chunk, block), dtype=u.dtype)
        sum_gB = np.empty((chunk, block), dtype=u.dtype)
        sum_Agah = np.empty((chunk, block), dtype=u.dtype)
        A_block = np.empty((n_state, block), dtype=u.dtype)
        dB_acc = np.empty((chunk, n_state, block), dtype=u.dtype)
        dC_acc = np.empty((chunk, n_state, block), dtype=u.dtype)
        # adjoint carried into a chunk from the future, a_{t+1} * g_{t+1} (+ dlast at the end), one plane per block
        adjoint = np.zeros((n_blocks, n_state, block), dtype=u.dtype)
        grad_A = np.zeros((n_blocks, n_state, block), dtype=u.dtype)
        for j in range(n_blocks):
            d0 = g * group_size + (first_block + j) * block
            for w in range(min(block, (g + 1) * group_size - d0)):
                for n in range(n_state):
                    adjoint[j, n, w] = dlast[b, d0 + w, n]
        for c in range(n_chunks - 1, -1, -1):
            t0 = c * chunk
            steps = min(chunk, length - t0)
            dB_acc[:] = 0
            dC_acc[:] = 0
            for j in range(n_blocks):
                d0 = g * group_size + (first_block + j) * block
                width = min(block, (g + 1) * group_size - d0)
                if width < block:  # the group's last block: lanes >= width must be zero
                    dt[:] = 0
                    ut[:] = 0
                    dyt[:] = 0
                _load_block(dy, b, d0, width, t0, steps, dyt)
                _load_A(A, d0, width, A_block)
                # recompute the chunk's decays and states from its checkpoint
                states[0] = 0
                for w in range(width):
                    for n in range(n_state):
                        states[0, n, w] = checkpoints[b, d0 + w, c, n]
                _chunk_scan(
                    u,
                    delta,
                    A_block,
                    Bt,
                    b,
                    g,
                    d0,
                    width,
                    t0,
                    steps,
                    dt,
                    ut,
                    dtu,
                    x,
                    x_in,
                    decays,
                    k_scratch,
                    scale_scratch,
                    states,
                )
                # grads[k] = g_t = adjoint_{t+1} + dy_t C_t, and adjoint_t = a_t g_t (grads reuses x's buffer)
                grads = x
                for k in range(steps):
                    dy_k = dyt[k]
                    for n in range(n_state):
                        cn = Ct[b, g, t0 + k, n]
                        g_kn = grads[k, n]
                        for w in range(block):
                            g_kn[w] = dy_k[w] * cn
                for k in range(steps - 1, -1, -1):
                    for n in range(n_state):
                        adj, g_kn, a_kn = adjoint[j, n], grads[k, n], decays[k, n]
                        for w in range(block):
                            gi = adj[w] + g_kn[w]
                            g_kn[w] = gi
                            adj[w] = a_kn[w] * gi
                # dC_t += dy_t h_t ; dB_t += g_t dt_t u_t (summed over the lanes at the end of the chunk)
                for k in range(steps):
                    dy_k, dtu_k = dyt[k], dtu[k]
                    for n in range(n_state):
                        dC_kn, h_kn = dC_acc[k, n], states[k + 1, n]
                        for w in range(block):
                            dC_kn[w] += dy_k[w] * h_kn[w]
                        dB_kn, g_kn = dB_acc[k, n], grads[k, n]
                        for w in range(block):
                            dB_kn[w] += g_kn[w] * dtu_k[w]
                # sum_n g_t B_t -> du and the u-part of ddelta
                sum_gB[:] = 0
                for k in range(steps):
                    s_k = sum_gB[k]
                    for n in range(n_state):
                        bn = Bt[b, g, t0 + k, n]
                        g_kn = grads[k, n]
                        for w in range(block):
                            s_k[w] += g_kn[w] * bn
                # gah_t = g_t a_t h_{t-1} (in decays' buffer) -> dA and the A-part of ddelta
                gah = decays
                sum_Agah[:] = 0
                grad_A_j = grad_A[j]
                for k in range(steps):
                    s_k, dt_k = sum_Agah[k], dt[k]
                    for n in range(n_state):
                        gah_kn, g_kn, h_kn, a_n, gA_n = gah[k, n], grads[k, n], states[k, n], A_block[n], grad_A_j[n]
                        for w in range(block):
                            gah_kn[w] *= g_kn[w] * h_kn[w]
                        for w in range(block):
                            s_k[w] += a_n[w] * gah_kn[w]
                        for w in range(block):
                            gA_n[w] += dt_k[w] * gah_kn[w]
                for k in range(steps):
                    s_k, sA_k, dt_k, u_k = sum_gB[k], sum_Agah[k], dt[k], ut[k]
                    for w in range(block):
                        sA_k[w] += u_k[w] * s_k[w]
                        s_k[w] *= dt_k[w]
                _store_block(sum_gB, b, d0, width, t0, steps, du)
                _store_block(sum_Agah, b, d0, width, t0, steps, ddelta)
            for k in range(steps):
                for n in range(n_state):
                    dB_kn, dC_kn = dB_acc[k, n], dC_acc[k, n]
                    sb = dB_kn[0]
                    sc = dC_kn[0]
                    for w in range(1, block):
                        sb += dB_kn[w]
                        sc += dC_kn[w]
                    dB_parts[b, g, part, t0 + k, n] = sb
                    dC_parts[b, g, part, t0 + k, n] = sc
        for j in range(n_blocks):
            d0 = g * group_size + (first_block + j) * block
            for w in range(min(block, (g + 1) * group_size - d0)):
                for n in range(n_state):
                    dA_per_batch[b, d0 + w, n] = grad_A[j, n, w]


def _num_threads() -> int:
    """Follow torch's intra-op thread setting (which users and nnU-Net already tune) without exceeding numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))


def _choose_threading_layer() -> None:
    """Before numba's first parallel launch in this process, prefer the workqueue layer unless the user chose one.

    numba would pick GNU OpenMP when present, and a child forked after that pool started (DataLoader workers) is
    terminated ("fork() called from a process already using GNU OpenMP"). The workqueue layer survives fork; it must
    not be entered by two threads at once (see _launch_lock). Done here, not at import, so that importing the package
    leaves numba's configuration alone; once numba's pool runs, its layer is fixed and is left as it is.
    """
    from numba.np.ufunc import parallel

    if numba.config.THREADING_LAYER == "default" and not getattr(parallel, "_is_initialized", False):
        numba.config.THREADING_LAYER = "workqueue"


def _launch(kernel, *args):
    with _launch_lock:
        _choose_threading_layer()
        numba.set_num_threads(_num_threads())
        kernel(*args)


class _NumbaKernel:
    """The numba kernels behind `BlockedScan`. Checkpoints: (batch, dim, n_chunks, N)."""

    block = BLOCK
    threads = staticmethod(_num_threads)

    @staticmethod
    def forward(u, delta, A, Bt, Ct, save, y, last_state):
        (batch, dim, length), groups = u.shape, Bt.shape[1]
        checkpoints = u.new_empty(batch, dim, -(-length // CHUNK) if save else 1, A.shape[1])
        _launch(
            _forward_kernel,
            u.numpy(),
            delta.numpy(),
            A.numpy(),
            Bt.numpy(),
            Ct.numpy(),
            dim // groups,
            CHUNK,
            BLOCK,
            save,
            y.numpy(),
            last_state.numpy(),
            checkpoints.numpy(),
        )
        return checkpoints

    @staticmethod
    def backward(u, delta, A, Bt, Ct, checkpoints, dy, dlast, du, ddelta, dA_per_batch, dB_parts, dC_parts):
        dim, groups, parts = u.shape[1], dB_parts.shape[1], dB_parts.shape[2]
        _launch(
            _backward_kernel,
            u.numpy(),
            delta.numpy(),
            A.numpy(),
            Bt.numpy(),
            Ct.numpy(),
            dy.numpy(),
            dlast.numpy(),
            checkpoints.numpy(),
            dim // groups,
            CHUNK,
            BLOCK,
            parts,
            du.numpy(),
            ddelta.numpy(),
            dA_per_batch.numpy(),
            dB_parts.numpy(),
            dC_parts.numpy(),
        )


def selective_scan_core_numba(u, delta, A, B, C):
    """Same contract as `scan_reference.selective_scan_core_reference` (CPU tensors, float32 or float64)."""
    check_cpu_inputs(u, "numba")
    return BlockedScan.apply(_NumbaKernel, u, delta, A, B, C)
