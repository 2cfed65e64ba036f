"""Skip fusions: Mamba-Guided Fusion (the decoder's upsampled features gate the encoder skip) and plain concat."""

from typing import Type

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from nnunetv2_hymunet.errors import HyMUNetError

FUSIONS = ("mgf", "concat")


class MambaGuidedFusion(nn.Module):
    """MGF skip: G = sigmoid(Norm(Conv1x1(D_up))), E' = E * G + E, output concat(D_up, E').

    D_up is the transposed-conv upsampling of the deeper decoder output; its deepest source is the Mamba stages, so
    the gate brings global context into each skip. The residual term keeps E's signal when G is small. The gate conv
    is 1x1 because the decoder convs that follow already mix space; a 3x3 gate would add 9 C^2 parameters per level.
    """

    def __init__(self, conv_op: Type[_ConvNd], channels: int, norm_op=None, norm_op_kwargs=None, conv_bias=False):
        super().__init__()
        self.gate_conv = conv_op(channels, channels, 1, 1, 0, bias=conv_bias)
        self.gate_norm = norm_op(channels, **(norm_op_kwargs or {})) if norm_op is not None else nn.Identity()

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
                      conv_bias=False) -> nn.Module:
    if fusion == "mgf":
        return MambaGuidedFusion(conv_op, channels, norm_op, norm_op_kwargs, conv_bias)
    if fusion == "concat":
        return ConcatFusion()
    raise HyMUNetError(f"fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
