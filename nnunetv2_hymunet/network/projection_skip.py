"""A residual block's projection skip (ResNet-D: [avg-pool,] 1x1 conv, InstanceNorm) with the norm folded into the conv.

InstanceNorm of a 1x1 conv h = W p (+ b) needs, per sample and output channel c, the mean and the variance of h over
the voxels. Both follow from the per-sample statistics of the conv's input p (C_in channels): mean_c = w_c . mu and
var_c = w_c^T Sigma w_c, with mu the channel means and Sigma the (biased) channel covariance of p. So, per sample,

    pc = p - mu,  Sigma = pc pc^T / P,  var = diag(W Sigma W^T),  scale = gamma * rsqrt(var + eps),
    out = (scale * W) pc + beta,

one matrix product over the channels writes the output: no separate norm pass over the C_out-channel output, and no
recomputation of the conv and the norm in backward (RecomputedSkip's). The backward is written out
(_FoldedConvInstanceNorm): it keeps only the skip's input x, which the block's first conv keeps anyway, and a few
numbers per sample and channel; the pool and pc are recomputed from x in backward (C_in channels, fewer than the C_out
of the output). A conv bias cancels under the norm; it gets its gradient, zero.
"""

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint


class RecomputedSkip(nn.Sequential):
    """A residual block's projection skip (ResNet-D: avg-pool, 1x1 conv, norm), recomputed in backward.

    Kept as is, its norm keeps the 1x1 conv's output for backward: one extra full-width map per block, which
    PlainConvUNet does not have. Its input is the block input, which the block's first conv keeps anyway, so
    recomputing costs only a 1x1 conv and a norm. Same children, so the same state_dict keys and values.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return checkpoint(super().forward, x, use_reentrant=False)
        return super().forward(x)


def foldable_norm(norm: nn.Module) -> bool:
    """InstanceNorm (any dimension) without running statistics: per sample, per channel, over all voxels."""
    return isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats


def _parts(skip: nn.Sequential):
    """(pool or None, conv, norm) of DNA's BasicBlockD projection skip [pool,] ConvDropoutNormReLU(conv, norm); None
    when the skip has another shape (dropout, a nonlinearity, a conv that is not a plain 1x1)."""
    children = list(skip)
    pool = children.pop(0) if len(children) == 2 else None
    if len(children) != 1:
        return None
    block = children[0]
    conv, norm = getattr(block, "conv", None), getattr(block, "norm", None)
    if conv is None or norm is None or list(getattr(block, "all_modules", [])) != [conv, norm]:
        return None
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed or conv.groups != 1:
        return None
    if any(k != 1 for k in conv.kernel_size) or any(s != 1 for s in conv.stride) or any(p != 0 for p in conv.padding):
        return None
    if pool is not None and not isinstance(pool, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return None
    return pool, conv, norm


def can_fold(skip: nn.Sequential) -> bool:
    parts = _parts(skip)
    return parts is not None and foldable_norm(parts[2])


class FoldedNormSkip(RecomputedSkip):
    """The projection skip [pool,] conv1x1, InstanceNorm computed as the folded formula above (same children, so the
    same state_dict keys and values as the Sequential it replaces). Under autocast or with mixed dtypes it falls back
    to RecomputedSkip (the module's own layers, recomputed in backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = _parts(self)
        if (
            parts is None  # the layers were changed after construction (e.g. norms swapped for identity)
            or not foldable_norm(parts[2])
            or torch.is_autocast_enabled(x.device.type)
            or not x.dtype.is_floating_point
            or any(p.dtype != x.dtype for p in self.parameters())
        ):
            return super().forward(x)
        pool, conv, norm = parts
        return folded_conv_instance_norm(x, pool, conv, norm)


def folded_conv_instance_norm(x: torch.Tensor, pool, conv: nn.modules.conv._ConvNd, norm: nn.Module) -> torch.Tensor:
    """norm(conv(pool(x))) (pool may be None) for a 1x1 conv and an InstanceNorm without running statistics, by the
    folded formula."""
    params = [conv.weight, conv.bias, norm.weight if norm.affine else None, norm.bias if norm.affine else None]
    return _FoldedConvInstanceNorm.apply(x, pool, conv, norm, *params)


def _pooled(x: torch.Tensor, pool) -> torch.Tensor:
    return pool(x) if pool is not None else x


class _FoldedConvInstanceNorm(torch.autograd.Function):
    """The folded formula with its backward written out. It saves x (the block's input, which the block's first conv
    keeps anyway) and per-sample statistics (mu, Sigma, the output channels' scales: a few numbers per channel), and
    in backward recomputes the pool and pc = p - mu (C_in channels): autograd of the formula would keep pc, C_in
    channels at the skip's output resolution (at the ISIC plan 3 x 768 x 1024 for stage 0 and 32 x 384 x 512 for
    stage 1, per sample).

    With g the output's gradient (per sample C_out x P), ps = scale * W and r = rsqrt(var + eps):
        d beta = sum g,  d(ps) = g pc^T,  d scale = rowsum(d(ps) * W),  d gamma = sum d scale * r,
        d var = -r^3 / 2 * d scale * gamma,  dW = sum_n d(ps) * scale + 2 d var * (W Sigma),
        d Sigma = W^T diag(d var) W,  dp = ps^T (g - mean g) + 2 d Sigma pc / P,
    and the pool's backward of dp. The bias gets its gradient, zero."""

    @staticmethod
    def forward(ctx, x, pool, conv, norm, weight, bias, gamma, beta):
        p = _pooled(x, pool)
        batch, _, *spatial = p.shape
        n_voxels = p[0, 0].numel()
        w = weight.flatten(1)  # C_out x C_in
        flat = p.flatten(2)  # N x C_in x P
        mean = flat.mean(2, keepdim=True)
        pc = flat - mean
        cov = torch.bmm(pc, pc.transpose(1, 2)).div_(n_voxels)  # N x C_in x C_in
        var = (torch.matmul(w, cov) * w).sum(-1)  # N x C_out: diag(W Sigma W^T)
        rstd = torch.rsqrt(var.clamp_min(0) + norm.eps)
        scale = rstd * gamma if gamma is not None else rstd
        folded = scale.unsqueeze(2) * w  # N x C_out x C_in
        if beta is not None:
            out = torch.baddbmm(beta.view(1, -1, 1), folded, pc)
        else:
            out = torch.bmm(folded, pc)
        del pc
        ctx.pool = pool
        ctx.weight_shape = weight.shape
        ctx.save_for_backward(x, weight, bias, gamma, mean, cov, var, rstd, scale)
        return out.view(batch, w.shape[0], *spatial)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias, gamma, mean, cov, var, rstd, scale = ctx.saved_tensors
        batch, channels_out = grad_out.shape[:2]
        w = weight.flatten(1)
        g = grad_out.reshape(batch, channels_out, -1)
        n_voxels = g.shape[2]
        with torch.enable_grad():
            x_leaf = x.detach().requires_grad_(ctx.needs_input_grad[0] and ctx.pool is not None)
            p = _pooled(x_leaf, ctx.pool)
        pc = p.detach().flatten(2) - mean
        g_sum = g.sum(2)  # N x C_out
        grad_folded = torch.bmm(g, pc.transpose(1, 2))  # N x C_out x C_in
        grad_scale = (grad_folded * w).sum(-1)  # N x C_out
        grad_weight = (grad_folded * scale.unsqueeze(2)).sum(0)
        grad_gamma = grad_beta = None
        if gamma is not None:
            grad_gamma = (grad_scale * rstd).sum(0)
            grad_rstd = grad_scale * gamma
        else:
            grad_rstd = grad_scale
        grad_var = grad_rstd * rstd.pow(3) * -0.5 * (var >= 0)  # clamp_min(0)'s gradient
        grad_weight += 2 * (grad_var.unsqueeze(2) * torch.matmul(w, cov)).sum(0)
        if ctx.needs_input_grad[6] or ctx.needs_input_grad[7]:
            grad_beta = g_sum.sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            folded_t = (scale.unsqueeze(2) * w).transpose(1, 2)  # N x C_in x C_out
            grad_cov = torch.matmul(w.t(), grad_var.unsqueeze(2) * w)  # N x C_in x C_in: W^T diag(d var) W
            shift = -torch.bmm(folded_t, g_sum.unsqueeze(2)).div_(n_voxels)  # - ps^T mean(g)
            grad_p = torch.baddbmm(shift, folded_t, g)
            grad_p.baddbmm_(grad_cov, pc, alpha=2.0 / n_voxels)
            grad_p = grad_p.view(p.shape)
            if ctx.pool is not None:
                (grad_x,) = torch.autograd.grad(p, x_leaf, grad_p)
            else:
                grad_x = grad_p
        grad_bias = torch.zeros_like(bias) if bias is not None else None
        return grad_x, None, None, None, grad_weight.view(ctx.weight_shape), grad_bias, grad_gamma, grad_beta
