"""Compare our selective scan and Mamba module with mamba_ssm's own CPU-usable reference code.

mamba_ssm only imports with its compiled CUDA extension, so on a CPU machine this script prepares a SCRATCH venv
outside the repository (default /tmp/mamba_venv), installs mamba-ssm there as pure Python
(MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE, --no-deps --no-build-isolation) plus transformers (imported by
mamba_ssm's package __init__), stubs the `selective_scan_cuda` module, and re-runs itself inside that venv to compare:
- mamba_ssm.ops.selective_scan_interface.selective_scan_ref vs our selective_scan_fn (every CPU backend), output,
  last state and the gradients of all eight inputs, float32 (their reference computes in float32);
- mamba_ssm.modules.mamba_simple.Mamba (slow path patched to selective_scan_ref, causal_conv1d_fn=None) vs our
  Mamba with the same state_dict (loaded strict), output and input gradient.

torch: by default the scratch venv reuses the torch of the repository's venv through a .pth file (same binary,
no multi-GB download of the CUDA wheel); --install-torch installs torch from scripts/constraints-cpu.txt instead.
The repository's venv is never modified.

    python scripts/check_mamba_ssm_parity.py [--venv /tmp/mamba_venv] [--install-torch]
"""

import argparse
import os
import subprocess
import sys
import sysconfig
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAMBA_SSM_VERSION = "2.3.2.post1"


def _run(cmd, **kwargs):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def prepare_venv(venv, install_torch):
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        _run([sys.executable, "-m", "venv", venv])
    pip = [python, "-m", "pip", "install", "-q"]
    if install_torch:
        _run(pip + ["-c", os.path.join(ROOT, "scripts", "constraints-cpu.txt"), "torch"])
    else:
        # chain the current environment's site-packages (torch, ...) behind the scratch venv's own
        site = subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        with open(os.path.join(site, "_parent_env.pth"), "w") as f:
            f.write(sysconfig.get_paths()["purelib"] + "\n")
    _run(pip + ["setuptools", "wheel", "packaging", "ninja", "einops"])
    env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="TRUE")
    _run(pip + ["--no-deps", "--no-build-isolation", f"mamba-ssm=={MAMBA_SSM_VERSION}"], env=env)
    _run(pip + ["transformers"])
    return python


def _stub_cuda_modules():
    """mamba_ssm imports its CUDA extension unguarded; the reference code we call never touches it."""
    for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
        sys.modules.setdefault(name, types.ModuleType(name))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def compare():
    import torch

    _stub_cuda_modules()
    import mamba_ssm
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    from nnunetv2_hymunet.ssm import Mamba, selective_scan_fn
    from nnunetv2_hymunet.ssm.selective_scan import ENV_VAR

    print(f"mamba_ssm {mamba_ssm.__version__}, torch {torch.__version__}")
    worst = 0.0
    names = ("out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")
    for groups in (None, 2):
        gen = torch.Generator().manual_seed(0)
        b, d, L, n = 2, 8, 97, 16
        bc = (b, n, L) if groups is None else (b, groups, n, L)
        inputs = [
            torch.randn(b, d, L, generator=gen),
            torch.randn(b, d, L, generator=gen) - 1,
            -torch.exp(torch.randn(d, n, generator=gen) * 0.5),
            torch.randn(*bc, generator=gen),
            torch.randn(*bc, generator=gen),
            torch.randn(d, generator=gen),
            torch.randn(b, d, L, generator=gen),
            torch.randn(d, generator=gen) * 0.3,
        ]

        def run(fn):
            xs = [x.clone().requires_grad_() for x in inputs]
            out, last = fn(*xs[:5], xs[5], z=xs[6], delta_bias=xs[7], delta_softplus=True, return_last_state=True)
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            ((out * w).sum() + last.sum()).backward()
            return [out, last] + [x.grad for x in xs]

        theirs = run(selective_scan_ref)
        for backend in ("reference", "native", "torch"):
            os.environ[ENV_VAR] = backend
            ours = run(selective_scan_fn)
            errs = {name: rel_err(o, t) for name, o, t in zip(names, ours, theirs)}
            worst = max(worst, *errs.values())
            print(
                f"selective_scan groups={groups} backend={backend}: max rel err {max(errs.values()):.2e} "
                + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            )

    torch.manual_seed(0)
    theirs = mamba_simple.Mamba(64, use_fast_path=False)
    mamba_simple.causal_conv1d_fn = None
    mamba_simple.selective_scan_fn = selective_scan_ref
    ours = Mamba(64)
    print("load_state_dict:", ours.load_state_dict(theirs.state_dict(), strict=True))
    x = torch.randn(2, 300, 64)
    x_theirs = x.clone().requires_grad_()
    out_theirs = theirs(x_theirs)
    out_theirs.square().mean().backward()
    for backend in ("reference", "native", "torch"):
        os.environ[ENV_VAR] = backend
        x_ours = x.clone().requires_grad_()
        out_ours = ours(x_ours)
        out_ours.square().mean().backward()
        e_out, e_dx = rel_err(out_ours, out_theirs), rel_err(x_ours.grad, x_theirs.grad)
        worst = max(worst, e_out, e_dx)
        print(f"Mamba(64) (2, 300, 64) backend={backend}: out rel err {e_out:.2e}, d input rel err {e_dx:.2e}")
    print(f"worst relative error: {worst:.2e}")
    return 0 if worst < 1e-5 else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default="/tmp/mamba_venv", help="scratch venv (outside the repository)")
    parser.add_argument(
        "--install-torch",
        action="store_true",
        help="install torch from scripts/constraints-cpu.txt instead of reusing this env's torch",
    )
    parser.add_argument("--compare", action="store_true", help=argparse.SUPPRESS)  # internal: run inside the venv
    args = parser.parse_args()
    if args.compare:
        return compare()
    if os.path.abspath(args.venv).startswith(ROOT + os.sep):
        parser.error(f"--venv {args.venv} is inside the repository; use a scratch path")
    python = prepare_venv(args.venv, args.install_torch)
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([python, os.path.abspath(__file__), "--compare"], env=env, cwd="/tmp").returncode


if __name__ == "__main__":
    sys.exit(main())
