"""`hymunet plan`: write nnUNetHyMUNetPlans.json next to nnU-Net's own plans.

The new plans are a copy of the source plans (nnUNetPlans by default) in which each chosen configuration's
architecture names `nnunetv2_hymunet.network.HyMUNet` (same stages, kernels and strides, plus the hybrid knobs), with
batch and patch size re-fitted to a GPU memory target. Data identifiers are unchanged, so the preprocessed data of
the source plans is reused as it is, and the stock trainer can train HyMUNet:

    nnUNetv2_train 501 2d 0 -p nnUNetHyMUNetPlans
"""

import json
import math
import os
import re
from copy import deepcopy

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import atomic_write_text
from nnunetv2_hymunet.planning.architecture import HYBRID_KNOBS, hymunet_architecture_entry
from nnunetv2_hymunet.planning.presets import load_preset
from nnunetv2_hymunet.planning.sizing import check_patch, fit_batch_and_patch, max_batch_size

DEFAULT_PLANS_NAME = "nnUNetHyMUNetPlans"
DEFAULT_SOURCE_PLANS = "nnUNetPlans"
DEFAULT_GPU_MEMORY_GB = 8.0
_PLANS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _preprocessed_dataset_folder(dataset: str) -> str:
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if not nnUNet_preprocessed.is_set():
        raise HyMUNetError("the environment variable nnUNet_preprocessed is not set (nnU-Net's preprocessed data "
                           "folder, see nnU-Net's documentation/set_environment_variables.md)")
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
        raise HyMUNetError(f"{flag} {name!r}: a plans identifier such as nnUNetHyMUNetPlans (letters, digits, '_', "
                           "'-', '.'; no path, no .json)")
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
    if not planner.startswith("hymunet plan"):
        raise HyMUNetError(f"--plans-name: {path} exists and was not written by hymunet plan; choose another name")


def feature_map_elements(architecture: dict, patch_size, num_input_channels: int, num_output_channels: int) -> float:
    """nnU-Net's memory yardstick for one sample: the network's compute_conv_feature_map_size at `patch_size`."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(architecture["network_class_name"], architecture["arch_kwargs"],
                                 architecture["_kw_requires_import"], num_input_channels, num_output_channels,
                                 allow_init=False, deep_supervision=True)
    return float(net.compute_conv_feature_map_size(tuple(patch_size)))


def plan_configuration(configuration: dict, settings: dict, knobs: dict, gpu_memory_gb: float,
                       num_input_channels: int, num_output_channels: int, where: str) -> tuple:
    """(new configuration entries, summary) for one resolved source configuration."""
    architecture = hymunet_architecture_entry(configuration, knobs)
    strides = architecture["arch_kwargs"]["strides"]
    planned_patch = list(configuration["patch_size"])
    planned_batch = int(configuration["batch_size"])
    dim = len(planned_patch)

    def estimate(patch):
        return feature_map_elements(architecture, patch, num_input_channels, num_output_channels)

    if "patch_size" in settings:
        patch = list(settings["patch_size"])
        check_patch(patch, strides, f"{where}.patch_size")
    else:
        patch = None
    if "batch_size" in settings:
        batch = int(settings["batch_size"])
        patch = patch or planned_patch
        elements = estimate(patch)
    elif patch is not None:
        elements = estimate(patch)
        batch = max(2, min(planned_batch, max_batch_size(elements, dim, gpu_memory_gb)))
    else:
        batch, patch, elements = fit_batch_and_patch(estimate, planned_patch, planned_batch, strides,
                                                     configuration["median_image_size_in_voxels"], gpu_memory_gb)
    # the source network at the same patch: the ratio shows what the hybrid stages cost
    source_elements = feature_map_elements(configuration["architecture"], patch, num_input_channels,
                                           num_output_channels)
    fits = max_batch_size(elements, dim, gpu_memory_gb) >= batch
    summary = {
        "source": {"batch_size": planned_batch, "patch_size": planned_patch,
                   "network": configuration["architecture"]["network_class_name"].rsplit(".", 1)[-1],
                   "feature_map_elements": source_elements},
        "hymunet": {"batch_size": batch, "patch_size": patch, "feature_map_elements": elements,
                    "knobs": {k: v for k, v in architecture["arch_kwargs"].items() if k in HYBRID_KNOBS}},
        "fits_target": bool(fits),
    }
    return {"architecture": architecture, "batch_size": batch, "patch_size": patch}, summary


def write_hymunet_plans(dataset: str, configurations=None, preset_path: str = None, gpu_memory_gb: float = None,
                        plans_name: str = None, source_plans: str = None) -> tuple:
    """Write the HyMUNet plans for `dataset` (name or id); returns (plans file, {configuration: summary})."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    preset = load_preset(preset_path) if preset_path else {}
    plans_name = _plans_identifier(preset.get("plans_name", DEFAULT_PLANS_NAME) if plans_name is None else plans_name,
                                   "--plans-name")
    source_plans = _plans_identifier(
        preset.get("source_plans", DEFAULT_SOURCE_PLANS) if source_plans is None else source_plans, "--source-plans")
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
    source = _load_json(source_file, "source plans", f"Run `nnUNetv2_plan_and_preprocess -d {dataset_id}` first"
                        + (f" (or pick the planner that writes {source_plans})" if source_plans != "nnUNetPlans"
                           else ""))
    dataset_json = _load_json(os.path.join(folder, "dataset.json"), "dataset.json",
                              f"Run `nnUNetv2_plan_and_preprocess -d {dataset_id}` first")

    plans = deepcopy(source)
    plans["plans_name"] = plans_name
    plans["experiment_planner_used"] = f"hymunet plan (from {source_plans}, {gpu_memory_gb:g} GB target)"
    available = list(source["configurations"])
    if configurations:
        missing = [c for c in configurations if c not in available]
        if missing:
            raise HyMUNetError(f"configuration(s) {', '.join(missing)} not in {source_file} "
                               f"(available: {', '.join(available)})")
        chosen = list(configurations)
    else:  # configurations that inherit (3d_cascade_fullres) pick HyMUNet up from their parent
        chosen = [c for c in available if "inherits_from" not in source["configurations"][c]]
    preset_configurations = preset.get("configurations", {})
    ignored = [c for c in preset_configurations if c not in chosen]
    if ignored:
        print(f"note: preset settings for {', '.join(ignored)} not used (not planned here)")

    source_manager = PlansManager(source)
    label_manager = source_manager.get_label_manager(dataset_json)
    num_input_channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {})))
    summaries = {}
    for name in chosen:
        settings = preset_configurations.get(name, {})
        knobs = {**preset.get("hybrid_knobs", {}), **settings.get("hybrid_knobs", {})}
        resolved = source_manager.get_configuration(name).configuration
        entries, summaries[name] = plan_configuration(
            resolved, settings, knobs, gpu_memory_gb, num_input_channels, label_manager.num_segmentation_heads,
            where=f"{preset_path or 'plan'}: configurations.{name}")
        plans["configurations"][name].update(entries)

    write_json_atomically(plans, target)
    return target, summaries
