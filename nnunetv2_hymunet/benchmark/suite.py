"""The synthetic benchmark suite: three small nnU-Net raw datasets that prove the harness end to end on a CPU.

- `SynthLesion2D`: dermoscopy-like RGB images with one irregular lesion (the ISIC-like generator of
  nnunetv2_hymunet.conversion.synthetic); labels background / lesion.
- `SynthRegions3D`: BraTS-like volumes, 4 channels (T1-, T1ce-, T2-, FLAIR-like contrasts) with a nested tumour:
  edema around an enhancing rim around a necrotic core, in the converter's BraTS labels and regions
  (conversion/brats_labels.py: 1 NCR, 2 ED, 3 ET; whole tumour, tumour core, enhancing tumour).
- `SynthOppositeKey2D` (the long-range task; id first+3, 973 is the retired SynthLongRange2D): a grey image with a
  textured blob, a bright and a dark round marker, all about 0.4 image widths from the centre. The key marker is
  diametrically opposite the blob through the centre, the decoy a quarter turn from the blob; the blob's label is 1
  when the key is bright, 2 when it is dark. Train it with the plans `nnUNetLongRangePlans` (benchmark/long_range.py):
  nnU-Net's plans cut to the depth whose conv-only receptive field is smaller than the minimum blob-marker distance.

  Why a conv-only network cannot learn the rule: the output at a blob pixel is a function of the input inside its
  receptive field, a square that holds the blob and background but neither marker (every blob-marker distance is at
  least `min_marker_distance(side)`, larger than the receptive field; tested), and the blob's surroundings are drawn
  the same way in both classes. The only other path is instance normalisation, whose per-image statistics are sums of
  local features; every image has one bright and one dark marker at the same radius, whose positions have the same
  distribution in both classes (uniform angle), so those statistics carry no class either (markers are also farther
  apart than the receptive field, so no feature sees their relative placement). Such a network can only guess:
  expected blob-class accuracy 0.5. A layer that mixes the whole image (Mamba scans) can read the key.

Sizes: `small` (the documented study) and `tiny` (the end-to-end test). Everything is seeded; every dataset is
written atomically (temporary folder, renamed at the end).
"""

import os

import numpy as np
from scipy import ndimage

from nnunetv2_hymunet.conversion.brats_labels import CHANNEL_NAMES, ED, ET, NCR, REGION_LABELS, REGIONS_CLASS_ORDER
from nnunetv2_hymunet.conversion.raw_dataset import AtomicDatasetFolder, write_dataset_json
from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case
from nnunetv2_hymunet.errors import HyMUNetError

# task -> {size: (number of training cases, image side)}
SIZES = {
    "SynthLesion2D": {"small": (40, 64), "tiny": (8, 32)},
    "SynthRegions3D": {"small": (24, 32), "tiny": (8, 16)},
    # 64 px: the smallest side at which a 2-stage U-Net (receptive field 15 px) stays below the blob-marker distance
    # (20 px); a HyM-UNet training step costs about a quarter of one at 128 px (3 stages), which a CPU study needs
    "SynthOppositeKey2D": {"small": (60, 64), "tiny": (8, 64)},
}
TASKS = tuple(SIZES)
LONG_RANGE_TASK = "SynthOppositeKey2D"
# dataset id = first id + offset; 973 was SynthLongRange2D, retired (a U-Net of nnU-Net's depth saw its marker), so
# that its results are never mixed with the new task's
ID_OFFSETS = {"SynthLesion2D": 0, "SynthRegions3D": 1, LONG_RANGE_TASK: 3}
DEFAULT_FIRST_ID = 971


def _smooth(rng, shape, sigma):
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def _to_uint8(image):
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8)


def min_marker_distance(side: int) -> int:
    """Smallest Chebyshev distance (px) between any two of blob, key marker and decoy marker in every case."""
    return int(round(0.32 * side))


