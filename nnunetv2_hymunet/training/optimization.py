"""The HyM-UNet training recipe: nnU-Net's SGD for the CNN, AdamW with warm-up for the Mamba layers.

Why two recipes: nnU-Net's SGD (lr 1e-2, momentum 0.99, weight decay 3e-5 on everything) was tuned for convolutions.
Under it the selective scan's own parameters (A_log, D, dt_proj, x_proj) receive gradients many orders of magnitude
smaller than the convs' and stay at their initialisation (docs/benchmarks.md, "Mamba learning"). An adaptive optimizer
normalises each parameter's step, which is how Mamba is trained everywhere else.

One `HybridOptimizer` holds every group (so nnU-Net's checkpoints, GradScaler, DDP and `self.optimizer` keep working
unchanged); each group names its `algorithm` ("sgd" or "adamw"). `GroupPolyLRScheduler` applies nnU-Net's poly decay
to each group's own base lr, with an optional linear warm-up per group.
"""

import math
from typing import Dict, Iterable, List, Tuple

import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from torch import nn

from nnunetv2_hymunet.errors import HyMUNetError

ALGORITHMS = ("sgd", "adamw")

# Mamba parameters that must not decay: the state matrix, the skip, the step-size bias (mamba_ssm flags the first two
# with _no_weight_decay; decaying dt_proj.bias would pull every step size towards softplus(0)), norms and biases.
_NO_DECAY_SUFFIXES = ("A_log", "D", "dt_proj.bias", "layer_scale", "gamma")


def is_mamba_parameter(name: str) -> bool:
    """Parameters of the Mamba token mixers (MambaLayer: its LayerNorm, its Mamba, an optional layer scale)."""
    return ".mamba_layers." in f".{name}"


def is_selective_scan_parameter(name: str) -> bool:
    """The selective scan's own parameters: A, D, the step size and the input-dependent B/C/step selection."""
    return is_mamba_parameter(name) and any(part in name for part in (".A_log", ".D", ".dt_proj.", ".x_proj."))


def mamba_decays(name: str, parameter: torch.Tensor) -> bool:
    if parameter.ndim <= 1 or ".norm." in name:  # biases, norms, A-like vectors
        return False
    return not any(name.endswith(suffix) for suffix in _NO_DECAY_SUFFIXES)


def split_parameters(network: nn.Module) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """{"cnn": ..., "mamba": ..., "mamba_no_decay": ...}: every trainable parameter in exactly one group."""
    groups = {"cnn": [], "mamba": [], "mamba_no_decay": []}
    for name, parameter in network.named_parameters():
        if not parameter.requires_grad:
            continue
        if not is_mamba_parameter(name):
            groups["cnn"].append((name, parameter))
        elif mamba_decays(name, parameter):
            groups["mamba"].append((name, parameter))
        else:
            groups["mamba_no_decay"].append((name, parameter))
    return groups


class HybridOptimizer(torch.optim.Optimizer):
    """SGD (torch.optim.SGD's update, Nesterov momentum) or AdamW (torch.optim.AdamW's update) per parameter group.

    Each group carries `algorithm` plus that algorithm's hyperparameters: sgd: lr, momentum, nesterov, weight_decay;
    adamw: lr, betas, eps, weight_decay (decoupled). Groups may also carry `name` and `warmup_epochs` (read by
    GroupPolyLRScheduler). The state lives in one state_dict, so nnU-Net's checkpoint saves and `--c` restores both
    algorithms' moments.
    """

    def __init__(self, param_groups: Iterable[dict]):
        param_groups = list(param_groups)
        for group in param_groups:
            algorithm = group.get("algorithm")
            if algorithm not in ALGORITHMS:
                raise HyMUNetError(
                    f"parameter group {group.get('name', '?')!r}: algorithm={algorithm!r} is not one "
                    f"of {', '.join(ALGORITHMS)}"
                )
            if not (math.isfinite(group.get("lr", float("nan"))) and group["lr"] >= 0):
                raise HyMUNetError(f"parameter group {group.get('name', '?')!r}: lr must be a finite number >= 0")
        defaults = {
            "lr": 1e-2,
            "momentum": 0.99,
            "nesterov": True,
            "weight_decay": 0.0,
            "betas": (0.9, 0.999),
            "eps": 1e-8,
        }
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["algorithm"] == "sgd":
                self._sgd(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _sgd(self, group: dict, params: List[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        if weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
        if momentum != 0:
            buffers = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(momentum).add_(g)
                buffers.append(state["momentum_buffer"])
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_add_(params, grads, alpha=-lr)

    def _adamw(self, group: dict, params: List[torch.Tensor]) -> None:
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0  # a Python int: no device sync per parameter on CUDA
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = step = int(state["step"]) + 1
            if weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            exp_avg, exp_avg_sq, grad = state["exp_avg"], state["exp_avg_sq"], p.grad
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class GroupPolyLRScheduler(PolyLRScheduler):
    """nnU-Net's PolyLRScheduler, applied to each group's own base lr (`initial_lr`) instead of one lr for all.

    A group with `warmup_epochs` = W > 0 starts at 1/(W+1) of its poly lr and reaches it linearly at epoch W.
    """

    def __init__(self, optimizer, max_steps: int, exponent: float = 0.9, current_step: int = None):
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        super().__init__(optimizer, optimizer.param_groups[0]["initial_lr"], max_steps, exponent, current_step)

    def lr_factor(self, group: dict, current_step: int) -> float:
        poly = max(0.0, 1 - current_step / self.max_steps) ** self.exponent
        warmup = group.get("warmup_epochs", 0) or 0
        return poly * (min(1.0, (current_step + 1) / (warmup + 1)) if warmup > 0 else 1.0)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        for group in self.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * self.lr_factor(group, current_step)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
