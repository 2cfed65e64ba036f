"""Every selective-scan backend on this machine against the plain sequential reference (forward and all gradients)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.ssm import resolve_backend, selective_scan_fn
from nnunetv2_hymunet.ssm.selective_scan import ENV_VAR, mamba_ssm_kernel

FAST_CPU_BACKENDS = ["native", "torch"]
# (batch, dim, L, N, groups); groups=None means B, C given as (batch, N, L). L=130, 37 and 100 are no multiple of any
# chunk size (native checkpoints every 16 steps, the torch scan uses chunks of ceil(sqrt(L))). dim=70 in 2
# groups puts a full block of 32 lanes and a 3-channel remainder block into each group.
SHAPES = [(2, 6, 37, 4, None), (1, 4, 1, 3, 2), (2, 6, 130, 5, 3), (3, 5, 64, 16, None), (2, 70, 100, 16, 2)]
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(seed, batch, dim, length, n_state, groups, dtype, delta_scale=1.0):
    """Random (never zero) inputs for selective_scan_fn, drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    bc_shape = (batch, n_state, length) if groups is None else (batch, groups, n_state, length)
    inputs = {
        "u": rand(batch, dim, length),
        "delta": rand(batch, dim, length) * 0.5 + (delta_scale - 2.0),
        "A": -torch.exp(rand(dim, n_state) * 0.5 + 0.5),
        "B": rand(*bc_shape),
        "C": rand(*bc_shape),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim) * 0.3,
    }
    return {k: v.to(dtype).requires_grad_() for k, v in inputs.items()}


def run_scan(backend, inputs, monkeypatch, return_last_state=True):
    monkeypatch.setenv(ENV_VAR, backend)
    return selective_scan_fn(
        inputs["u"],
        inputs["delta"],
        inputs["A"],
        inputs["B"],
        inputs["C"],
        inputs["D"],
        z=inputs["z"],
        delta_bias=inputs["delta_bias"],
        delta_softplus=True,
        return_last_state=return_last_state,
    )


