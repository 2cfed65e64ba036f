"""Which network a model name stands for, built exactly as training would build it.

A model name is a trainer class name (`nnUNetTrainer`, `nnUNetTrainerHyMUNet`, `nnUNetTrainerHyMUNet_noMamba`, ...
or any trainer nnU-Net can find, `nnUNet_extTrainer` included) or `ResEncM`: nnU-Net's stock trainer on the
`nnUNetResEncUNetMPlans` network (ResidualEncoderUNet with (1, 3, 4, 6, 6, 6, ...) residual blocks per stage and one
conv per decoder stage), built on the same topology (stages, features, strides, patch) as the plan being profiled so
that the comparison is per patch. nnU-Net's ResEnc M planner may pick a different patch size for a real dataset; profile
its plans with `-p nnUNetResEncUNetMPlans` to see that one.
"""

from copy import deepcopy

from nnunetv2_hymunet.benchmark.presets import RESENC_M_BLOCKS, ProfilePlan
from nnunetv2_hymunet.errors import HyMUNetError

RESENC_M = "ResEncM"
DEFAULT_MODELS = (
    "nnUNetTrainer",
    RESENC_M,
    "nnUNetTrainerHyMUNet",
    "nnUNetTrainerHyMUNet_noMGF",
    "nnUNetTrainerHyMUNet_noMamba",
)


def find_trainer_class(name: str):
    """The trainer class called `name`: ours first (cheap), then nnU-Net's search (its package, nnUNet_extTrainer)."""
    import nnunetv2_hymunet.training as ours

    if name == "nnUNetTrainer":  # skip nnU-Net's search, which imports every trainer module it ships
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        return nnUNetTrainer
    if hasattr(ours, name):
        return getattr(ours, name)
    from nnunetv2_hymunet.benchmark.schedule import parse_bench_name

    if parse_bench_name(name):
        from nnunetv2_hymunet.benchmark.ext_trainers import benchmark_trainers

        if hasattr(benchmark_trainers, name):
            return getattr(benchmark_trainers, name)
    from nnunetv2_hymunet.training.discovery import find_trainer

    found = find_trainer(name)
    if found is None:
        raise HyMUNetError(
            f"model {name!r}: no nnU-Net trainer class of that name was found (searched "
            f"nnunetv2.training.nnUNetTrainer and the nnUNet_extTrainer folders). Use a trainer class "
            f"name or {RESENC_M}"
        )
    return found


def resenc_m_configuration(configuration: dict) -> dict:
    """The configuration with its network swapped for ResEnc M (same stages, features, kernels, strides)."""
    configuration = deepcopy(configuration)
    architecture = configuration["architecture"]
    kwargs = architecture["arch_kwargs"]
    n_stages = kwargs["n_stages"]
    if n_stages > len(RESENC_M_BLOCKS):
        raise HyMUNetError(f"ResEncM is defined for at most {len(RESENC_M_BLOCKS)} stages, the plan has {n_stages}")
    kwargs.pop("n_conv_per_stage", None)
    kwargs["n_blocks_per_stage"] = list(RESENC_M_BLOCKS[:n_stages])
    kwargs["n_conv_per_stage_decoder"] = [1] * (n_stages - 1)
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
    return configuration


def build_training_network(model: str, plan: ProfilePlan):
    """(network with deep supervision enabled, trainer class name) for one model on one plan."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    plans_manager, configuration_manager = plan.managers()
    if model == RESENC_M:
        trainer_class = find_trainer_class("nnUNetTrainer")
        configuration_manager = ConfigurationManager(resenc_m_configuration(plan.configuration_dict))
    else:
        trainer_class = find_trainer_class(model)
    num_input_channels = determine_num_input_channels(plans_manager, configuration_manager, plan.dataset_json)
    num_outputs = plans_manager.get_label_manager(plan.dataset_json).num_segmentation_heads
    network = trainer_class.build_network_architecture(
        plans_manager, configuration_manager, num_input_channels, num_outputs, True
    )
    return network, trainer_class.__name__, num_input_channels, num_outputs


def set_deep_supervision(network, enabled: bool) -> None:
    """What nnUNetTrainer.set_deep_supervision_enabled does (networks without a decoder flag are left alone)."""
    decoder = getattr(network, "decoder", None)
    if decoder is not None and hasattr(decoder, "deep_supervision"):
        decoder.deep_supervision = enabled
