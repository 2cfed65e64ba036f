"""HyM-UNet: residual CNN shallow stages, CNN + Mamba deep stages, Mamba-Guided Fusion skips, from nnU-Net plans."""

from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from dynamic_network_architectures.building_blocks.helper import convert_conv_op_to_dim
from dynamic_network_architectures.initialization.weight_init import InitWeights_He, init_last_bn_before_add_to_0
from torch import nn

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.decoder import FusionUNetDecoder
from nnunetv2_hymunet.network.hybrid_encoder import HybridEncoder
from nnunetv2_hymunet.network.knobs import HybridKnobs, per_stage


class HyMUNet(nn.Module):
    """Hybrid CNN-Mamba U-Net for nnU-Net v2 (2D and 3D: the conv op decides).

    Builds exactly what its arguments say; the plans' arch_kwargs hold every one of them. nnUNetPlannerHyMUNet,
    `hymunet plan` and the trainers write them from nnU-Net's U-Net plans through one function
    (planning/architecture.py: hymunet_arch_kwargs, which also documents the layout derived from a U-Net plan).
      - U-Net arguments as nnU-Net 2.8 writes them: n_stages, features_per_stage, conv_op, kernel_sizes, strides,
        n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
        nonlin_kwargs; and n_blocks_per_stage (residual blocks per encoder stage, as ResidualEncoderUNet). Plans that
        give n_conv_per_stage (PlainConvUNet's, or hymunet 0.1.0's HyMUNet plans) are refused with the way to
        convert them.
      - Hybrid knobs (network/knobs.py, HybridKnobs: names, defaults, checks): mamba_stages (indices, 0 = full
        resolution) or n_mamba_stages (the deepest k), scan, fusion, d_state, d_conv, expand,
        mamba_max_inner_channels, n_mamba_layers_per_stage, direction_merge, dt_min, dt_max, gate_norm, layer_scale.
    input_channels, num_classes and deep_supervision come from nnU-Net's get_network_from_plans.

    Parts:
      - Encoder stage s: n_blocks_per_stage[s] residual blocks (DNA BasicBlockD, ResNet-D); the first block's first
        conv is strided and does the downsampling. Then, in the stages listed in mamba_stages,
        `n_mamba_layers_per_stage` residual `x + gamma * Mamba(LayerNorm(x))` layers. Changing the Mamba stages only
        adds or removes Mamba layers: `mamba_stages=[]` is the "No-Mamba" control with the same convolutions.
        `scan`: flat | bidir | cross. `direction_merge`: mean (default) | sum (one Mamba shared by the directions) |
        separate (one Mamba per direction, averaged). `dt_min`, `dt_max`: Mamba's initial step-size range.
        `layer_scale`: None (default, gamma = 1) or the initial value of a learnable per-channel gamma.
        Mamba's d_inner = expand * C is capped at max(C, mamba_max_inner_channels) (default 512: expand 2 up to 256
        channels, 1 at 512), which keeps the 512-channel stages lighter than a 3x3 conv at the same width.
        The Mamba layers are built on a private RNG state: a given torch seed gives HyMUNet and its No-Mamba control
        the same conv weights.
      - Decoder level s (deepest first): transposed conv up, `fusion` mgf (Mamba-Guided Fusion gate) or concat, then
        n_conv_per_stage_decoder[s] conv blocks; deep supervision as nnU-Net's UNetDecoder
        (`self.decoder.deep_supervision`). `gate_norm`, the MGF gate's norm: instance (default: the plan's norm_op) |
        none | channel (LayerNorm over the channels of each voxel, which keeps image-level signal).
    Input spatial sizes must be divisible by the product of the strides per axis (nnU-Net pads to the patch size).
    Memory: what a training step keeps for backward is ~1.02x PlainConvUNet's at nnU-Net's ISIC-like 2D plan: the
    MGF gates, the Mamba layers' per-direction scans and the residual blocks' projection skips recompute in backward
    instead of keeping full-size intermediates; compute_conv_feature_map_size counts what is kept
    (tests/test_network_memory.py, scripts/profile_components.py).
    """

    def __init__(
        self,
        input_channels: int,
        n_stages: int,
        features_per_stage: Union[int, Sequence[int]],
        conv_op,
        kernel_sizes,
        strides,
        n_blocks_per_stage: Union[int, Sequence[int]] = None,
        num_classes: Optional[int] = None,
        n_conv_per_stage_decoder: Union[int, Sequence[int]] = None,
        conv_bias: bool = False,
        norm_op=None,
        norm_op_kwargs: dict = None,
        dropout_op=None,
        dropout_op_kwargs: dict = None,
        nonlin=None,
        nonlin_kwargs: dict = None,
        deep_supervision: bool = False,
        **knobs,
    ):
        super().__init__()
        if "n_conv_per_stage" in knobs:
            raise HyMUNetError(
                "HyMUNet takes its layout explicitly (n_blocks_per_stage); these arch_kwargs give n_conv_per_stage (a "
                "PlainConvUNet plan, or a plans file of hymunet 0.1.0): convert them with nnunetv2_hymunet.planning."
                "architecture.hymunet_arch_kwargs (a plans file: upgrade_plans), or re-run hymunet plan"
            )
        for name, value in (
            ("num_classes", num_classes),
            ("n_blocks_per_stage", n_blocks_per_stage),
            ("n_conv_per_stage_decoder", n_conv_per_stage_decoder),
        ):
            if value is None:
                raise HyMUNetError(f"HyMUNet needs {name} (a plans arch_kwargs key)")
        knobs = HybridKnobs.from_dict(knobs, "HyMUNet")
        if isinstance(n_stages, bool) or not isinstance(n_stages, (int, np.integer)) or n_stages < 2:
            raise HyMUNetError(f"n_stages must be an integer >= 2, got {n_stages!r}")
        dim = convert_conv_op_to_dim(conv_op)
        features_per_stage = per_stage("features_per_stage", features_per_stage, n_stages)
        kernel_sizes = per_stage("kernel_sizes", kernel_sizes, n_stages)
        strides = per_stage("strides", strides, n_stages)
        for name, entries in (("kernel_sizes", kernel_sizes), ("strides", strides)):
            for entry in entries:
                if not isinstance(entry, (int, np.integer)) and len(entry) != dim:
                    raise HyMUNetError(f"{name} entry {entry} does not match the {dim}D conv_op {conv_op.__name__}")
        n_blocks = per_stage("n_blocks_per_stage", n_blocks_per_stage, n_stages)
        n_conv_decoder = per_stage("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1)
        for name, counts in (("n_blocks_per_stage", n_blocks), ("n_conv_per_stage_decoder", n_conv_decoder)):
            if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 1 for c in counts):
                raise HyMUNetError(f"{name} must hold integers >= 1, got {counts}")
        mamba_stage_indices = knobs.stage_indices(n_stages)

        self.n_stages = n_stages
        self.knobs = knobs
        self.mamba_stages = mamba_stage_indices
        self.n_mamba_stages = len(mamba_stage_indices)
        self.n_blocks_per_stage = [int(b) for b in n_blocks]
        self.n_conv_per_stage_decoder = [int(c) for c in n_conv_decoder]
        self.scan = knobs.scan
        self.fusion = knobs.fusion
        self.encoder = HybridEncoder(
            input_channels,
            features_per_stage,
            conv_op,
            kernel_sizes,
            strides,
            self.n_blocks_per_stage,
            [s in mamba_stage_indices for s in range(n_stages)],
            conv_bias,
            norm_op,
            norm_op_kwargs,
            dropout_op,
            dropout_op_kwargs,
            nonlin,
            nonlin_kwargs,
            knobs.scan,
            knobs.d_state,
            knobs.d_conv,
            knobs.expand,
            knobs.mamba_max_inner_channels,
            knobs.n_mamba_layers_per_stage,
            knobs.direction_merge,
            knobs.dt_min,
            knobs.dt_max,
            knobs.layer_scale,
        )
        self.decoder = FusionUNetDecoder(
            self.encoder, num_classes, self.n_conv_per_stage_decoder, deep_supervision, knobs.fusion, knobs.gate_norm
        )
        self.total_stride = [int(np.prod([s[d] for s in self.encoder.strides])) for d in range(dim)]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        spatial = x.shape[2:]
        if len(spatial) != len(self.total_stride) or any(n % s for n, s in zip(spatial, self.total_stride)):
            raise HyMUNetError(
                f"HyMUNet input of spatial size {tuple(spatial)} must have {len(self.total_stride)} "
                f"spatial axes divisible by the total stride {tuple(self.total_stride)} "
                "(pad it, as nnU-Net does to the patch size)"
            )
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Stored activations per sample (conv outputs as DNA counts them, plus an estimate for Mamba and MGF)."""
        if len(input_size) != len(self.total_stride):
            raise HyMUNetError(
                f"input_size must be the spatial size only ({len(self.total_stride)} values), got {tuple(input_size)}"
            )
        return self.encoder.compute_conv_feature_map_size(input_size) + self.decoder.compute_conv_feature_map_size(
            input_size
        )

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init for convs and zero-init of each residual block's last norm (like ResidualEncoderUNet).

        Both only touch Conv2d/3d, ConvTranspose2d/3d and BasicBlockD, so Mamba's own initialisation (dt_proj bias,
        A_log, D, its Conv1d) is kept.
        """
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
