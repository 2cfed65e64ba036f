"""The one translation from an nnU-Net plans architecture to HyMUNet's explicit arch_kwargs.

Used by the trainers (which build HyMUNet from whatever plans are in use), by nnUNetPlannerHyMUNet / `hymunet plan`
(which write HyMUNet into a plans file) and by the planner's memory estimate, so every route builds exactly the same
network from the same plans, and a HyMUNet plans file says everything about the network it builds.

The layout HyMUNet derives from a U-Net plan (PlainConvUNet or ResidualEncoderUNet):
  - blocks per encoder stage: the ResEnc plan's n_blocks_per_stage, or ceil(n_conv_per_stage / 2) for PlainConvUNet
    (a residual block holds two convs: the same number of 3x3 convs);
  - the hybrid stages, the deepest half (n_stages // 2, at least one), get a single (strided) residual block: the
    Mamba layers carry the rest of the stage;
  - the decoder levels fed by the hybrid stages' skips use one conv fewer than the plan (at least one). These lighter
    convs pay for the Mamba and MGF parameters;
  - the Mamba stages (by default the hybrid ones) and every other knob are written out (network/knobs.py).
A HyMUNet plan whose arch_kwargs hold n_blocks_per_stage is explicit already and is taken as it is (only the knob
overrides apply); one with n_conv_per_stage (written by hymunet 0.1.0) is read as the PlainConvUNet plan it came from.
"""

from copy import deepcopy

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.network.knobs import KNOB_NAMES, HybridKnobs, default_n_hybrid_stages, per_stage

HYMUNET_CLASS_NAME = "nnunetv2_hymunet.network.HyMUNet"

# kept for code that imported it: the knob names (network/knobs.py holds their defaults and checks)
HYBRID_KNOBS = KNOB_NAMES

# U-Net arguments HyMUNet shares one to one (per-stage lists are written out as lists).
_SHARED_KEYS = (
    "n_stages",
    "features_per_stage",
    "conv_op",
    "kernel_sizes",
    "strides",
    "conv_bias",
    "norm_op",
    "norm_op_kwargs",
    "dropout_op",
    "dropout_op_kwargs",
    "nonlin",
    "nonlin_kwargs",
)
_REQUIRED_KEYS = ("n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides")
_DEFAULTS = {
    "conv_bias": False,
    "norm_op": None,
    "norm_op_kwargs": None,
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": None,
    "nonlin_kwargs": None,
}


def is_hymunet(network_class_name: str) -> bool:
    return network_class_name == HYMUNET_CLASS_NAME or network_class_name.rsplit(".", 1)[-1] == "HyMUNet"


