"""Running nnU-Net from this package: one helper each, shared by the CLI, the demo, the benchmark and the tests.

- `find_executable`: an nnU-Net console script of this environment.
- `run_logged`: run a command with its whole output in a log file; a failure raises, quoting the log's tail.
- `read_schedule`: short training schedules from environment variables (the demo and benchmark trainers).
- `resolve_dataset` / `dataset_id` / `parse_new_dataset`: what `-d` means (nnU-Net's name-or-id).

Light on purpose (no torch, no nnunetv2 at import): trainers read their schedule through it when they start.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable, Mapping

from nnunetv2_hymunet.errors import HyMUNetError

_DATASET_NAME = re.compile(r"^Dataset(?P<id>\d{3})_(?P<name>[A-Za-z0-9][A-Za-z0-9_\-]*)$")


# ---------------------------------------------------------------- commands


def find_executable(name: str) -> str:
    """The console script `name` of the environment running this interpreter (next to it), else from PATH."""
    if os.path.isabs(name):
        return name
    beside = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    if not found:
        raise HyMUNetError(
            f"{name} not found next to {sys.executable} nor on PATH: is nnunetv2 installed in this environment?"
        )
    return found


def shell_line(command: list, env: Mapping[str, str] | None = None) -> str:
    """The command (with the variables it sets) as a line one can paste into a shell."""
    prefix = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (env or {}).items())
    return (prefix + " " if prefix else "") + " ".join(shlex.quote(str(c)) for c in command)


def run_logged(
    command: list,
    log_path: str,
    env: Mapping[str, str] | None = None,
    *,
    append: bool = False,
    on_line: Callable[[str], None] | None = None,
    title: str | None = None,
    timeout: float | None = None,
) -> float:
    """Run `command` (command[0] found with `find_executable`) with stdout and stderr in `log_path`; the seconds it
    took. `env` is the child's whole environment (default: this one). `append` adds to the log under a `$ command`
    line with the variables `env` changes (a log of several commands). `on_line` sees every output
    line as it comes. A non-zero exit or `timeout` raises a HyMUNetError naming the log and quoting its last lines;
    Ctrl-C or SIGTERM stops the child too."""
    command = [find_executable(str(command[0])), *map(str, command[1:])]
    folder = os.path.dirname(os.path.abspath(log_path))
    os.makedirs(folder, exist_ok=True)
    title = title or os.path.basename(command[0])
    tail = deque(maxlen=15)
    started = time.monotonic()
    timed_out = threading.Event()
    with open(log_path, "a" if append else "w") as log:
        if append:
            changed = {k: v for k, v in (env or {}).items() if os.environ.get(k) != v}
            log.write(f"\n$ {shell_line(command, changed)}\n")
            log.flush()
        with subprocess.Popen(
            command,
            env=None if env is None else dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        ) as process:
            watchdog = None
            if timeout is not None:
                watchdog = threading.Timer(timeout, lambda: (timed_out.set(), process.kill()))
                watchdog.start()
            try:
                for line in process.stdout:
                    log.write(line)
                    tail.append(line.rstrip("\n"))
                    if on_line is not None:
                        on_line(line)
            except BaseException:  # Ctrl-C / SIGTERM: stop the child too (leaving Popen would wait for it)
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                raise
            finally:
                if watchdog is not None:
                    watchdog.cancel()
            code = process.wait()
    seconds = time.monotonic() - started
    if timed_out.is_set():
        raise HyMUNetError(
            f"{title} timed out after {timeout:.0f} s; full output in {log_path}; last lines:\n" + "\n".join(tail)
        )
    if code != 0:
        raise HyMUNetError(
            f"{title} failed (exit code {code}) after {seconds:.0f} s; full output in {log_path}; "
            "last lines:\n" + "\n".join(tail)
        )
    return seconds


# ---------------------------------------------------------------- schedules from the environment


def read_schedule(mapping: Mapping[str, str], environ: Mapping[str, str] = os.environ) -> dict:
    """{trainer attribute: value} for each variable of `mapping` ({variable: attribute}) that is set in `environ`
    (empty counts as unset); anything but a positive integer raises, naming the variable."""
    schedule = {}
    for variable, attribute in mapping.items():
        text = str(environ.get(variable, "")).strip()
        if not text:
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise HyMUNetError(
                f"environment variable {variable}={text!r}: expected a positive integer "
                f"(it sets the trainer's {attribute})"
            )
        schedule[attribute] = value
    return schedule


# ---------------------------------------------------------------- datasets


def resolve_dataset(dataset, flag: str = "-d") -> str:
    """DatasetNNN_Name for a name or an id, as nnU-Net resolves `-d` (nnUNet_raw, _preprocessed, _results)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(str(dataset).strip())
    except (RuntimeError, ValueError) as e:  # nnU-Net's message goes on to list the environment over many lines
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HyMUNetError(
            f"{flag} {dataset}: no such dataset in nnUNet_raw / nnUNet_preprocessed / nnUNet_results ({first})"
        ) from None


def dataset_id(dataset_name: str) -> int:
    """The id of a DatasetNNN_Name folder name."""
    match = _DATASET_NAME.match(os.path.basename(str(dataset_name)))
    if not match:
        raise HyMUNetError(f"{dataset_name!r} is not an nnU-Net dataset name (DatasetNNN_Name)")
    return int(match.group("id"))


def parse_new_dataset(text: str, flag: str = "-d") -> tuple[int, str | None]:
    """(id, name or None) for the dataset a command creates: `501` or `Dataset501_ISIC2018`. The id is 1..999."""
    text = str(text).strip()
    match = _DATASET_NAME.match(text)
    if match:
        number, name = int(match.group("id")), match.group("name")
    elif re.fullmatch(r"\d{1,3}", text):
        number, name = int(text), None
    else:
        raise HyMUNetError(f"{flag} {text!r}: expected a dataset id (1..999) or a name DatasetNNN_Name")
    if not 1 <= number <= 999:
        raise HyMUNetError(f"{flag} {text!r}: the dataset id must be between 1 and 999 (nnU-Net's DatasetNNN)")
    return number, name
