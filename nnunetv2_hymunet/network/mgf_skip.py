"""Skip fusions: Mamba-Guided Fusion (the decoder's upsampled features gate the encoder skip) and plain concat."""

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_hymunet.errors import HyMUNetError

FUSIONS = ("mgf", "concat")
GATE_NORMS = ("instance", "none", "channel")


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of each voxel of a (batch, C, *spatial) map (ConvNeXt's channels-first LayerNorm).

    The MGF gate's "channel" norm. Unlike InstanceNorm, which subtracts each channel's mean over the image and so
    removes any per-image (global) component before the sigmoid, it normalises each voxel on its own: a component
    that is constant over the image (what the Mamba stages' global context contributes) survives, and the gate of a
    voxel does not depend on the patch it was predicted in. GroupNorm(1) would keep per-channel global offsets too, but
    it still rescales by whole-patch statistics.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps).movedim(-1, 1)


def build_gate_norm(gate_norm: str, channels: int, norm_op=None, norm_op_kwargs=None) -> nn.Module:
    """instance: the plan's norm_op (InstanceNorm in nnU-Net's plans); none: identity; channel: ChannelLayerNorm."""
    if gate_norm == "instance":
        return norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()
    if gate_norm == "none":
        return nn.Identity()
    if gate_norm == "channel":
        return ChannelLayerNorm(channels, eps=(norm_op_kwargs or {}).get("eps", 1e-5))
    raise HyMUNetError(f"gate_norm={gate_norm!r} is not one of {', '.join(GATE_NORMS)}")


class MambaGuidedFusion(nn.Module):
    """MGF skip: G = sigmoid(Norm(Conv1x1(D_up))), E' = E * G + E, output concat(D_up, E').

    D_up is the transposed-conv upsampling of the deeper decoder output; its deepest source is the Mamba stages, so
    the gate brings global context into each skip. The residual term keeps E's signal when G is small. The gate conv
    is 1x1 because the decoder convs that follow already mix space; a 3x3 gate would add 9 C^2 parameters per level.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, norm_op=None, norm_op_kwargs=None, conv_bias=False,
                 gate_norm: str = "instance"):
        super().__init__()
        self.gate_conv = conv_op(channels, channels, 1, 1, 0, bias=conv_bias)
        self.gate_norm = build_gate_norm(gate_norm, channels, norm_op, norm_op_kwargs)

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.gate_norm(self.gate_conv(upsampled)))
        # E * G + E written as E * (G + 1): one elementwise pass less in backward than addcmul on CPU
        return torch.cat((upsampled, skip * (gate + 1)), 1)

    def feature_map_size(self, channels: int, n_voxels: int) -> int:
        return 2 * channels * n_voxels  # gate conv (norm and sigmoid not counted, as in DNA) and the gated skip


class ConcatFusion(nn.Module):
    """Plain U-Net skip, concat(D_up, E): the ablation of MGF."""

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        return torch.cat((upsampled, skip), 1)

    def feature_map_size(self, channels: int, n_voxels: int) -> int:
        return 0


def build_skip_fusion(fusion: str, conv_op: Type[_ConvNd], channels: int, norm_op=None, norm_op_kwargs=None,
                      conv_bias=False, gate_norm: str = "instance") -> nn.Module:
    if fusion == "mgf":
        return MambaGuidedFusion(conv_op, channels, norm_op, norm_op_kwargs, conv_bias, gate_norm)
    if fusion == "concat":
        return ConcatFusion()
    raise HyMUNetError(f"fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
