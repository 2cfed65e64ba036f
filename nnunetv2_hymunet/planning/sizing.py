"""Batch and patch size for HyMUNet under a GPU memory target, the way nnU-Net's planners size PlainConvUNet.

nnU-Net estimates training memory as the number of stored feature-map elements for one sample
(`compute_conv_feature_map_size`) and compares it with reference values measured for PlainConvUNet: a network
whose estimate is 85e6 elements (2D) or 560e6 (3D) trains in 8 GB at batch size 12 (2D) or 2 (3D). We reuse that
yardstick with HyMUNet's own estimate, which counts its convolutions and its Mamba layers, so the deep Mamba stages
shrink the batch (then the patch) just as extra convolutions would. The network topology (strides) and the
preprocessed data stay those of the source plans: the patch only shrinks in steps that keep it divisible by the
total stride.
"""

from typing import Callable, Sequence

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError

# ExperimentPlanner's reference values (nnunetv2 2.8.1, default_experiment_planner.py)
REFERENCE_ELEMENTS = {2: 85_000_000, 3: 560_000_000}
REFERENCE_BATCH = {2: 12, 3: 2}
REFERENCE_GB = 8
MIN_BATCH = 2
MIN_DEEPEST_EDGE = 4  # nnU-Net's UNet_featuremap_min_edge_length


def total_strides(strides: Sequence[Sequence[int]]) -> np.ndarray:
    return np.prod(np.array(strides, dtype=np.int64), axis=0)


def check_patch(patch_size: Sequence[int], strides: Sequence[Sequence[int]], where: str) -> None:
    divisor = total_strides(strides)
    if len(patch_size) != len(divisor) or np.any(np.array(patch_size) % divisor):
        raise HyMUNetError(f"{where}: patch size {list(patch_size)} must have {len(divisor)} axes, each divisible by "
                           f"the network's total stride {divisor.tolist()}")


def max_batch_size(estimate: float, dim: int, gpu_memory_gb: float) -> int:
    budget = REFERENCE_ELEMENTS[dim] * gpu_memory_gb / REFERENCE_GB
    return int(np.floor(budget / estimate * REFERENCE_BATCH[dim]))


def fit_batch_and_patch(estimate_fn: Callable[[tuple], float], patch_size: Sequence[int], batch_size: int,
                        strides: Sequence[Sequence[int]], median_shape: Sequence[float],
                        gpu_memory_gb: float) -> tuple:
    """(batch, patch, estimate): the planned batch (never larger), shrunk until it fits; below the minimum batch of 2
    the patch shrinks instead, along the axis largest relative to the median image, by one total-stride step."""
    dim = len(patch_size)
    divisor = total_strides(strides)
    patch = [int(p) for p in patch_size]
    while True:
        estimate = float(estimate_fn(tuple(patch)))
        fitting = max_batch_size(estimate, dim, gpu_memory_gb)
        if fitting >= MIN_BATCH:
            return max(MIN_BATCH, min(batch_size, fitting)), patch, estimate
        shrinkable = [a for a in range(dim) if patch[a] // divisor[a] - 1 >= MIN_DEEPEST_EDGE]
        if not shrinkable:
            raise HyMUNetError(
                f"HyMUNet does not fit {gpu_memory_gb:g} GB even at batch size {MIN_BATCH} with patch {patch} "
                f"(estimated {estimate:.3g} feature-map elements per sample); raise --gpu-memory-gb or use a "
                "preset with fewer Mamba stages or scan directions")
        axis = max(shrinkable, key=lambda a: patch[a] / max(float(median_shape[a]), 1.0))
        patch[axis] -= int(divisor[axis])
