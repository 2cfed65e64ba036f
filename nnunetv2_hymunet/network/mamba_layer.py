"""Token mixing over a feature map with Mamba: `x + Mamba(LayerNorm(x))` along one or more scan orders."""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.knobs import DIRECTION_MERGES, SCAN_ORDERS, HybridKnobs  # noqa: F401 (re-exported)
from nnunetv2_hymunet.ssm import Mamba, selective_scan_fn


def scan_directions(scan: str, n_spatial_dims: int) -> List[Tuple[Tuple[int, ...], bool]]:
    """The sequences one scan reads, as (spatial axis permutation, reversed) pairs.

    A permutation lists the spatial axes outermost first, so its last axis varies fastest along the sequence.
    flat: raster order. bidir: raster and its reverse. cross: each spatial axis once as the fastest one (2D: row-major
    and column-major; 3D: the three axis orders), each forwards and reversed.
    """
    if scan not in SCAN_ORDERS:
        raise HyMUNetError(f"scan={scan!r} is not one of {', '.join(SCAN_ORDERS)}")
    raster = tuple(range(n_spatial_dims))
    if scan == "flat":
        return [(raster, False)]
    if scan == "bidir":
        return [(raster, False), (raster, True)]
    directions = []
    for fastest in reversed(raster):  # raster order first
        perm = tuple(a for a in raster if a != fastest) + (fastest,)
        directions += [(perm, False), (perm, True)]
    return directions


def effective_expand(channels: int, expand: float, max_inner_channels: int) -> float:
    """Mamba's expansion at `channels`, capped so that d_inner = expand * channels stays <= max(channels, cap)."""
    if max_inner_channels is None:
        return expand
    return min(expand, max(1.0, max_inner_channels / channels))


def to_sequence(grid: torch.Tensor, perm: Sequence[int], reverse: bool) -> torch.Tensor:
    """(batch, C, *spatial) -> (batch, C, L) read in the order of `perm` (last axis fastest), maybe reversed."""
    batch, channels = grid.shape[:2]
    seq = grid.permute(0, 1, *(2 + a for a in perm)).reshape(batch, channels, -1)
    return seq.flip(-1) if reverse else seq


