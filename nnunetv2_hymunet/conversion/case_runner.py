"""Run one conversion function per case, serially or in worker processes, and collect every input problem.

A case function reads its inputs, validates them and writes its outputs (into the temporary dataset folder) in one
pass, so each file is read once. It returns a list of `Problem`s instead of raising, so that one run reports every bad
file rather than the first.
"""

import multiprocessing
import os
from typing import Callable, Iterable, NamedTuple, Sequence

from tqdm import tqdm

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.fs_safety import default_signals_in_worker


class Problem(NamedTuple):
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def unpaired_problems(files: dict, partners: dict, missing_partner: Callable[[str], str]) -> list[Problem]:
    """A Problem for each file in `files` whose key is not in `partners`; `missing_partner(key)` names the gap."""
    return [Problem(files[key], missing_partner(key)) for key in sorted(set(files) - set(partners))]


def map_cases(case_function: Callable, cases: Sequence, num_workers: int, description: str) -> list[list[Problem]]:
    """Apply `case_function` to every case (in order) with a progress bar; return each case's problems.

    Results come back in input order and every case writes only its own files, so the output does not depend on
    `num_workers`.
    """
    if num_workers < 1:
        raise HyMUNetError(f"-np/--num-processes must be at least 1, got {num_workers}")
    num_workers = min(num_workers, max(1, len(cases)))
    progress = dict(total=len(cases), desc=description, unit="case", leave=False)
    if num_workers == 1:
        return [case_function(case) for case in tqdm(cases, **progress)]
    # workers leave SIGTERM to the parent, which stops them and removes the temporary folder
    with multiprocessing.Pool(num_workers, initializer=default_signals_in_worker) as pool:
        return list(tqdm(pool.imap(case_function, cases, chunksize=1), **progress))


def raise_if_problems(problems: Iterable[Problem], what: str) -> None:
    """Stop with one error that lists every problem, one file per line, sorted by path."""
    problems = sorted(set(problems))
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise HyMUNetError(f"{len(problems)} problem(s) in {what}; nothing was written:\n{lines}")


def describe_read_error(path: str, error: BaseException) -> Problem:
    """A uniform message for a file that exists but cannot be decoded."""
    reason = str(error).strip() or type(error).__name__
    return Problem(path, f"cannot be read ({type(error).__name__}: {reason})")


def relative_to(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:  # different drives on Windows
        return path
