"""BraTS 2021 and BraTS 2023 GLI -> region-based nnU-Net raw dataset, and predictions back to release labels.

Labels, regions and channels of the converted dataset: conversion/brats_labels.py (BraTS 2023's labels 1 NCR, 2 ED,
3 ET). BraTS 2021's ET label 4 becomes 3; 2023 labels are kept as they are. Channels: T1 (2021 `t1`, 2023 `t1n`),
T1ce (`t1ce` / `t1c`), T2 (`t2` / `t2w`), FLAIR (`flair` / `t2f`).

Images are copied byte for byte, so their geometry is untouched; label maps are rewritten with the source header
(spacing, origin, direction, qform/sform) and only the voxel values and data type changed.
"""

import gzip
import os
import re
import shutil
from dataclasses import dataclass
from functools import partial

import numpy as np

from nnunetv2_hymunet.conversion.brats_labels import CHANNEL_NAMES, DATASET_LABELS, REGION_LABELS, REGIONS_CLASS_ORDER
from nnunetv2_hymunet.conversion.case_runner import Problem, describe_read_error, map_cases, raise_if_problems
from nnunetv2_hymunet.conversion.raw_dataset import AtomicDatasetFolder, write_dataset_json, write_source_record
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import AtomicFolder, check_output_path, check_replaceable


@dataclass(frozen=True)
class Release:
    year: str
    case_pattern: re.Pattern
    separator: str
    modalities: tuple[str, str, str, str]
    labels: tuple[int, ...]
    # release label -> dataset label, for the labels that change
    remap: dict

    def file_name(self, case_id: str, suffix: str) -> str:
        return f"{case_id}{self.separator}{suffix}.nii.gz"

    def find_file(self, folder: str, case_id: str, suffix: str) -> tuple[str | None, Problem | None]:
        """(path, None) for CASE_suffix.nii.gz or an uncompressed CASE_suffix.nii; (None, problem) when both exist."""
        gzipped = os.path.join(folder, self.file_name(case_id, suffix))
        plain = gzipped[: -len(".gz")]
        present = [p for p in (gzipped, plain) if os.path.isfile(p)]
        if len(present) == 2:
            return None, Problem(
                plain, f"both {os.path.basename(gzipped)} and {os.path.basename(plain)} exist; keep one"
            )
        return (present[0] if present else None), None


RELEASES = {
    "2021": Release("2021", re.compile(r"^BraTS2021_\d{5}$"), "_", ("t1", "t1ce", "t2", "flair"), (0, 1, 2, 4), {4: 3}),
    "2023": Release(
        "2023", re.compile(r"^BraTS-GLI-\d{5}-\d{3}$"), "-", ("t1n", "t1c", "t2w", "t2f"), (0, 1, 2, 3), {}
    ),
}


def _case_folders(input_dir: str, max_depth: int = 2) -> list[str]:
    """Folders named like a BraTS case, at the top of input_dir or up to `max_depth` levels below it."""
    found, level = [], [input_dir]
    for _ in range(max_depth):
        next_level = []
        for folder in level:
            for entry in sorted(os.listdir(folder)):
                path = os.path.join(folder, entry)
                if not os.path.isdir(path):
                    continue
                if any(r.case_pattern.match(entry) for r in RELEASES.values()):
                    found.append(path)
                else:
                    next_level.append(path)
        level = next_level
    return found


def detect_release(case_folders: list[str], input_dir: str) -> Release:
    years = {year for f in case_folders for year, r in RELEASES.items() if r.case_pattern.match(os.path.basename(f))}
    if not years:
        raise HyMUNetError(f"--input {input_dir}: no BraTS case folders found (BraTS2021_NNNNN or BraTS-GLI-NNNNN-NNN)")
    if len(years) > 1:
        raise HyMUNetError(f"--input {input_dir} mixes BraTS 2021 and 2023 case folders; convert them separately")
    return RELEASES[years.pop()]


