"""HyM-UNet network (2D and 3D) built from nnU-Net plans: hybrid CNN-Mamba encoder, MGF skips, nnU-Net decoder."""

from nnunetv2_hymunet.network.hymunet import HyMUNet

__all__ = ["HyMUNet"]
