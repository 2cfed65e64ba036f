"""HyM-UNet trainers for nnU-Net v2 (`nnUNetv2_train ... -tr nnUNetTrainerHyMUNet`).

Every trainer class is exported here: nnU-Net finds external trainers by importing a module that re-exports this
package (see nnunetv2_hymunet/nnunet_ext/), so keep this import light (no optional dependencies such as mamba_ssm).
"""

from nnunetv2_hymunet.training.trainer import nnUNetTrainerHyMUNet
from nnunetv2_hymunet.training.variants import (
    nnUNetTrainerHyMUNet_1epoch,
    nnUNetTrainerHyMUNet_5epochs,
    nnUNetTrainerHyMUNet_10epochs,
    nnUNetTrainerHyMUNet_20epochs,
    nnUNetTrainerHyMUNet_50epochs,
    nnUNetTrainerHyMUNet_100epochs,
    nnUNetTrainerHyMUNet_250epochs,
    nnUNetTrainerHyMUNet_bidir,
    nnUNetTrainerHyMUNet_BoundaryLoss,
    nnUNetTrainerHyMUNet_cross,
    nnUNetTrainerHyMUNet_demo,
    nnUNetTrainerHyMUNet_flat,
    nnUNetTrainerHyMUNet_nnUNetSGD,
    nnUNetTrainerHyMUNet_noMamba,
    nnUNetTrainerHyMUNet_noMGF,
)

__all__ = [
    "nnUNetTrainerHyMUNet",
    "nnUNetTrainerHyMUNet_noMGF",
    "nnUNetTrainerHyMUNet_noMamba",
    "nnUNetTrainerHyMUNet_nnUNetSGD",
    "nnUNetTrainerHyMUNet_flat",
    "nnUNetTrainerHyMUNet_bidir",
    "nnUNetTrainerHyMUNet_cross",
    "nnUNetTrainerHyMUNet_1epoch",
    "nnUNetTrainerHyMUNet_5epochs",
    "nnUNetTrainerHyMUNet_10epochs",
    "nnUNetTrainerHyMUNet_20epochs",
    "nnUNetTrainerHyMUNet_50epochs",
    "nnUNetTrainerHyMUNet_100epochs",
    "nnUNetTrainerHyMUNet_250epochs",
    "nnUNetTrainerHyMUNet_demo",
    "nnUNetTrainerHyMUNet_BoundaryLoss",
]