def find_cases(input_dir: str, release_year: str | None) -> tuple[Release, list[tuple], dict, list[Problem]]:
    if not os.path.isdir(input_dir):
        raise HyMUNetError(f"--input {input_dir} is not a folder")
    folders = _case_folders(input_dir)
    release = detect_release(folders, input_dir)
    if release_year is not None and release_year != release.year:
        raise HyMUNetError(
            f"--release {release_year} given, but the case folders in {input_dir} follow the "
            f"BraTS {release.year} naming"
        )
    cases, problems, seen = [], [], {}
    training, test = [], []
    for folder in folders:
        case_id = os.path.basename(folder)
        if not release.case_pattern.match(case_id):
            continue
        if case_id in seen:
            problems.append(Problem(folder, f"case {case_id} also exists at {seen[case_id]}"))
            continue
        seen[case_id] = folder
        found = [release.find_file(folder, case_id, m) for m in release.modalities + ("seg",)]
        ambiguous = [problem for _, problem in found if problem is not None]
        problems += ambiguous
        images = [path for path, _ in found[:4]]
        for modality, path in zip(release.modalities, images):
            if path is None and not ambiguous:
                problems.append(
                    Problem(
                        os.path.join(folder, release.file_name(case_id, modality)),
                        "missing modality file (.nii.gz or .nii)",
                    )
                )
        if ambiguous or None in images:
            continue
        seg = found[4][0]
        labelled = seg is not None
        if not labelled:
            stray = _segmentation_lookalikes(folder, images)
            if stray:
                problems.append(
                    Problem(
                        stray[0],
                        f"looks like a segmentation but is not named "
                        f"{release.file_name(case_id, 'seg')} (or .nii); rename it, or "
                        "remove it to convert the case as unlabelled",
                    )
                )
                continue
        (training if labelled else test).append(case_id)
        image_folder = "imagesTr" if labelled else "imagesTs"
        cases.append(
            (
                images,
                seg if labelled else None,
                [os.path.join(image_folder, f"{case_id}_{c:04d}.nii.gz") for c in range(4)],
                os.path.join("labelsTr", f"{case_id}.nii.gz") if labelled else None,
            )
        )
    record = {
        "training": {"images": "imagesTr", "labels": "labelsTr", "cases": sorted(training)},
        "validation (no labels)": {"images": "imagesTs", "labels": None, "cases": sorted(test)},
    }
    return release, cases, record, problems


def _segmentation_lookalikes(folder: str, images: list[str]) -> list[str]:
    """Files of a case folder without a proper seg file whose name says 'seg' (e.g. _seg.mha, _Seg.nii.gz)."""
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if "seg" in f.lower() and os.path.join(folder, f) not in images
    )


def _copy_as_nii_gz(source: str, target: str) -> None:
    """Byte-for-byte copy of a .nii.gz; an uncompressed .nii is gzipped on the way (same header, same geometry)."""
    if source.endswith(".gz"):
        shutil.copyfile(source, target)
        return
    with open(source, "rb") as f_in, open(target, "wb") as f_out:
        with gzip.GzipFile(filename="", mode="wb", fileobj=f_out, mtime=0, compresslevel=1) as gz:
            shutil.copyfileobj(f_in, gz, length=1 << 20)


def _geometry_problem(path: str, reference_path: str, image, reference) -> str | None:
    if image.shape != reference.shape:
        return f"shape {image.shape} differs from {reference.shape} of {reference_path}"
    if not np.allclose(image.affine, reference.affine, atol=1e-4):
        return f"geometry (affine) differs from {reference_path}"
    return None


def _load_volume(path: str, problems: list[Problem]):
    """(nibabel image, voxel array) after a full decode, or (None, None) with the reason added to problems."""
    import nibabel

    try:
        image = nibabel.load(path)
        data = np.asanyarray(image.dataobj)
    except Exception as e:  # nibabel raises many types (ImageFileError, EOFError, zlib/gzip errors, ValueError)
        problems.append(describe_read_error(path, e))
        return None, None
    if data.ndim != 3:
        problems.append(Problem(path, f"expected a 3-D volume, got shape {data.shape}"))
        return None, None
    return image, data


def _save_labels_like(labels: np.ndarray, source_image, path: str) -> None:
    """Write a uint8 label map with the source file's header, so its geometry stays exactly the same."""
    import nibabel

    header = source_image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    nibabel.save(nibabel.Nifti1Image(labels.astype(np.uint8), source_image.affine, header), path)


def _remap(labels: np.ndarray, mapping: dict) -> np.ndarray:
    out = labels.astype(np.uint8, copy=True)
    for source, target in mapping.items():
        out[labels == source] = target
    return out


def _unexpected_labels(data: np.ndarray, allowed) -> list:
    if np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        return ["NaN/inf"]
    values = np.unique(data)
    return [v.item() for v in values if v not in allowed]


def convert_case(case: tuple, output_dir: str, release: Release) -> list[Problem]:
    images, seg_path, images_out, seg_out = case
    problems: list[Problem] = []
    loaded = [(p, *_load_volume(p, problems)) for p in images + ([seg_path] if seg_path else [])]
    readable = [(p, img) for p, img, _ in loaded if img is not None]
    for path, image in readable[1:]:
        message = _geometry_problem(path, readable[0][0], image, readable[0][1])
        if message:
            problems.append(Problem(path, message))
    seg_data = loaded[-1][2] if seg_path else None
    if seg_data is not None:
        unexpected = _unexpected_labels(seg_data, release.labels)
        if unexpected:
            problems.append(
                Problem(
                    seg_path,
                    f"labels must be within {list(release.labels)} (BraTS {release.year}), "
                    f"found also {unexpected[:10]}",
                )
            )
    if problems:
        return problems
    for source, target in zip(images, images_out):
        _copy_as_nii_gz(source, os.path.join(output_dir, target))
    if seg_path:
        _save_labels_like(_remap(seg_data, release.remap), loaded[-1][1], os.path.join(output_dir, seg_out))
    return []


