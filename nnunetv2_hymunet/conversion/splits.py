"""Fixed cross-validation splits supplied by the user, written as nnU-Net's `splits_final.json`.

Accepted formats (chosen by the file ending):
- `.json`: nnU-Net's own splits_final.json format, a list of folds, each `{"train": [ids], "val": [ids]}`.
  Every fold must partition the training cases: train and val disjoint, together all training cases.
- anything else (`.csv`, `.txt`, `.tsv`): one case per line, `id,fold` (comma, tab or spaces between them), folds
  numbered 0..K-1. Blank lines, `#` comments and a header line (`id,fold`) are skipped. Every training case must
  appear exactly once.
Ids are case identifiers as written in imagesTr (for ISIC: `ISIC_0000000`); a bare 7-digit ISIC number is accepted
too and prefixed with `ISIC_` when `id_prefix` is given.
"""

import json
import os
import re

from nnunetv2_hymunet.errors import HyMUNetError

_SEPARATORS = re.compile(r"[,\t; ]+")


def _normalise_id(raw: str, id_prefix: str | None) -> str:
    raw = raw.strip().strip('"').strip("'")
    if id_prefix and raw.isdigit():
        return f"{id_prefix}{raw}"
    return raw


def _read_text(path: str) -> str:
    """The file as text; a UTF-8 byte-order mark (Excel's "CSV UTF-8") is dropped, a binary file is an error."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise HyMUNetError(f"--split-file {path} is not a UTF-8 text file (a binary file?)") from None
    except OSError as e:
        raise HyMUNetError(f"--split-file {path} cannot be read: {e.strerror or e}") from None
    if "\x00" in text:
        raise HyMUNetError(f"--split-file {path} is not a text file (it contains NUL bytes)")
    return text


def _folds_from_table(path: str, id_prefix: str | None) -> tuple[dict[str, int], list[str]]:
    assignment: dict[str, int] = {}
    problems = []
    for line_number, line in enumerate(_read_text(path).splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        fields = [x for x in _SEPARATORS.split(line) if x]
        if len(fields) != 2:
            problems.append(f"line {line_number}: expected 'id,fold', got {line!r}")
            continue
        case_id, fold = _normalise_id(fields[0], id_prefix), fields[1].strip().strip('"')
        if not fold.lstrip("-").isdigit():
            if not assignment and not problems:  # a header line
                continue
            problems.append(f"line {line_number}: fold {fold!r} is not an integer")
            continue
        if case_id in assignment:
            problems.append(f"line {line_number}: {case_id} is listed twice")
            continue
        assignment[case_id] = int(fold)
    return assignment, problems


def _folds_from_json(path: str, id_prefix: str | None) -> tuple[list[dict], list[str]]:
    try:
        content = json.loads(_read_text(path))
    except ValueError as e:
        raise HyMUNetError(f"--split-file {path} cannot be read as JSON ({e})") from None
    if not isinstance(content, list) or not all(
        isinstance(fold, dict) and isinstance(fold.get("train"), list) and isinstance(fold.get("val"), list)
        for fold in content
    ):
        raise HyMUNetError(f'--split-file {path}: expected a JSON list of {{"train": [...], "val": [...]}} folds')
    folds = [
        {key: [_normalise_id(str(i), id_prefix) for i in fold[key]] for key in ("train", "val")} for fold in content
    ]
    return folds, []


def read_split_file(path: str, training_ids: list[str], id_prefix: str | None = None) -> list[dict]:
    """Parse and check a split file against the converted training cases; returns nnU-Net folds (sorted ids)."""
    if not os.path.exists(path):
        raise HyMUNetError(f"--split-file {path} does not exist")
    if not os.path.isfile(path):
        raise HyMUNetError(f"--split-file {path} is not a file")
    known = set(training_ids)
    if path.lower().endswith(".json"):
        folds, problems = _folds_from_json(path, id_prefix)
        for index, fold in enumerate(folds):
            train, val = set(fold["train"]), set(fold["val"])
            if train & val:
                problems.append(
                    f"fold {index}: {len(train & val)} case(s) in both train and val, e.g. {sorted(train & val)[0]}"
                )
            if (train | val) != known:
                missing, unknown = known - train - val, (train | val) - known
                if missing:
                    problems.append(f"fold {index}: {len(missing)} training case(s) missing, e.g. {sorted(missing)[0]}")
                if unknown:
                    problems.append(
                        f"fold {index}: {len(unknown)} id(s) not among the training cases, e.g. {sorted(unknown)[0]}"
                    )
        val_counts: dict[str, int] = {}
        for fold in folds:
            for case_id in fold["val"]:
                val_counts[case_id] = val_counts.get(case_id, 0) + 1
        repeated = sorted(i for i, n in val_counts.items() if n > 1)
        if repeated:
            problems.append(f"{len(repeated)} case(s) are in more than one val set, e.g. {repeated[0]}")
    else:
        assignment, problems = _folds_from_table(path, id_prefix)
        unknown = sorted(set(assignment) - known)
        missing = sorted(known - set(assignment))
        if unknown:
            problems.append(f"{len(unknown)} id(s) not among the training cases: {', '.join(unknown[:10])}")
        if missing:
            problems.append(f"{len(missing)} training case(s) have no fold: {', '.join(missing[:10])}")
        fold_numbers = sorted(set(assignment.values()))
        if fold_numbers and fold_numbers != list(range(len(fold_numbers))):
            problems.append(f"folds must be numbered 0..K-1 without gaps, got {fold_numbers}")
        folds = [
            {
                "train": sorted(i for i, f in assignment.items() if f != k),
                "val": sorted(i for i, f in assignment.items() if f == k),
            }
            for k in fold_numbers
        ]
    if not problems and len(folds) < 2:
        problems.append(f"need at least 2 folds, got {len(folds)}")
    if problems:
        raise HyMUNetError(
            f"--split-file {path} does not match the training cases:\n" + "\n".join(f"  {p}" for p in problems)
        )
    return [{"train": sorted(fold["train"]), "val": sorted(fold["val"])} for fold in folds]


def splits_destination(folder_name: str, raw_target: str) -> tuple[str, bool]:
    """(path, in_preprocessed): $nnUNet_preprocessed/DatasetNNN_NAME/ when that is set, else the raw dataset."""
    preprocessed = os.environ.get("nnUNet_preprocessed")
    if preprocessed:
        return os.path.join(os.path.abspath(preprocessed), folder_name, "splits_final.json"), True
    return os.path.join(raw_target, "splits_final.json"), False
