"""The only module in the folder that nnU-Net's `nnUNet_extTrainer` search imports: it re-exports our trainers.

nnU-Net imports every module of each folder listed in nnUNet_extTrainer as a top-level module, so this folder
must hold nothing else.
"""

from nnunetv2_hymunet.training import *  # noqa: F401,F403
