"""HyM-UNet for nnU-Net v2: hybrid CNN-Mamba U-Net with Mamba-Guided Fusion skips."""

__version__ = "0.1.0"
