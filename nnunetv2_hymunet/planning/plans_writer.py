"""`hymunet plan`: write nnUNetHyMUNetPlans.json next to nnU-Net's own plans, with nnUNetPlannerHyMUNet.

The new plans are a copy of the source plans (nnUNetPlans by default) in which each chosen configuration is
re-planned by nnUNetPlannerHyMUNet (planning/planner.py): nnU-Net's planning loop at the configuration's spacing and
median shape, sized with HyMUNet's memory estimate, writing HyMUNet's explicit arch_kwargs. Spacing, data identifiers
and preprocessing entries are the source's, so its preprocessed data is reused as it is, and the stock trainer can
train HyMUNet:

    nnUNetv2_train 501 2d 0 -p nnUNetHyMUNetPlans

Like nnU-Net's planners, it reads the dataset's raw dataset.json and its dataset_fingerprint.json.
"""

import json
import math
import os
import re
from copy import deepcopy

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_write_text
from nnunetv2_hymunet.network.knobs import STAGE_KNOBS
from nnunetv2_hymunet.planning.presets import load_preset

DEFAULT_PLANS_NAME = "nnUNetHyMUNetPlans"  # = planner.DEFAULT_PLANS_NAME (not imported: it pulls in nnU-Net)
_WRITERS = ("hymunet plan", "nnUNetPlannerHyMUNet")  # plans files this command may replace
DEFAULT_SOURCE_PLANS = "nnUNetPlans"
DEFAULT_GPU_MEMORY_GB = 8.0
_PLANS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _preprocessed_dataset_folder(dataset: str) -> str:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise HyMUNetError(
            "the environment variable nnUNet_preprocessed is not set (nnU-Net's preprocessed data "
            "folder, see nnU-Net's documentation/set_environment_variables.md)"
        )
    try:
        dataset_name = maybe_convert_to_dataset_name(dataset)
    except RuntimeError as e:  # nnU-Net's message goes on to list the environment over several lines
        raise HyMUNetError(f"-d {dataset!r}: {str(e).strip().splitlines()[0]}") from None
    return os.path.join(str(nnUNet_preprocessed), dataset_name)


def _load_json(path: str, what: str, hint: str) -> dict:
    if not os.path.isfile(path):
        raise HyMUNetError(f"{what} not found: {path}. {hint}")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HyMUNetError(f"cannot read {what} {path}: {e}") from e


def write_json_atomically(obj, path: str) -> None:
    """Write beside the target, then rename: a crash never leaves a half-written plans file (umask permissions)."""
    atomic_write_text(path, json.dumps(obj, indent=4) + "\n")


def _plans_identifier(name: str, flag: str) -> str:
    """A plans identifier is a file name in the dataset's preprocessed folder, never a path out of it."""
    if not isinstance(name, str) or not _PLANS_NAME.match(name) or name.endswith(".json"):
        raise HyMUNetError(
            f"{flag} {name!r}: a plans identifier such as nnUNetHyMUNetPlans (letters, digits, '_', "
            "'-', '.'; no path, no .json)"
        )
    return name


def _check_replaceable_plans(path: str) -> None:
    """An existing plans file is replaced only when `hymunet plan` wrote it (nnU-Net's own plans never are)."""
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            planner = str(json.load(f).get("experiment_planner_used", ""))
    except (OSError, ValueError, AttributeError):
        planner = ""
    if not planner.startswith(_WRITERS):
        raise HyMUNetError(f"--plans-name: {path} exists and was not written by hymunet plan; choose another name")


def _merge_knobs(base: dict, override: dict) -> dict:
    """A configuration's preset knobs over the preset's: naming the Mamba stages either way replaces both."""
    merged = dict(base)
    if any(k in override for k in STAGE_KNOBS):
        for k in STAGE_KNOBS:
            merged.pop(k, None)
    merged.update(override)
    return merged


def _approximate_n_voxels(source: dict, name: str, num_training: int) -> float:
    """The dataset's voxels at the configuration's spacing, as nnU-Net's plan_experiment counts them (for 2d: the
    3d_fullres median shape, whose slices the 2d configuration sees)."""
    configurations = source["configurations"]
    shape = configurations[name]["median_image_size_in_voxels"]
    if len(shape) == 2 and "median_image_size_in_voxels" in configurations.get("3d_fullres", {}):
        shape = configurations["3d_fullres"]["median_image_size_in_voxels"]
    return float(np.prod(shape, dtype=np.float64) * max(1, int(num_training)))


def _planner(dataset_id: str, gpu_memory_gb: float, plans_name: str):
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    from nnunetv2_hymunet.planning.planner import nnUNetPlannerHyMUNet

    hint = f"nnU-Net's planners read it; run `nnUNetv2_plan_and_preprocess -d {dataset_id}` first"
    if nnUNet_raw is None:
        raise HyMUNetError(f"the environment variable nnUNet_raw is not set ({hint})")
    for path in (
        os.path.join(nnUNet_raw, dataset_id, "dataset.json"),
        os.path.join(nnUNet_preprocessed, dataset_id, "dataset_fingerprint.json"),
    ):
        if not os.path.isfile(path):
            raise HyMUNetError(f"{path} not found ({hint})")
    try:
        return nnUNetPlannerHyMUNet(dataset_id, gpu_memory_gb, plans_name=plans_name)
    except (OSError, ValueError) as e:
        raise HyMUNetError(f"-d {dataset_id}: cannot read the raw dataset or its fingerprint: {e}") from None


