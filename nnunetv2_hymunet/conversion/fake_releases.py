"""Small synthetic trees in the exact file naming of the ISIC 2018, DRIVE and BraTS 2021 / 2023 GLI releases.

They let tests, the demo and users run the converters without the real data. The images are synthetic (ISIC, BraTS)
or derived from scikit-image's bundled CC0 fundus photograph (DRIVE); none of them is real patient data.
"""

import functools
import math
import os

import numpy as np
from PIL import Image
from scipy import ndimage

from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import OWNER_FILE  # AtomicFolder's record in the folder being filled

FAKE_NOTICE = "Synthetic data written by `hymunet convert make-fake`; not part of any real release.\n"
DRIVE_SIZE = (584, 565)  # (height, width) of every DRIVE image


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise HyMUNetError(f"make-fake: --seed must be a non-negative integer, got {seed}")


def _prepare_empty_folder(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or set(os.listdir(path)) - {OWNER_FILE}):
        raise HyMUNetError(f"{path} exists and is not an empty folder; choose a new folder for the fake release")
    os.makedirs(path, exist_ok=True)


def _write_notices(folder: str) -> None:
    for name in ("ATTRIBUTION.txt", "LICENSE.txt"):
        with open(os.path.join(folder, name), "w") as f:
            f.write(FAKE_NOTICE)


