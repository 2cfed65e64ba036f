"""Where a converted dataset goes and how it gets there atomically.

The dataset is built in a hidden temporary folder beside the target (same file system) and renamed into place only
after every case converted cleanly, so a failed or interrupted run never leaves a `DatasetNNN_*` folder behind
(fs_safety.AtomicFolder). An existing dataset with the same id is replaced only when the user asked for it and
hymunet wrote it.
"""

import json
import os
import re
from glob import glob

from batchgenerators.utilities.file_and_folder_operations import save_json

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import AtomicFolder, check_output_path, check_replaceable, remove_stale_partials

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def resolve_output_root(output: str | None, inputs: dict | None = None) -> str:
    """--output if given, else $nnUNet_raw; a clear error when neither is set or it cannot be written."""
    root = output or os.environ.get("nnUNet_raw")
    if not root:
        raise HyMUNetError("no output folder: pass --output NNUNET_RAW or set the nnUNet_raw environment variable")
    flag = "--output" if output else "$nnUNet_raw"
    root = check_output_path(root, flag)
    if inputs:  # the root may hold the input (a release unpacked into nnUNet_raw) but not be it
        for input_flag, input_path in inputs.items():
            if input_path is not None and os.path.realpath(root) == os.path.realpath(input_path):
                raise HyMUNetError(f"{flag} {root} is the input {input_flag}; choose another output folder")
    return root


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise HyMUNetError(f"-d {dataset_id}: the dataset id must be between 1 and 999 (nnU-Net's DatasetNNN)")
    if not _NAME_PATTERN.match(name):
        raise HyMUNetError(f"--name {name!r} must contain only letters, digits, '_' and '-' (and start with one)")
    return f"Dataset{dataset_id:03d}_{name}"


def existing_datasets_with_id(root: str, dataset_id: int) -> list[str]:
    """Folders nnU-Net would resolve for this id (any name), excluding our own hidden temporary folders."""
    return sorted(p for p in glob(os.path.join(root, f"Dataset{dataset_id:03d}_*")) if os.path.isdir(p))


def is_converted_dataset(folder: str) -> bool:
    """A dataset an earlier hymunet version converted (before the output marker existed)."""
    try:
        with open(os.path.join(folder, "dataset.json")) as f:
            return str(json.load(f).get("converted_by", "")).startswith("hymunet ")
    except (OSError, ValueError, AttributeError):
        return False


class AtomicDatasetFolder(AtomicFolder):
    """Context manager: yields a temporary folder to fill; on clean exit it becomes `root/DatasetNNN_NAME`.

    An existing dataset with the same id (any name) is replaced only with `overwrite`, only when hymunet wrote it, and
    never when it is or holds one of `inputs` ({flag: path}). Any exception (a `HyMUNetError` for bad input, Ctrl-C,
    SIGTERM) removes the temporary folder, and the root too when this run created it.
    """

    def __init__(
        self,
        root: str,
        dataset_id: int,
        name: str,
        overwrite: bool,
        inputs: dict | None = None,
        command: str = "convert",
    ):
        self.root = root
        self.folder_name = dataset_folder_name(dataset_id, name)
        if os.path.isdir(root):
            remove_stale_partials(root)  # may restore a dataset a killed run had moved aside
        existing = existing_datasets_with_id(root, dataset_id) if os.path.isdir(root) else []
        if existing and not overwrite:
            names = ", ".join(os.path.basename(p) for p in existing)
            raise HyMUNetError(
                f"dataset id {dataset_id} already exists in {root} ({names}); pass --overwrite to replace it"
            )
        for folder in existing:
            check_replaceable(folder, "--overwrite", inputs or {}, overwrite, recognise=is_converted_dataset)
        super().__init__(os.path.join(root, self.folder_name), command, replaces=existing)
        self.existing = existing


def write_dataset_json(
    folder: str,
    channel_names: dict,
    labels: dict,
    num_training: int,
    file_ending: str,
    regions_class_order=None,
    **extra,
) -> None:
    """dataset.json through nnU-Net's own generator (keeps the label key order, which regions depend on)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        folder,
        dict(channel_names),
        dict(labels),
        num_training,
        file_ending,
        regions_class_order=regions_class_order,
        **extra,
    )


def write_source_record(folder: str, converter: str, input_dir: str, splits: dict, **options) -> None:
    """`source_splits.json`: which original split (and file) every converted case came from."""
    save_json(
        {"converter": converter, "input": os.path.abspath(input_dir), "options": options, "splits": splits},
        os.path.join(folder, "source_splits.json"),
        sort_keys=False,
    )
