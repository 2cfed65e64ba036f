"""nnUNetTrainerHyMUNet: nnU-Net's default trainer with HyM-UNet as the network.

Everything except the network is nnU-Net's: data loading, augmentation, loss, optimiser, schedule, deep supervision,
validation, checkpoints. Variants are tiny subclasses that set two class attributes:

- `hybrid_knobs`: HyMUNet knobs this trainer forces (ablations). Knobs not named here come from the plans when the
  plans already describe HyMUNet (`hymunet plan`), otherwise from HyMUNet's defaults.
- `schedule`: trainer attributes set after nnU-Net's defaults (num_epochs, num_iterations_per_epoch, ...).

The optimiser is part of the model: `configure_optimizers` keeps nnU-Net's SGD recipe for the CNN and gives the Mamba
layers AdamW with a warm-up and no weight decay on A_log, D, dt_proj's bias, norms and biases (training/optimization.py
says why). `nnUNetTrainerHyMUNet_nnUNetSGD` keeps nnU-Net's single SGD for comparison. Every trainer logs, per epoch
and parameter group, the gradient norm and the update ratio ||w_end - w_start|| / ||w_start|| (training log and
progress_param_groups.png next to progress.png).

`build_network_architecture` is a classmethod so that a variant's knobs reach it both when the trainer builds its
network and when nnU-Net's predictor calls it on the class (its signature, seen from the class, still starts with
`plans_manager`, which is how nnU-Net 2.7+ recognises the new calling convention).
"""

import math
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_hymunet.planning.architecture import build_hymunet
from nnunetv2_hymunet.training import diagnostics
from nnunetv2_hymunet.training.optimization import GroupPolyLRScheduler, HybridOptimizer, split_parameters


