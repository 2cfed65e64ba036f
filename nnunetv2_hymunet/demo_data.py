"""The demo's (and the 2D end-to-end tests') synthetic ISIC-like nnU-Net raw dataset.

RGB dermoscopy-like PNGs (lesion texture, hair occluders, uneven illumination) from
`nnunetv2_hymunet.conversion.synthetic`, 0/1 masks, in nnU-Net's raw layout; held-out test images go to imagesTs
and their masks to a separate folder so that nothing in the raw dataset leaks them into training.
"""

import os

import numpy as np
from PIL import Image

from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case


def write_isic_like_dataset(
    raw_root: str,
    dataset_id: int,
    name: str,
    num_train: int,
    num_test: int,
    size: int,
    seed: int,
    test_labels_folder: str,
) -> str:
    """Write DatasetNNN_NAME under `raw_root` (and test masks to `test_labels_folder`); returns the dataset folder."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    os.makedirs(test_labels_folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(num_train + num_test):
        image, mask = make_isic_like_case(rng, size, size)
        case = f"case_{index:04d}"
        if index < num_train:
            image_path = os.path.join(folder, "imagesTr", f"{case}_0000.png")
            mask_path = os.path.join(folder, "labelsTr", f"{case}.png")
        else:
            image_path = os.path.join(folder, "imagesTs", f"{case}_0000.png")
            mask_path = os.path.join(test_labels_folder, f"{case}.png")
        Image.fromarray(image).save(image_path)
        Image.fromarray(mask.astype(np.uint8)).save(mask_path)
    generate_dataset_json(
        folder,
        {0: "R", 1: "G", 2: "B"},
        {"background": 0, "lesion": 1},
        num_train,
        ".png",
        dataset_name=name,
        description="synthetic ISIC-like lesions (nnunetv2_hymunet demo)",
    )
    return folder


def write_blob_volume_dataset(
    raw_root: str,
    dataset_id: int,
    name: str,
    num_train: int,
    num_test: int,
    shape,
    seed: int,
    spacing_zyx=(2.0, 1.0, 1.0),
) -> str:
    """Single-channel NIfTI volumes with one bright noisy ellipsoid labelled 1 (tests and the device check).

    Test volumes go to imagesTs and their labels to labelsTs (a folder nnU-Net does not read).
    """
    import SimpleITK as sitk
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    for index in range(num_train + num_test):
        centre = [rng.uniform(0.35, 0.65) * n for n in shape]
        radii = [rng.uniform(0.18, 0.3) * n for n in shape]
        mask = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) < 1
        image = rng.normal(0, 0.4, shape).astype(np.float32) + mask * np.float32(rng.uniform(0.8, 1.2))
        split = "Tr" if index < num_train else "Ts"
        for array, sub, suffix in ((image, f"images{split}", "_0000"), (mask.astype(np.uint8), f"labels{split}", "")):
            item = sitk.GetImageFromArray(array)
            item.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # SimpleITK wants x, y, z
            sitk.WriteImage(item, os.path.join(folder, sub, f"vol_{index:03d}{suffix}.nii.gz"))
    generate_dataset_json(folder, {0: "MRI"}, {"background": 0, "blob": 1}, num_train, ".nii.gz", dataset_name=name)
    return folder
