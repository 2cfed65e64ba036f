"""Skip fusions: Mamba-Guided Fusion (the decoder's upsampled features gate the encoder skip) and plain concat."""

from typing import Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.conv import _ConvNd

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.knobs import FUSIONS, GATE_NORMS


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

    def __init__(
        self,
        conv_op: Type[_ConvNd],
        channels: int,
        norm_op=None,
        norm_op_kwargs=None,
        conv_bias=False,
        gate_norm: str = "instance",
    ):
        super().__init__()
        self.gate_conv = conv_op(channels, channels, 1, 1, 0, bias=conv_bias)
        self.gate_norm = build_gate_norm(gate_norm, channels, norm_op, norm_op_kwargs)

    def gate(self, upsampled: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """G; inplace (outside autograd only): the sigmoid overwrites the norm's output."""
        normed = self.gate_norm(self.gate_conv(upsampled))
        return normed.sigmoid_() if inplace else torch.sigmoid(normed)

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        params = tuple(self.parameters())
        if torch.is_grad_enabled() and any(t.requires_grad for t in (skip, upsampled, *params)):
            if any(getattr(m, "track_running_stats", False) for m in self.modules()):
                # recomputing would update the running statistics twice: plain autograd
                return torch.cat((upsampled, skip * (self.gate(upsampled) + 1)), 1)
            return _GatedSkip.apply(self, skip, upsampled, *params)
        with torch.no_grad():
            return _fused_forward(self, skip, upsampled)

    def feature_map_size(self, channels: int, n_voxels: int) -> int:
        return 0  # _GatedSkip keeps nothing beyond what the encoder and the decoder conv keep anyway


def _sample_slices(module: "MambaGuidedFusion", batch: int):
    """One sample at a time when the gate of a sample depends on that sample only (instance, channel or no norm):
    the gate's temporaries then take 1/batch of the memory. A norm over the batch gets the whole batch at once."""
    if isinstance(module.gate_norm, (nn.modules.instancenorm._InstanceNorm, ChannelLayerNorm, nn.Identity)):
        return [slice(i, i + 1) for i in range(batch)]
    return [slice(None)]


GATE_CHANNEL_CHUNK = 8  # output channels of the gate computed at a time where each channel's gate is separable


def _channel_slices(module: "MambaGuidedFusion", channels: int):
    """The gate's output channels in chunks when a channel's gate needs only that channel's conv output (instance
    norm without running statistics, or none): the 1x1 conv and the norm then act on each chunk alone."""
    norm = module.gate_norm
    if isinstance(norm, nn.Identity) or (
        isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats
    ):
        return [slice(c, min(c + GATE_CHANNEL_CHUNK, channels)) for c in range(0, channels, GATE_CHANNEL_CHUNK)]
    return [slice(None)]


def _gate_channels(module: "MambaGuidedFusion", upsampled: torch.Tensor, part: slice) -> torch.Tensor:
    """G for the output channels `part` (see _channel_slices), computed in place, outside autograd."""
    if part == slice(None):
        return module.gate(upsampled, inplace=True)
    conv, norm = module.gate_conv, module.gate_norm
    h = conv._conv_forward(upsampled, conv.weight[part], None if conv.bias is None else conv.bias[part])
    if not isinstance(norm, nn.Identity):
        h = F.instance_norm(
            h,
            None,
            None,
            norm.weight[part] if norm.affine else None,
            norm.bias[part] if norm.affine else None,
            True,
            0.0,
            norm.eps,
        )
    return h.sigmoid_()


def _fused_forward(module: "MambaGuidedFusion", skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
    """concat(D_up, E * (G + 1)) without autograd, the gate computed sample by sample (see _sample_slices) and in
    chunks of channels (see _channel_slices), the product written into the output's second half: at the
    full-resolution level the temporaries are those of one chunk of one sample instead of Conv1x1(D_up), Norm(.), G
    and E * (G + 1) for the batch. E * G + E is written as E * (G + 1): one elementwise pass less in backward than
    addcmul on CPU."""
    channels = upsampled.shape[1]
    out = None
    for sample in _sample_slices(module, upsampled.shape[0]):
        for part in _channel_slices(module, channels):
            gate = _gate_channels(module, upsampled[sample], part)
            if out is None:
                dtype = torch.promote_types(upsampled.dtype, torch.promote_types(skip.dtype, gate.dtype))
                out = upsampled.new_empty((upsampled.shape[0], 2 * channels, *upsampled.shape[2:]), dtype=dtype)
                out[:, :channels].copy_(upsampled)
            gated = out[sample, channels:][:, part]
            gated.copy_(skip[sample][:, part] * gate.add_(1))
            del gate
    return out


class _GatedSkip(torch.autograd.Function):
    """MGF's forward keeping nothing of its own for backward: it saves the skip E (kept anyway by the encoder's next
    conv) and its output concat(D_up, E') (kept anyway by the decoder conv that reads it), takes D_up back from the
    output and recomputes the gate G in backward, sample by sample. The plain autograd graph would keep D_up,
    Conv1x1(D_up), G and G+1: four full-resolution maps per decoder level. Same values and gradients as that graph
    (tests/test_network_equivalence.py)."""

    @staticmethod
    def forward(ctx, module: "MambaGuidedFusion", skip, upsampled, *params):
        device_type = upsampled.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.module = module
        ctx.upsampled_dtype = upsampled.dtype
        out = _fused_forward(module, skip, upsampled)
        ctx.save_for_backward(skip, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        skip, out = ctx.saved_tensors
        module, channels = ctx.module, skip.shape[1]
        params = tuple(module.parameters())
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        grad_skip = torch.empty_like(skip)
        grad_up = out.new_empty((out.shape[0], channels, *out.shape[2:]), dtype=ctx.upsampled_dtype)
        grad_params = [None] * len(params)
        for sample in _sample_slices(module, skip.shape[0]):
            # D_up back from the output: exact, the concatenation only ever upcasts it
            upsampled = out[sample, :channels].to(ctx.upsampled_dtype).detach().requires_grad_(True)
            with torch.enable_grad(), torch.autocast(device_type, autocast_dtype, enabled=autocast_enabled):
                gate = module.gate(upsampled)
            grad_gated = grad_out[sample, channels:]
            grad_skip[sample] = grad_gated * (gate.detach() + 1)
            grads = torch.autograd.grad(gate, (upsampled, *params), grad_gated * skip[sample], allow_unused=True)
            grad_up[sample] = grads[0] + grad_out[sample, :channels].to(grads[0].dtype)
            grad_params = [
                g if acc is None else acc if g is None else acc + g for acc, g in zip(grad_params, grads[1:])
            ]
            del gate, grads
        return (None, grad_skip, grad_up, *grad_params)


class ConcatFusion(nn.Module):
    """Plain U-Net skip, concat(D_up, E): the ablation of MGF."""

    def forward(self, skip: torch.Tensor, upsampled: torch.Tensor) -> torch.Tensor:
        return torch.cat((upsampled, skip), 1)

    def feature_map_size(self, channels: int, n_voxels: int) -> int:
        return 0


def build_skip_fusion(
    fusion: str,
    conv_op: Type[_ConvNd],
    channels: int,
    norm_op=None,
    norm_op_kwargs=None,
    conv_bias=False,
    gate_norm: str = "instance",
) -> nn.Module:
    if fusion == "mgf":
        return MambaGuidedFusion(conv_op, channels, norm_op, norm_op_kwargs, conv_bias, gate_norm)
    if fusion == "concat":
        return ConcatFusion()
    raise HyMUNetError(f"fusion={fusion!r} is not one of {', '.join(FUSIONS)}")
