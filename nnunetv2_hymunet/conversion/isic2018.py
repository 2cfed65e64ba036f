"""ISIC 2018 Task 1 (lesion boundary segmentation) -> nnU-Net raw dataset.

Training goes to imagesTr/labelsTr; the official Validation and Test sets (when their folders are present) go to
imagesTs, with labelsTs for the splits whose ground-truth folder is present. JPEGs become RGB PNGs (nnU-Net's 2D
reader takes no JPEG), masks 0/255 become 0/1. Case identifiers are the ISIC ids (`ISIC_0000000`).
"""

import json
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
from nnunetv2_hymunet.conversion.image_files import (
    READ_ERRORS,
    files_by_pattern,
    open_rgb,
    present_values,
    read_single_channel,
    save_png,
)
from nnunetv2_hymunet.conversion.raw_dataset import AtomicDatasetFolder, write_dataset_json, write_source_record
from nnunetv2_hymunet.conversion.splits import read_split_file, splits_destination
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import StagedFile

# (split, image folder, ground-truth folder, nnU-Net image folder, nnU-Net label folder)
RELEASE_SPLITS = (
    ("training", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth", "imagesTr", "labelsTr"),
    (
        "validation",
        "ISIC2018_Task1-2_Validation_Input",
        "ISIC2018_Task1_Validation_GroundTruth",
        "imagesTs",
        "labelsTs",
    ),
    ("test", "ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth", "imagesTs", "labelsTs"),
)
IMAGE_PATTERN = re.compile(r"^(ISIC_\d{7})\.jpg$")
MASK_PATTERN = re.compile(r"^(ISIC_\d{7})_segmentation\.png$")
MASK_VALUES = {0, 255}


def find_cases(input_dir: str) -> tuple[list[tuple], dict, list[Problem]]:
    """Pair images and masks per split. Returns (cases, split record, problems found from the file names alone)."""
    if not os.path.isdir(input_dir):
        raise HyMUNetError(f"--input {input_dir} is not a folder")
    cases, record, problems = [], {}, []
    seen: dict[str, str] = {}
    for split, image_folder, truth_folder, images_out, labels_out in RELEASE_SPLITS:
        image_dir, truth_dir = os.path.join(input_dir, image_folder), os.path.join(input_dir, truth_folder)
        if not os.path.isdir(image_dir):
            if split == "training":
                problems.append(Problem(image_dir, "missing: the ISIC 2018 training images folder"))
            if os.path.isdir(truth_dir):
                problems.append(Problem(truth_dir, f"ground truth without its image folder {image_folder}"))
            continue
        images = files_by_pattern(image_dir, IMAGE_PATTERN)
        if not images:
            problems.append(Problem(image_dir, "contains no ISIC_<7 digits>.jpg images"))
        labelled = os.path.isdir(truth_dir)
        if split == "training" and not labelled:
            problems.append(Problem(truth_dir, "missing: the ISIC 2018 training ground-truth folder"))
        masks = files_by_pattern(truth_dir, MASK_PATTERN) if labelled else {}
        if labelled:
            problems += unpaired_problems(images, masks, lambda i: f"has no mask {i}_segmentation.png in {truth_dir}")
            problems += unpaired_problems(masks, images, lambda i: f"has no image {i}.jpg in {image_dir}")
        split_ids = []
        for case_id in sorted(images):
            if case_id in seen:
                problems.append(Problem(images[case_id], f"{case_id} is also in the {seen[case_id]} split"))
                continue
            seen[case_id] = split
            if labelled and case_id not in masks:
                continue
            split_ids.append(case_id)
            label_out = os.path.join(labels_out, f"{case_id}.png") if labelled else None
            cases.append(
                (images[case_id], masks.get(case_id), os.path.join(images_out, f"{case_id}_0000.png"), label_out)
            )
        record[split] = {"images": images_out, "labels": labels_out if labelled else None, "cases": split_ids}
    return cases, record, problems


def convert_case(case: tuple, output_dir: str) -> list[Problem]:
    """Read, check and write one image (and its mask) in one pass."""
    image_path, mask_path, image_out, label_out = case
    problems = []
    try:
        image = open_rgb(image_path)
    except READ_ERRORS as e:
        problems.append(describe_read_error(image_path, e))
        image = None
    mask = None
    if mask_path is not None:
        try:
            mask = read_single_channel(mask_path)
        except READ_ERRORS as e:
            problems.append(describe_read_error(mask_path, e))
        if mask is not None:
            unexpected = sorted(set(present_values(mask)) - MASK_VALUES)
            if unexpected:
                problems.append(Problem(mask_path, f"mask values must be 0 and 255, found also {unexpected[:10]}"))
            if image is not None and mask.shape != (image.height, image.width):
                problems.append(
                    Problem(
                        mask_path,
                        f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                        f"size {image.width}x{image.height} ({image_path})",
                    )
                )
    if problems:
        return problems
    save_png(image, os.path.join(output_dir, image_out))
    if mask is not None:
        save_png((mask == 255).astype(np.uint8), os.path.join(output_dir, label_out))
    return []


def convert_isic2018(
    input_dir: str,
    output_root: str,
    dataset_id: int,
    name: str = "ISIC2018",
    overwrite: bool = False,
    num_workers: int = 1,
    split_file: str | None = None,
) -> str:
    """Convert the ISIC 2018 Task 1 release folders under `input_dir`; returns the new dataset folder."""
    cases, record, problems = find_cases(input_dir)
    training_ids = record.get("training", {}).get("cases", [])
    folds = None
    if split_file is not None and not problems:
        folds = read_split_file(split_file, training_ids, id_prefix="ISIC_")
    atomic = AtomicDatasetFolder(
        output_root, dataset_id, name, overwrite, inputs={"--input": input_dir, "--split-file": split_file}
    )
    splits_path, in_preprocessed = splits_destination(atomic.folder_name, atomic.target)
    if folds is not None and in_preprocessed and os.path.isfile(splits_path) and not overwrite:
        raise HyMUNetError(f"{splits_path} already exists; pass --overwrite to replace it")

    # both or neither: the splits file is written (under a temporary name) before the dataset is committed, so an
    # unwritable $nnUNet_preprocessed stops the run before anything is in place
    splits_json = json.dumps(folds, indent=4).encode() if folds is not None else None
    staged = (
        StagedFile(splits_path, splits_json, "--split-file (written to $nnUNet_preprocessed)")
        if splits_json is not None and in_preprocessed
        else None
    )
    if staged is not None:
        atomic.after_commit.append(staged.commit)
    try:
        with atomic as temp:
            for folder in sorted({os.path.dirname(p) for c in cases for p in (c[2], c[3]) if p is not None}):
                os.makedirs(os.path.join(temp, folder), exist_ok=True)
            results = map_cases(partial(convert_case, output_dir=temp), cases, num_workers, "ISIC 2018")
            raise_if_problems(problems + [p for r in results for p in r], f"the ISIC 2018 input {input_dir}")
            write_dataset_json(
                temp,
                {"0": "R", "1": "G", "2": "B"},
                {"background": 0, "lesion": 1},
                len(training_ids),
                ".png",
                dataset_name=atomic.folder_name,
                description="ISIC 2018 Task 1 lesion boundary segmentation",
                reference="https://challenge.isic-archive.com/landing/2018/45/",
                license="CC BY-NC 4.0 (ISIC archive); check the terms of your download",
                converted_by="hymunet convert isic2018",
            )
            write_source_record(temp, "isic2018", input_dir, record)
            if splits_json is not None and not in_preprocessed:
                with open(os.path.join(temp, "splits_final.json"), "wb") as f:
                    f.write(splits_json)
    finally:
        if staged is not None:
            staged.discard()

    if folds is not None:
        if in_preprocessed:
            print(f"wrote {len(folds)} fixed folds to {splits_path}")
        else:
            print(
                f"wrote {len(folds)} fixed folds to {splits_path}; nnUNet_preprocessed is not set, so copy it to "
                f"$nnUNet_preprocessed/{atomic.folder_name}/splits_final.json before training"
            )
    return atomic.target