def outputs_and_grads(backend, inputs, monkeypatch, seed=0):
    out, last_state = run_scan(backend, inputs, monkeypatch)
    gen = torch.Generator().manual_seed(seed + 1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    w_state = torch.randn(last_state.shape, generator=gen, dtype=torch.float64)
    loss = (out.double() * w_out).sum() + (last_state.double() * w_state).sum()
    grads = torch.autograd.grad(loss, [inputs[k] for k in INPUT_NAMES])
    return [out, last_state, *grads]


def rel_err(x, ref):
    ref = ref.detach().double()
    scale = ref.norm().clamp_min(1e-300)
    return ((x.detach().double() - ref).norm() / scale).item()


def assert_matches(results, reference, tol, label):
    names = ("out", "last_state", *(f"d{k}" for k in INPUT_NAMES))
    for name, got, ref in zip(names, results, reference):
        assert got.shape == ref.shape, f"{label} {name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(got).all(), f"{label} {name}: non-finite values"
        if ref.abs().max() == 0:  # e.g. dA at L=1, where the state before the only step is zero
            assert got.abs().max() == 0, f"{label} {name}: expected exactly zero"
            continue
        err = rel_err(got, ref)
        assert err <= tol, f"{label} {name}: relative error {err:.2e} > {tol:.0e}"


def available_backends():
    backends = list(FAST_CPU_BACKENDS)
    if torch.cuda.is_available():
        backends.append("torch-cuda")
        if mamba_ssm_kernel() is not None:
            backends.append("cuda")
    return backends


def to_device(inputs, backend):
    if backend in ("cuda", "torch-cuda"):
        return {k: v.detach().cuda().requires_grad_() for k, v in inputs.items()}
    return inputs


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-L{}-N{}-G{}".format(*s))
@pytest.mark.parametrize("backend", available_backends())
def test_float64_matches_reference(backend, shape, monkeypatch):
    if backend == "cuda":
        pytest.skip("mamba_ssm's CUDA kernel computes in float32; covered by test_float32_matches_float64_reference")
    seed = 1000 + sum(shape[:4])
    reference = outputs_and_grads("reference", make_inputs(seed, *shape, torch.float64), monkeypatch, seed)
    inputs = to_device(make_inputs(seed, *shape, torch.float64), backend)
    results = outputs_and_grads(backend.removesuffix("-cuda"), inputs, monkeypatch, seed)
    assert_matches([r.cpu() for r in results], reference, 1e-10, f"{backend} float64")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-d{}-L{}-N{}-G{}".format(*s))
@pytest.mark.parametrize("backend", available_backends())
def test_float32_matches_float64_reference(backend, shape, monkeypatch):
    seed = 2000 + sum(shape[:4])
    reference = outputs_and_grads("reference", make_inputs(seed, *shape, torch.float64), monkeypatch, seed)
    inputs = {k: v.detach().float().requires_grad_() for k, v in make_inputs(seed, *shape, torch.float64).items()}
    results = outputs_and_grads(backend.removesuffix("-cuda"), to_device(inputs, backend), monkeypatch, seed)
    assert results[0].dtype == torch.float32
    assert_matches([r.cpu() for r in results], reference, 1e-5, f"{backend} float32")


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_large_deltas_stay_finite_and_accurate(backend, monkeypatch):
    """Trained-size steps (per-step |delta*A| up to ~100) overflow exp(-cumsum) closed forms; ours must not."""
    shape = (2, 8, 300, 16, None)
    inputs64 = make_inputs(7, *shape, torch.float64, delta_scale=4.0)
    with torch.no_grad():
        inputs64["A"].copy_(-torch.arange(1, 17, dtype=torch.float64).repeat(8, 1))
        inputs64["delta"].mul_(2)
        max_step = (F.softplus(inputs64["delta"] + inputs64["delta_bias"][:, None]).max() * 16).item()
    assert max_step > 50, f"stress inputs too mild: max |delta*A| = {max_step:.1f}"
    reference = outputs_and_grads("reference", inputs64, monkeypatch, 7)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        inputs = {k: v.detach().to(dtype).requires_grad_() for k, v in inputs64.items()}
        results = outputs_and_grads(backend, inputs, monkeypatch, 7)
        assert_matches(results, reference, tol, f"{backend} {dtype} stress (max |delta*A| {max_step:.0f})")


@pytest.mark.parametrize("backend", FAST_CPU_BACKENDS)
def test_non_contiguous_inputs_and_optional_arguments(backend, monkeypatch):
    inputs = make_inputs(11, 2, 6, 50, 4, None, torch.float64)
    # transposed storage for every (batch, *, L) tensor: same values, non-contiguous views
    for key in ("u", "delta", "z", "B", "C"):
        inputs[key] = inputs[key].detach().transpose(-1, -2).contiguous().transpose(-1, -2).requires_grad_()
        assert not inputs[key].is_contiguous()
    monkeypatch.setenv(ENV_VAR, "reference")
    expected = selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    monkeypatch.setenv(ENV_VAR, backend)
    got = selective_scan_fn(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert not isinstance(got, tuple)
    assert rel_err(got, expected) <= 1e-10


@pytest.mark.parametrize("backend", ["reference", *FAST_CPU_BACKENDS])
def test_autocast_runs_recurrence_in_float32(backend, monkeypatch):
    inputs = make_inputs(13, 2, 4, 40, 4, None, torch.float64)
    bf16 = {k: v.detach().to(torch.bfloat16) for k, v in inputs.items()}
    monkeypatch.setenv(ENV_VAR, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, last_state = selective_scan_fn(
            bf16["u"],
            bf16["delta"],
            bf16["A"],
            bf16["B"],
            bf16["C"],
            bf16["D"],
            z=bf16["z"],
            delta_bias=bf16["delta_bias"],
            delta_softplus=True,
            return_last_state=True,
        )
    assert out.dtype == torch.bfloat16
    assert last_state.dtype == torch.float32
    f32 = {k: v.float() for k, v in bf16.items()}
    expected, expected_state = selective_scan_fn(
        f32["u"],
        f32["delta"],
        f32["A"],
        f32["B"],
        f32["C"],
        f32["D"],
        z=f32["z"],
        delta_bias=f32["delta_bias"],
        delta_softplus=True,
        return_last_state=True,
    )
    assert torch.equal(out, expected.to(torch.bfloat16))
    assert rel_err(last_state, expected_state) <= 1e-6


def test_auto_backend_and_impossible_requests(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    # the C kernel wherever a compiler is found (it must then build), else the torch scan
    compilers = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    has_compiler = any(shutil.which(cc) for cc in compilers)
    assert resolve_backend(torch.device("cpu")) == ("native" if has_compiler else "torch")
    assert resolve_backend(torch.device("cpu"), "torch") == "torch"
    with pytest.raises(HyMUNetError, match="native runs on CPU tensors only"):
        resolve_backend(torch.device("cuda"), "native")
    if mamba_ssm_kernel() is None:
        with pytest.raises(HyMUNetError, match="mamba_ssm's CUDA kernel does not import"):
            resolve_backend(torch.device("cpu"), "cuda")
    else:
        with pytest.raises(HyMUNetError, match="not on a CUDA device"):
            resolve_backend(torch.device("cpu"), "cuda")
    monkeypatch.setenv(ENV_VAR, "cuda")
    u = torch.randn(1, 2, 3)
    with pytest.raises(HyMUNetError, match=ENV_VAR):
        selective_scan_fn(u, u, torch.randn(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))
    monkeypatch.setenv(ENV_VAR, "fast-please")
    with pytest.raises(HyMUNetError, match="fast-please"):
        resolve_backend(torch.device("cpu"))


@pytest.mark.parametrize("how", ["environment", "argument"])
def test_unknown_backend_names_the_valid_choices(how, monkeypatch):
    """The numba backend was removed: asking for it is an unknown name, from the environment or as an argument."""
    valid = "is not one of auto, cuda, native, torch, reference"
    monkeypatch.setenv(ENV_VAR, "numba" if how == "environment" else "auto")
    with pytest.raises(HyMUNetError, match=f"{ENV_VAR}='numba' {valid}"):
        resolve_backend(torch.device("cpu"), None if how == "environment" else "numba")
    if how == "environment":
        u = torch.randn(1, 2, 3)
        with pytest.raises(HyMUNetError, match=valid):
            selective_scan_fn(u, u, torch.randn(2, 4), torch.randn(1, 4, 3), torch.randn(1, 4, 3))


def test_cpu_kernel_works_in_forked_worker():
    """DataLoader workers are forked from a process that may already have run the kernel (the native kernel's worker
    threads, which a forked child does not inherit)."""
    script = textwrap.dedent("""
        import multiprocessing as mp, os, sys, torch
        os.environ["HYMUNET_SCAN_BACKEND"] = sys.argv[1]
        torch.set_num_threads(2)
        from nnunetv2_hymunet.ssm import selective_scan_fn

        def scan():
            g = torch.Generator().manual_seed(0)
            u = torch.randn(2, 4, 70, generator=g)
            B = torch.randn(2, 3, 70, generator=g)
            return selective_scan_fn(u, u.sigmoid(), -torch.rand(4, 3, generator=g), B, B)

        def child(queue):
            queue.put(scan().sum().item())

        if __name__ == "__main__":
            parent = scan().sum().item()
            queue = mp.get_context("fork").Queue()
            proc = mp.get_context("fork").Process(target=child, args=(queue,))
            proc.start()
            value = queue.get(timeout=120)
            proc.join(timeout=120)
            assert proc.exitcode == 0, proc.exitcode
            assert value == parent, (value, parent)
            print("fork ok")
    """)
    env = dict(os.environ)
    env.pop(ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-c", script, "native"], capture_output=True, text=True, timeout=300, env=env
    )
    assert result.returncode == 0 and "fork ok" in result.stdout, result.stdout + result.stderr


def test_native_kernel_is_deterministic_across_thread_counts_and_pools(monkeypatch):
    """Tasks write disjoint outputs and dB / dC are summed per part, so 1 thread, 2 OpenMP threads and 2 Python
    threads (the path of forked children and of compilers without OpenMP) give bit-identical results."""
    from nnunetv2_hymunet.ssm import scan_native

    assert scan_native.uses_openmp()  # gcc and clang on Linux have OpenMP
    results = []
    previous = torch.get_num_threads()
    try:
        for threads, python_pool in ((1, False), (2, False), (2, True)):
            torch.set_num_threads(threads)
            monkeypatch.setattr(scan_native, "_forked_child", python_pool)
            monkeypatch.setattr(scan_native, "_pool", None)
            inputs = make_inputs(19, 2, 100, 90, 16, 2, torch.float32)
            results.append(outputs_and_grads("native", inputs, monkeypatch, 19))
            assert (scan_native._pool is not None) == python_pool
    finally:
        torch.set_num_threads(previous)
    for one, two, three in zip(*results):
        assert torch.equal(one, two) and torch.equal(one, three)


def test_native_builds_without_openmp(tmp_path):
    """A compiler without OpenMP (Apple clang) gets a library that runs its tasks on the Python thread pool."""
    script = textwrap.dedent("""
        import torch
        from nnunetv2_hymunet.ssm import scan_native
        from nnunetv2_hymunet.ssm.scan_reference import selective_scan_core_reference
        scan_native.ATTEMPTS = (("-fno-openmp",),)
        torch.set_num_threads(2)
        assert scan_native.build_error() is None and not scan_native.uses_openmp()
        g = torch.Generator().manual_seed(0)
        u, delta = torch.randn(2, 64, 50, generator=g, dtype=torch.float64), torch.rand(2, 64, 50, generator=g)
        A, B = -torch.rand(64, 4, generator=g, dtype=torch.float64), torch.randn(2, 1, 4, 50, generator=g)
        args = (u, delta.double(), A, B.double(), B.double())
        y, last = scan_native.selective_scan_core_native(*args)
        y_ref, last_ref = selective_scan_core_reference(*args)
        assert scan_native._pool is not None
        assert torch.allclose(y, y_ref, rtol=1e-10, atol=1e-12) and torch.allclose(last, last_ref, rtol=1e-10)
        print("ok")
    """)
    env = dict(os.environ, HYMUNET_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


def test_native_build_is_cached_and_keyed_by_source(tmp_path, monkeypatch):
    from nnunetv2_hymunet.ssm import scan_native

    monkeypatch.setenv("HYMUNET_CACHE_DIR", str(tmp_path / "cache"))
    first = scan_native._build(torch.float64)
    mtime = first.stat().st_mtime_ns
    assert scan_native._build(torch.float64) == first and first.stat().st_mtime_ns == mtime  # not rebuilt
    source = tmp_path / "scan_native.c"
    source.write_text(scan_native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(scan_native, "SOURCE", source)
    assert scan_native._build(torch.float64) != first
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".so", ".so"]  # no temporary files left


@pytest.mark.parametrize("cc", ["no-such-compiler", "false"])
def test_native_without_a_working_compiler_falls_back_to_torch(cc, tmp_path):
    script = textwrap.dedent("""
        import os, sys, torch
        from nnunetv2_hymunet.errors import HyMUNetError
        from nnunetv2_hymunet.ssm import resolve_backend, selective_scan_fn
        assert resolve_backend(torch.device("cpu")) == "torch", resolve_backend(torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        u, B = torch.randn(2, 4, 40, generator=g), torch.randn(2, 3, 40, generator=g)
        args = (u, u.sigmoid(), -torch.rand(4, 3, generator=g), B, B)
        fallback = selective_scan_fn(*args)
        os.environ["HYMUNET_SCAN_BACKEND"] = "reference"
        torch.testing.assert_close(fallback, selective_scan_fn(*args))
        assert "numba" not in sys.modules  # nothing imports it, installed or not
        try:
            resolve_backend(torch.device("cpu"), "native")
        except HyMUNetError as e:
            print(e)
    """)
    env = dict(os.environ, CC=cc, HYMUNET_CACHE_DIR=str(tmp_path))
    env.pop(ENV_VAR, None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = "no C compiler found" if cc == "no-such-compiler" else "failed to compile scan_native.c"
    assert f"{ENV_VAR}=native but the C kernel cannot be built here" in result.stdout
    assert expected in result.stdout, result.stdout
    assert not list(tmp_path.glob("*.so")), "a failed build must not leave a library behind"
