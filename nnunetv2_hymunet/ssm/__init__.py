"""Selective-scan ops (fast backends next to the plain reference) and the Mamba mixer module."""

from nnunetv2_hymunet.ssm.mamba_simple import Mamba
from nnunetv2_hymunet.ssm.selective_scan import resolve_backend, selective_scan_fn

__all__ = ["Mamba", "selective_scan_fn", "resolve_backend"]
