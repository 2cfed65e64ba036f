"""The demo's (and the 2D end-to-end tests') synthetic ISIC-like nnU-Net raw dataset.

RGB dermoscopy-like PNGs (lesion texture, hair occluders, uneven illumination) from
`nnunetv2_hymunet.conversion.synthetic`, 0/1 masks, in nnU-Net's raw layout; held-out test images go to imagesTs
and their masks to a separate folder so that nothing in the raw dataset leaks them into training.
"""

import os

import numpy as np
from PIL import Image

from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case


def write_isic_like_dataset(raw_root: str, dataset_id: int, name: str, num_train: int, num_test: int, size: int,
                            seed: int, test_labels_folder: str) -> str:
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
    generate_dataset_json(folder, {0: "R", 1: "G", 2: "B"}, {"background": 0, "lesion": 1}, num_train, ".png",
                          dataset_name=name, description="synthetic ISIC-like lesions (nnunetv2_hymunet demo)")
    return folder
