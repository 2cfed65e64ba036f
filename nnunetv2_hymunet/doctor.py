"""`hymunet doctor`: versions, the scan backend each device gets, and whether nnU-Net finds our trainers."""

import importlib.metadata
import os


def _version(dist: str, missing: str = "not installed") -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


def _native_status() -> str:
    from nnunetv2_hymunet.ssm import scan_native, selective_scan

    error = selective_scan.native_build_error()
    if error is not None:
        return f"unavailable ({error})"
    return f"built with {scan_native.compiler()}, cached in {scan_native.cache_dir()}"


def collect_report() -> dict:
    import torch

    from nnunetv2_hymunet import __version__
    from nnunetv2_hymunet.ssm import selective_scan
    from nnunetv2_hymunet.training.discovery import discovery_report

    report = {
        "nnunetv2-hymunet": __version__,
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "none (CPU build)",
        "CUDA device visible": torch.cuda.is_available(),
        "nnunetv2": _version("nnunetv2"),
        "dynamic-network-architectures": _version("dynamic-network-architectures"),
        "mamba-ssm": _version("mamba-ssm"),
        "causal-conv1d": _version("causal-conv1d"),
        "mamba_ssm CUDA kernel importable": selective_scan.mamba_ssm_kernel() is not None,
        f"{selective_scan.ENV_VAR}": os.environ.get(selective_scan.ENV_VAR, "auto (unset)"),
        "native scan kernel (C)": _native_status(),
    }
    for device in ("cpu", "cuda"):
        try:
            report[f"scan backend on {device}"] = selective_scan.resolve_backend(torch.device(device))
        except Exception as e:  # a forced backend that cannot run there
            report[f"scan backend on {device}"] = f"unavailable: {e}"
    report.update(discovery_report())
    return report


def run_doctor(args) -> int:
    report = collect_report()
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    return 0


def add_subparsers(subparsers):
    p = subparsers.add_parser(
        "doctor",
        help="print versions, scan backends and nnU-Net trainer discovery status",
        description="Print versions (torch, nnunetv2, mamba-ssm), which selective-scan backend "
        "runs on CPU and on CUDA, and whether nnU-Net finds the HyM-UNet trainers.",
    )
    p.set_defaults(func=run_doctor)
