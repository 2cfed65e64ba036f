"""The synthetic benchmark suite: three small nnU-Net raw datasets that prove the harness end to end on a CPU.

- `SynthLesion2D`: dermoscopy-like RGB images with one irregular lesion (the ISIC-like generator of
  nnunetv2_hymunet.conversion.synthetic); labels background / lesion.
- `SynthRegions3D`: BraTS-like volumes, 4 channels (FLAIR-, T1ce-, T2-, T1-like contrasts) with a nested tumour:
  edema (1) around an enhancing rim (3) around a necrotic core (2); evaluated as nnU-Net regions whole tumour
  [1, 2, 3], tumour core [2, 3], enhancing [3] (regions_class_order [1, 2, 3]).
- `SynthLongRange2D`: a textured blob on one side of a grey image and a small square marker on the opposite side.
  The blob looks the same in both classes; its label (1 or 2) is given only by the marker (bright: 1, dark: 2) about
  half an image width away, so a pixel's label depends on content far outside a few conv layers' reach. The code is
  carried by brightness, not position, so nnU-Net's mirroring and rotation augmentations keep it valid. (A U-Net with
  nnU-Net's depth still sees the whole image at its bottleneck; this task tests whether global mixing helps on top.)

Sizes: `small` (the documented study) and `tiny` (the end-to-end test). Everything is seeded; every dataset is
written atomically (temporary folder, renamed at the end).
"""

import os

import numpy as np
from scipy import ndimage

from nnunetv2_hymunet.conversion.raw_dataset import AtomicDatasetFolder, write_dataset_json
from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case
from nnunetv2_hymunet.errors import HyMUNetError

# task -> {size: (number of training cases, image side)}
SIZES = {
    "SynthLesion2D": {"small": (40, 64), "tiny": (8, 32)},
    "SynthRegions3D": {"small": (24, 32), "tiny": (8, 16)},
    "SynthLongRange2D": {"small": (40, 96), "tiny": (8, 32)},
}
TASKS = tuple(SIZES)
DEFAULT_FIRST_ID = 971


