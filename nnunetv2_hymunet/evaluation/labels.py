"""What is evaluated: the labels or regions of a dataset, read from its dataset.json as nnU-Net defines them.

A label maps to one value of the segmentation map; a region (dataset.json value is a list, e.g. BraTS
"whole tumor": [1, 2, 3]) is the union of several values, exactly as nnU-Net's region-based training does. The
`channel` is the index of the target in the probabilities nnU-Net saves with --save_probabilities: the label value
for softmax outputs (channel 0 is background), the position among the foreground regions for sigmoid outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError


@dataclass(frozen=True)
class Target:
    name: str
    values: tuple[int, ...]
    channel: int
    is_region: bool = False

    def mask(self, seg: np.ndarray) -> np.ndarray:
        if len(self.values) == 1:
            return seg == self.values[0]
        return np.isin(seg, self.values)

    def as_dict(self) -> dict:
        return {"name": self.name, "values": list(self.values), "region": self.is_region, "channel": self.channel}


def targets_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[list[Target], int | None]:
    """(targets in dataset.json order without background, ignore label or None)."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise HyMUNetError(f"{source}: no 'labels' mapping")
    ignore = labels.get("ignore")
    has_regions = any(isinstance(v, (list, tuple)) for k, v in labels.items() if k != "ignore")
    targets = []
    for name, value in labels.items():
        if name == "ignore":
            continue
        values = tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)
        if all(v == 0 for v in values):
            continue  # background
        channel = len(targets) if has_regions else values[0]
        targets.append(Target(str(name), values, channel, is_region=has_regions))
    if not targets:
        raise HyMUNetError(f"{source}: 'labels' holds no foreground label")
    return targets, None if ignore is None else int(ignore)


def targets_from_values(values) -> list[Target]:
    """One target per nonzero label value (used when no dataset.json is given), named by the value."""
    return [Target(str(int(v)), (int(v),), int(v)) for v in sorted(set(int(v) for v in values)) if v != 0]
