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


def _label_value(value, name: str, source: str) -> int:
    """A label value must be a non-negative integer (1.0 is accepted, 1.5 / "1" / true are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 0:
        raise HyMUNetError(
            f"{source}: label {name!r} has value {value!r}; label values must be non-negative "
            "integers (a region is a list of them)"
        )
    return int(value)


def targets_from_dataset_json(dataset_json: dict, source: str = "dataset.json") -> tuple[list[Target], int | None]:
    """(targets in dataset.json order without background, ignore label or None)."""
    labels = dataset_json.get("labels") if isinstance(dataset_json, dict) else None
    if not isinstance(labels, dict) or not labels:
        raise HyMUNetError(f"{source}: no 'labels' mapping")
    ignore = labels.get("ignore")
    if ignore is not None:
        ignore = _label_value(ignore, "ignore", source)
    has_regions = any(isinstance(v, (list, tuple)) for k, v in labels.items() if k != "ignore")
    targets, owners = [], {}
    for name, value in labels.items():
        if name == "ignore":
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                raise HyMUNetError(f"{source}: region {name!r} is an empty list")
            values = tuple(_label_value(v, name, source) for v in value)
        else:
            values = (_label_value(value, name, source),)
        if not has_regions:
            if values[0] in owners:
                raise HyMUNetError(f"{source}: labels {owners[values[0]]!r} and {name!r} both have value {values[0]}")
            owners[values[0]] = name
        if ignore is not None and ignore in values:
            raise HyMUNetError(f"{source}: label {name!r} uses the ignore value {ignore}")
        if all(v == 0 for v in values):
            continue  # background
        channel = len(targets) if has_regions else values[0]
        targets.append(Target(str(name), values, channel, is_region=has_regions))
    if not targets:
        raise HyMUNetError(f"{source}: 'labels' holds no foreground label")
    return targets, ignore


def targets_from_values(values) -> list[Target]:
    """One target per nonzero label value (used when no dataset.json is given), named by the value."""
    return [Target(str(int(v)), (int(v),), int(v)) for v in sorted(set(int(v) for v in values)) if v != 0]
