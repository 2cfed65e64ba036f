"""All-or-nothing output folders for `evaluate` and `compare` (fs_safety.write_files_into): every file is written into
a temporary folder first and moved into place only once all of them were written, so a failed or interrupted run never
leaves a half-written result; an existing folder keeps its other files, and a file hymunet did not write is never
replaced."""

from __future__ import annotations

import json
from typing import Callable, Mapping

from nnunetv2_hymunet.fs_safety import write_files_into


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_output_folder(
    out_dir: str,
    writers: dict[str, Callable[[str], None]],
    command: str = "evaluate",
    inputs: Mapping[str, str | None] | None = None,
) -> list[str]:
    """Call writers[relative_path](absolute_temp_path) for every file, then move them into out_dir (-o); returns the
    final paths. `inputs` ({flag: folder}) may not be out_dir or lie inside it."""
    return write_files_into(out_dir, writers, command, flag="-o", inputs=inputs)
