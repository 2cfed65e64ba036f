"""Built-in plans for `hymunet profile --plan NAME`, and how a dataset's own plans are loaded.

The presets are what nnU-Net 2.8.1 plans for two typical settings, written out so that profiling needs no dataset:

- `isic-like-2d`: dermoscopy photographs (RGB PNG, about 1000x700 px, no spacing). Produced by running nnU-Net 2.8.1's
  default `ExperimentPlanner` on RGB images of 700x1000 px: 2d configuration, patch 768x1024, batch 2, 8 stages,
  features 32..512, 2 convs per stage; 2 output channels (background, lesion).
- `brats-like-3d`: brain-tumour MRI (4 co-registered modalities, 1 mm isotropic, regions whole tumour / tumour core /
  enhancing tumour as in nnU-Net's BraTS setup): 3d_fullres, patch 128^3, batch 2, 6 stages, features 32..320,
  isotropic 3x3x3 kernels and stride 2; 3 output channels (one sigmoid per region).

Both are complete plans dicts (PlansManager / ConfigurationManager accept them), so the networks are built through the
trainers' own `build_network_architecture` exactly as training would build them.
"""

import json
import os
from copy import deepcopy

from batchgenerators.utilities.file_and_folder_operations import isfile, join

from nnunetv2_hymunet.errors import HyMUNetError

# ResEnc M encoder depth (nnU-Net's nnUNetPlannerResEncM: residual blocks per stage, capped at the stage count).
RESENC_M_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6)


def _configuration(dim: int, patch_size, batch_size: int, spacing, features, n_channels: int, data_identifier: str):
    n_stages = len(features)
    conv = f"torch.nn.modules.conv.Conv{dim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    resampling_kwargs = {"order_z": 0, "force_separate_z": None}
    return {
        "data_identifier": data_identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": list(patch_size),
        "median_image_size_in_voxels": [float(s) for s in patch_size],
        "spacing": list(spacing),
        "normalization_schemes": ["ZScoreNormalization"] * n_channels,
        "use_mask_for_norm": [dim == 3] * n_channels,
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling_kwargs},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling_kwargs},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling_kwargs},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": list(features),
                "conv_op": conv,
                "kernel_sizes": [[3] * dim for _ in range(n_stages)],
                "strides": [[1] * dim] + [[2] * dim for _ in range(n_stages - 1)],
                "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": dim == 3,
    }


def _plans(
    dataset_name: str,
    configuration_name: str,
    configuration: dict,
    image_reader_writer: str,
    spacing,
    median_shape,
    n_channels: int,
) -> dict:
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": list(spacing),
        "original_median_shape_after_transp": list(median_shape),
        "image_reader_writer": image_reader_writer,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {configuration_name: configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(c): {
                "max": 1.0,
                "mean": 0.0,
                "median": 0.0,
                "min": -1.0,
                "percentile_00_5": -1.0,
                "percentile_99_5": 1.0,
                "std": 1.0,
            }
            for c in range(n_channels)
        },
    }


def _isic_like_2d():
    configuration = _configuration(
        2, (768, 1024), 2, (1.0, 1.0), (32, 64, 128, 256, 512, 512, 512, 512), 3, "nnUNetPlans_2d"
    )
    configuration["use_mask_for_norm"] = [False] * 3
    plans = _plans("Dataset000_ISICLike", "2d", configuration, "NaturalImage2DIO", (999.0, 1.0, 1.0), (1, 700, 1000), 3)
    dataset_json = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": 2594,
        "file_ending": ".png",
    }
    return plans, "2d", dataset_json, (700, 1000)


def _brats_like_3d():
    configuration = _configuration(
        3, (128, 128, 128), 2, (1.0, 1.0, 1.0), (32, 64, 128, 256, 320, 320), 4, "nnUNetPlans_3d_fullres"
    )
    plans = _plans(
        "Dataset000_BraTSLike", "3d_fullres", configuration, "SimpleITKIO", (1.0, 1.0, 1.0), (140, 170, 140), 4
    )
    from nnunetv2_hymunet.conversion.brats_labels import dataset_json_fields

    dataset_json = {**dataset_json_fields(), "numTraining": 1251, "file_ending": ".nii.gz"}
    return plans, "3d_fullres", dataset_json, (140, 170, 140)


# name -> factory returning (plans dict, configuration name, dataset.json dict, default sliding-window case shape)
PRESETS = {"isic-like-2d": _isic_like_2d, "brats-like-3d": _brats_like_3d}


