"""A boundary term for nnU-Net's Dice + CE loss (the HyM-UNet paper's "hybrid loss emphasising boundary accuracy").

The term is Kervadec et al.'s boundary loss (MIDL 2019): mean over voxels of `p_c * phi_c`, where `p_c` is the
predicted probability of class (or region) c and `phi_c` the signed distance to the reference boundary of c
(negative inside, positive outside). Probability mass far outside the reference costs most, missed mass deep inside
gains most, so the loss pulls the predicted contour onto the reference contour.

Exact distance transforms on the CPU would stall GPU training, so `phi` is computed on the tensor's own device from
repeated 3x3(x3) max-pooling: the chessboard distance, truncated at `distance_cap` voxels and divided by it (phi in
[-1, 1]). Near the boundary, where the term matters, that equals the exact chessboard distance; farther away every
voxel gets the same full weight, which also keeps one far-off blob from dominating the loss.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _max_pool(x: torch.Tensor) -> torch.Tensor:
    pool = {4: F.max_pool2d, 5: F.max_pool3d}.get(x.ndim)
    if pool is None:
        raise ValueError(
            f"expected a (batch, channel, *spatial) tensor with 2 or 3 spatial axes, got shape {tuple(x.shape)}"
        )
    return pool(x, kernel_size=3, stride=1, padding=1)


@torch.no_grad()
def truncated_signed_distance(mask: torch.Tensor, distance_cap: int) -> torch.Tensor:
    """Signed chessboard distance to the boundary of `mask` (b, c, *spatial), truncated at `distance_cap`, / cap.

    Voxels outside the mask get +d/cap where d >= 1 is the distance to the nearest mask voxel; voxels inside get -d/cap
    where d >= 1 is the distance to the nearest non-mask voxel. Channels without any mask voxel are +1 everywhere.
    """
    if distance_cap < 1:
        raise ValueError(f"distance_cap must be >= 1, got {distance_cap}")
    inside = mask.float()
    grown, shrunk = inside, inside
    distance_out = torch.zeros_like(inside)
    distance_in = torch.zeros_like(inside)
    for _ in range(distance_cap):
        distance_out += 1 - grown  # voxels the mask has not reached yet are one step farther away
        distance_in += shrunk  # voxels still inside after k erosions are one step deeper
        grown = _max_pool(grown)
        shrunk = -_max_pool(-shrunk)
    return (distance_out - distance_in) / distance_cap


class BoundaryLoss(nn.Module):
    """Kervadec's boundary loss on logits, for nnU-Net's label (softmax) and region (sigmoid) targets.

    Label targets are (b, 1, *spatial) class indices; the background channel is left out, as in nnU-Net's Dice.
    Region targets are (b, r, *spatial) binary maps, with nnU-Net's extra last channel marking ignored voxels when
    `has_ignore_channel`. Ignored voxels (the ignore label, or that channel) contribute nothing.
    """

    def __init__(self, regions: bool, ignore_label: int = None, distance_cap: int = 8):
        super().__init__()
        self.regions = regions
        self.ignore_label = ignore_label
        self.distance_cap = distance_cap

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.regions:
            if self.ignore_label is not None:
                valid = ~target[:, -1:].bool()
                target = target[:, :-1]
            else:
                valid = None
            probabilities = torch.sigmoid(net_output.float())
            foreground = target.bool()
        else:
            if target.shape[1] != 1:
                raise ValueError(f"label targets must have one channel, got shape {tuple(target.shape)}")
            valid = target != self.ignore_label if self.ignore_label is not None else None
            classes = torch.arange(1, net_output.shape[1], device=target.device).view(1, -1, *[1] * (target.ndim - 2))
            foreground = target == classes  # one-hot without background; the ignore label matches no class
            probabilities = torch.softmax(net_output.float(), 1)[:, 1:]
        if foreground.shape != probabilities.shape:
            raise ValueError(
                f"target shape {tuple(foreground.shape)} does not match the network output "
                f"{tuple(probabilities.shape)} (after removing background / ignore channels)"
            )
        phi = truncated_signed_distance(foreground, self.distance_cap)
        weighted = probabilities * phi
        if valid is None:
            return weighted.mean()
        return (weighted * valid).sum() / torch.clip(valid.sum() * weighted.shape[1], min=1)


class WithBoundaryTerm(nn.Module):
    """`base(out, target) + boundary_weight * boundary(out, target)`; the trainer ramps `boundary_weight`."""

    def __init__(self, base: nn.Module, boundary: BoundaryLoss, boundary_weight: float = 0.0):
        super().__init__()
        self.base = base
        self.boundary = boundary
        self.boundary_weight = boundary_weight

    def forward(self, net_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.base(net_output, target)
        if self.boundary_weight:
            loss = loss + self.boundary_weight * self.boundary(net_output, target)
        return loss
