"""Plan presets: HyMUNet knobs, batch and patch size that override the automatic choice.

Layout (every key optional except as noted; `description` and `_comment` are free text for the reader):

    {
      "description": "what the preset is for",
      "_comment": {"key": "what it means", ...},
      "plans_name": "nnUNetHyMUNetPlans",          # the plans identifier written (-p NAME)
      "source_plans": "nnUNetPlans",               # the nnU-Net plans it derives from (same preprocessed data)
      "gpu_memory_gb": 8,                          # target GPU memory for automatic batch/patch sizing
      "hybrid_knobs": {"scan": "cross", ...},      # HyMUNet knobs for every configuration
      "configurations": {                          # per nnU-Net configuration
        "2d": {"batch_size": 12, "patch_size": [256, 256], "hybrid_knobs": {...}}
      }
    }

The bundled presets are package data (`nnunetv2_hymunet/presets/*.json`), read with importlib.resources so that an
installed wheel finds them; any other preset is a JSON file given by its path.
"""

import json
import os
from importlib import resources

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.knobs import HybridKnobs

_TOP_KEYS = {"description", "_comment", "plans_name", "source_plans", "gpu_memory_gb", "hybrid_knobs", "configurations"}
_CONFIGURATION_KEYS = {"_comment", "batch_size", "patch_size", "hybrid_knobs"}


def _check_knobs(knobs, where: str) -> dict:
    HybridKnobs.from_dict(knobs, where)  # names, types and ranges: the one definition of the knobs
    return knobs


def _positive_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyMUNetError(f"{where} must be a positive integer, got {value!r}")
    return value


def validate_preset(preset, source: str) -> dict:
    """Check a preset's structure and types; errors name `source` (the file) and the offending key."""
    if not isinstance(preset, dict):
        raise HyMUNetError(f"{source}: a preset must be a JSON object")
    unknown = sorted(set(preset) - _TOP_KEYS)
    if unknown:
        raise HyMUNetError(f"{source}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("plans_name", "source_plans"):
        if key in preset and (not isinstance(preset[key], str) or not preset[key] or os.sep in preset[key]):
            raise HyMUNetError(f"{source}: {key} must be a plain plans identifier, got {preset[key]!r}")
    if "gpu_memory_gb" in preset:
        value = preset["gpu_memory_gb"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise HyMUNetError(f"{source}: gpu_memory_gb must be a positive number, got {value!r}")
    _check_knobs(preset.get("hybrid_knobs", {}), f"{source}: hybrid_knobs")
    configurations = preset.get("configurations", {})
    if not isinstance(configurations, dict):
        raise HyMUNetError(f"{source}: configurations must be an object mapping configuration names to settings")
    for name, settings in configurations.items():
        where = f"{source}: configurations.{name}"
        if not isinstance(settings, dict):
            raise HyMUNetError(f"{where} must be an object")
        unknown = sorted(set(settings) - _CONFIGURATION_KEYS)
        if unknown:
            raise HyMUNetError(
                f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(_CONFIGURATION_KEYS))})"
            )
        if "batch_size" in settings:
            _positive_int(settings["batch_size"], f"{where}.batch_size")
        if "patch_size" in settings:
            patch = settings["patch_size"]
            if not isinstance(patch, list) or len(patch) not in (2, 3):
                raise HyMUNetError(f"{where}.patch_size must be a list of 2 or 3 integers, got {patch!r}")
            for v in patch:
                _positive_int(v, f"{where}.patch_size entry")
        _check_knobs(settings.get("hybrid_knobs", {}), f"{where}.hybrid_knobs")
    return preset


def _bundled_folder():
    return resources.files("nnunetv2_hymunet").joinpath("presets")


def bundled_preset_names() -> list:
    """Names of the presets shipped in the package (`hymunet plan --preset NAME`)."""
    return sorted(entry.name[: -len(".json")] for entry in _bundled_folder().iterdir() if entry.name.endswith(".json"))


def _parse(text: str, source: str) -> dict:
    try:
        preset = json.loads(text)
    except json.JSONDecodeError as e:
        raise HyMUNetError(f"cannot read preset {source}: {e}") from e
    return validate_preset(preset, source)


def load_preset(path: str) -> dict:
    """Read and validate a preset: a JSON file's path, or the name of a bundled preset such as `isic2018_2d`."""
    if os.path.isfile(path):
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise HyMUNetError(f"cannot read preset {path}: {e}") from e
        return _parse(text, path)
    names = bundled_preset_names()
    if path in names:
        text = _bundled_folder().joinpath(path + ".json").read_text(encoding="utf-8")
        return _parse(text, f"bundled preset {path}")
    raise HyMUNetError(
        f"preset not found: {path!r} is neither a file nor a bundled preset (bundled: {', '.join(names)})"
    )