def plan_configuration(planner, source: dict, name: str, settings: dict, knobs: dict, where: str) -> tuple:
    """(new configuration, summary) for one configuration of the source plans."""
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    resolved = PlansManager(source).get_configuration(name).configuration
    n_voxels = _approximate_n_voxels(source, name, planner.dataset_json.get("numTraining", 1))
    configuration = planner.plan_from_source(
        resolved, n_voxels, knobs, settings.get("patch_size"), settings.get("batch_size"), where
    )
    recursive_fix_for_json_export(configuration)  # numpy values from nnU-Net's topology functions
    patch, batch = configuration["patch_size"], configuration["batch_size"]
    elements = planner.estimate(configuration["architecture"], patch)
    # the source network at the same patch: the ratio shows what the hybrid stages cost
    source_elements = planner.estimate(resolved["architecture"], patch)
    reference, ref_bs = planner.memory_reference(len(patch))
    summary = {
        "source": {
            "batch_size": resolved["batch_size"],
            "patch_size": list(resolved["patch_size"]),
            "network": resolved["architecture"]["network_class_name"].rsplit(".", 1)[-1],
            "feature_map_elements": source_elements,
        },
        "hymunet": {"batch_size": batch, "patch_size": patch, "feature_map_elements": elements, "knobs": knobs},
        "fits_target": bool(elements * batch <= reference * ref_bs),
    }
    return configuration, summary


def write_hymunet_plans(
    dataset: str,
    configurations=None,
    preset_path: str = None,
    gpu_memory_gb: float = None,
    plans_name: str = None,
    source_plans: str = None,
) -> tuple:
    """Write the HyMUNet plans for `dataset` (name or id); returns (plans file, {configuration: summary})."""
    preset = load_preset(preset_path) if preset_path else {}
    plans_name = _plans_identifier(
        preset.get("plans_name", DEFAULT_PLANS_NAME) if plans_name is None else plans_name, "--plans-name"
    )
    source_plans = _plans_identifier(
        preset.get("source_plans", DEFAULT_SOURCE_PLANS) if source_plans is None else source_plans, "--source-plans"
    )
    if gpu_memory_gb is None:  # 0 is a value to refuse, not "use the default"
        gpu_memory_gb = preset.get("gpu_memory_gb", DEFAULT_GPU_MEMORY_GB)
    try:
        gpu_memory_gb = float(gpu_memory_gb)
    except (TypeError, ValueError):
        raise HyMUNetError(f"--gpu-memory-gb must be a number, got {gpu_memory_gb!r}") from None
    if not (math.isfinite(gpu_memory_gb) and gpu_memory_gb > 0):
        raise HyMUNetError(f"--gpu-memory-gb must be a positive number of GB, got {gpu_memory_gb}")
    if plans_name == source_plans:
        raise HyMUNetError(f"the HyMUNet plans name must differ from the source plans ({source_plans})")

    folder = _preprocessed_dataset_folder(dataset)
    dataset_id = os.path.basename(folder)
    target = os.path.join(folder, plans_name + ".json")
    _check_replaceable_plans(target)
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
        raise HyMUNetError(f"no permission to write {target} (the dataset's nnUNet_preprocessed folder)")
    source_file = os.path.join(folder, source_plans + ".json")
    source = _load_json(
        source_file,
        "source plans",
        f"Run `nnUNetv2_plan_and_preprocess -d {dataset_id}` first"
        + (f" (or pick the planner that writes {source_plans})" if source_plans != "nnUNetPlans" else ""),
    )

    plans = deepcopy(source)
    plans["plans_name"] = plans_name
    plans["experiment_planner_used"] = f"hymunet plan (from {source_plans}, {gpu_memory_gb:g} GB target)"
    available = list(source["configurations"])
    if configurations:
        missing = [c for c in configurations if c not in available]
        if missing:
            raise HyMUNetError(
                f"configuration(s) {', '.join(missing)} not in {source_file} (available: {', '.join(available)})"
            )
        chosen = list(configurations)
    else:  # configurations that inherit (3d_cascade_fullres) pick HyMUNet up from their parent
        chosen = [c for c in available if "inherits_from" not in source["configurations"][c]]
    preset_configurations = preset.get("configurations", {})
    ignored = [c for c in preset_configurations if c not in chosen]
    if ignored:
        print(f"note: preset settings for {', '.join(ignored)} not used (not planned here)")

    planner = _planner(dataset_id, gpu_memory_gb, plans_name)
    summaries = {}
    for name in chosen:
        settings = preset_configurations.get(name, {})
        knobs = _merge_knobs(preset.get("hybrid_knobs", {}), settings.get("hybrid_knobs", {}))
        plans["configurations"][name], summaries[name] = plan_configuration(
            planner, source, name, settings, knobs, where=f"{preset_path or 'plan'}: configurations.{name}"
        )

    write_json_atomically(plans, target)
    return target, summaries
