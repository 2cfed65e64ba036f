"""The boundary-aware loss: distance maps, its direction, label setups (classes, regions, ignore) and the trainer."""

import numpy as np
import pytest
import torch
from conftest import tiny_dataset_json, tiny_plans
from scipy import ndimage

from nnunetv2_hymunet.training import nnUNetTrainerHyMUNet_BoundaryLoss
from nnunetv2_hymunet.training.boundary_loss import BoundaryLoss, truncated_signed_distance


def _exact_chessboard_sdm(mask: np.ndarray, cap: int) -> np.ndarray:
    outside = ndimage.distance_transform_cdt(~mask, metric="chessboard")
    inside = ndimage.distance_transform_cdt(mask, metric="chessboard")
    return (np.minimum(outside, cap) - np.minimum(inside, cap)) / cap


@pytest.mark.parametrize("shape", [(20, 24), (10, 12, 14)])
def test_signed_distance_matches_an_exact_chessboard_transform(shape):
    rng = np.random.default_rng(0)
    mask = ndimage.binary_opening(rng.random(shape) > 0.6)
    mask = np.pad(mask[(slice(2, -2),) * len(shape)], 2)  # keep away from the border (the pooling pads differently)
    cap = 4
    ours = truncated_signed_distance(torch.from_numpy(mask)[None, None], cap)[0, 0].numpy()
    np.testing.assert_allclose(ours, _exact_chessboard_sdm(mask, cap), atol=1e-6)
    empty = truncated_signed_distance(torch.zeros(1, 1, *shape, dtype=torch.bool), cap)
    assert torch.all(empty == 1)


def _square_target(size=24, lo=8, hi=16):
    target = torch.zeros(1, 1, size, size, dtype=torch.long)
    target[..., lo:hi, lo:hi] = 1
    return target


def _logits_for(mask: torch.Tensor, sharpness: float = 6.0) -> torch.Tensor:
    """Two-class logits whose argmax is `mask` (b, 1, ...)."""
    fg = (mask.float() * 2 - 1) * sharpness
    return torch.cat([-fg, fg], 1)


def test_loss_is_lower_for_the_right_contour_and_its_gradient_moves_the_contour():
    loss = BoundaryLoss(regions=False, distance_cap=8)
    target = _square_target()
    exact = loss(_logits_for(target), target)
    shifted = loss(_logits_for(torch.roll(target, 3, dims=-1)), target)
    bigger = loss(_logits_for(_square_target(lo=5, hi=19)), target)
    assert exact < shifted and exact < bigger

    logits = torch.zeros(1, 2, 24, 24, requires_grad=True)
    loss(logits, target).backward()
    fg_grad = logits.grad[0, 1]
    assert fg_grad[12, 12] < 0 < fg_grad[2, 2]  # raise the foreground inside, lower it outside


def test_ignore_label_voxels_do_not_count():
    loss = BoundaryLoss(regions=False, ignore_label=2, distance_cap=4)
    target = _square_target()
    target_with_ignore = target.clone()
    target_with_ignore[..., :4, :] = 2
    logits = torch.randn(1, 2, 24, 24)
    altered = logits.clone()
    altered[:, 1, :4, :] += 50  # foreground pushed up, only in the ignored rows
    assert torch.isclose(loss(logits, target_with_ignore), loss(altered, target_with_ignore))
    assert not torch.isclose(loss(logits, target), loss(altered, target))


def test_regions_with_an_ignore_channel():
    loss = BoundaryLoss(regions=True, ignore_label=3, distance_cap=4)
    regions = torch.zeros(2, 2, 16, 16)
    regions[:, 0, 4:12, 4:12] = 1  # whole
    regions[:, 1, 6:10, 6:10] = 1  # core
    ignore = torch.zeros(2, 1, 16, 16)
    ignore[..., :, :3] = 1
    target = torch.cat([regions, ignore], 1)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    assert torch.all(logits.grad[..., :3] == 0)
    good = loss((regions * 2 - 1) * 6, target)
    assert good < loss(torch.zeros(2, 2, 16, 16), target)


def test_mismatched_target_is_reported():
    with pytest.raises(ValueError, match="does not match"):
        BoundaryLoss(regions=True)(torch.randn(1, 3, 8, 8), torch.zeros(1, 2, 8, 8))


def test_trainer_adds_a_ramped_term_at_every_deep_supervision_scale(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = dict(tiny_plans(), continue_training=False)
    trainer = nnUNetTrainerHyMUNet_BoundaryLoss(plans, "2d", 0, tiny_dataset_json(), torch.device("cpu"))
    trainer.num_epochs = 10
    loss = trainer._build_loss()
    assert trainer.boundary_weight(0) == 0.0
    assert trainer.boundary_weight(5) == pytest.approx(trainer.boundary_weight_max)
    assert 0 < trainer.boundary_weight(2) < trainer.boundary_weight(4) < trainer.boundary_weight_max

    targets = [_square_target(32, 8, 24), _square_target(16, 4, 12), _square_target(8, 2, 6)]
    outputs = [torch.randn(1, 2, s, s) for s in (32, 16, 8)]
    trainer._boundary_term.boundary_weight = 0.0
    without = loss(outputs, targets)
    trainer._boundary_term.boundary_weight = 0.5
    with_term = loss(outputs, targets)
    expected_extra = sum(
        w * 0.5 * BoundaryLoss(regions=False)(o, t) for w, o, t in zip(loss.weight_factors, outputs, targets) if w != 0
    )
    assert with_term - without == pytest.approx(float(expected_extra), rel=1e-4, abs=1e-6)
