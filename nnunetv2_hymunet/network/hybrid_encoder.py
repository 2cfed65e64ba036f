"""The hybrid encoder: residual conv stages, with Mamba token mixers appended to the deepest stages."""

import contextlib
import hashlib
from typing import List, Sequence

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim, maybe_convert_scalar_to_list
from dynamic_network_architectures.building_blocks.residual import StackedResidualBlocks
from torch import nn

from nnunetv2_hymunet.network.mamba_layer import MambaLayer, effective_expand
from nnunetv2_hymunet.network.projection_skip import FoldedNormSkip, RecomputedSkip, can_fold


def recompute_projection_skips(blocks: StackedResidualBlocks) -> None:
    """Swap each BasicBlockD's projection skip for a FoldedNormSkip (InstanceNorm without running statistics: the
    norm folded into the 1x1 conv) or else a RecomputedSkip (not when a norm tracks running statistics: recomputing
    would update them twice)."""
    for block in blocks.blocks:
        skip = getattr(block, "skip", None)
        if not isinstance(skip, nn.Sequential):
            continue
        if can_fold(skip):
            block.skip = FoldedNormSkip(*skip)
        elif not any(getattr(m, "track_running_stats", False) for m in skip.modules()):
            block.skip = RecomputedSkip(*skip)


@contextlib.contextmanager
def rng_untouched(stage: int):
    """Run the body on a private CPU generator state, leaving the global one as it was.

    The Mamba layers are built inside it, so a network with and without them (the No-Mamba control) draws the same
    conv weights for a given torch seed. Their own seed is derived from the current state (read, not consumed) and
    the stage index, so a seed still makes them reproducible and different stages differ.
    """
    digest = hashlib.blake2b(torch.get_rng_state().numpy().tobytes() + stage.to_bytes(4, "little"), digest_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(int.from_bytes(digest.digest(), "little") >> 1)
        yield


class HybridStage(nn.Module):
    """One resolution stage: residual blocks (the first one strided: the downsampling), then Mamba layers."""

    def __init__(self, blocks: StackedResidualBlocks, mamba_layers: Sequence[MambaLayer]):
        super().__init__()
        self.blocks = blocks
        self.mamba_layers = nn.ModuleList(mamba_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)
        for layer in self.mamba_layers:
            x = layer(x)
        return x


class HybridEncoder(nn.Module):
    """Encoder returning every stage's output (the skips, bottleneck last).

    Exposes the attributes DNA decoders read from an encoder (output_channels, strides, kernel_sizes, conv_op,
    norm/dropout/nonlin ops and kwargs, conv_bias).
    """

    def __init__(
        self,
        input_channels: int,
        features_per_stage: Sequence[int],
        conv_op,
        kernel_sizes,
        strides,
        n_blocks_per_stage: Sequence[int],
        mamba_stages: Sequence[bool],
        conv_bias=False,
        norm_op=None,
        norm_op_kwargs=None,
        dropout_op=None,
        dropout_op_kwargs=None,
        nonlin=None,
        nonlin_kwargs=None,
        scan="cross",
        d_state=16,
        d_conv=4,
        expand=2,
        mamba_max_inner_channels=512,
        n_mamba_layers_per_stage=1,
        direction_merge="mean",
        dt_min=0.001,
        dt_max=0.1,
        layer_scale=None,
    ):
        super().__init__()
        n_spatial_dims = convert_conv_op_to_dim(conv_op)
        stages = []
        channels_in = input_channels
        for s, channels in enumerate(features_per_stage):
            blocks = StackedResidualBlocks(
                n_blocks_per_stage[s],
                conv_op,
                channels_in,
                channels,
                kernel_sizes[s],
                strides[s],
                conv_bias,
                norm_op,
                norm_op_kwargs,
                dropout_op,
                dropout_op_kwargs,
                nonlin,
                nonlin_kwargs,
            )
            recompute_projection_skips(blocks)
            stage_expand = effective_expand(channels, expand, mamba_max_inner_channels)
            with rng_untouched(stage=s):
                mamba_layers = [
                    MambaLayer(
                        channels,
                        n_spatial_dims,
                        scan,
                        d_state,
                        d_conv,
                        stage_expand,
                        direction_merge,
                        dt_min,
                        dt_max,
                        layer_scale,
                    )
                    for _ in range(n_mamba_layers_per_stage if mamba_stages[s] else 0)
                ]
            stages.append(HybridStage(blocks, mamba_layers))
            channels_in = channels
        self.stages = nn.ModuleList(stages)

        self.output_channels = list(features_per_stage)
        self.strides = [maybe_convert_scalar_to_list(conv_op, s) for s in strides]
        self.kernel_sizes = [maybe_convert_scalar_to_list(conv_op, k) for k in kernel_sizes]
        self.conv_op = conv_op
        self.norm_op = norm_op
        self.norm_op_kwargs = norm_op_kwargs
        self.dropout_op = dropout_op
        self.dropout_op_kwargs = dropout_op_kwargs
        self.nonlin = nonlin
        self.nonlin_kwargs = nonlin_kwargs
        self.conv_bias = conv_bias

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        output = np.int64(0)
        size = list(input_size)
        for stage, stride in zip(self.stages, self.strides):
            size_out = [i // j for i, j in zip(size, stride)]
            for i, block in enumerate(stage.blocks.blocks):
                output += block.compute_conv_feature_map_size(size if i == 0 else size_out)
                # DNA counts the skip conv's output; a RecomputedSkip keeps nothing, a FoldedNormSkip only the
                # block's input (kept by its first conv anyway) and per-channel statistics
                if isinstance(block.skip, RecomputedSkip):
                    output -= np.int64(block.output_channels) * np.prod(size_out, dtype=np.int64)
            size = size_out
            for layer in stage.mamba_layers:
                output += np.int64(layer.feature_map_size(size))
        return output