class ProfilePlan:
    """Everything needed to build a trainer's network: plans, configuration name, dataset.json, and where they came
    from. `case_shape` is the image size used for the sliding-window timing (spatial axes of the plan's
    configuration)."""

    def __init__(self, plans: dict, configuration: str, dataset_json: dict, source: str, case_shape):
        if configuration not in plans.get("configurations", {}):
            known = ", ".join(sorted(plans.get("configurations", {})))
            raise HyMUNetError(f"{source} has no configuration {configuration!r} (it has: {known})")
        self.plans = plans
        self.configuration = configuration
        self.dataset_json = dataset_json
        self.source = source
        self.case_shape = tuple(int(s) for s in case_shape)

    def managers(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans_manager = PlansManager(self.plans)
        return plans_manager, plans_manager.get_configuration(self.configuration)

    @property
    def configuration_dict(self) -> dict:
        return self.plans["configurations"][self.configuration]

    def with_patch_size(self, patch_size) -> "ProfilePlan":
        """A copy whose configuration uses another patch size (it must divide by the plan's total stride)."""
        import numpy as np

        configuration = self.configuration_dict
        patch_size = [int(p) for p in patch_size]
        strides = configuration["architecture"]["arch_kwargs"]["strides"]
        if len(patch_size) != len(configuration["patch_size"]):
            raise HyMUNetError(
                f"--patch-size needs {len(configuration['patch_size'])} values for configuration "
                f"{self.configuration!r}, got {len(patch_size)}"
            )
        total_stride = np.prod(np.array(strides), axis=0)
        if any(p % s for p, s in zip(patch_size, total_stride)):
            raise HyMUNetError(
                f"--patch-size {patch_size} must be divisible by the network's total stride "
                f"{total_stride.tolist()} (the product of the plan's strides)"
            )
        if np.prod(np.array(patch_size) // total_stride) < 2:
            raise HyMUNetError(
                f"--patch-size {patch_size} leaves a single voxel at the bottleneck (total stride "
                f"{total_stride.tolist()}); instance normalisation needs more: use a larger patch"
            )
        plans = deepcopy(self.plans)
        plans["configurations"][self.configuration]["patch_size"] = patch_size
        return ProfilePlan(plans, self.configuration, self.dataset_json, self.source, self.case_shape)


def read_json_file(path: str, what: str) -> dict:
    """A JSON object from `path`; anything else (unreadable, not JSON, not an object) raises, naming the file."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HyMUNetError(
            f"{path}: cannot read {what}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from None
    if not isinstance(data, dict):
        raise HyMUNetError(f"{path}: {what} must be a JSON object, got {type(data).__name__}")
    return data


def read_plans(path: str) -> dict:
    """nnU-Net plans from `path`, checked for the part every command here reads (configurations)."""
    plans = read_json_file(path, "nnU-Net plans")
    if not isinstance(plans.get("configurations"), dict) or not all(
        isinstance(c, dict) for c in plans["configurations"].values()
    ):
        raise HyMUNetError(f"{path}: not nnU-Net plans (no 'configurations' object of configurations)")
    return plans


def preset_plan(name: str) -> ProfilePlan:
    if name not in PRESETS:
        raise HyMUNetError(f"--plan {name!r} is not a built-in plan; choose one of: {', '.join(PRESETS)}")
    plans, configuration, dataset_json, case_shape = PRESETS[name]()
    return ProfilePlan(plans, configuration, dataset_json, f"built-in plan {name}", case_shape)


def dataset_plan(dataset: str, configuration: str, plans_identifier: str = "nnUNetPlans") -> ProfilePlan:
    """The plans nnU-Net wrote for a dataset: $nnUNet_preprocessed/DatasetX/PLANS.json and its dataset.json."""
    from nnunetv2_hymunet.nnunet_tools import resolve_dataset

    preprocessed = os.environ.get("nnUNet_preprocessed")
    if not preprocessed:
        raise HyMUNetError(
            "nnUNet_preprocessed is not set: it must point at the folder nnUNetv2_plan_and_preprocess "
            "wrote, or use --plan for a built-in plan"
        )
    dataset_name = resolve_dataset(dataset)
    plans_file = join(preprocessed, dataset_name, plans_identifier + ".json")
    dataset_json_file = join(preprocessed, dataset_name, "dataset.json")
    for f in (plans_file, dataset_json_file):
        if not isfile(f):
            raise HyMUNetError(
                f"{f} does not exist: run nnUNetv2_plan_and_preprocess -d {dataset} first "
                f"(or check -p {plans_identifier})"
            )
    plans = read_plans(plans_file)
    configuration_dict = plans.get("configurations", {}).get(configuration, {})
    if "architecture" not in configuration_dict and "inherits_from" in configuration_dict:
        # cascade/lowres configurations inherit: let nnU-Net's ConfigurationManager resolve them once, store flat
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        plans["configurations"][configuration] = PlansManager(plans).get_configuration(configuration).configuration
        configuration_dict = plans["configurations"][configuration]
    if not configuration_dict:
        raise HyMUNetError(f"{plans_file} has no configuration {configuration!r}")
    arch = configuration_dict.get("architecture")
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("arch_kwargs"), dict)
        or not isinstance(configuration_dict.get("patch_size"), list)
    ):
        raise HyMUNetError(
            f"{plans_file}: configuration {configuration!r} lacks a patch_size list or an "
            "architecture with arch_kwargs (corrupt plans?)"
        )
    median = configuration_dict.get("median_image_size_in_voxels") or configuration_dict["patch_size"]
    return ProfilePlan(
        plans, configuration, read_json_file(dataset_json_file, "dataset.json"), plans_file, [round(m) for m in median]
    )
