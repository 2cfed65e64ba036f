"""Fused CPU selective scan in C (`scan_native.c`), compiled on first use with the system C compiler.

The library is built once per scalar type with `-O3 -march=native` and cached under
$HYMUNET_CACHE_DIR (default: $XDG_CACHE_HOME/nnunetv2_hymunet or ~/.cache/nnunetv2_hymunet), keyed by the source, the
compiler, the flags and the CPU, so a home directory shared by different machines gets one build per CPU. The compiler
is $CC, else the first of cc, gcc, clang on PATH. Where none works, `build_error()` says why and the dispatcher uses
the torch scan instead.

Threads follow torch's intra-op setting (which users and nnU-Net already tune). Built with OpenMP, the library splits
the tasks over OpenMP's pool, which is torch's own; without OpenMP the task ranges run on a small Python thread pool
(ctypes releases the GIL during the call).
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from nnunetv2_hymunet.fs_safety import atomic_path
from nnunetv2_hymunet.ssm.blocked_scan import BlockedScan, check_cpu_inputs

SOURCE = Path(__file__).with_name("scan_native.c")
BLOCK = 32  # lanes per block and steps per checkpoint, as in scan_native.c (checked when the library loads)
CHUNK = 16
# -ffp-contract=fast: fused multiply-adds in the vector code. -fopenmp runs the tasks in OpenMP's thread pool (torch's,
# see scan_native.c). Compilers that reject a flag get the next attempt: without OpenMP (Apple clang; the tasks then
# run on a Python thread pool), then also without -march=native (older clang on arm64).
FLAGS = ("-O3", "-ffp-contract=fast", "-std=c99", "-shared", "-fPIC")
ATTEMPTS = (("-march=native", "-fopenmp"), ("-march=native",), ())
_TYPES = {torch.float32: ("float", []), torch.float64: ("double", ["-DSCAN_DOUBLE"])}


class NativeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    if os.environ.get("HYMUNET_CACHE_DIR"):
        return Path(os.environ["HYMUNET_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nnunetv2_hymunet"


def compiler() -> str:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise NativeBuildError(f"no C compiler found (tried {', '.join(candidates)}; set CC to choose one)")


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else what platform reports."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.machine() + platform.processor()


@functools.lru_cache(maxsize=None)
def _compiler_version(cc: str) -> str:
    return subprocess.run([cc, "--version"], capture_output=True, text=True).stdout


def _build(dtype: torch.dtype) -> Path:
    cc = compiler()
    type_name, defines = _TYPES[dtype]
    key = hashlib.sha256(
        "\0".join(
            [SOURCE.read_text(), cc, _compiler_version(cc), repr((FLAGS, ATTEMPTS, defines)), _cpu_identity()]
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"scan_native_{type_name}_{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename, so concurrent first uses never load a half-written library
    with atomic_path(str(target), suffix=".so", executable=True) as tmp:
        for extra in ATTEMPTS:
            result = subprocess.run(
                [cc, *FLAGS, *extra, *defines, str(SOURCE), "-o", tmp], capture_output=True, text=True
            )
            if result.returncode == 0:
                break
        else:
            raise NativeBuildError(f"{cc} failed to compile {SOURCE.name}:\n{result.stderr.strip()}")
    return target


_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


@functools.lru_cache(maxsize=None)
def _library(dtype: torch.dtype):
    """The loaded library for dtype, or the NativeBuildError that prevented it (cached either way)."""
    try:
        lib = ctypes.CDLL(str(_build(dtype)))
    except (NativeBuildError, OSError) as error:
        return error if isinstance(error, NativeBuildError) else NativeBuildError(str(error))
    lib.scan_forward.restype = ctypes.c_int
    lib.scan_forward.argtypes = [_ptr] * 5 + [_i64] * 5 + [ctypes.c_int] + [_ptr] * 3 + [_i64] * 2 + [ctypes.c_int]
    lib.scan_backward.restype = ctypes.c_int
    lib.scan_backward.argtypes = [_ptr] * 8 + [_i64] * 6 + [_ptr] * 5 + [_i64] * 2 + [ctypes.c_int]
    lib.scan_openmp.restype = ctypes.c_int
    if (lib.scan_block(), lib.scan_chunk()) != (BLOCK, CHUNK):  # the checkpoint layout depends on both
        return NativeBuildError(
            f"{SOURCE.name} has BLOCK, CHUNK = {lib.scan_block()}, {lib.scan_chunk()}, "
            f"this module expects {BLOCK}, {CHUNK}"
        )
    return lib


def uses_openmp() -> bool:
    return not isinstance(_library(torch.float32), NativeBuildError) and bool(_library(torch.float32).scan_openmp())


def build_error():
    """None when the float32 and float64 kernels build and load here, else the reason (a string)."""
    for dtype in _TYPES:
        lib = _library(dtype)
        if isinstance(lib, NativeBuildError):
            return str(lib)
    return None


def _kernels(dtype: torch.dtype):
    lib = _library(dtype)
    if isinstance(lib, NativeBuildError):
        raise lib
    return lib


# A pool of worker threads, rebuilt after fork() (a forked child has the pool object but not its threads). A forked
# child never enters an OpenMP parallel region: GNU OpenMP's pool does not survive fork() and the child would hang.
_pool, _pool_size, _pool_lock = None, 0, threading.Lock()
_forked_child = False


def _reset_pool_after_fork():
    global _pool, _pool_size, _pool_lock, _forked_child
    _pool, _pool_size, _pool_lock, _forked_child = None, 0, threading.Lock(), True


os.register_at_fork(after_in_child=_reset_pool_after_fork)


def _run_ranges(lib, function, args, n_tasks: int):
    """Runs function(*args, begin, end, threads) over [0, n_tasks) split into one contiguous range per thread: in one
    call when the library splits the range itself (OpenMP), else one call per range on the pool."""
    global _pool, _pool_size
    threads = max(1, min(torch.get_num_threads(), n_tasks))
    if threads == 1 or (lib.scan_openmp() and not _forked_child):
        codes = [function(*args, 0, n_tasks, threads)]
    else:
        bounds = [n_tasks * i // threads for i in range(threads + 1)]
        ranges = [(bounds[i], bounds[i + 1]) for i in range(threads)]
        with _pool_lock:
            if _pool is None or _pool_size < threads - 1:
                if _pool is not None:
                    _pool.shutdown(wait=False)
                _pool, _pool_size = ThreadPoolExecutor(threads - 1, thread_name_prefix="hymunet-scan"), threads - 1
            pool = _pool
        futures = [pool.submit(function, *args, begin, end, 1) for begin, end in ranges[1:]]
        codes = [function(*args, *ranges[0], 1)] + [future.result() for future in futures]
    if any(code != 0 for code in codes):
        raise MemoryError("the native selective scan could not allocate its scratch buffers")


def _p(x: torch.Tensor) -> int:
    return x.data_ptr()


class _NativeKernel:
    """The C kernels behind `BlockedScan`. Checkpoints: (batch, G, blocks_per_group, n_chunks, N, BLOCK)."""

    block = BLOCK
    threads = staticmethod(torch.get_num_threads)

    @staticmethod
    def forward(u, delta, A, Bt, Ct, save, y, last_state):
        (batch, dim, length), groups, n_state = u.shape, Bt.shape[1], A.shape[1]
        blocks_per_group = -(-(dim // groups) // BLOCK)
        checkpoints = (
            u.new_empty(batch, groups, blocks_per_group, -(-length // CHUNK), n_state, BLOCK)
            if save
            else u.new_empty(0)
        )
        lib = _kernels(u.dtype)
        args = (
            _p(u),
            _p(delta),
            _p(A),
            _p(Bt),
            _p(Ct),
            batch,
            dim,
            length,
            n_state,
            groups,
            int(save),
            _p(y),
            _p(last_state),
            _p(checkpoints),
        )
        _run_ranges(lib, lib.scan_forward, args, batch * groups * blocks_per_group)
        return checkpoints

    @staticmethod
    def backward(u, delta, A, Bt, Ct, checkpoints, dy, dlast, du, ddelta, dA_per_batch, dB_parts, dC_parts):
        (batch, dim, length), (groups, parts), n_state = u.shape, dB_parts.shape[1:3], A.shape[1]
        lib = _kernels(u.dtype)
        args = (
            _p(u),
            _p(delta),
            _p(A),
            _p(Bt),
            _p(Ct),
            _p(dy),
            _p(dlast),
            _p(checkpoints),
            batch,
            dim,
            length,
            n_state,
            groups,
            parts,
            _p(du),
            _p(ddelta),
            _p(dA_per_batch),
            _p(dB_parts),
            _p(dC_parts),
        )
        _run_ranges(lib, lib.scan_backward, args, batch * groups * parts)


def selective_scan_core_native(u, delta, A, B, C):
    """Same contract as `scan_reference.selective_scan_core_reference` (CPU tensors, float32 or float64)."""
    check_cpu_inputs(u, "native")
    return BlockedScan.apply(_NativeKernel, u, delta, A, B, C)
