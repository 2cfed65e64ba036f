"""HyMUNet's hybrid knobs: the one definition of their names, defaults and checks.

Presets, the planner, the trainers (ablation variants) and HyMUNet itself read and check knobs through `HybridKnobs`,
so a bad value gets the same one-line error wherever it comes from. This module is the lowest layer (the network
imports it; it imports nothing of the package but the error type).
"""

import math
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError

SCAN_ORDERS = ("flat", "bidir", "cross")
FUSIONS = ("mgf", "concat")
DIRECTION_MERGES = ("mean", "sum", "separate")
GATE_NORMS = ("instance", "none", "channel")
_CHOICES = {"scan": SCAN_ORDERS, "fusion": FUSIONS, "direction_merge": DIRECTION_MERGES, "gate_norm": GATE_NORMS}
# the two ways of naming the Mamba stages: setting either one (a preset, a trainer variant) replaces both
STAGE_KNOBS = ("n_mamba_stages", "mamba_stages")


def default_n_hybrid_stages(n_stages: int) -> int:
    """The deepest half of the stages (rounded down), at least one: the hybrid stages, and by default the Mamba ones."""
    return max(1, n_stages // 2)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def per_stage(name: str, value, n: int) -> list:
    """A per-stage argument as an explicit list of n entries (an int stands for n equal entries)."""
    if _is_int(value):
        return [int(value)] * n
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) and not isinstance(value, np.ndarray):
        raise HyMUNetError(f"{name} must be a list of {n} entries or an integer, got {value!r}")
    value = list(value)
    if len(value) != n:
        raise HyMUNetError(f"{name} has {len(value)} entries, expected {n}: {value}")
    return value


