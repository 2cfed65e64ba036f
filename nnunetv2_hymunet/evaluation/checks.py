"""The input checks of `hymunet evaluate`, in one place: what makes a score meaningless is an error naming the file,
what leaves it meaningful but surprising is a warning recorded in metrics.json.

- Spacing: every value positive and finite (from the files and from --spacing); a zero spacing makes every distance 0.
- Geometry: prediction and field-of-view mask must lie on the reference's grid: same shape, spacing within a relative
  1e-4, origin within 0.01 voxel, direction cosines within 1e-3 (nnU-Net copies the image geometry into its
  predictions, so only a wrong file fails). 2D PNG/BMP/TIF files carry no origin or direction.
- Labels: with a dataset.json, every value in a reference or prediction must be declared there (an undeclared value,
  e.g. a raw 0/255 mask, would silently score as background).
- Scoring masks: a field-of-view mask, or the voxels left after removing the ignore label, must select something
  (an empty one would score every prediction as perfect).
- Probabilities: finite and within [0, 1].
"""

from __future__ import annotations

import math

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError

SPACING_RTOL = 1e-4
ORIGIN_TOLERANCE_VOXELS = 0.01
DIRECTION_ATOL = 1e-3
PROBABILITY_SLACK = 1e-3  # float16 / float32 rounding around 0 and 1


def check_spacing(spacing, what: str) -> tuple[float, ...]:
    """`spacing` as floats, or an error naming `what` when a value is not a positive finite number."""
    values = tuple(float(s) for s in spacing)
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise HyMUNetError(f"{what}: spacing {list(values)} is not positive and finite (distances would be wrong)")
    return values


def geometry_of(properties: dict) -> dict | None:
    """{"origin", "direction"} in world coordinates from an nnU-Net reader's properties; None when the format has no
    geometry (PNG/BMP/TIF)."""
    if "sitk_stuff" in properties:
        stuff = properties["sitk_stuff"]
        return {
            "origin": np.asarray(stuff["origin"], dtype=np.float64),
            "direction": np.asarray(stuff["direction"], dtype=np.float64),
        }
    if "nibabel_stuff" in properties:
        affine = np.asarray(properties["nibabel_stuff"]["original_affine"], dtype=np.float64)
        linear = affine[:3, :3]
        norms = np.linalg.norm(linear, axis=0)
        norms[norms == 0] = 1.0
        return {"origin": affine[:3, 3], "direction": (linear / norms).ravel()}
    return None


def grid_mismatch(ref: tuple, other: tuple) -> str | None:
    """Why `other` is not on the reference's grid, or None. Each argument: (shape, spacing, geometry)."""
    (ref_shape, ref_spacing, ref_geometry), (shape, spacing, geometry) = ref, other
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(shape)} differs from the reference's {tuple(ref_shape)}"
    if not np.allclose(spacing, ref_spacing, rtol=SPACING_RTOL, atol=1e-9):
        return f"spacing {tuple(spacing)} differs from the reference's {tuple(ref_spacing)}"
    if ref_geometry is None or geometry is None:
        return None
    origin_tolerance = ORIGIN_TOLERANCE_VOXELS * min(ref_spacing)
    if (
        ref_geometry["origin"].shape != geometry["origin"].shape
        or np.max(np.abs(ref_geometry["origin"] - geometry["origin"])) > origin_tolerance
    ):
        return (
            f"origin {np.round(geometry['origin'], 4).tolist()} differs from the reference's "
            f"{np.round(ref_geometry['origin'], 4).tolist()} (tolerance {origin_tolerance:g})"
        )
    if (
        ref_geometry["direction"].shape != geometry["direction"].shape
        or np.max(np.abs(ref_geometry["direction"] - geometry["direction"])) > DIRECTION_ATOL
    ):
        return (
            f"direction {np.round(geometry['direction'], 4).tolist()} differs from the reference's "
            f"{np.round(ref_geometry['direction'], 4).tolist()}"
        )
    return None


def undeclared_values(seg: np.ndarray, declared: set) -> list:
    """Values of a label map that dataset.json does not declare (at most 10)."""
    values = np.unique(seg)
    return [int(v) for v in values if int(v) not in declared][:10]


def check_scoring_mask(valid: np.ndarray | None, case: str, fov_file: str | None, ignore_label) -> None:
    if valid is None or valid.any():
        return
    if fov_file is not None:
        raise HyMUNetError(
            f"case {case}: the field-of-view mask {fov_file} selects no voxel (or only voxels with "
            f"the ignore label); nothing would be scored"
        )
    raise HyMUNetError(
        f"case {case}: every reference voxel has the ignore label {ignore_label}; nothing would be scored"
    )


def check_probabilities(probabilities: np.ndarray, case: str, npz_file: str) -> None:
    finite = np.isfinite(probabilities)
    if not finite.all():
        raise HyMUNetError(
            f"case {case}: {npz_file} holds {int(finite.size - np.count_nonzero(finite))} NaN or infinite probabilities"
        )
    low, high = float(probabilities.min()), float(probabilities.max())
    if low < -PROBABILITY_SLACK or high > 1 + PROBABILITY_SLACK:
        raise HyMUNetError(
            f"case {case}: {npz_file} holds values in [{low:g}, {high:g}], not probabilities in [0, 1] (logits?)"
        )
