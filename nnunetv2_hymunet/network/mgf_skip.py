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
            if _explicit(self, skip, upsampled):
                return _ExplicitGatedSkip.apply(self, skip, upsampled, *params)
            return _GatedSkip.apply(self, skip, upsampled, *params)
        with torch.no_grad():
            if _explicit(self, skip, upsampled):
                return _explicit_forward(self, skip, upsampled)[0]
            return _fused_forward(self, skip, upsampled)

    def feature_map_size(self, channels: int, n_voxels: int) -> int:
        return 0  # the gate keeps nothing beyond what the encoder and the decoder conv keep anyway


def _sample_slices(module: "MambaGuidedFusion", batch: int):
    """One sample at a time when the gate of a sample depends on that sample only (instance, channel or no norm):
    the gate's temporaries then take 1/batch of the memory. A norm over the batch gets the whole batch at once."""
    if isinstance(module.gate_norm, (nn.modules.instancenorm._InstanceNorm, ChannelLayerNorm, nn.Identity)):
        return [slice(i, i + 1) for i in range(batch)]
    return [slice(None)]


# Output channels of the gate computed at a time by _fused_forward without autograd (inference under autocast),
# where each channel's gate is separable: the temporaries of the full-resolution level are then those of 8 channels
# of one sample, which keeps 3D inference's peak at PlainConvUNet's. The hand-written path (_explicit) needs no
# chunks: it computes the gate in the output's own memory.
GATE_CHANNEL_CHUNK = 8


def _explicit(module: "MambaGuidedFusion", skip: torch.Tensor, upsampled: torch.Tensor) -> bool:
    """Whether the gate is computed by hand (_explicit_forward, _ExplicitGatedSkip): InstanceNorm without running
    statistics or no norm, one dtype and no autocast. Otherwise (channel norm, a norm over the batch, autocast's mixed
    dtypes) the module's own layers run (_fused_forward, _GatedSkip)."""
    norm, conv = module.gate_norm, module.gate_conv
    if not (
        isinstance(norm, nn.Identity)
        or (isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats)
    ):
        return False
    if conv.groups != 1 or any(k != 1 for k in conv.kernel_size) or conv.weight.shape[:2] != upsampled.shape[1:2] * 2:
        return False
    dtype = conv.weight.dtype
    return (
        dtype.is_floating_point
        and skip.dtype == upsampled.dtype == dtype
        and skip.shape == upsampled.shape
        and not torch.is_autocast_enabled(upsampled.device.type)
    )


