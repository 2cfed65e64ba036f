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
from nnunetv2_hymunet.network.mamba_layer import SCAN_ORDERS, check_mamba_layer_knobs
from nnunetv2_hymunet.network.mgf_skip import FUSIONS, GATE_NORMS


def default_n_hybrid_stages(n_stages: int) -> int:
    """The deepest half of the stages (rounded down), at least one."""
    return max(1, n_stages // 2)


def _per_stage(name: str, value, n: int) -> list:
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    value = list(value)
    if len(value) != n:
        raise HyMUNetError(f"{name} has {len(value)} entries, expected {n}: {value}")
    return value


def _mamba_stage_indices(n_stages: int, n_mamba_stages, mamba_stages) -> List[int]:
    """The sorted stage indices that carry Mamba layers, from n_mamba_stages (the deepest k) and/or mamba_stages."""
    if n_mamba_stages is not None and (not isinstance(n_mamba_stages, (int, np.integer))
                                       or isinstance(n_mamba_stages, bool) or not 0 <= n_mamba_stages <= n_stages):
        raise HyMUNetError(f"n_mamba_stages must be an integer in 0..n_stages={n_stages}, got {n_mamba_stages!r}")
    if mamba_stages is None:
        k = default_n_hybrid_stages(n_stages) if n_mamba_stages is None else int(n_mamba_stages)
        return list(range(n_stages - k, n_stages))
    if isinstance(mamba_stages, (str, bytes)) or not all(
            isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in mamba_stages):
        raise HyMUNetError(f"mamba_stages must be a list of stage indices, got {mamba_stages!r}")
    indices = sorted(int(s) for s in mamba_stages)
    if len(set(indices)) != len(indices) or any(not 0 <= s < n_stages for s in indices):
        raise HyMUNetError(f"mamba_stages must list distinct stage indices in 0..{n_stages - 1}, got {mamba_stages!r}")
    if n_mamba_stages is not None and indices != list(range(n_stages - n_mamba_stages, n_stages)):
        raise HyMUNetError(f"n_mamba_stages={n_mamba_stages} (the deepest {n_mamba_stages} stages) disagrees with "
                           f"mamba_stages={mamba_stages!r}; give one of them")
    return indices


class HyMUNet(nn.Module):
    """Hybrid CNN-Mamba U-Net for nnU-Net v2 (2D and 3D: the conv op decides).

    Accepted plans ``arch_kwargs`` keys (what nnU-Net 2.8 writes):
      - PlainConvUNet plans: n_stages, features_per_stage, conv_op, kernel_sizes, strides, n_conv_per_stage,
        n_conv_per_stage_decoder, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs, nonlin,
        nonlin_kwargs.
      - ResidualEncoderUNet plans: the same with n_blocks_per_stage instead of n_conv_per_stage.
      - Hybrid knobs (optional): n_mamba_stages or mamba_stages, scan, fusion, d_state, d_conv, expand,
        mamba_max_inner_channels, n_mamba_layers_per_stage, direction_merge, dt_min, dt_max, gate_norm, layer_scale.
    input_channels, num_classes and deep_supervision come from nnU-Net's get_network_from_plans.

    Topology (fixed by the plan; n_mamba_stages only adds or removes Mamba layers, so n_mamba_stages=0 is the
    "No-Mamba" control with the same convolutions):
      - Encoder stage s: residual blocks (DNA BasicBlockD, ResNet-D); the first block's first conv is strided and does
        the downsampling. Blocks per stage: n_blocks_per_stage[s] for ResEnc plans; for PlainConvUNet plans
        ceil(n_conv_per_stage[s] / 2), since a BasicBlockD holds two convs (same number of 3x3 convs as PlainConvUNet).
      - Hybrid stages, the deepest half (n_stages // 2, at least one): a single strided residual block; the Mamba
        layers carry the rest of the stage. The decoder levels fed by their skips use one conv fewer than the plan
        (at least one). These light convs are what pays for the Mamba and MGF parameters.
      - Mamba layers: `n_mamba_layers_per_stage` residual `x + gamma * Mamba(LayerNorm(x))` layers after the conv
        blocks of the deepest `n_mamba_stages` stages (default: the hybrid stages; any value 0..n_stages), or of the
        stages listed in `mamba_stages` (indices, 0 = full resolution). `scan`: flat | bidir | cross.
        `direction_merge`: mean (default) | sum (one Mamba shared by the directions) | separate (one Mamba per
        direction, averaged). `dt_min`, `dt_max`: Mamba's initial step-size range (default 0.001, 0.1 as mamba_ssm).
        `layer_scale`: None (default, gamma = 1) or the initial value of a learnable per-channel gamma.
        Mamba's d_inner = expand * C is capped at max(C, mamba_max_inner_channels) (default 512: expand 2 up to 256
        channels, 1 at 512), which keeps the 512-channel stages lighter than a 3x3 conv at the same width.
        The Mamba layers are built on a private RNG state: a given torch seed gives HyMUNet and its No-Mamba control
        the same conv weights.
      - Decoder: transposed conv up, `fusion` mgf (Mamba-Guided Fusion gate) or concat, then conv blocks; deep
        supervision as nnU-Net's UNetDecoder (`self.decoder.deep_supervision`). `gate_norm`, the MGF gate's norm:
        instance (default: the plan's norm_op) | none | channel (LayerNorm over the channels of each voxel, which keeps
        image-level signal).
    Input spatial sizes must be divisible by the product of the strides per axis (nnU-Net pads to the patch size).
    Memory: what a training step keeps for backward is ~1.02x PlainConvUNet's at nnU-Net's ISIC-like 2D plan: the
    MGF gates, the Mamba layers' per-direction scans and the residual blocks' projection skips recompute in backward
    instead of keeping full-size intermediates; compute_conv_feature_map_size counts what is kept
    (tests/test_network_memory.py, scripts/profile_components.py).
    """

    def __init__(self, input_channels: int, n_stages: int, features_per_stage: Union[int, Sequence[int]], conv_op,
                 kernel_sizes, strides, n_conv_per_stage: Optional[Union[int, Sequence[int]]] = None,
                 num_classes: Optional[int] = None,
                 n_conv_per_stage_decoder: Optional[Union[int, Sequence[int]]] = None, conv_bias: bool = False,
                 norm_op=None, norm_op_kwargs: dict = None, dropout_op=None, dropout_op_kwargs: dict = None,
                 nonlin=None, nonlin_kwargs: dict = None, deep_supervision: bool = False,
                 n_mamba_stages: Optional[int] = None, scan: str = "cross", fusion: str = "mgf", d_state: int = 16,
                 d_conv: int = 4, expand: float = 2, n_blocks_per_stage: Optional[Union[int, Sequence[int]]] = None,
                 mamba_max_inner_channels: Optional[int] = 512, n_mamba_layers_per_stage: int = 1,
                 mamba_stages: Optional[Sequence[int]] = None, direction_merge: str = "mean", dt_min: float = 0.001,
                 dt_max: float = 0.1, gate_norm: str = "instance", layer_scale: Optional[float] = None):
        super().__init__()
        if num_classes is None:
            raise HyMUNetError("HyMUNet needs num_classes")
        if n_conv_per_stage_decoder is None:
            raise HyMUNetError("HyMUNet needs n_conv_per_stage_decoder (a plans arch_kwargs key)")
        if (n_conv_per_stage is None) == (n_blocks_per_stage is None):
            raise HyMUNetError("HyMUNet needs exactly one of n_conv_per_stage (PlainConvUNet plans) and "
                               "n_blocks_per_stage (ResidualEncoderUNet plans)")
        if not isinstance(n_stages, (int, np.integer)) or n_stages < 2:
            raise HyMUNetError(f"n_stages must be an integer >= 2, got {n_stages!r}")
        dim = convert_conv_op_to_dim(conv_op)
        mamba_stage_indices = _mamba_stage_indices(n_stages, n_mamba_stages, mamba_stages)
        if scan not in SCAN_ORDERS:
            raise HyMUNetError(f"scan={scan!r} is not one of {', '.join(SCAN_ORDERS)}")
        if fusion not in FUSIONS:
            raise HyMUNetError(f"fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
        if gate_norm not in GATE_NORMS:
            raise HyMUNetError(f"gate_norm={gate_norm!r} is not one of {', '.join(GATE_NORMS)}")
        check_mamba_layer_knobs(direction_merge, dt_min, dt_max, layer_scale)
        if not isinstance(n_mamba_layers_per_stage, (int, np.integer)) or n_mamba_layers_per_stage < 1:
            raise HyMUNetError(f"n_mamba_layers_per_stage must be an integer >= 1, got {n_mamba_layers_per_stage!r}")

        features_per_stage = _per_stage("features_per_stage", features_per_stage, n_stages)
        kernel_sizes = _per_stage("kernel_sizes", kernel_sizes, n_stages)
        strides = _per_stage("strides", strides, n_stages)
        for name, entries in (("kernel_sizes", kernel_sizes), ("strides", strides)):
            for entry in entries:
                if not isinstance(entry, (int, np.integer)) and len(entry) != dim:
                    raise HyMUNetError(f"{name} entry {entry} does not match the {dim}D conv_op {conv_op.__name__}")
        if n_blocks_per_stage is not None:
            n_blocks = _per_stage("n_blocks_per_stage", n_blocks_per_stage, n_stages)
        else:
            n_blocks = [max(1, -(-int(c) // 2)) for c in _per_stage("n_conv_per_stage", n_conv_per_stage, n_stages)]
        n_conv_decoder = _per_stage("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1)

        n_hybrid = default_n_hybrid_stages(n_stages)
        hybrid = [s >= n_stages - n_hybrid for s in range(n_stages)]
        n_blocks = [1 if hybrid[s] else n_blocks[s] for s in range(n_stages)]
        # decoder level s (deepest first) is fed by the skip of encoder stage n_stages - 2 - s
        n_conv_decoder = [max(1, n_conv_decoder[s] - 1) if hybrid[n_stages - 2 - s] else n_conv_decoder[s]
                          for s in range(n_stages - 1)]
        has_mamba = [s in mamba_stage_indices for s in range(n_stages)]

        self.n_stages = n_stages
        self.mamba_stages = mamba_stage_indices
        self.n_mamba_stages = len(mamba_stage_indices)
        self.hybrid_stages = hybrid
        self.scan = scan
        self.fusion = fusion
        self.encoder = HybridEncoder(input_channels, features_per_stage, conv_op, kernel_sizes, strides, n_blocks,
                                     has_mamba, conv_bias, norm_op, norm_op_kwargs, dropout_op, dropout_op_kwargs,
                                     nonlin, nonlin_kwargs, scan, d_state, d_conv, expand, mamba_max_inner_channels,
                                     n_mamba_layers_per_stage, direction_merge, dt_min, dt_max, layer_scale)
        self.decoder = FusionUNetDecoder(self.encoder, num_classes, n_conv_decoder, deep_supervision, fusion,
                                         gate_norm)
        self.total_stride = [int(np.prod([s[d] for s in self.encoder.strides])) for d in range(dim)]

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        spatial = x.shape[2:]
        if len(spatial) != len(self.total_stride) or any(n % s for n, s in zip(spatial, self.total_stride)):
            raise HyMUNetError(f"HyMUNet input of spatial size {tuple(spatial)} must have {len(self.total_stride)} "
                               f"spatial axes divisible by the total stride {tuple(self.total_stride)} "
                               "(pad it, as nnU-Net does to the patch size)")
        return self.decoder(self.encoder(x))

    def compute_conv_feature_map_size(self, input_size: Sequence[int]) -> np.int64:
        """Stored activations per sample (conv outputs as DNA counts them, plus an estimate for Mamba and MGF)."""
        if len(input_size) != len(self.total_stride):
            raise HyMUNetError(f"input_size must be the spatial size only ({len(self.total_stride)} values), "
                               f"got {tuple(input_size)}")
        return self.encoder.compute_conv_feature_map_size(input_size) + \
            self.decoder.compute_conv_feature_map_size(input_size)

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """He init for convs and zero-init of each residual block's last norm (like ResidualEncoderUNet).

        Both only touch Conv2d/3d, ConvTranspose2d/3d and BasicBlockD, so Mamba's own initialisation (dt_proj bias,
        A_log, D, its Conv1d) is kept.
        """
        InitWeights_He(1e-2)(module)
        init_last_bn_before_add_to_0(module)
