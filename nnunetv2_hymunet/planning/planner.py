"""nnUNetPlannerHyMUNet: nnU-Net's ExperimentPlanner for HyMUNet, the way nnUNetPlannerResEncM is for ResEnc.

nnU-Net's own planning loop runs unchanged: it picks a U-Net topology for the spacing, shrinks the patch until batch
size 2 fits the GPU memory target, then derives the batch size. Two hooks make it plan HyMUNet:

- the memory estimate is HyMUNet's own `compute_conv_feature_map_size`, for the HyMUNet the loop's U-Net becomes
  (`static_estimate_VRAM_usage`), measured against nnU-Net's reference values for PlainConvUNet (HyMUNet counts the
  activations it keeps in the same unit);
- the plan's architecture is HyMUNet's explicit arch_kwargs (planning/architecture.py: blocks per stage, decoder convs
  per level, the Mamba stages and every knob), so the plans file says what gets built.

2d and 3d_fullres keep nnUNetPlans' data identifiers, so the preprocessed data is reused as it is.

Two routes:
- `plan_experiment()` (inherited): nnU-Net's full planning from the dataset fingerprint, e.g.
  `plan_experiment_dataset(ID, experiment_planner_class=nnUNetPlannerHyMUNet)`. nnU-Net's `-pl NAME` only searches
  nnunetv2's own package, so it does not find this class; `hymunet plan` is the command line route.
- `plan_from_source(...)` (what `hymunet plan` runs): the configurations of existing nnU-Net plans (nnUNetPlans or a
  ResEnc plans file) re-planned for HyMUNet at their spacing and median shape, with that plan's layout (PlainConvUNet
  or ResEnc blocks), data identifiers and preprocessing entries, and preset overrides.
"""

from copy import deepcopy
from typing import List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.planning.architecture import hymunet_architecture

PLAIN_CONV_UNET = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESENC_UNET = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
DEFAULT_PLANS_NAME = "nnUNetHyMUNetPlans"