def _conv1x1(module: "MambaGuidedFusion", upsampled: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Conv1x1 of one sample's D_up (channels x voxels) as a matrix product into `out`. Under InstanceNorm without
    the conv's bias: the norm subtracts it again (its gradient, 0 up to rounding, is still returned)."""
    conv = module.gate_conv
    if conv.bias is None or not isinstance(module.gate_norm, nn.Identity):
        return torch.mm(conv.weight.flatten(1), upsampled, out=out)
    return torch.addmm(conv.bias.unsqueeze(1), conv.weight.flatten(1), upsampled, out=out)


def _gate_into(norm: nn.Module, h: torch.Tensor, mean, rstd, out: torch.Tensor) -> torch.Tensor:
    """G = sigmoid(Norm(h)) into `out` (may be h) from the conv output h of one sample (channels x voxels) and, for
    InstanceNorm, its per-channel mean and 1/std: (h - mean) * rstd * gamma + beta in one per-channel affine pass
    (batch norm's inference kernel with mean `mean`, variance 1, eps 0, weight rstd * gamma and bias beta)."""
    if rstd is None:
        return torch.sigmoid(h, out=out)
    scale = rstd * norm.weight if norm.affine else rstd
    shift = norm.bias if norm.affine else torch.zeros_like(rstd)
    torch.ops.aten.native_batch_norm.out(
        h.unsqueeze(0),
        scale,
        shift,
        mean,
        torch.ones_like(rstd),
        False,
        0.0,
        0.0,
        out=out.unsqueeze(0),
        save_mean=h.new_empty(0),
        save_invstd=h.new_empty(0),
    )
    return out.sigmoid_()


def _explicit_forward(module: "MambaGuidedFusion", skip: torch.Tensor, upsampled: torch.Tensor):
    """concat(D_up, E * (G + 1)) computed by hand (see _explicit), sample by sample, in the output's memory: the
    conv output, Norm(.), G and E + E * G all in the output's second half, so no temporary of the gate's size.
    Returns the output and InstanceNorm's per-sample mean and 1/std of W D_up (batch x 2 x channels; None for no
    norm). The variance is taken of the centered conv output (mean, subtraction and a norm: three fast passes on
    CPU, where var_mean's one-pass Welford takes as long as seven)."""
    batch, channels = upsampled.shape[:2]
    n_voxels = upsampled[0, 0].numel()
    norm = module.gate_norm
    out = upsampled.new_empty((batch, 2 * channels, *upsampled.shape[2:]))
    out[:, :channels].copy_(upsampled)
    stats = None if isinstance(norm, nn.Identity) else upsampled.new_empty((batch, 2, channels))
    for b in range(batch):
        up = out[b, :channels].view(channels, n_voxels)
        e = skip[b].reshape(channels, n_voxels)
        h = _conv1x1(module, up, out[b, channels:].view(channels, n_voxels))
        mean = rstd = None
        if stats is not None:
            mean = stats[b, 0]
            torch.mean(h, 1, out=mean)
            h.sub_(mean.unsqueeze(1))
            rstd = torch.linalg.vector_norm(h, dim=1).square_().div_(n_voxels).add_(norm.eps).rsqrt_()
            stats[b, 1] = rstd
        gate = _gate_into(norm, h, None if mean is None else torch.zeros_like(mean), rstd, h)
        torch.addcmul(e, e, gate, out=gate)  # E + E * G
    return out, stats


class _ExplicitGatedSkip(torch.autograd.Function):
    """MGF with the gate's forward and backward written out (see _explicit), sample by sample: the 1x1 conv is a
    matrix product over channels, InstanceNorm's backward is batch norm's backward kernel on one sample (channels x
    voxels) from the saved per-channel mean and 1/std (2 x batch x channels numbers), and the passes write into the
    gradients' memory (the recomputed conv output into dD_up's, G into dE's) or one buffer. Like _GatedSkip it saves
    E and the output, and recomputes Conv1x1(D_up) in backward. Same values and gradients as plain autograd of the
    formula to float rounding (tests/test_network_equivalence.py, tests/test_mgf_speed_equivalence.py)."""

    @staticmethod
    def forward(ctx, module: "MambaGuidedFusion", skip, upsampled, *params):
        ctx.module = module
        out, stats = _explicit_forward(module, skip, upsampled)
        ctx.save_for_backward(skip, out, stats)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        skip, out, stats = ctx.saved_tensors
        module = ctx.module
        conv, norm = module.gate_conv, module.gate_norm
        batch, channels = skip.shape[:2]
        n_voxels = skip[0, 0].numel()
        grad_out = grad_out.contiguous()
        weight = conv.weight.flatten(1)
        affine = stats is not None and norm.affine
        grad_skip = skip.new_empty(skip.shape)
        grad_up = skip.new_empty(skip.shape)
        grad_weight = torch.zeros_like(weight)
        grad_bias = None if conv.bias is None else torch.zeros_like(conv.bias)
        grad_gamma, grad_beta = (torch.zeros_like(norm.weight), torch.zeros_like(norm.bias)) if affine else (None,) * 2
        d = skip.new_empty((channels, n_voxels))
        for b in range(batch):
            up = out[b, :channels].view(channels, n_voxels)
            e = skip[b].reshape(channels, n_voxels)
            grad_gated = grad_out[b, channels:].view(channels, n_voxels)
            mean, rstd = (None, None) if stats is None else stats[b]
            h = _conv1x1(module, up, grad_up[b].view(channels, n_voxels))  # dD_up's memory, free until the end
            gate = _gate_into(norm, h, mean, rstd, grad_skip[b].view(channels, n_voxels))  # dE's memory, for now
            torch.mul(grad_gated, e, out=d)  # dG = dE' E
            torch.ops.aten.sigmoid_backward(d, gate, grad_input=d)  # dn = d(Norm(h)) = dG G (1 - G)
            torch.addcmul(grad_gated, grad_gated, gate, out=gate)  # dE = dE' (G + 1)
            if stats is not None:
                dh, dgamma, dbeta = torch.ops.aten.native_batch_norm_backward(
                    d.unsqueeze(0), h.unsqueeze(0), norm.weight, None, None, mean, rstd, True, norm.eps,
                    [True, affine, affine],
                )  # fmt: skip
                dh = dh.squeeze(0)
                if affine:
                    grad_gamma += dgamma
                    grad_beta += dbeta
            else:
                dh = d
            grad_weight.addmm_(dh, up.t())
            if grad_bias is not None:
                grad_bias += dh.sum(1)
            torch.addmm(  # dD_up = W^T dh + the gradient of the output's first half, over h
                grad_out[b, :channels].view(channels, n_voxels), weight.t(), dh, out=grad_up[b].view(channels, n_voxels)
            )
            del dh
        grads = [(conv.weight, grad_weight.view_as(conv.weight)), (conv.bias, grad_bias)]
        if affine:
            grads += [(norm.weight, grad_gamma), (norm.bias, grad_beta)]
        by_param = [next((g for q, g in grads if q is p), None) for p in module.parameters()]
        return (None, grad_skip, grad_up, *by_param)


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


def _fused_forward(
    module: "MambaGuidedFusion", skip: torch.Tensor, upsampled: torch.Tensor, chunked: bool = True
) -> torch.Tensor:
    """concat(D_up, E * (G + 1)) without autograd by the module's own layers (where _explicit does not apply), the
    gate computed sample by sample (see _sample_slices) and, if `chunked` (inference), in chunks of channels (see
    _channel_slices), the product written into the output's second half: at the full-resolution level the
    temporaries are those of one chunk of one sample instead of Conv1x1(D_up), Norm(.), G and E * (G + 1) for the
    batch. Training's forward (_GatedSkip) takes all channels of a sample at once: each chunk's conv re-reads D_up.
    E * G + E is written as E * (G + 1), as autocast's plain graph computes it."""
    channels = upsampled.shape[1]
    out = None
    for sample in _sample_slices(module, upsampled.shape[0]):
        for part in _channel_slices(module, channels) if chunked else [slice(None)]:
            gate = _gate_channels(module, upsampled[sample], part)
            if out is None:
                dtype = torch.promote_types(upsampled.dtype, torch.promote_types(skip.dtype, gate.dtype))
                out = upsampled.new_empty((upsampled.shape[0], 2 * channels, *upsampled.shape[2:]), dtype=dtype)
                out[:, :channels].copy_(upsampled)
            gated = out[sample, channels:][:, part]
            torch.mul(skip[sample][:, part], gate.add_(1), out=gated)
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
        out = _fused_forward(module, skip, upsampled, chunked=False)
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