def chebyshev_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Smallest Chebyshev (chessboard) distance between a pixel of mask a and a pixel of mask b."""
    return int(ndimage.distance_transform_cdt(~b, metric="chessboard")[a].min())


def _disc(yy, xx, centre, radius):
    return np.hypot(yy - centre[0], xx - centre[1]) <= radius


def long_range_case(rng, side: int):
    """(grey uint8 image, label map, {"blob", "key", "decoy"} masks) of SynthOppositeKey2D.

    Every image holds a textured blob and two round markers, one bright and one dark, all at about the same distance
    from the image centre. The key marker sits diametrically opposite the blob through the centre; the decoy sits at
    the blob's position turned 90 degrees (either way) around the centre. The blob's label is 1 when the key is bright,
    2 when it is dark. Nothing near the blob differs between the classes, and both classes have the same global
    intensity statistics (one bright, one dark marker, the same blob), so a network whose receptive field is smaller
    than the blob-marker distance, and whose only global path is instance normalisation, can do no better than
    chance (see the module docstring). The rule survives nnU-Net's mirroring and rotation augmentation (both keep
    "opposite through the centre" and the decoy's quarter turn).
    """
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    centre = np.array([(side - 1) / 2, (side - 1) / 2])
    marker_radius = 0.03 * side
    limit = min_marker_distance(side)
    for _ in range(1000):  # rejection sampling: every case keeps the guaranteed distances
        angle = rng.uniform(0, 2 * np.pi)
        offset = side * rng.uniform(0.36, 0.41) * np.array([np.sin(angle), np.cos(angle)])
        turn = rng.choice((-1, 1))
        blob_radius = side * rng.uniform(0.05, 0.065)
        wobble = 1 + 0.15 * np.cos(
            3 * np.arctan2(yy - centre[0] - offset[0], xx - centre[1] - offset[1]) + rng.uniform(0, 2 * np.pi)
        )
        blob = np.hypot(yy - centre[0] - offset[0], xx - centre[1] - offset[1]) < blob_radius * wobble
        key = _disc(yy, xx, centre - offset, marker_radius)
        decoy = _disc(yy, xx, centre + turn * np.array([-offset[1], offset[0]]), marker_radius)
        if min(chebyshev_distance(blob, key), chebyshev_distance(blob, decoy), chebyshev_distance(key, decoy)) >= limit:
            break
    else:
        raise RuntimeError(f"no SynthOppositeKey2D geometry found for side {side}")
    image = 0.5 + 0.06 * _smooth(rng, (side, side), side / 12) + 0.03 * rng.standard_normal((side, side))
    image[blob] = 0.72 + 0.08 * _smooth(rng, (side, side), 1.5)[blob]
    key_bright = rng.random() < 0.5
    image[key] = 0.95 if key_bright else 0.05
    image[decoy] = 0.05 if key_bright else 0.95
    label = np.zeros((side, side), dtype=np.uint8)
    label[blob] = 1 if key_bright else 2
    return _to_uint8(image), label, {"blob": blob, "key": key, "decoy": decoy}


def long_range_description(side: int) -> tuple:
    """(description for dataset.json, conv-only receptive field px, stages of nnUNetLongRangePlans) of a side x side
    SynthOppositeKey2D, for the 2d plans nnU-Net writes for such images (3x3 convs, strides 1, 2, 2, ..., two convs
    per stage; nnUNetLongRangePlans cuts them; `hymunet benchmark long-range-plans` checks the real plans)."""
    from nnunetv2_hymunet.benchmark.long_range import LONG_RANGE_PLANS, choose_stages, conv_receptive_field, cut_plans
    from nnunetv2_hymunet.benchmark.presets import _configuration

    n_stages = int(np.log2(side / 4)) + 1  # nnU-Net's planner stops at a 4-pixel bottleneck
    features = [min(32 * 2**s, 512) for s in range(n_stages)]
    plans = {"configurations": {"2d": _configuration(2, (side, side), 2, (1.0, 1.0), features, 1, "nnUNetPlans_2d")}}
    distance = min_marker_distance(side)
    stages = choose_stages(plans, "2d", distance)
    cut = cut_plans(plans, "2d", stages)["configurations"]["2d"]["architecture"]["arch_kwargs"]
    rf = max(conv_receptive_field(cut, 2))
    text = (
        f"A blob's class (1: key marker bright, 2: key marker dark) is given only by the marker diametrically "
        f"opposite it through the image centre; a decoy marker of the other brightness sits a quarter turn away. "
        f"Every blob-marker and marker-marker distance is at least {distance} px (Chebyshev). Train with plans "
        f"{LONG_RANGE_PLANS} (`hymunet benchmark long-range-plans`): nnU-Net's 2d plans cut to {stages} stages, "
        f"whose conv-only receptive field is {rf} px, smaller than that distance; a conv-only network can only "
        f"guess the class. Score: blob-class accuracy."
    )
    return text, rf, stages


def regions_case(rng, side: int):
    """(4 x side^3 float32 channels T1, T1ce, T2, FLAIR; label map 1 NCR / 2 ED / 3 ET) of SynthRegions3D."""
    grid = np.stack(np.mgrid[0:side, 0:side, 0:side]).astype(np.float32)
    centre = side * rng.uniform(0.4, 0.6, size=3)
    radii = side * rng.uniform(0.18, 0.28, size=3)

    def ellipsoid(scale):
        distance = sum(((grid[a] - centre[a]) / (radii[a] * scale)) ** 2 for a in range(3))
        return distance < 1

    brain = sum(((grid[a] - side / 2) / (side * 0.48)) ** 2 for a in range(3)) < 1
    whole, core, necrosis = ellipsoid(1.0), ellipsoid(rng.uniform(0.5, 0.65)), ellipsoid(rng.uniform(0.25, 0.35))
    label = np.zeros((side,) * 3, dtype=np.uint8)
    label[whole] = ED
    label[core] = ET
    label[necrosis] = NCR
    label[~brain] = 0
    # (background, NCR, ED, ET) intensity per channel: T1, T1ce, T2, FLAIR
    contrasts = np.array(
        [[0.5, 0.3, 0.45, 0.35], [0.4, 0.2, 0.4, 0.9], [0.35, 0.6, 0.7, 0.6], [0.3, 0.7, 0.8, 0.75]], dtype=np.float32
    )
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
        elif task == LONG_RANGE_TASK:
            grey, label, _ = long_range_case(rng, side)
            _write_png(os.path.join(images, f"{case}_0000.png"), grey)
            _write_png(os.path.join(labels, f"{case}.png"), label)
        else:
            channels, label = regions_case(rng, side)
            for c in range(4):
                _write_nifti(os.path.join(images, f"{case}_{c:04d}.nii.gz"), channels[c])
            _write_nifti(os.path.join(labels, f"{case}.nii.gz"), label)
    if task == "SynthLesion2D":
        write_dataset_json(
            folder, {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, n_cases, ".png", dataset_name=task
        )
    elif task == LONG_RANGE_TASK:
        from nnunetv2_hymunet.benchmark.long_range import DATASET_KEY

        description, rf, stages = long_range_description(side)
        print(f"{task}: {description}")
        write_dataset_json(
            folder,
            {0: "grey"},
            {"background": 0, "blob_key_bright": 1, "blob_key_dark": 2},
            n_cases,
            ".png",
            dataset_name=task,
            description=description,
            **{
                DATASET_KEY: {
                    "min_marker_distance_px": min_marker_distance(side),
                    "expected_receptive_field_px": rf,
                    "expected_stages": stages,
                }
            },
        )
    else:
        write_dataset_json(
            folder,
            CHANNEL_NAMES,
            REGION_LABELS,
            n_cases,
            ".nii.gz",
            regions_class_order=REGIONS_CLASS_ORDER,
            dataset_name=task,
        )


def make_suite(
    output_root: str,
    first_id: int = DEFAULT_FIRST_ID,
    size: str = "small",
    tasks=TASKS,
    overwrite: bool = False,
    seed: int = 0,
) -> list:
    """Write the suite's datasets as DatasetNNN_<task> (ids first_id, first_id+1, ...); returns their folders."""
    if size not in ("small", "tiny"):
        raise HyMUNetError(f"--size must be 'small' or 'tiny', got {size!r}")
    unknown = [t for t in tasks if t not in SIZES]
    if unknown:
        raise HyMUNetError(f"--tasks: unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    folders = []
    for task in tasks:
        offset = ID_OFFSETS[task]
        n_cases, side = SIZES[task][size]
        with AtomicDatasetFolder(output_root, first_id + offset, task, overwrite) as temp:
            _write_task(temp, task, n_cases, side, seed + offset)
        folders.append(os.path.join(output_root, f"Dataset{first_id + offset:03d}_{task}"))
    return folders
