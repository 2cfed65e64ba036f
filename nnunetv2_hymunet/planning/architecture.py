"""Translate the architecture an nnU-Net plans file describes into HyMUNet constructor arguments.

Used by the trainers (which build HyMUNet from whatever plans are in use) and by `hymunet plan` (which writes
HyMUNet into a plans file), so both routes build exactly the same network from the same plans.
"""

from copy import deepcopy

from nnunetv2_hymunet.errors import HyMUNetError

HYMUNET_CLASS_NAME = "nnunetv2_hymunet.network.HyMUNet"

# The hybrid knobs HyMUNet adds to the PlainConvUNet arguments; only these may be set by trainers and presets.
HYBRID_KNOBS = ("n_mamba_stages", "mamba_stages", "scan", "fusion", "d_state", "d_conv", "expand",
                "mamba_max_inner_channels", "n_mamba_layers_per_stage", "direction_merge", "dt_min", "dt_max",
                "gate_norm", "layer_scale")

# PlainConvUNet arguments HyMUNet shares one to one.
_SHARED_KEYS = (
    "n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage_decoder",
    "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op", "dropout_op_kwargs", "nonlin", "nonlin_kwargs",
)
_REQUIRED_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides")


def is_hymunet(network_class_name: str) -> bool:
    return network_class_name == HYMUNET_CLASS_NAME or network_class_name.rsplit(".", 1)[-1] == "HyMUNet"


def hymunet_arch_kwargs(network_class_name: str, arch_kwargs: dict, knob_overrides: dict = None) -> dict:
    """HyMUNet arch_kwargs (strings for the classes, as in plans files) from a plans architecture entry.

    Accepts PlainConvUNet-style (`n_conv_per_stage`) and ResidualEncoderUNet-style (`n_blocks_per_stage`; HyMUNet
    takes either) architectures, and HyMUNet itself, whose hybrid knobs are kept. Arguments HyMUNet has no use for
    (ResEnc's block type, stem and bottleneck channels, ...) are dropped. `knob_overrides` (a trainer variant's or a
    preset's knobs) win over the plans'.
    """
    missing = [k for k in _REQUIRED_KEYS if k not in arch_kwargs]
    if missing:
        raise HyMUNetError(
            f"the plans architecture {network_class_name} has no {', '.join(missing)} in arch_kwargs: HyMUNet is "
            "built from U-Net-style plans (PlainConvUNet, ResidualEncoderUNet or HyMUNet). Re-plan with "
            "nnUNetv2_plan_and_preprocess (default planner or a ResEnc planner)")
    out = {k: deepcopy(arch_kwargs[k]) for k in _SHARED_KEYS if k in arch_kwargs}
    if "n_conv_per_stage" in arch_kwargs:
        out["n_conv_per_stage"] = deepcopy(arch_kwargs["n_conv_per_stage"])
    elif "n_blocks_per_stage" in arch_kwargs:
        out["n_blocks_per_stage"] = deepcopy(arch_kwargs["n_blocks_per_stage"])
    else:
        raise HyMUNetError(f"the plans architecture {network_class_name} has neither n_conv_per_stage nor "
                           "n_blocks_per_stage in arch_kwargs")
    n_stages = out["n_stages"]
    if "n_conv_per_stage_decoder" not in out:
        out["n_conv_per_stage_decoder"] = [2] * (n_stages - 1)
    if is_hymunet(network_class_name):
        out.update({k: deepcopy(arch_kwargs[k]) for k in HYBRID_KNOBS if k in arch_kwargs})
    if knob_overrides:
        unknown = sorted(set(knob_overrides) - set(HYBRID_KNOBS))
        if unknown:
            raise HyMUNetError(f"unknown HyMUNet knob(s) {', '.join(unknown)}; known: {', '.join(HYBRID_KNOBS)}")
        out.update(deepcopy(knob_overrides))
    return out


def requires_import(arch_kwargs: dict) -> list:
    """The arch_kwargs entries that name classes (resolved with pydoc.locate by nnU-Net)."""
    return [k for k in ("conv_op", "norm_op", "dropout_op", "nonlin") if k in arch_kwargs]


def hymunet_architecture_entry(configuration: dict, knob_overrides: dict = None) -> dict:
    """A plans `architecture` entry naming HyMUNet, derived from a resolved plans configuration dict."""
    architecture = configuration["architecture"]
    arch_kwargs = hymunet_arch_kwargs(architecture["network_class_name"], architecture["arch_kwargs"],
                                      knob_overrides)
    return {"network_class_name": HYMUNET_CLASS_NAME, "arch_kwargs": arch_kwargs,
            "_kw_requires_import": requires_import(arch_kwargs)}


def build_hymunet(configuration_manager, num_input_channels: int, num_output_channels: int,
                  enable_deep_supervision: bool, knob_overrides: dict = None, allow_init: bool = True):
    """HyMUNet for a plans configuration (the trainers' build_network_architecture and the VRAM estimate)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch_kwargs = hymunet_arch_kwargs(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs, knob_overrides)
    return get_network_from_plans(HYMUNET_CLASS_NAME, arch_kwargs, requires_import(arch_kwargs),
                                  num_input_channels, num_output_channels, allow_init=allow_init,
                                  deep_supervision=enable_deep_supervision)
