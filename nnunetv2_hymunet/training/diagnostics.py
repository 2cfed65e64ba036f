"""Per-epoch training diagnostics per parameter group: gradient norm and update ratio ||w_end - w_start|| / ||w_start||.

They show whether every part of the hybrid trains: a group whose update ratio stays orders of magnitude below the
convs' is not learning (the failure the HyM-UNet recipe fixes). Gradients are read in an optimizer step pre-hook, so
they are the gradients the optimizer applies (after GradScaler's unscale and nnU-Net's clipping); a step GradScaler
skips is not counted. Per step the cost is one fused norm per group, kept on the device (no synchronisation).
"""

import os
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import nn

from nnunetv2_hymunet.training.optimization import is_mamba_parameter, is_selective_scan_parameter

WATCH_GROUPS = ("cnn", "mamba_proj", "selective_scan", "mamba_norm")
LOGGER_KEY = "hymunet_param_groups"
PLOT_NAME = "progress_param_groups.png"


def _plain_name(name: str) -> str:
    """Parameter name without the prefixes of torch.compile (_orig_mod.) and DDP (module.)."""
    for prefix in ("_orig_mod.", "module."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def watch_group(name: str) -> str:
    name = _plain_name(name)
    if not is_mamba_parameter(name):
        return "cnn"
    if is_selective_scan_parameter(name):
        return "selective_scan"
    if ".norm." in name or "layer_scale" in name:
        return "mamba_norm"
    return "mamba_proj"


class GroupDiagnostics:
    def __init__(self, network: nn.Module):
        self.groups: Dict[str, List[nn.Parameter]] = {}
        for name, parameter in network.named_parameters():
            if parameter.requires_grad:
                self.groups.setdefault(watch_group(name), []).append(parameter)
        self._grad_norm_sum: Dict[str, torch.Tensor] = {}
        self._steps = 0
        self._snapshot: Optional[Dict[str, List[torch.Tensor]]] = None

    def attach(self, optimizer: torch.optim.Optimizer):
        return optimizer.register_step_pre_hook(lambda *_: self.record_gradients())

    @torch.no_grad()
    def record_gradients(self) -> None:
        for group, params in self.groups.items():
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                continue
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            self._grad_norm_sum[group] = self._grad_norm_sum.get(group, 0) + norm
        self._steps += 1

    @torch.no_grad()
    def start_epoch(self) -> None:
        self._snapshot = {g: [p.detach().clone() for p in params] for g, params in self.groups.items()}
        self._grad_norm_sum, self._steps = {}, 0

    @torch.no_grad()
    def end_epoch(self) -> Dict[str, Dict[str, float]]:
        """{group: {"grad_norm": mean over this epoch's steps, "update_ratio": ..., "n_params": ...}}."""
        result = {}
        for group, params in self.groups.items():
            entry = {
                "n_params": int(sum(p.numel() for p in params)),
                "grad_norm": float("nan"),
                "update_ratio": float("nan"),
            }
            if group in self._grad_norm_sum and self._steps:
                entry["grad_norm"] = float(self._grad_norm_sum[group]) / self._steps
            if self._snapshot is not None:
                before = self._snapshot[group]
                delta = torch._foreach_sub([p.detach() for p in params], before)
                delta_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(delta)).float())
                base_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(before)).float())
                entry["update_ratio"] = float(delta_norm / base_norm.clamp_min(1e-30))
            result[group] = entry
        self._snapshot = None
        return result


def format_log_line(entry: Dict[str, Dict[str, float]]) -> str:
    parts = [f"{g}: grad norm {v['grad_norm']:.3g}, update ratio {v['update_ratio']:.3g}" for g, v in entry.items()]
    return "Parameter groups (mean gradient norm per step, ||w_end - w_start|| / ||w_start|| this epoch): " + "; ".join(
        parts
    )


def plot_history(history: List[Optional[dict]], output_folder: str) -> str:
    """Write PLOT_NAME next to nnU-Net's progress.png: gradient norm and update ratio per group and epoch."""
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    groups = sorted({g for entry in history if entry for g in entry}, key=lambda g: (g not in WATCH_GROUPS, g))
    fig, axes = plt.subplots(2, 1, figsize=(10, 9), sharex=True)
    for ax, key, label in (
        (axes[0], "grad_norm", "mean gradient norm per step"),
        (axes[1], "update_ratio", "update ratio ||Δw|| / ||w|| per epoch"),
    ):
        for group in groups:
            values = [entry[group][key] if entry and group in entry else np.nan for entry in history]
            values = [v if v and np.isfinite(v) and v > 0 else np.nan for v in values]
            ax.plot(range(len(values)), values, label=group, linewidth=2)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="best")
    axes[1].set_xlabel("epoch")
    fig.suptitle("HyM-UNet: does every parameter group train?")
    fig.tight_layout()
    path = os.path.join(output_folder, PLOT_NAME)
    fig.savefig(path)
    plt.close(fig)
    return path