def make_fake_isic2018(
    out_dir: str,
    num_cases: int = 10,
    seed: int = 0,
    image_size: int = 128,
    num_validation: int | None = None,
    num_test: int | None = None,
) -> str:
    """Training, Validation and Test folders with ground truth; images are landscape, heights in [0.75, 1] x size."""
    if num_cases < 1 or not 16 <= image_size <= 4096:
        raise HyMUNetError("make-fake isic2018 needs --num-cases >= 1 and --image-size in 16..4096")
    _check_seed(seed)
    _prepare_empty_folder(out_dir)
    rng = np.random.default_rng(seed)
    counts = {
        "Training": num_cases,
        "Validation": max(1, num_cases // 5) if num_validation is None else num_validation,
        "Test": max(1, num_cases // 5) if num_test is None else num_test,
    }
    ids = np.sort(rng.choice(10**7, size=sum(counts.values()), replace=False))
    order = rng.permutation(len(ids))  # ISIC ids are not grouped by split
    start = 0
    for split, count in counts.items():
        if count == 0:
            continue
        image_dir = os.path.join(out_dir, f"ISIC2018_Task1-2_{split}_Input")
        truth_dir = os.path.join(out_dir, f"ISIC2018_Task1_{split}_GroundTruth")
        for folder in (image_dir, truth_dir):
            os.makedirs(folder)
            _write_notices(folder)
        for index in order[start : start + count]:
            height = int(rng.integers(int(0.75 * image_size), image_size + 1))
            width = int(round(height * rng.uniform(1.2, 1.5)))
            rgb, mask = make_isic_like_case(rng, height, width)
            case_id = f"ISIC_{ids[index]:07d}"
            Image.fromarray(rgb).save(os.path.join(image_dir, f"{case_id}.jpg"), quality=95)
            Image.fromarray(mask.astype(np.uint8) * np.uint8(255)).save(
                os.path.join(truth_dir, f"{case_id}_segmentation.png")
            )
        start += count
    return out_dir


@functools.lru_cache(maxsize=4)
def _drive_template(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """skimage's fundus photograph at DRIVE's aspect, a vessel map from a black top-hat, and the field of view."""
    from skimage import data, morphology

    photo = Image.fromarray(data.retina()).resize((width, height), Image.Resampling.BILINEAR)
    rgb = np.asarray(photo)
    fov = ndimage.binary_fill_holes(rgb.mean(axis=2) > 20)
    fov = ndimage.binary_erosion(fov, iterations=max(1, min(height, width) // 100))
    green = rgb[..., 1]
    radius = max(2, int(round(min(height, width) / 80)))
    vesselness = morphology.black_tophat(green, morphology.disk(radius)).astype(np.float32)
    vessels = fov & (vesselness > np.percentile(vesselness[fov], 88))
    return rgb, vessels, fov


def _drive_case(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The template with a random flip, shift and colour change applied alike to image, vessels and FOV."""
    rgb, vessels, fov = _drive_template(height, width)
    flip = bool(rng.integers(0, 2))
    shift = (int(rng.integers(-height // 40, height // 40 + 1)), int(rng.integers(-width // 40, width // 40 + 1)))

    def move(array):
        array = array[:, ::-1] if flip else array
        return np.roll(array, shift, axis=(0, 1))

    gain = rng.uniform(0.8, 1.15, size=3)
    image = move(rgb).astype(np.float32) * gain + rng.normal(0, 2.0, size=rgb.shape)
    moved_fov = move(fov)
    image[~moved_fov] = 0
    return np.clip(image, 0, 255).astype(np.uint8), move(vessels) & moved_fov, moved_fov


def _save_gif(mask: np.ndarray, path: str) -> None:
    Image.fromarray(mask.astype(np.uint8) * np.uint8(255), mode="L").save(path)


def make_fake_drive(
    out_dir: str, num_cases: int = 20, seed: int = 0, scale: float = 1.0, with_test_manual: bool = False
) -> str:
    """training/ (ids 21..) and test/ (ids 01..) like the current download: test/1st_manual only when asked for."""
    if not 1 <= num_cases <= 20:
        raise HyMUNetError(
            f"make-fake drive: --num-cases must be 1..20 per split (DRIVE numbers its images 01-40), got {num_cases}"
        )
    if not (math.isfinite(scale) and 0 < scale <= 4):
        raise HyMUNetError(f"make-fake drive: --scale must be in (0, 4], got {scale}")
    _check_seed(seed)
    height, width = int(round(DRIVE_SIZE[0] * scale)), int(round(DRIVE_SIZE[1] * scale))
    if min(height, width) < 32:
        raise HyMUNetError(f"make-fake drive: --scale {scale} gives {width}x{height} images; use at least 32 px")
    _prepare_empty_folder(out_dir)
    rng = np.random.default_rng(seed)
    for split, first_number in (("training", 21), ("test", 1)):
        folders = {"images": os.path.join(out_dir, split, "images"), "mask": os.path.join(out_dir, split, "mask")}
        if split == "training" or with_test_manual:
            folders["1st_manual"] = os.path.join(out_dir, split, "1st_manual")
        for folder in folders.values():
            os.makedirs(folder)
        for number in range(first_number, first_number + num_cases):
            image, vessels, fov = _drive_case(rng, height, width)
            Image.fromarray(image).save(os.path.join(folders["images"], f"{number:02d}_{split}.tif"))
            _save_gif(fov, os.path.join(folders["mask"], f"{number:02d}_{split}_mask.gif"))
            if "1st_manual" in folders:
                _save_gif(vessels, os.path.join(folders["1st_manual"], f"{number:02d}_manual1.gif"))
    return out_dir


# release -> (training folder, validation folder, case id format, modality suffixes, separator, tumour labels)
_BRATS_LAYOUTS = {
    "2021": (
        "BraTS2021_Training_Data",
        "BraTS2021_Validation_Data",
        "BraTS2021_{:05d}",
        ("t1", "t1ce", "t2", "flair"),
        "_",
        {"ncr": 1, "ed": 2, "et": 4},
    ),
    "2023": (
        "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData",
        "ASNR-MICCAI-BraTS2023-GLI-Challenge-ValidationData",
        "BraTS-GLI-{:05d}-000",
        ("t1n", "t1c", "t2w", "t2f"),
        "-",
        {"ncr": 1, "ed": 2, "et": 3},
    ),
}


def _brats_case(rng: np.random.Generator, shape: tuple[int, int, int], labels: dict):
    """Four modality volumes (int16) and a tumour label map: NCR core, ET rim, ED halo inside an ellipsoid head."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (grid**2).sum(axis=0) < 0.85
    centre = rng.uniform(-0.3, 0.3, size=3)[:, None, None, None]
    stretch = rng.uniform(0.8, 1.25, size=3)[:, None, None, None]
    distance = np.sqrt((((grid - centre) * stretch) ** 2).sum(axis=0))
    distance = distance + 0.04 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    r_ncr, r_et, r_ed = np.sort(rng.uniform(0.1, 0.5, size=3))
    seg = np.zeros(shape, dtype=np.uint8)
    seg[(distance < r_ed) & head] = labels["ed"]
    if rng.random() < 0.85:  # some real cases have no enhancing tumour
        seg[(distance < r_et) & head] = labels["et"]
    seg[(distance < r_ncr) & head] = labels["ncr"]
    # per modality: intensity of (brain, NCR, ED, ET)
    contrasts = ((400, 250, 350, 420), (420, 200, 380, 900), (300, 700, 650, 500), (350, 300, 800, 600))
    volumes = []
    for brain, ncr, ed, et in contrasts:
        volume = np.where(head, brain, 0).astype(np.float32)
        for name, value in (("ed", ed), ("et", et), ("ncr", ncr)):
            volume[seg == labels[name]] = value
        volume += head * rng.normal(0, 20, size=shape)
        volumes.append(np.clip(volume, 0, None).astype(np.int16))
    return volumes, seg


def make_fake_brats(
    out_dir: str,
    release: str = "2021",
    num_cases: int = 4,
    seed: int = 0,
    shape: tuple[int, int, int] = (40, 48, 36),
    num_unlabelled: int = 1,
) -> str:
    """Labelled cases in the training folder and `num_unlabelled` cases without seg in the validation folder."""
    import nibabel

    if release not in _BRATS_LAYOUTS:
        raise HyMUNetError(f"make-fake brats: --release must be 2021 or 2023, got {release!r}")
    if num_cases < 1 or min(shape) < 8 or max(shape) > 512:
        raise HyMUNetError("make-fake brats needs --num-cases >= 1 and a --shape of 8..512 voxels per axis")
    if num_unlabelled < 0:
        raise HyMUNetError(f"make-fake brats: --num-unlabelled must be >= 0, got {num_unlabelled}")
    _check_seed(seed)
    train_folder, val_folder, id_format, modalities, separator, labels = _BRATS_LAYOUTS[release]
    _prepare_empty_folder(out_dir)
    rng = np.random.default_rng(seed)
    for index in range(num_cases + num_unlabelled):
        labelled = index < num_cases
        case_id = id_format.format(index)
        case_dir = os.path.join(out_dir, train_folder if labelled else val_folder, case_id)
        os.makedirs(case_dir)
        # BraTS-like LPS-flipped 1 mm grid; a random origin so that geometry preservation is actually tested
        affine = np.diag([-1.0, -1.0, 1.0, 1.0])
        affine[:3, 3] = rng.uniform(-120, 120, size=3).round(2)
        volumes, seg = _brats_case(rng, shape, labels)
        outputs = list(zip(modalities, volumes)) + ([("seg", seg)] if labelled else [])
        for suffix, volume in outputs:
            image = nibabel.Nifti1Image(volume, affine)
            image.header.set_qform(affine, code=1)
            image.header.set_sform(affine, code=1)
            nibabel.save(image, os.path.join(case_dir, f"{case_id}{separator}{suffix}.nii.gz"))
    return out_dir