@dataclass(frozen=True)
class HybridKnobs:
    """Every HyMUNet knob with its default. Construction checks each value (HyMUNetError naming the knob).

    n_mamba_stages / mamba_stages: which stages carry Mamba layers, as "the deepest k" or as stage indices
      (0 = full resolution); neither: the deepest half. Giving both is allowed only when they agree.
    scan: flat | bidir | cross. fusion: mgf | concat (the MGF ablation). d_state, d_conv, expand: Mamba's state size,
    causal conv width and inner expansion; mamba_max_inner_channels caps d_inner = expand * C at max(C, cap) (None: no
    cap). n_mamba_layers_per_stage: Mamba layers after a stage's conv blocks. direction_merge: mean | sum | separate.
    dt_min, dt_max: Mamba's initial step-size range. gate_norm: instance | none | channel (the MGF gate's norm).
    layer_scale: None (gamma = 1) or the initial value of a learnable per-channel gamma.
    """

    n_mamba_stages: Optional[int] = None
    mamba_stages: Optional[Tuple[int, ...]] = None
    scan: str = "cross"
    fusion: str = "mgf"
    d_state: int = 16
    d_conv: int = 4
    expand: float = 2
    mamba_max_inner_channels: Optional[int] = 512
    n_mamba_layers_per_stage: int = 1
    direction_merge: str = "mean"
    dt_min: float = 0.001
    dt_max: float = 0.1
    gate_norm: str = "instance"
    layer_scale: Optional[float] = None

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise HyMUNetError(f"knob {name}={value!r} is not one of {', '.join(choices)}")
        for name in ("d_state", "d_conv", "n_mamba_layers_per_stage"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise HyMUNetError(f"knob {name} must be an integer >= 1, got {value!r}")
        if self.mamba_max_inner_channels is not None and (
            not _is_int(self.mamba_max_inner_channels) or self.mamba_max_inner_channels < 1
        ):
            raise HyMUNetError(
                "knob mamba_max_inner_channels must be null/None or an integer >= 1, got "
                f"{self.mamba_max_inner_channels!r}"
            )
        if not _is_real(self.expand) or self.expand < 1:
            raise HyMUNetError(f"knob expand must be a number >= 1, got {self.expand!r}")
        if not _is_real(self.dt_min) or not _is_real(self.dt_max) or not 0 < self.dt_min <= self.dt_max:
            raise HyMUNetError(
                f"knobs dt_min and dt_max must be numbers with 0 < dt_min <= dt_max, got "
                f"{self.dt_min!r}, {self.dt_max!r}"
            )
        if self.layer_scale is not None and (not _is_real(self.layer_scale) or self.layer_scale < 0):
            raise HyMUNetError(f"knob layer_scale must be null/None or a finite number >= 0, got {self.layer_scale!r}")
        if self.n_mamba_stages is not None and (not _is_int(self.n_mamba_stages) or self.n_mamba_stages < 0):
            raise HyMUNetError(f"knob n_mamba_stages must be null/None or an integer >= 0, got {self.n_mamba_stages!r}")
        if self.mamba_stages is not None:
            stages = self.mamba_stages
            if (
                isinstance(stages, (str, bytes))
                or not isinstance(stages, (Sequence, np.ndarray))
                or not all(_is_int(s) and s >= 0 for s in stages)
                or len(set(int(s) for s in stages)) != len(stages)
            ):
                raise HyMUNetError(f"knob mamba_stages must be a list of distinct stage indices >= 0, got {stages!r}")
            object.__setattr__(self, "mamba_stages", tuple(sorted(int(s) for s in stages)))

    @classmethod
    def from_dict(cls, knobs: Mapping, where: str = "hybrid knobs") -> "HybridKnobs":
        """Knobs from a preset / plans / trainer mapping; unknown names and bad values are errors naming `where`."""
        if not isinstance(knobs, Mapping):
            raise HyMUNetError(f"{where}: hybrid knobs must be an object/dict, got {type(knobs).__name__}")
        unknown = sorted(set(knobs) - set(KNOB_NAMES))
        if unknown:
            raise HyMUNetError(
                f"{where}: unknown HyMUNet knob {', '.join(map(repr, unknown))} (known: {', '.join(KNOB_NAMES)})"
            )
        try:
            return cls(**knobs)
        except HyMUNetError as e:
            raise HyMUNetError(f"{where}: {e}") from None

    def as_dict(self) -> dict:
        """{name: value} of every knob (mamba_stages as a list, as in JSON)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if out["mamba_stages"] is not None:
            out["mamba_stages"] = list(out["mamba_stages"])
        return out

    def with_overrides(self, overrides: Optional[Mapping], where: str = "knob overrides") -> "HybridKnobs":
        """These knobs with `overrides` (a trainer variant's, a preset's) on top; an override of n_mamba_stages or
        mamba_stages replaces both (`{"n_mamba_stages": 0}` removes Mamba from plans that list mamba_stages)."""
        if not overrides:
            return self
        checked = HybridKnobs.from_dict(overrides, where)  # names and values checked before anything is merged
        values = self.as_dict()
        if any(k in overrides for k in STAGE_KNOBS):
            values.update({k: None for k in STAGE_KNOBS})
        values.update({k: getattr(checked, k) for k in overrides})
        return HybridKnobs(**values)

    def stage_indices(self, n_stages: int) -> list:
        """The sorted indices of the stages that carry Mamba layers, in a network of n_stages stages."""
        k = self.n_mamba_stages
        if k is not None and k > n_stages:
            raise HyMUNetError(f"knob n_mamba_stages must be in 0..n_stages={n_stages}, got {k}")
        if self.mamba_stages is None:
            k = default_n_hybrid_stages(n_stages) if k is None else k
            return list(range(n_stages - k, n_stages))
        indices = list(self.mamba_stages)
        if any(s >= n_stages for s in indices):
            raise HyMUNetError(f"knob mamba_stages must list stage indices in 0..{n_stages - 1}, got {indices}")
        if k is not None and indices != list(range(n_stages - k, n_stages)):
            raise HyMUNetError(
                f"knob n_mamba_stages={k} (the deepest {k} stages) disagrees with mamba_stages="
                f"{indices}; give one of them"
            )
        return indices

    def explicit(self, n_stages: int) -> dict:
        """Every knob written out for a network of n_stages stages: mamba_stages as the list of indices (no
        n_mamba_stages), the rest as they are. What the plans' arch_kwargs hold."""
        out = self.as_dict()
        out["mamba_stages"] = self.stage_indices(n_stages)
        del out["n_mamba_stages"]
        return out


KNOB_NAMES = tuple(f.name for f in fields(HybridKnobs))