def from_sequence(seq: torch.Tensor, perm: Sequence[int], reverse: bool, spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of to_sequence: (batch, C, L) in the direction's order -> (batch, C, *spatial) (a view when not
    reversed)."""
    if reverse:
        seq = seq.flip(-1)
    batch, channels, _ = seq.shape
    grid = seq.view(batch, channels, *(spatial[a] for a in perm))
    inverse = np.argsort(perm)
    return grid.permute(0, 1, *(2 + int(a) for a in inverse))


def direction_scan(mamba: Mamba, x_in: torch.Tensor, direction, spatial: Sequence[int]) -> torch.Tensor:
    """Mamba.forward between in_proj and the z gate, along one direction: the x half of in_proj's output
    (batch, L, d_inner) in voxel order -> causal conv, SiLU, x_proj, dt_proj, selective scan with the D skip ->
    (batch, L, d_inner) in voxel order. Same parameters and ops as `Mamba.forward` (tests/test_network_equivalence.py
    checks the two agree)."""
    perm, reverse = direction
    u = mamba._causal_conv(to_sequence(x_in.transpose(1, 2).unflatten(2, spatial), perm, reverse))
    x_dbl = mamba.x_proj(u.transpose(1, 2))  # (batch, L, dt_rank + 2N)
    dt, B, C = torch.split(x_dbl, [mamba.dt_rank, mamba.d_state, mamba.d_state], dim=-1)
    dt = F.linear(dt, mamba.dt_proj.weight).transpose(1, 2)  # bias is added inside the scan, before softplus
    scan_dtype = torch.float64 if x_in.dtype == torch.float64 else torch.float32  # as Mamba.forward
    A = -torch.exp(mamba.A_log.to(scan_dtype))
    y = selective_scan_fn(
        u,
        dt,
        A,
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        mamba.D.to(scan_dtype),
        z=None,
        delta_bias=mamba.dt_proj.bias.to(scan_dtype),
        delta_softplus=True,
    )
    return from_sequence(y, perm, reverse, spatial).flatten(2).transpose(1, 2)


class MambaLayer(nn.Module):
    """Residual Mamba token mixer on a (batch, C, *spatial) feature map; output has the input's shape and dtype.

    Tokens are the feature map's voxels; out = x + gamma * merge_d(Mamba_d(LayerNorm(x)) read along direction d).
    direction_merge: "mean" / "sum": all directions share one Mamba and their outputs, mapped back to voxel order, are
    averaged / summed; "separate": each direction has its own Mamba (own A, delta, D and projections, as VM-UNet's
    SS2D), outputs averaged (same output scale at init as "mean"). dt_min / dt_max: the range of Mamba's initial step
    sizes (the scan's initial reach). layer_scale: None (gamma = 1, no parameter) or the initial value of a learnable
    per-channel gamma. With a shared Mamba, its token-wise parts (in_proj, the SiLU(z) gate, out_proj) run once in
    voxel order and only the causal conv and the selective scan run per direction (`direction_scan`), recomputed in
    backward while training. LayerNorm, Mamba and the residual sum run in float32 with autocast off (the selective
    scan is unstable in half precision), then the result is cast back to the
    caller's dtype.
    """

    def __init__(
        self,
        channels: int,
        n_spatial_dims: int,
        scan: str = "cross",
        d_state: int = 16,
        d_conv: int = 4,
        expand: float = 2,
        direction_merge: str = "mean",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        layer_scale: Optional[float] = None,
    ):
        super().__init__()
        HybridKnobs(
            scan=scan,
            d_state=d_state,
            d_conv=d_conv,
            direction_merge=direction_merge,
            dt_min=dt_min,
            dt_max=dt_max,
            layer_scale=layer_scale,
        )  # the knobs' one set of checks
        self.channels = channels
        self.scan = scan
        self.direction_merge = direction_merge
        self.directions = scan_directions(scan, n_spatial_dims)
        self.norm = nn.LayerNorm(channels)
        mamba_kwargs = dict(
            d_model=channels, d_state=d_state, d_conv=d_conv, expand=expand, dt_min=dt_min, dt_max=dt_max
        )
        if direction_merge == "separate":
            self.mambas = nn.ModuleList([Mamba(**mamba_kwargs) for _ in self.directions])
        else:
            self.mamba = Mamba(**mamba_kwargs)
        if layer_scale is None:
            self.register_parameter("layer_scale", None)
        else:
            self.layer_scale = nn.Parameter(torch.full((channels,), float(layer_scale)))
            self.layer_scale._no_weight_decay = True
        self.recompute = True  # recompute the per-direction scans in backward (see _scan); False keeps them

    @property
    def mamba_modules(self) -> List[Mamba]:
        """The Mamba of each direction (one shared module unless direction_merge is "separate")."""
        return list(self.mambas) if self.direction_merge == "separate" else [self.mamba]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        caller_dtype = x.dtype
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x.device.type, enabled=False):
            x_c = x.to(compute_dtype)
            batch, channels, *spatial = x_c.shape
            normed = self.norm(x_c.flatten(2).transpose(1, 2))  # (batch, L, C), raster order
            if self.direction_merge == "separate":
                mixed = None
                for mamba, direction in zip(self.mambas, self.directions):
                    x_in, z = mamba.in_proj(normed).chunk(2, -1)
                    y = self._scan(mamba, x_in, direction, spatial)
                    out = mamba.out_proj(y * F.silu(z))
                    mixed = out if mixed is None else mixed + out
                if len(self.directions) > 1:
                    mixed = mixed / len(self.directions)
            else:
                # in_proj, the SiLU(z) gate and out_proj act on each token alone, and the directions share them:
                # run them once in voxel order and merge the directions' scan outputs in between (mean and sum
                # commute with the linear out_proj, which has no bias)
                mamba = self.mamba
                x_in, z = mamba.in_proj(normed).chunk(2, -1)
                y = None
                for direction in self.directions:
                    y_d = self._scan(mamba, x_in, direction, spatial)
                    y = y_d if y is None else y + y_d
                if len(self.directions) > 1 and self.direction_merge == "mean":
                    y = y / len(self.directions)
                mixed = mamba.out_proj(y * F.silu(z))
            if self.layer_scale is not None:
                mixed = mixed * self.layer_scale.to(compute_dtype)
            out = x_c + mixed.transpose(1, 2).reshape(x_c.shape)
        return out.to(caller_dtype)

    def _scan(self, mamba: Mamba, x_in: torch.Tensor, direction, spatial) -> torch.Tensor:
        """One direction's causal conv and selective scan (with its D skip, without the z gate), (batch, L, d_inner)
        in voxel order. While training it is recomputed in backward instead of keeping its intermediates (a
        permuted copy, the conv output, the step sizes, the scan's checkpoints: ~8 d_inner values per token and
        direction); its input is the in_proj output, which the z gate keeps anyway."""
        if self.recompute and torch.is_grad_enabled() and x_in.requires_grad:
            return checkpoint(direction_scan, mamba, x_in, direction, spatial, use_reentrant=False)
        return direction_scan(mamba, x_in, direction, spatial)

    def feature_map_size(self, spatial_size: Sequence[int]) -> int:
        """Activations this layer keeps per sample for backward, in the unit of DNA's counts (one map per conv,
        where a conv block really keeps two: its norm's input and its nonlinearity's output), so half of the values
        kept per token: in_proj's input (C), its output x|z (2 d_inner), the merged scan output, SiLU(z) and the gated
        product out_proj reads (3 d_inner; x|z and these three per direction when each has its own Mamba), the
        layer-scaled output (C, with layer_scale). The per-direction scans keep nothing (recomputed)."""
        n_tokens = int(np.prod(spatial_size, dtype=np.int64))
        d_inner = self.mamba_modules[0].d_inner
        n_mamba = len(self.mamba_modules)
        kept = self.channels + n_mamba * 5 * d_inner + (self.channels if self.layer_scale is not None else 0)
        if not self.recompute:
            kept += len(self.directions) * 8 * d_inner  # conv input/output, u, step sizes, scan checkpoints
        return n_tokens * kept // 2
