"""All-or-nothing output folders: every file is written into a temporary folder beside the target first, and only
moved into place once all of them were written, so a failed run never leaves a half-written result."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Callable


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_output_folder(out_dir: str, writers: dict[str, Callable[[str], None]]) -> list[str]:
    """Call writers[relative_path](absolute_temp_path) for every file, then move them into out_dir.

    A new out_dir appears in one rename. In an existing out_dir only the named files are replaced (one atomic
    os.replace each); other files in it are left alone, so pointing -o at a prediction folder deletes nothing.
    Returns the final paths.
    """
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        for rel in writers:
            target = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            writers[rel](target)
        if not os.path.exists(out_dir):
            os.rename(tmp, out_dir)
            tmp = None
        else:
            for rel in writers:
                os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
                os.replace(os.path.join(tmp, rel), os.path.join(out_dir, rel))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out_dir, rel) for rel in writers]
