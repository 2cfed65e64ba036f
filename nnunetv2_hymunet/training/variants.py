"""nnUNetTrainerHyMUNet variants, nnU-Net style: each one changes a knob, the schedule or the loss."""

import numpy as np
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from nnunetv2_hymunet.nnunet_tools import read_schedule
from nnunetv2_hymunet.training.boundary_loss import BoundaryLoss, WithBoundaryTerm
from nnunetv2_hymunet.training.trainer import nnUNetTrainerHyMUNet

# --- ablations (same schedule as nnUNetTrainerHyMUNet) ---


class nnUNetTrainerHyMUNet_noMGF(nnUNetTrainerHyMUNet):
    """Plain U-Net skips (concatenation) instead of Mamba-Guided Fusion."""

    hybrid_knobs = {"fusion": "concat"}


class nnUNetTrainerHyMUNet_noMamba(nnUNetTrainerHyMUNet):
    """Same topology with the Mamba layers removed: a purely convolutional control."""

    hybrid_knobs = {"n_mamba_stages": 0}


class nnUNetTrainerHyMUNet_flat(nnUNetTrainerHyMUNet):
    """Raster scan order only."""

    hybrid_knobs = {"scan": "flat"}


class nnUNetTrainerHyMUNet_bidir(nnUNetTrainerHyMUNet):
    """Raster scan and its reverse."""

    hybrid_knobs = {"scan": "bidir"}


class nnUNetTrainerHyMUNet_cross(nnUNetTrainerHyMUNet):
    """All axis orders and their reverses (HyMUNet's default, named explicitly for ablation tables)."""

    hybrid_knobs = {"scan": "cross"}


class nnUNetTrainerHyMUNet_nnUNetSGD(nnUNetTrainerHyMUNet):
    """nnU-Net's single SGD over every parameter, Mamba layers included (the recipe before the Mamba group)."""

    mamba_optimizer = "sgd"


# --- training length, as nnU-Net's nnUNetTrainer_Xepochs ---


class nnUNetTrainerHyMUNet_1epoch(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 1}


class nnUNetTrainerHyMUNet_5epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 5}


class nnUNetTrainerHyMUNet_10epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 10}


class nnUNetTrainerHyMUNet_20epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 20}


class nnUNetTrainerHyMUNet_50epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 50}


class nnUNetTrainerHyMUNet_100epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 100}


class nnUNetTrainerHyMUNet_250epochs(nnUNetTrainerHyMUNet):
    schedule = {"num_epochs": 250}


# --- short, environment-configurable schedule for `hymunet demo`, smoke tests and CPU trials ---

DEMO_SCHEDULE_ENV = {
    "HYMUNET_EPOCHS": "num_epochs",
    "HYMUNET_ITERATIONS": "num_iterations_per_epoch",
    "HYMUNET_VAL_ITERATIONS": "num_val_iterations_per_epoch",
    "HYMUNET_SAVE_EVERY": "save_every",
}


class nnUNetTrainerHyMUNet_demo(nnUNetTrainerHyMUNet):
    """A minutes-long schedule (default 10 epochs x 25 iterations, 5 validation iterations): not for real training.

    Each value can be overridden with the environment variable of the same meaning (HYMUNET_EPOCHS,
    HYMUNET_ITERATIONS, HYMUNET_VAL_ITERATIONS, HYMUNET_SAVE_EVERY), read when the trainer starts. Prediction does
    not depend on them.
    """

    schedule = {"num_epochs": 10, "num_iterations_per_epoch": 25, "num_val_iterations_per_epoch": 5, "save_every": 5}

    def training_schedule(self) -> dict:
        values = {**self.schedule, **read_schedule(DEMO_SCHEDULE_ENV)}
        self.print_to_log_file(f"{type(self).__name__} schedule: " + ", ".join(f"{k}={v}" for k, v in values.items()))
        return values


# --- boundary-aware hybrid loss ---


class nnUNetTrainerHyMUNet_BoundaryLoss(nnUNetTrainerHyMUNet):
    """nnU-Net's Dice + CE (or Dice + BCE for regions) plus a ramped boundary term (Kervadec's boundary loss).

    The boundary weight grows linearly from 0 at the first epoch to `boundary_weight_max` at
    `boundary_ramp_fraction` of the training, then stays there: early on, the overlap terms find the structure, later
    the boundary term refines its contour. The term is applied at every deep-supervision scale (with the same
    distance cap in voxels of that scale), honours regions and the ignore label.
    """

    boundary_weight_max = 0.5
    boundary_ramp_fraction = 0.5
    boundary_distance_cap = 8

    def _build_loss(self):
        loss = super()._build_loss()
        boundary = BoundaryLoss(
            regions=self.label_manager.has_regions,
            ignore_label=self.label_manager.ignore_label,
            distance_cap=self.boundary_distance_cap,
        )
        if isinstance(loss, DeepSupervisionWrapper):
            loss.loss = WithBoundaryTerm(loss.loss, boundary)
            self._boundary_term = loss.loss
        else:
            loss = WithBoundaryTerm(loss, boundary)
            self._boundary_term = loss
        return loss

    def boundary_weight(self, epoch: int) -> float:
        ramp_epochs = max(1.0, self.boundary_ramp_fraction * self.num_epochs)
        return float(self.boundary_weight_max * np.clip(epoch / ramp_epochs, 0.0, 1.0))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self._boundary_term.boundary_weight = self.boundary_weight(self.current_epoch)
        self.print_to_log_file(f"Boundary loss weight: {self._boundary_term.boundary_weight:.4f}")