def memory_estimate(architecture: dict, patch_size, input_channels: int, output_channels: int) -> int:
    """The network's compute_conv_feature_map_size for one sample at patch_size, built as nnU-Net's
    static_estimate_VRAM_usage builds it (no initialisation, no deep supervision argument), without its per-call
    hostname lookup (a subprocess) and thread-count change."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        input_channels,
        output_channels,
        allow_init=False,
    )
    return int(net.compute_conv_feature_map_size(tuple(int(p) for p in patch_size)))


class nnUNetPlannerHyMUNet(ExperimentPlanner):
    hybrid_knobs: dict = {}  # a subclass plans another design, nnU-Net style (presets give them per configuration)

    def __init__(
        self,
        dataset_name_or_id: Union[str, int],
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = DEFAULT_PLANS_NAME,
        overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
        suppress_transpose: bool = False,
    ):
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        self.knob_overrides = dict(self.hybrid_knobs)
        # the U-Net layout nnU-Net's loop plans (UNet_class stays PlainConvUNet); HyMUNet is derived from it
        self.unet_layout = PLAIN_CONV_UNET

    def generate_data_identifier(self, configuration_name: str) -> str:
        # as the ResEnc planners: the same spacing and preprocessing as nnUNetPlans, so its data is reused
        if configuration_name in ("2d", "3d_fullres"):
            return "nnUNetPlans_" + configuration_name
        return self.plans_identifier + "_" + configuration_name

    def hymunet_architecture(self, unet_arch_kwargs: dict) -> dict:
        """HyMUNet's plans architecture entry for the U-Net arch_kwargs nnU-Net's loop writes."""
        arch_kwargs = dict(unet_arch_kwargs)
        if self.unet_layout == RESENC_UNET:  # the loop names the per-stage counts n_conv_per_stage
            arch_kwargs["n_blocks_per_stage"] = arch_kwargs.pop("n_conv_per_stage")
        return hymunet_architecture(self.unet_layout, arch_kwargs, self.knob_overrides)

    def static_estimate_VRAM_usage(
        self,
        patch_size,
        input_channels: int,
        output_channels: int,
        arch_class_name: str,
        arch_kwargs: dict,
        arch_kwargs_req_import,
    ) -> int:
        """HyMUNet's memory estimate for the U-Net nnU-Net's loop is sizing (an instance method here: the knobs
        belong to the planner)."""
        return memory_estimate(self.hymunet_architecture(arch_kwargs), patch_size, input_channels, output_channels)

    def get_plans_for_configuration(
        self, spacing, median_shape, data_identifier: str, approximate_n_voxels_dataset: float, _cache: dict
    ) -> dict:
        plan = super().get_plans_for_configuration(
            spacing, median_shape, data_identifier, approximate_n_voxels_dataset, _cache
        )
        plan["architecture"] = self.hymunet_architecture(plan["architecture"]["arch_kwargs"])
        return plan

    # ------------------------------------------------------------------ hymunet plan's route

    def memory_reference(self, dim: int) -> Tuple[float, int]:
        """(feature-map elements that fit the GPU memory target, the batch size they correspond to), as nnU-Net's
        loop computes them."""
        reference = (self.UNet_reference_val_2d if dim == 2 else self.UNet_reference_val_3d) * (
            self.UNet_vram_target_GB / self.UNet_reference_val_corresp_GB
        )
        return reference, self.UNet_reference_val_corresp_bs_2d if dim == 2 else self.UNet_reference_val_corresp_bs_3d

    def batch_size_for(self, estimate: float, patch_size, approximate_n_voxels_dataset: float) -> int:
        """nnU-Net's batch size for a fixed patch (the last lines of get_plans_for_configuration, which has no
        separate function for them): memory-bound, at most 5% of the dataset, at least 2."""
        reference, ref_bs = self.memory_reference(len(patch_size))
        batch_size = round(reference / estimate * ref_bs)
        five_percent = round(
            approximate_n_voxels_dataset * self.max_dataset_covered / np.prod(patch_size, dtype=np.float64)
        )
        return int(max(min(batch_size, five_percent), self.UNet_min_batch_size))

    def use_layout_of(self, architecture: dict) -> None:
        """Plan the U-Net layout of a source plans architecture (PlainConvUNet convs or ResEnc blocks per stage)."""
        name, kwargs = architecture["network_class_name"], architecture["arch_kwargs"]
        short = name.rsplit(".", 1)[-1]
        if short not in ("PlainConvUNet", "ResidualEncoderUNet"):
            raise HyMUNetError(
                f"the source plans' network is {name}: hymunet plan derives HyMUNet from nnU-Net's "
                "U-Net plans (nnUNetPlans, or a ResEnc planner's plans)"
            )
        encoder = list(kwargs["n_blocks_per_stage" if short == "ResidualEncoderUNet" else "n_conv_per_stage"])
        decoder = list(kwargs.get("n_conv_per_stage_decoder", [2] * (len(encoder) - 1)))
        # the loop may pick more stages than the source had: continue with the deepest entry, as nnU-Net's tuples do
        self.UNet_blocks_per_stage_encoder = tuple(encoder + encoder[-1:] * 16)
        self.UNet_blocks_per_stage_decoder = tuple(decoder + (decoder[-1:] or [2]) * 16)
        self.unet_layout = RESENC_UNET if short == "ResidualEncoderUNet" else PLAIN_CONV_UNET

    def plan_from_source(
        self,
        configuration: dict,
        approximate_n_voxels_dataset: float,
        knobs: dict = None,
        patch_size=None,
        batch_size: int = None,
        where: str = "plan",
    ) -> dict:
        """A HyMUNet configuration from a resolved source configuration (nnU-Net plans), at its spacing and median
        shape. patch_size / batch_size (a preset's) replace the planned ones: the topology is nnU-Net's for that patch,
        which must come out unchanged (divisible by the total stride, deepest feature map at least 4 wide)."""
        self.knob_overrides = {**self.hybrid_knobs, **(knobs or {})}
        self.use_layout_of(configuration["architecture"])
        spacing = [float(s) for s in configuration["spacing"]]
        median_shape = [float(s) for s in configuration["median_image_size_in_voxels"]]
        if patch_size is None:
            planned = self.get_plans_for_configuration(
                spacing, median_shape, configuration["data_identifier"], approximate_n_voxels_dataset, {}
            )
            patch, architecture = [int(p) for p in planned["patch_size"]], planned["architecture"]
            batch = planned["batch_size"] if batch_size is None else batch_size
        else:
            patch = [int(p) for p in patch_size]
            if len(patch) != len(spacing):
                raise HyMUNetError(f"{where}.patch_size {patch} must have {len(spacing)} axes")
            # nnU-Net's topology for exactly this patch: the loop starts from it (the median shape clips the initial
            # patch) and, with no memory limit, has nothing to shrink; its batch size is not used
            memory_target = self.UNet_vram_target_GB
            self.UNet_vram_target_GB = 1e12
            try:
                planned = self.get_plans_for_configuration(
                    spacing, patch, configuration["data_identifier"], approximate_n_voxels_dataset, {}
                )
            finally:
                self.UNet_vram_target_GB = memory_target
            topology_patch = [int(p) for p in planned["patch_size"]]
            if topology_patch != patch:
                strides = planned["architecture"]["arch_kwargs"]["strides"]
                raise HyMUNetError(
                    f"{where}.patch_size {patch} does not fit nnU-Net's topology at this spacing: it "
                    f"must be divisible by the total stride {np.prod(strides, axis=0).tolist()} "
                    f"(nnU-Net's patch for it: {topology_patch})"
                )
            architecture, batch = planned["architecture"], batch_size
        if batch is None:
            batch = self.batch_size_for(self.estimate(architecture, patch), patch, approximate_n_voxels_dataset)
        out = deepcopy(configuration)
        out.pop("inherits_from", None)
        out.update({"architecture": architecture, "patch_size": patch, "batch_size": int(batch)})
        return out

    def estimate(self, architecture: dict, patch_size) -> int:
        """The memory estimate of any plans architecture (HyMUNet's, the source's) for one sample at patch_size."""
        return memory_estimate(architecture, patch_size, self.num_input_channels, self.num_output_channels)

    @property
    def num_input_channels(self) -> int:
        return len(self.dataset_json.get("channel_names", self.dataset_json.get("modality", {})))

    @property
    def num_output_channels(self) -> int:
        return len(self.dataset_json["labels"])
