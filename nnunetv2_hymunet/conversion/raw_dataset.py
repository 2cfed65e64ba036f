"""Where a converted dataset goes and how it gets there atomically.

The dataset is built in a hidden temporary folder beside the target (same file system) and renamed into place only
after every case converted cleanly, so a failed or interrupted run never leaves a `DatasetNNN_*` folder behind. An
existing dataset with the same id is replaced only when the user asked for it.
"""

import os
import re
import shutil
import tempfile
from glob import glob

from batchgenerators.utilities.file_and_folder_operations import save_json

from nnunetv2_hymunet.errors import HyMUNetError

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")


def resolve_output_root(output: str | None) -> str:
    """--output if given, else $nnUNet_raw; a clear error when neither is set."""
    root = output or os.environ.get("nnUNet_raw")
    if not root:
        raise HyMUNetError("no output folder: pass --output NNUNET_RAW or set the nnUNet_raw environment variable")
    if os.path.exists(root) and not os.path.isdir(root):
        raise HyMUNetError(f"output {root} exists and is not a folder")
    return os.path.abspath(root)


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise HyMUNetError(f"--dataset-id must be between 1 and 999 (nnU-Net's DatasetNNN), got {dataset_id}")
    if not _NAME_PATTERN.match(name):
        raise HyMUNetError(f"--name {name!r} must contain only letters, digits, '_' and '-' (and start with one)")
    return f"Dataset{dataset_id:03d}_{name}"


def existing_datasets_with_id(root: str, dataset_id: int) -> list[str]:
    """Folders nnU-Net would resolve for this id (any name), excluding our own hidden temporary folders."""
    return sorted(p for p in glob(os.path.join(root, f"Dataset{dataset_id:03d}_*")) if os.path.isdir(p))


class AtomicDatasetFolder:
    """Context manager: yields a temporary folder to fill; on clean exit it becomes `root/DatasetNNN_NAME`.

    Any exception (including a `HyMUNetError` for bad input, or Ctrl-C) removes the temporary folder, and the root
    too when this run created it and it is still empty.
    """

    def __init__(self, root: str, dataset_id: int, name: str, overwrite: bool):
        self.root = root
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.target = os.path.join(root, self.folder_name)
        self.existing = existing_datasets_with_id(root, dataset_id) if os.path.isdir(root) else []
        if self.existing and not overwrite:
            names = ", ".join(os.path.basename(p) for p in self.existing)
            raise HyMUNetError(
                f"dataset id {dataset_id} already exists in {root} ({names}); pass --overwrite to replace it"
            )
        self._created_root = False
        self.temp = None

    def __enter__(self) -> str:
        if not os.path.isdir(self.root):
            os.makedirs(self.root)
            self._created_root = True
        self.temp = tempfile.mkdtemp(prefix=f".{self.folder_name}.partial-", dir=self.root)
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            if self._created_root and not os.listdir(self.root):
                os.rmdir(self.root)
            return False
        os.chmod(self.temp, 0o755)  # mkdtemp makes it 0700
        # move replaced datasets aside first so the new one is in place before anything is deleted
        trash = [tempfile.mkdtemp(prefix=f".{os.path.basename(p)}.replaced-", dir=self.root) for p in self.existing]
        for old, bin_folder in zip(self.existing, trash):
            os.replace(old, os.path.join(bin_folder, "old"))
        os.replace(self.temp, self.target)
        for bin_folder in trash:
            shutil.rmtree(bin_folder, ignore_errors=True)
        return False


def write_dataset_json(folder: str, channel_names: dict, labels: dict, num_training: int, file_ending: str,
                       regions_class_order=None, **extra) -> None:
    """dataset.json through nnU-Net's own generator (keeps the label key order, which regions depend on)."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(folder, dict(channel_names), dict(labels), num_training, file_ending,
                          regions_class_order=regions_class_order, **extra)


def write_source_record(folder: str, converter: str, input_dir: str, splits: dict, **options) -> None:
    """`source_splits.json`: which original split (and file) every converted case came from."""
    save_json({"converter": converter, "input": os.path.abspath(input_dir), "options": options, "splits": splits},
              os.path.join(folder, "source_splits.json"), sort_keys=False)
