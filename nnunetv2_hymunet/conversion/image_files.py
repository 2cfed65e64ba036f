"""Reading the releases' 2D files (JPEG, TIF, GIF, PNG) with Pillow and writing nnU-Net's PNGs.

Pillow is used for every 2D format: it decodes GIFs as single 2-D frames (skimage/imageio return (1, H, W, 3) for the
DRIVE GIFs) and writes deterministic PNGs, so serial and parallel conversions are byte-identical.
"""

import os
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow raises these for missing, truncated or non-image files
READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)
# zlib level 1: about 4x faster than Pillow's default (6) on 1000x700 dermoscopy-like images, files ~12% larger;
# nnU-Net reads each raw PNG only once, during preprocessing
PNG_COMPRESS_LEVEL = 1


def files_by_pattern(folder: str, pattern: re.Pattern) -> dict[str, str]:
    """{first regex group: path} for the files in `folder` whose names match (empty for a missing folder).

    Matching names rather than listing the folder skips the releases' ATTRIBUTION.txt, LICENSE.txt and the like.
    """
    if not os.path.isdir(folder):
        return {}
    found = {}
    for entry in sorted(os.listdir(folder)):
        match = pattern.match(entry)
        if match and os.path.isfile(os.path.join(folder, entry)):
            found[match.group(1)] = os.path.join(folder, entry)
    return found


def open_rgb(path: str) -> Image.Image:
    """A fully decoded RGB image (grey or CMYK inputs are converted; decoding errors surface here, not later)."""
    with Image.open(path) as image:
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")


def read_single_channel(path: str) -> np.ndarray:
    """A 2-D uint8 array from a one-channel file (L, 1-bit or palette). Raises ValueError for colour files."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "P":  # GIF and some PNG masks: map palette indices to their grey values
            image = image.convert("L")
        elif image.mode == "1":
            return np.asarray(image, dtype=np.uint8) * np.uint8(255)
        elif image.mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"expected a single-channel image, got mode {image.mode} with {len(image.getbands())} channels"
            )
        return np.asarray(image)


def read_binary_gif(path: str) -> np.ndarray:
    """DRIVE's vessel and FOV GIFs as a boolean 2-D map, binarised at 128 (some releases' GIFs are not pure 0/255)."""
    with Image.open(path) as image:
        image.load()
        grey = np.asarray(image.convert("L"))
    return grey >= 128


def present_values(array: np.ndarray) -> list[int]:
    """The distinct values of a label map (bincount for uint8, which is much faster than np.unique)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256)).tolist()
    return np.unique(array).tolist()


def save_png(image, path: str) -> None:
    """Write a PIL image or a uint8 array (HxW or HxWx3) as a lossless PNG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