def _smooth(rng, shape, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _to_uint8(image):
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def long_range_case(rng, side: int):
    """(grey uint8 image, label map) of SynthLongRange2D."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    image = 0.5 + 0.06 * _smooth(rng, (side, side), side / 12) + 0.03 * rng.standard_normal((side, side))
    blob_left = rng.random() < 0.5
    cx = side * rng.uniform(0.15, 0.3)
    cx = cx if blob_left else side - cx
    cy = side * rng.uniform(0.25, 0.75)
    radius = side * rng.uniform(0.09, 0.14)
    angle = np.arctan2(yy - cy, xx - cx)
    wobble = 1 + 0.15 * np.cos(3 * angle + rng.uniform(0, 2 * np.pi))
    blob = np.hypot(yy - cy, xx - cx) < radius * wobble
    image[blob] = 0.75 + 0.08 * _smooth(rng, (side, side), 1.5)[blob]
    bright = rng.random() < 0.5
    half = max(1, int(round(side * 0.04)))
    mx = side - int(side * rng.uniform(0.08, 0.15)) if blob_left else int(side * rng.uniform(0.08, 0.15))
    my = int(side * rng.uniform(0.2, 0.8))
    image[max(0, my - half):my + half + 1, max(0, mx - half):mx + half + 1] = 1.0 if bright else 0.0
    label = np.zeros((side, side), dtype=np.uint8)
    label[blob] = 1 if bright else 2
    return _to_uint8(image), label


def regions_case(rng, side: int):
    """(4 x side^3 float32 channels, label map with 1 edema / 2 necrosis / 3 enhancing) of SynthRegions3D."""
    grid = np.stack(np.mgrid[0:side, 0:side, 0:side]).astype(np.float32)
    centre = side * rng.uniform(0.4, 0.6, size=3)
    radii = side * rng.uniform(0.18, 0.28, size=3)

    def ellipsoid(scale):
        distance = sum(((grid[a] - centre[a]) / (radii[a] * scale)) ** 2 for a in range(3))
        return distance < 1

    brain = sum(((grid[a] - side / 2) / (side * 0.48)) ** 2 for a in range(3)) < 1
    whole, core, necrosis = ellipsoid(1.0), ellipsoid(rng.uniform(0.5, 0.65)), ellipsoid(rng.uniform(0.25, 0.35))
    label = np.zeros((side,) * 3, dtype=np.uint8)
    label[whole] = 1
    label[core] = 3
    label[necrosis] = 2
    label[~brain] = 0
    # (background, edema, necrosis, enhancing) intensity per channel: FLAIR, T1ce, T2, T1
    contrasts = np.array([[0.3, 0.8, 0.7, 0.75], [0.4, 0.4, 0.2, 0.9], [0.35, 0.7, 0.6, 0.6], [0.5, 0.45, 0.3, 0.35]],
                         dtype=np.float32)
    channels = np.empty((4, side, side, side), dtype=np.float32)
    for c in range(4):
        channel = contrasts[c][label] + 0.05 * _smooth(rng, label.shape, 2.0) + 0.04 * rng.standard_normal(label.shape)
        channel[~brain] = 0
        channels[c] = channel
    return channels, label


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def _write_nifti(path, array):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, path)


def _write_task(folder: str, task: str, n_cases: int, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    images, labels = os.path.join(folder, "imagesTr"), os.path.join(folder, "labelsTr")
    os.makedirs(images)
    os.makedirs(labels)
    for i in range(n_cases):
        case = f"case_{i:03d}"
        if task == "SynthLesion2D":
            rgb, mask = make_isic_like_case(rng, side, side)
            _write_png(os.path.join(images, f"{case}_0000.png"), rgb)
            _write_png(os.path.join(labels, f"{case}.png"), mask.astype(np.uint8))
        elif task == "SynthLongRange2D":
            grey, label = long_range_case(rng, side)
            _write_png(os.path.join(images, f"{case}_0000.png"), grey)
            _write_png(os.path.join(labels, f"{case}.png"), label)
        else:
            channels, label = regions_case(rng, side)
            for c in range(4):
                _write_nifti(os.path.join(images, f"{case}_{c:04d}.nii.gz"), channels[c])
            _write_nifti(os.path.join(labels, f"{case}.nii.gz"), label)
    if task == "SynthLesion2D":
        write_dataset_json(folder, {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, n_cases, ".png",
                           dataset_name=task)
    elif task == "SynthLongRange2D":
        write_dataset_json(folder, {0: "grey"}, {"background": 0, "blob_bright_marker": 1, "blob_dark_marker": 2},
                           n_cases, ".png", dataset_name=task)
    else:
        write_dataset_json(folder, {0: "FLAIR", 1: "T1ce", 2: "T2", 3: "T1"},
                           {"background": 0, "whole_tumor": [1, 2, 3], "tumor_core": [2, 3], "enhancing_tumor": [3]},
                           n_cases, ".nii.gz", regions_class_order=[1, 2, 3], dataset_name=task)


def make_suite(output_root: str, first_id: int = DEFAULT_FIRST_ID, size: str = "small", tasks=TASKS,
               overwrite: bool = False, seed: int = 0) -> list:
    """Write the suite's datasets as DatasetNNN_<task> (ids first_id, first_id+1, ...); returns their folders."""
    if size not in ("small", "tiny"):
        raise HyMUNetError(f"--size must be 'small' or 'tiny', got {size!r}")
    unknown = [t for t in tasks if t not in SIZES]
    if unknown:
        raise HyMUNetError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    folders = []
    for task in tasks:
        offset = TASKS.index(task)
        n_cases, side = SIZES[task][size]
        with AtomicDatasetFolder(output_root, first_id + offset, task, overwrite) as temp:
            _write_task(temp, task, n_cases, side, seed + offset)
        folders.append(os.path.join(output_root, f"Dataset{first_id + offset:03d}_{task}"))
    return folders
