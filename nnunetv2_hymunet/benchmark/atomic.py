"""Write a file under a temporary name beside the target, then rename (moved to nnunetv2_hymunet.fs_safety)."""

from nnunetv2_hymunet.fs_safety import atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_bytes", "atomic_write_text"]
