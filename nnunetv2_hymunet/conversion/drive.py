"""DRIVE (retinal vessel segmentation) -> nnU-Net raw dataset.

training/ goes to imagesTr/labelsTr, test/ to imagesTs (and labelsTs when test/1st_manual exists; the current public
download lacks it). TIF images become RGB PNGs; the GIF manuals and field-of-view masks are read as 2-D grey with
Pillow and binarised at 128. The FOV masks are kept as 0/1 PNGs in fovTr/ and fovTs/ for inside-FOV evaluation.

Label modes (--fov-mode):
- plain (default): {background: 0, vessel: 1}; the network is trained on the whole image, as most DRIVE papers do.
- ignore: {background: 0, vessel: 1, ignore: 2}, every pixel outside the FOV is 2. nnU-Net then neither trains on
  nor scores those pixels (its Dice is an inside-FOV Dice); predictions outside the FOV are meaningless and should be
  multiplied by the FOV mask.
"""

import os
import re
from functools import partial

import numpy as np

from nnunetv2_hymunet.conversion.case_runner import (
    Problem,
    describe_read_error,
    map_cases,
    raise_if_problems,
    unpaired_problems,
)
from nnunetv2_hymunet.conversion.image_files import READ_ERRORS, files_by_pattern, open_rgb, read_binary_gif, save_png
from nnunetv2_hymunet.conversion.raw_dataset import AtomicDatasetFolder, write_dataset_json, write_source_record
from nnunetv2_hymunet.errors import HyMUNetError

FOV_MODES = ("plain", "ignore")
# (split, release folder, image suffix, nnU-Net folders: images, labels, fov)
RELEASE_SPLITS = (
    ("training", "training", "training", "imagesTr", "labelsTr", "fovTr"),
    ("test", "test", "test", "imagesTs", "labelsTs", "fovTs"),
)


def find_cases(input_dir: str) -> tuple[list[tuple], dict, list[Problem]]:
    """Match images, manuals and FOV masks by their number. Returns (cases, split record, naming problems)."""
    if not os.path.isdir(input_dir):
        raise HyMUNetError(f"--input {input_dir} is not a folder")
    cases, record, problems = [], {}, []
    for split, folder, suffix, images_out, labels_out, fov_out in RELEASE_SPLITS:
        split_dir = os.path.join(input_dir, folder)
        image_dir = os.path.join(split_dir, "images")
        if not os.path.isdir(image_dir):
            if split == "training":
                problems.append(Problem(image_dir, "missing: the DRIVE training images folder"))
            continue
        images = files_by_pattern(image_dir, re.compile(rf"^(\d+)_{suffix}\.tif$"))
        fovs = files_by_pattern(os.path.join(split_dir, "mask"), re.compile(rf"^(\d+)_{suffix}_mask\.gif$"))
        manual_dir = os.path.join(split_dir, "1st_manual")
        labelled = split == "training" or os.path.isdir(manual_dir)
        manuals = files_by_pattern(manual_dir, re.compile(r"^(\d+)_manual1\.gif$"))
        if not images:
            problems.append(Problem(image_dir, f"contains no NN_{suffix}.tif images"))
        fov_dir = os.path.join(split_dir, "mask")
        problems += unpaired_problems(images, fovs, lambda n: f"has no FOV mask {n}_{suffix}_mask.gif in {fov_dir}")
        problems += unpaired_problems(fovs, images, lambda n: f"has no image {n}_{suffix}.tif in {image_dir}")
        if labelled:
            problems += unpaired_problems(images, manuals, lambda n: f"has no manual {n}_manual1.gif in {manual_dir}")
            problems += unpaired_problems(manuals, images, lambda n: f"has no image {n}_{suffix}.tif in {image_dir}")
        split_ids = []
        for number in sorted(images):
            if number not in fovs or (labelled and number not in manuals):
                continue
            case_id = f"DRIVE_{number}"
            split_ids.append(case_id)
            cases.append(
                (
                    images[number],
                    manuals.get(number),
                    fovs[number],
                    os.path.join(images_out, f"{case_id}_0000.png"),
                    os.path.join(labels_out, f"{case_id}.png") if labelled else None,
                    os.path.join(fov_out, f"{case_id}.png"),
                )
            )
        record[split] = {
            "images": images_out,
            "labels": labels_out if labelled else None,
            "fov": fov_out,
            "cases": split_ids,
        }
    return cases, record, problems


def convert_case(case: tuple, output_dir: str, fov_mode: str) -> list[Problem]:
    image_path, manual_path, fov_path, image_out, label_out, fov_out = case
    problems, image, manual, fov = [], None, None, None
    try:
        image = open_rgb(image_path)
    except READ_ERRORS as e:
        problems.append(describe_read_error(image_path, e))
    try:
        fov = read_binary_gif(fov_path)
    except READ_ERRORS as e:
        problems.append(describe_read_error(fov_path, e))
    if manual_path is not None:
        try:
            manual = read_binary_gif(manual_path)
        except READ_ERRORS as e:
            problems.append(describe_read_error(manual_path, e))
    if image is not None:
        for path, mask in ((fov_path, fov), (manual_path, manual)):
            if mask is not None and mask.shape != (image.height, image.width):
                problems.append(
                    Problem(
                        path,
                        f"size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                        f"{image.width}x{image.height} ({image_path})",
                    )
                )
    if fov is not None and not fov.any():
        problems.append(Problem(fov_path, "FOV mask is empty (no pixel >= 128)"))
    if problems:
        return problems
    save_png(image, os.path.join(output_dir, image_out))
    save_png(fov.astype(np.uint8), os.path.join(output_dir, fov_out))
    if manual is not None:
        label = manual.astype(np.uint8)
        if fov_mode == "ignore":
            label[~fov] = 2
        save_png(label, os.path.join(output_dir, label_out))
    return []


def convert_drive(
    input_dir: str,
    output_root: str,
    dataset_id: int,
    name: str = "DRIVE",
    overwrite: bool = False,
    num_workers: int = 1,
    fov_mode: str = "plain",
) -> str:
    """Convert a DRIVE release folder (with training/ and test/); returns the new dataset folder."""
    if fov_mode not in FOV_MODES:
        raise HyMUNetError(f"--fov-mode must be one of {', '.join(FOV_MODES)}, got {fov_mode!r}")
    cases, record, problems = find_cases(input_dir)
    atomic = AtomicDatasetFolder(output_root, dataset_id, name, overwrite, inputs={"--input": input_dir})
    with atomic as temp:
        for folder in sorted({os.path.dirname(p) for c in cases for p in c[3:] if p is not None}):
            os.makedirs(os.path.join(temp, folder), exist_ok=True)
        results = map_cases(partial(convert_case, output_dir=temp, fov_mode=fov_mode), cases, num_workers, "DRIVE")
        raise_if_problems(problems + [p for r in results for p in r], f"the DRIVE input {input_dir}")
        labels = {"background": 0, "vessel": 1}
        if fov_mode == "ignore":
            labels["ignore"] = 2
        write_dataset_json(
            temp,
            {"0": "R", "1": "G", "2": "B"},
            labels,
            len(record["training"]["cases"]),
            ".png",
            dataset_name=atomic.folder_name,
            description=f"DRIVE retinal vessel segmentation (fov mode: {fov_mode})",
            reference="https://drive.grand-challenge.org/",
            license="see the DRIVE release terms",
            converted_by="hymunet convert drive",
            fov_mode=fov_mode,
            fov_folders={"train": "fovTr", "test": "fovTs"},
        )
        write_source_record(temp, "drive", input_dir, record, fov_mode=fov_mode)
    return atomic.target