class nnUNetTrainerHyMUNet(nnUNetTrainer):
    hybrid_knobs: dict = {}
    schedule: dict = {}
    # The Mamba layers' recipe (the CNN keeps nnU-Net's initial_lr / weight_decay / SGD with Nesterov momentum 0.99).
    mamba_optimizer: str = "adamw"  # "adamw", or "sgd" for nnU-Net's single SGD recipe over every parameter
    mamba_lr: float = 1e-3
    mamba_weight_decay: float = 1e-2
    mamba_betas: tuple = (0.9, 0.999)
    mamba_warmup_fraction: float = 0.02  # linear warm-up over this fraction of the epochs (at least one epoch)

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for name, value in self.training_schedule().items():
            if not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__}.schedule sets {name!r}, which nnUNetTrainer does not have")
            setattr(self, name, value)

    def training_schedule(self) -> dict:
        """Trainer attributes to override (a method so that a variant can compute them, e.g. from the environment)."""
        return dict(self.schedule)

    @classmethod
    def build_network_architecture(
        cls,
        plans_manager,
        configuration_manager,
        num_input_channels: int,
        num_output_channels: int,
        enable_deep_supervision: bool = True,
    ):
        return build_hymunet(
            configuration_manager,
            num_input_channels,
            num_output_channels,
            enable_deep_supervision,
            knob_overrides=cls.hybrid_knobs,
        )

    def mamba_warmup_epochs(self) -> int:
        return max(1, math.ceil(self.mamba_warmup_fraction * self.num_epochs)) if self.mamba_warmup_fraction else 0

    def optimizer_param_groups(self) -> list:
        """The HybridOptimizer groups: the CNN with nnU-Net's SGD, the Mamba layers with AdamW (decay / no decay)."""
        split = split_parameters(self.network)
        groups = [
            {
                "name": "cnn",
                "params": [p for _, p in split["cnn"]],
                "algorithm": "sgd",
                "lr": self.initial_lr,
                "momentum": 0.99,
                "nesterov": True,
                "weight_decay": self.weight_decay,
            }
        ]
        for name, weight_decay in (("mamba", self.mamba_weight_decay), ("mamba_no_decay", 0.0)):
            if split[name]:
                groups.append(
                    {
                        "name": name,
                        "params": [p for _, p in split[name]],
                        "algorithm": "adamw",
                        "lr": self.mamba_lr,
                        "betas": tuple(self.mamba_betas),
                        "eps": 1e-8,
                        "weight_decay": weight_decay,
                        "warmup_epochs": self.mamba_warmup_epochs(),
                    }
                )
        return groups

    def configure_optimizers(self):
        if self.mamba_optimizer == "sgd":
            optimizer, lr_scheduler = super().configure_optimizers()
        elif self.mamba_optimizer == "adamw":
            optimizer = HybridOptimizer(self.optimizer_param_groups())
            lr_scheduler = GroupPolyLRScheduler(optimizer, self.num_epochs)
        else:
            raise ValueError(f"{type(self).__name__}.mamba_optimizer={self.mamba_optimizer!r}: expected adamw or sgd")
        self.param_group_diagnostics = diagnostics.GroupDiagnostics(self.network)
        self.param_group_diagnostics.attach(optimizer)
        return optimizer, lr_scheduler

    # nnU-Net's planner fills the GPU up to its budget, so little headroom is left on plans sized for its own network
    memory_headroom = 1.05

    def activation_memory_ratio(self) -> float:
        """HyMUNet's activation-memory estimate over that of the network the plans describe (same patch and batch).

        1.0 for plans that already describe HyMUNet (`hymunet plan` sized them for it)."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        from nnunetv2_hymunet.planning.architecture import is_hymunet

        cm = self.configuration_manager
        if is_hymunet(cm.network_arch_class_name):
            return 1.0
        planned = get_network_from_plans(
            cm.network_arch_class_name,
            cm.network_arch_init_kwargs,
            cm.network_arch_init_kwargs_req_import,
            self.num_input_channels,
            self.label_manager.num_segmentation_heads,
            allow_init=False,
            deep_supervision=True,
        )
        network = self.network.module if self.is_ddp else self.network
        network = getattr(network, "_orig_mod", network)
        patch = cm.patch_size
        return float(network.compute_conv_feature_map_size(patch)) / float(planned.compute_conv_feature_map_size(patch))

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self.check_activation_memory()
        super().on_train_start()

    def check_activation_memory(self) -> float:
        """Warn at start-up when HyMUNet will not fit where nnU-Net planned its own network; returns the ratio."""
        ratio = self.activation_memory_ratio()
        planned_network = self.configuration_manager.network_arch_class_name.rsplit(".", 1)[-1]
        if ratio > self.memory_headroom:
            self.print_to_log_file(
                f"WARNING: HyMUNet keeps {ratio:.2f}x the activations of the {planned_network} these plans were "
                f"sized for (patch {self.configuration_manager.patch_size}, batch {self.batch_size}); it may not fit "
                "in the GPU memory nnU-Net planned for. Fix: `hymunet plan -d "
                f"{self.plans_manager.dataset_name} -c {self.configuration_name}` sizes patch and batch for HyMUNet; "
                "then train with `-p nnUNetHyMUNetPlans`.",
                also_print_to_console=True,
            )
        else:
            self.print_to_log_file(
                f"HyMUNet activation memory: {ratio:.2f}x the estimate of the network these plans were sized for"
            )
        return ratio

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if len(self.optimizer.param_groups) > 1:
            self.print_to_log_file(
                "Learning rate per parameter group: "
                + ", ".join(f"{g.get('name', i)} {g['lr']:.3g}" for i, g in enumerate(self.optimizer.param_groups))
            )
        self.param_group_diagnostics.start_epoch()

    def on_train_epoch_end(self, train_outputs):
        super().on_train_epoch_end(train_outputs)
        entry = self.param_group_diagnostics.end_epoch()
        history = self.logger.local_logger.my_fantastic_logging.setdefault(diagnostics.LOGGER_KEY, [])
        while len(history) < self.current_epoch:  # resumed from a checkpoint written without these diagnostics
            history.append(None)
        self.logger.log(diagnostics.LOGGER_KEY, entry, self.current_epoch)
        self.print_to_log_file(diagnostics.format_log_line(entry))
        if self.local_rank == 0:
            diagnostics.plot_history(history, self.output_folder)

    def _do_i_compile(self) -> bool:
        # torch.compile through the Mamba scan is unproven (data-dependent loops, optional CUDA extension), so it
        # is opt-in: only an explicit nnUNet_compile=true enables it, and then nnU-Net's own device rules apply.
        if os.environ.get("nnUNet_compile", "").lower() in ("true", "1", "t"):
            return super()._do_i_compile()
        return False
