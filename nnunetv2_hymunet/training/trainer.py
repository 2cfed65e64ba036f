"""nnUNetTrainerHyMUNet: nnU-Net's default trainer with HyM-UNet as the network.

Everything except the network is nnU-Net's: data loading, augmentation, loss, optimiser, schedule, deep supervision,
validation, checkpoints. Variants are tiny subclasses that set two class attributes:

- `hybrid_knobs`: HyMUNet knobs this trainer forces (ablations). Knobs not named here come from the plans when the
  plans already describe HyMUNet (`hymunet plan`), otherwise from HyMUNet's defaults.
- `schedule`: trainer attributes set after nnU-Net's defaults (num_epochs, num_iterations_per_epoch, ...).

`build_network_architecture` is a classmethod so that a variant's knobs reach it both when the trainer builds its
network and when nnU-Net's predictor calls it on the class (its signature, seen from the class, still starts with
`plans_manager`, which is how nnU-Net 2.7+ recognises the new calling convention).
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_hymunet.planning.architecture import build_hymunet


class nnUNetTrainerHyMUNet(nnUNetTrainer):
    hybrid_knobs: dict = {}
    schedule: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.training_schedule().items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__}.schedule sets {name!r}, which nnUNetTrainer does not have")
            setattr(self, name, value)

    def training_schedule(self) -> dict:
        """Trainer attributes to override (a method so that a variant can compute them, e.g. from the environment)."""
        return dict(self.schedule)

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        return build_hymunet(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision,
                             knob_overrides=cls.hybrid_knobs)

    def _do_i_compile(self) -> bool:
        # torch.compile through the Mamba scan is unproven (data-dependent loops, optional CUDA extension), so it
        # is opt-in: only an explicit nnUNet_compile=true enables it, and then nnU-Net's own device rules apply.
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            return super()._do_i_compile()
        return False