def convert_brats(
    input_dir: str,
    output_root: str,
    dataset_id: int,
    name: str | None = None,
    overwrite: bool = False,
    num_workers: int = 1,
    release_year: str | None = None,
) -> str:
    """Convert a BraTS 2021 or 2023 GLI release (auto-detected from the case folder names)."""
    release, cases, record, problems = find_cases(input_dir, release_year)
    name = name or f"BraTS{release.year}"
    atomic = AtomicDatasetFolder(output_root, dataset_id, name, overwrite, inputs={"--input": input_dir})
    with atomic as temp:
        for folder in sorted({os.path.dirname(p) for c in cases for p in c[2] + [c[3]] if p is not None}):
            os.makedirs(os.path.join(temp, folder), exist_ok=True)
        results = map_cases(
            partial(convert_case, output_dir=temp, release=release), cases, num_workers, f"BraTS {release.year}"
        )
        raise_if_problems(problems + [p for r in results for p in r], f"the BraTS {release.year} input {input_dir}")
        os.makedirs(os.path.join(temp, "labelsTr"), exist_ok=True)
        write_dataset_json(
            temp,
            CHANNEL_NAMES,
            REGION_LABELS,
            len(record["training"]["cases"]),
            ".nii.gz",
            regions_class_order=REGIONS_CLASS_ORDER,
            dataset_name=atomic.folder_name,
            description=f"BraTS {release.year} glioma segmentation, region-based (labels: 1 NCR, 2 ED, 3 ET)",
            reference="https://www.synapse.org/brats",
            license="see the BraTS release terms",
            converted_by=f"hymunet convert brats (release {release.year})",
            brats_release=release.year,
            release_label_map={str(k): v for k, v in release.remap.items()},
        )
        write_source_record(temp, "brats", input_dir, record, release=release.year)
    unlabelled = record["validation (no labels)"]["cases"]
    if unlabelled:
        print(
            f"note: {len(unlabelled)} case(s) without a segmentation went to imagesTs as unlabelled test cases: "
            f"{', '.join(unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''}"
        )
    return atomic.target


def find_predictions(pred_dir: str) -> list[str]:
    """The label maps nnU-Net wrote (`*.nii.gz`); its json files and .npz probabilities are skipped."""
    if not os.path.isdir(pred_dir):
        raise HyMUNetError(f"--input {pred_dir} is not a folder")
    files = sorted(os.path.join(pred_dir, f) for f in os.listdir(pred_dir) if f.endswith(".nii.gz"))
    if not files:
        raise HyMUNetError(f"--input {pred_dir} contains no .nii.gz predictions")
    return files


def convert_prediction_back(case: tuple, release: Release) -> list[Problem]:
    source, target = case
    problems: list[Problem] = []
    image, data = _load_volume(source, problems)
    if data is not None:
        unexpected = _unexpected_labels(data, DATASET_LABELS)
        if unexpected:
            problems.append(
                Problem(
                    source, f"prediction labels must be within {list(DATASET_LABELS)}, found also {unexpected[:10]}"
                )
            )
    if problems:
        return problems
    back = {dataset_label: release_label for release_label, dataset_label in release.remap.items()}
    _save_labels_like(_remap(data, back), image, target)
    return []


def convert_brats_back(
    pred_dir: str, output_dir: str, release_year: str, overwrite: bool = False, num_workers: int = 1
) -> str:
    """Map nnU-Net predictions (1 NCR, 2 ED, 3 ET) back to the release's label values, same file names."""
    if release_year not in RELEASES:
        raise HyMUNetError(f"--release must be one of {', '.join(RELEASES)}, got {release_year!r}")
    release = RELEASES[release_year]
    sources = find_predictions(pred_dir)
    inputs = {"--input": pred_dir}
    output_dir = check_output_path(output_dir, "--output", inputs)
    check_replaceable(output_dir, "--output", inputs, overwrite)
    with AtomicFolder(output_dir, "convert brats-back") as temp:
        cases = [(s, os.path.join(temp, os.path.basename(s))) for s in sources]
        results = map_cases(
            partial(convert_prediction_back, release=release), cases, num_workers, f"BraTS {release.year} labels"
        )
        raise_if_problems([p for r in results for p in r], f"the predictions in {pred_dir}")
    return output_dir
