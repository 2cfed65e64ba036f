"""U-Net decoder with a pluggable skip fusion (MGF or concat) and nnU-Net's deep supervision contract."""

from typing import List, Sequence, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import get_matching_convtransp
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from torch import nn

from nnunetv2_hymunet.network.hybrid_encoder import HybridEncoder
from nnunetv2_hymunet.network.mgf_skip import build_skip_fusion


class FusionUNetDecoder(nn.Module):
    """Per level, deepest first: D_up = transposed conv of the deeper output, fuse(E, D_up) -> 2C channels, conv blocks.

    Like DNA's UNetDecoder: `deep_supervision` is a plain attribute the nnU-Net trainer toggles; when on, forward
    returns one logit map per level, highest resolution first; when off, the highest-resolution logits only. Every
    segmentation head is built either way so that weights load in both modes. The encoder is not kept as a submodule
    (its parameters would appear twice in the state_dict).
    """

    def __init__(
        self,
        encoder: HybridEncoder,
        num_classes: int,
        n_conv_per_stage: Sequence[int],
        deep_supervision: bool,
        fusion: str = "mgf",
        gate_norm: str = "instance",
    ):
        super().__init__()
        self.deep_supervision = deep_supervision
        self.num_classes = num_classes
        self.encoder_strides = [list(s) for s in encoder.strides]
        self.skip_channels = list(encoder.output_channels[:-1])
        n_stages_encoder = len(encoder.output_channels)
        transpconv_op = get_matching_convtransp(conv_op=encoder.conv_op)

        stages, transpconvs, fusions, seg_layers = [], [], [], []
        for s in range(1, n_stages_encoder):
            channels_below = encoder.output_channels[-s]
            channels_skip = encoder.output_channels[-(s + 1)]
            stride = encoder.strides[-s]
            transpconvs.append(transpconv_op(channels_below, channels_skip, stride, stride, bias=encoder.conv_bias))
            fusions.append(
                build_skip_fusion(
                    fusion,
                    encoder.conv_op,
                    channels_skip,
                    encoder.norm_op,
                    encoder.norm_op_kwargs,
                    encoder.conv_bias,
                    gate_norm,
                )
            )
            stages.append(
                StackedConvBlocks(
                    n_conv_per_stage[s - 1],
                    encoder.conv_op,
                    2 * channels_skip,
                    channels_skip,
                    encoder.kernel_sizes[-(s + 1)],
                    1,
                    encoder.conv_bias,
                    encoder.norm_op,
                    encoder.norm_op_kwargs,
                    encoder.dropout_op,
                    encoder.dropout_op_kwargs,
                    encoder.nonlin,
                    encoder.nonlin_kwargs,
                )
            )
            seg_layers.append(encoder.conv_op(channels_skip, num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.fusions = nn.ModuleList(fusions)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: Sequence[torch.Tensor]) -> Union[torch.Tensor, List[torch.Tensor]]:
        x = skips[-1]
        seg_outputs = []
        last = len(self.stages) - 1
        for s in range(len(self.stages)):
            # D_up is not bound to a name: it is freed once fused, not kept through the conv blocks
            x = self.stages[s](self.fusions[s](skips[-(s + 2)], self.transpconvs[s](x)))
            if self.deep_supervision or s == last:
                seg_outputs.append(self.seg_layers[s](x))
        seg_outputs = seg_outputs[::-1]
        return seg_outputs if self.deep_supervision else seg_outputs[0]

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """input_size is the network's input size (as for DNA's UNetDecoder)."""
        skip_sizes = []
        size = list(input_size)
        for stride in self.encoder_strides[:-1]:
            size = [i // j for i, j in zip(size, stride)]
            skip_sizes.append(size)
        output = np.int64(0)
        for s in range(len(self.stages)):
            size = skip_sizes[-(s + 1)]
            channels = self.skip_channels[-(s + 1)]
            n_voxels = int(np.prod(size, dtype=np.int64))
            output += self.stages[s].compute_conv_feature_map_size(size)
            output += np.int64(channels * n_voxels)  # transposed conv
            output += np.int64(self.fusions[s].feature_map_size(channels, n_voxels))
            if self.deep_supervision or s == len(self.stages) - 1:
                output += np.int64(self.num_classes * n_voxels)
        return output