def _unet_layout(n_stages: int, arch_kwargs: dict, where: str) -> tuple:
    """(n_blocks_per_stage, n_conv_per_stage_decoder) of HyMUNet for a PlainConvUNet / ResEnc plan (module doc)."""
    if "n_blocks_per_stage" in arch_kwargs:
        blocks = [int(b) for b in per_stage(f"{where} n_blocks_per_stage", arch_kwargs["n_blocks_per_stage"], n_stages)]
    else:
        convs = per_stage(f"{where} n_conv_per_stage", arch_kwargs["n_conv_per_stage"], n_stages)
        blocks = [max(1, -(-int(c) // 2)) for c in convs]
    decoder = [
        int(c)
        for c in per_stage(
            f"{where} n_conv_per_stage_decoder", arch_kwargs.get("n_conv_per_stage_decoder", 2), n_stages - 1
        )
    ]
    hybrid = [s >= n_stages - default_n_hybrid_stages(n_stages) for s in range(n_stages)]
    blocks = [1 if hybrid[s] else blocks[s] for s in range(n_stages)]
    # decoder level s (deepest first) is fed by the skip of encoder stage n_stages - 2 - s
    decoder = [max(1, decoder[s] - 1) if hybrid[n_stages - 2 - s] else decoder[s] for s in range(n_stages - 1)]
    return blocks, decoder


def hymunet_arch_kwargs(network_class_name: str, arch_kwargs: dict, knob_overrides: dict = None) -> dict:
    """HyMUNet's explicit arch_kwargs (class entries as given: strings in plans files) from a plans architecture.

    Accepts PlainConvUNet (`n_conv_per_stage`), ResidualEncoderUNet (`n_blocks_per_stage`) and HyMUNet architectures.
    The result lists n_blocks_per_stage and n_conv_per_stage_decoder per stage, mamba_stages as indices and every
    knob; HyMUNet builds exactly that. Arguments HyMUNet has no use for (ResEnc's block type, stem, ...) are dropped.
    `knob_overrides` (a trainer variant's or a preset's knobs) win over the plans'.
    """
    where = network_class_name.rsplit(".", 1)[-1]
    missing = [k for k in _REQUIRED_KEYS if k not in arch_kwargs]
    if missing:
        raise HyMUNetError(
            f"the plans architecture {network_class_name} has no {', '.join(missing)} in arch_kwargs: HyMUNet is "
            "built from U-Net-style plans (PlainConvUNet, ResidualEncoderUNet or HyMUNet). Re-plan with "
            "nnUNetv2_plan_and_preprocess (default planner or a ResEnc planner)"
        )
    if "n_conv_per_stage" not in arch_kwargs and "n_blocks_per_stage" not in arch_kwargs:
        raise HyMUNetError(
            f"the plans architecture {network_class_name} has neither n_conv_per_stage nor "
            "n_blocks_per_stage in arch_kwargs"
        )
    if "n_conv_per_stage" in arch_kwargs and "n_blocks_per_stage" in arch_kwargs:
        raise HyMUNetError(
            f"the plans architecture {network_class_name} gives both n_conv_per_stage and "
            "n_blocks_per_stage in arch_kwargs: give one of them"
        )
    n_stages = arch_kwargs["n_stages"]
    if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 2:
        raise HyMUNetError(f"{where} arch_kwargs: n_stages must be an integer >= 2, got {n_stages!r}")
    out = {k: deepcopy(arch_kwargs.get(k, _DEFAULTS.get(k))) for k in _SHARED_KEYS}
    for key in ("features_per_stage", "kernel_sizes", "strides"):
        out[key] = per_stage(f"{where} {key}", out[key], n_stages)
    explicit = is_hymunet(network_class_name) and "n_blocks_per_stage" in arch_kwargs
    if explicit:
        out["n_blocks_per_stage"] = [
            int(b) for b in per_stage("HyMUNet n_blocks_per_stage", arch_kwargs["n_blocks_per_stage"], n_stages)
        ]
        out["n_conv_per_stage_decoder"] = [
            int(c)
            for c in per_stage(
                "HyMUNet n_conv_per_stage_decoder", arch_kwargs.get("n_conv_per_stage_decoder", 2), n_stages - 1
            )
        ]
    else:
        out["n_blocks_per_stage"], out["n_conv_per_stage_decoder"] = _unet_layout(n_stages, arch_kwargs, where)
    plans_knobs = {k: arch_kwargs[k] for k in KNOB_NAMES if k in arch_kwargs} if is_hymunet(network_class_name) else {}
    knobs = HybridKnobs.from_dict(plans_knobs, f"{where} arch_kwargs").with_overrides(knob_overrides)
    out.update(knobs.explicit(n_stages))
    return out


def requires_import(arch_kwargs: dict) -> list:
    """The arch_kwargs entries that name classes (resolved with pydoc.locate by nnU-Net)."""
    return [k for k in ("conv_op", "norm_op", "dropout_op", "nonlin") if k in arch_kwargs]


def hymunet_architecture(network_class_name: str, arch_kwargs: dict, knob_overrides: dict = None) -> dict:
    """A plans `architecture` entry naming HyMUNet with its explicit arch_kwargs."""
    kwargs = hymunet_arch_kwargs(network_class_name, arch_kwargs, knob_overrides)
    return {
        "network_class_name": HYMUNET_CLASS_NAME,
        "arch_kwargs": kwargs,
        "_kw_requires_import": requires_import(kwargs),
    }


def hymunet_architecture_entry(configuration: dict, knob_overrides: dict = None) -> dict:
    """hymunet_architecture for a resolved plans configuration dict."""
    architecture = configuration["architecture"]
    return hymunet_architecture(architecture["network_class_name"], architecture["arch_kwargs"], knob_overrides)


def build_hymunet(
    configuration_manager,
    num_input_channels: int,
    num_output_channels: int,
    enable_deep_supervision: bool,
    knob_overrides: dict = None,
    allow_init: bool = True,
):
    """HyMUNet for a plans configuration (the trainers' build_network_architecture)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    architecture = hymunet_architecture(
        configuration_manager.network_arch_class_name, configuration_manager.network_arch_init_kwargs, knob_overrides
    )
    return get_network_from_plans(
        architecture["network_class_name"],
        architecture["arch_kwargs"],
        architecture["_kw_requires_import"],
        num_input_channels,
        num_output_channels,
        allow_init=allow_init,
        deep_supervision=enable_deep_supervision,
    )


def upgrade_plans(plans: dict) -> list:
    """Rewrite in place each HyMUNet configuration whose arch_kwargs leave the layout to the network (n_conv_per_stage:
    plans written by hymunet 0.1.0) with the explicit arch_kwargs of the same network; the names rewritten.

    For the plans.json of a 0.1.0 model trained with the stock trainer on nnUNetHyMUNetPlans: its weights load into
    the network the rewritten plans describe (the same state_dict keys and shapes)."""
    upgraded = []
    for name, configuration in plans.get("configurations", {}).items():
        architecture = configuration.get("architecture")
        if (
            architecture
            and is_hymunet(architecture["network_class_name"])
            and "n_conv_per_stage" in architecture["arch_kwargs"]
        ):
            configuration["architecture"] = hymunet_architecture(
                architecture["network_class_name"], architecture["arch_kwargs"]
            )
            upgraded.append(name)
    return upgraded


def hymunet_from_unet_kwargs(
    input_channels: int,
    num_classes: int,
    deep_supervision: bool = False,
    network_class_name: str = "PlainConvUNet",
    **kwargs,
):
    """HyMUNet from U-Net arch_kwargs (classes, not their names) with knobs among them, through hymunet_arch_kwargs:
    how scripts and tests build the HyMUNet of a U-Net plan. No initialisation (as the class itself)."""
    from nnunetv2_hymunet.network import HyMUNet

    knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOB_NAMES}
    return HyMUNet(
        input_channels=input_channels,
        num_classes=num_classes,
        deep_supervision=deep_supervision,
        **hymunet_arch_kwargs(network_class_name, kwargs, knobs),
    )
