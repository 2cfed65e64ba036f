"""Safe writing for every command that writes: one output guard, atomic files and folders, clean interrupts.

- `check_output_path`: an output must be creatable (its nearest existing ancestor a writable folder) and must not be,
  or contain, one of the command's inputs.
- `check_replaceable`: what a command replaces must not be or contain an input, and must have been written by this
  tool (it holds the marker file `.hymunet-output`, written into every folder committed here), unless it is empty.
- `AtomicFolder`: build a folder under a hidden `.NAME.partial-*` name beside the target and rename it into place on
  success; what it replaces is moved aside first and removed only after the rename, so a failure at any point leaves
  either the old or the new folder. A partial folder records its owner (host, pid, process start time); partial
  folders whose owner is gone (SIGKILL, power loss) are removed by the next run that writes beside them.
- `atomic_write_bytes` / `atomic_write_text` / `atomic_path`: the same for single files.
- `terminate_as_exception`: SIGTERM (what SLURM sends at a time limit) and SIGHUP raise `Terminated`, so the clean-up
  above runs as it does for Ctrl-C.
Files and folders get the permissions the umask allows (mkstemp/mkdtemp would make them 0600/0700), so shared group
folders keep working.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
from typing import Callable, Iterable, Mapping

from nnunetv2_hymunet.errors import HyMUNetError

MARKER = ".hymunet-output"
OWNER_FILE = ".hymunet-owner"
PARTIAL_TAG = ".partial-"
REPLACED_TAG = ".replaced-"


# ---------------------------------------------------------------- permissions


def current_umask() -> int:
    try:  # Linux >= 4.7: read without changing it (os.umask is process-wide, not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_default_permissions(path: str) -> None:
    """What open()/mkdir() would have given: 0666 / 0777 minus the umask."""
    mode = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, mode & ~current_umask())


# ---------------------------------------------------------------- guards


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _is_same_or_ancestor(path: str, other: str) -> bool:
    """True when `path` is `other` or a folder above it (symlinks resolved)."""
    path, other = _real(path), _real(other)
    return other == path or other.startswith(path.rstrip(os.sep) + os.sep)


def check_not_input(path: str, inputs: Mapping[str, str | None], flag: str) -> None:
    """Refuse an output that is, or contains, one of the inputs ({flag: path})."""
    for input_flag, input_path in inputs.items():
        if input_path is None:
            continue
        if _real(path) == _real(input_path):
            raise HyMUNetError(f"{flag} {path} is the input {input_flag} {input_path}; choose another output folder")
        if _is_same_or_ancestor(path, input_path):
            raise HyMUNetError(
                f"{flag} {path} contains the input {input_flag} {input_path}; choose an output folder "
                "that does not hold the input"
            )


def check_output_path(
    path: str, flag: str, inputs: Mapping[str, str | None] = None, must_be_folder: bool = True
) -> str:
    """The absolute output path, after checking that it can be created or written and holds no input."""
    if not path or not str(path).strip():
        raise HyMUNetError(f"{flag}: empty path")
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.lexists(path) and must_be_folder and not os.path.isdir(path):
        raise HyMUNetError(f"{flag} {path} exists and is not a folder")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise HyMUNetError(f"{flag} {path} cannot be created: {existing} is a file, not a folder")
    try:  # a real write test: permissions, read-only mounts and pseudo file systems (/proc, /sys) alike
        os.rmdir(tempfile.mkdtemp(prefix=".hymunet-write-test-", dir=existing))
    except OSError as e:
        raise HyMUNetError(f"{flag} {path}: cannot write in {existing} ({e.strerror or e})") from None
    check_not_input(path, inputs or {}, flag)
    for folder in (os.path.dirname(path), path):  # before anyone looks at what exists there
        if os.path.isdir(folder):
            remove_stale_partials(folder)
    return path


def read_marker(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_tool_output(path: str, recognise: Callable[[str], bool] | None = None) -> bool:
    """True for a folder this tool wrote as a whole (its marker says so, or `recognise` accepts an older output)."""
    marker = read_marker(path)
    return bool(marker and marker.get("whole_folder") is True) or bool(recognise and recognise(path))


def check_replaceable(
    path: str,
    flag: str,
    inputs: Mapping[str, str | None],
    overwrite: bool,
    recognise: Callable[[str], bool] | None = None,
) -> None:
    """Refuse to replace `path` unless it is empty, or --overwrite was given and this tool wrote it."""
    if not os.path.lexists(path):
        return
    check_not_input(path, inputs, flag)
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        return
    if not overwrite:
        raise HyMUNetError(f"{flag} {path} exists and is not empty; pass --overwrite to replace it")
    if os.path.islink(path) or not os.path.isdir(path) or not is_tool_output(path, recognise):
        raise HyMUNetError(
            f"{flag} {path} was not written by hymunet (no {MARKER} marker); --overwrite replaces only "
            "hymunet's own outputs: remove it yourself or choose another folder"
        )


def write_marker(folder: str, command: str, files: Iterable[str] | None = None, whole_folder: bool = True) -> None:
    """The marker: whole_folder = this tool wrote the whole folder (else only `files`); `files` lists what the
    file-writing commands put there (relative paths), so that a re-run can remove its own stale files."""
    from nnunetv2_hymunet import __version__

    marker = {"written_by": f"hymunet {command}", "version": __version__, "whole_folder": whole_folder}
    if files is not None:
        marker["files"] = sorted(set(files))
    with open(os.path.join(folder, MARKER), "w") as f:
        json.dump(marker, f)
        f.write("\n")
    apply_default_permissions(os.path.join(folder, MARKER))


# ---------------------------------------------------------------- owners of temporary folders


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, Linux), to tell a reused pid from its first owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid())}


def _write_owner(folder: str, **extra) -> None:
    with open(os.path.join(folder, OWNER_FILE), "w") as f:
        json.dump({**_owner_record(), **extra}, f)


def _owner_gone(owner: dict) -> bool:
    """True only when the owner certainly no longer runs: same host, and its pid is gone or now another process."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    start = _process_start(owner["pid"])
    return owner.get("start") is not None and start is not None and start != owner["start"]


def remove_stale_partials(parent: str) -> list[str]:
    """Remove the temporary folders our killed runs left in `parent`; restore a dataset a killed run had moved aside.

    Only hidden `.NAME.partial-*` / `.NAME.replaced-*` folders holding our owner record whose process is gone are
    touched. Returns the paths handled.
    """
    handled = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return handled
    for entry in entries:
        if not entry.startswith(".") or (PARTIAL_TAG not in entry and REPLACED_TAG not in entry):
            continue
        folder = os.path.join(parent, entry)
        try:
            with open(os.path.join(folder, OWNER_FILE)) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            continue
        if not isinstance(owner, dict) or not _owner_gone(owner):
            continue
        restore_to = owner.get("restore_to")
        old = os.path.join(folder, "old")
        if REPLACED_TAG in entry and restore_to and os.path.lexists(old) and not os.path.lexists(restore_to):
            os.replace(old, restore_to)  # the run died between moving the old folder aside and the final rename
        shutil.rmtree(folder, ignore_errors=True)
        handled.append(folder)
    return handled


@contextlib.contextmanager
def _signals_deferred():
    """Hold SIGTERM / SIGHUP / SIGINT back during a few renames that must happen together."""
    signals = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


# ---------------------------------------------------------------- atomic folders


def _make_parents(path: str) -> list[str]:
    """os.makedirs(path) that returns the folders it created (deepest last), for removal after a failure."""
    created, current = [], os.path.abspath(path)
    while not os.path.isdir(current):
        created.append(current)
        current = os.path.dirname(current)
    made = []
    try:
        for folder in reversed(created):
            os.mkdir(folder)
            made.append(folder)
    except BaseException:
        _remove_if_empty(made)
        raise
    return made


def _remove_if_empty(folders: Iterable[str]) -> None:
    for folder in reversed(list(folders)):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _new_partial_folder(parent: str, name: str) -> str:
    """A hidden `.NAME.partial-*` folder in `parent` with our owner record (stale ones are removed first)."""
    remove_stale_partials(parent)
    try:
        temp = tempfile.mkdtemp(prefix=f".{name}{PARTIAL_TAG}", dir=parent)
    except OSError as e:
        raise HyMUNetError(f"cannot write in {parent}: {e.strerror or e}") from None
    _write_owner(temp)
    return temp


class AtomicFolder:
    """Context manager: yields a temporary folder to fill; on a clean exit it becomes `target` (with the marker).

    `replaces`: existing folders the new one supersedes (default: `target` if it exists); they must have been checked
    with `check_replaceable` by the caller. Any exception (bad input, Ctrl-C, SIGTERM) removes the temporary folder and
    the parent folders this run created.
    """

    def __init__(self, target: str, command: str, replaces: Iterable[str] | None = None):
        self.target = os.path.abspath(target)
        self.command = command
        self.parent = os.path.dirname(self.target)
        self.replaces = (
            list(replaces) if replaces is not None else ([self.target] if os.path.lexists(self.target) else [])
        )
        self.temp = None
        self._created: list[str] = []
        # renames that must happen together with this one (e.g. a StagedFile's commit), under the same signal block
        self.after_commit: list[Callable[[], None]] = []
        self.marker_files: list[str] | None = None  # what write_files_into put there

    def __enter__(self) -> str:
        self._created = _make_parents(self.parent)
        self.temp = _new_partial_folder(self.parent, os.path.basename(self.target))
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.temp, ignore_errors=True)
            _remove_if_empty(self._created)
            return False
        try:
            self._commit()
        except BaseException:
            shutil.rmtree(self.temp, ignore_errors=True)
            raise
        return False

    def _commit(self) -> None:
        if os.path.lexists(self.target) and self.target not in self.replaces:
            raise HyMUNetError(
                f"{self.target} appeared while this run was writing (another run?); nothing was replaced"
            )
        os.remove(os.path.join(self.temp, OWNER_FILE))
        write_marker(self.temp, self.command, self.marker_files)
        apply_default_permissions(self.temp)
        with _signals_deferred():
            # move replaced folders aside first so that the new one is in place before anything is deleted
            trash = []
            try:
                for old in self.replaces:
                    bin_folder = tempfile.mkdtemp(prefix=f".{os.path.basename(old)}{REPLACED_TAG}", dir=self.parent)
                    _write_owner(bin_folder, restore_to=old)
                    trash.append(bin_folder)
                    os.replace(old, os.path.join(bin_folder, "old"))
                os.replace(self.temp, self.target)
            except BaseException:
                for old, bin_folder in zip(self.replaces, trash):  # put back what was moved aside
                    if os.path.lexists(os.path.join(bin_folder, "old")) and not os.path.lexists(old):
                        os.replace(os.path.join(bin_folder, "old"), old)
                    shutil.rmtree(bin_folder, ignore_errors=True)
                raise
            for commit in self.after_commit:
                commit()
        for bin_folder in trash:
            shutil.rmtree(bin_folder, ignore_errors=True)


def check_files_target(
    out_dir: str, names: Iterable[str], flag: str = "-o", inputs: Mapping[str, str | None] = None
) -> tuple[str, set | None]:
    """Check, before any work, that write_files_into(out_dir, names) will be allowed. Returns (absolute out_dir,
    the files of an existing folder that hymunet wrote, or None when it wrote the whole folder or it is new)."""
    out_dir = check_output_path(out_dir, flag, inputs)
    if not os.path.isdir(out_dir) or is_tool_output(out_dir):
        return out_dir, None
    owned = set((read_marker(out_dir) or {}).get("files", []))
    clashes = [rel for rel in names if rel not in owned and os.path.lexists(os.path.join(out_dir, rel))]
    if clashes:
        raise HyMUNetError(
            f"{flag} {out_dir} holds {clashes[0]}, which hymunet did not write; choose another output folder"
        )
    return out_dir, owned


def write_files_into(
    out_dir: str,
    writers: Mapping[str, Callable[[str], None]],
    command: str,
    flag: str = "-o",
    inputs: Mapping[str, str | None] = None,
) -> list[str]:
    """Call writers[relative_path](absolute_path) for every file, all into a temporary folder first, then move them
    into `out_dir`: a new folder appears in one rename; in an existing folder only the named files are replaced, and
    only when this tool wrote that folder (else an existing file of the same name is an error). Returns the paths."""
    out_dir, owned = check_files_target(out_dir, writers, flag, inputs)
    if not os.path.isdir(out_dir):
        atomic = AtomicFolder(out_dir, command, replaces=[])
        atomic.marker_files = list(writers)
        with atomic as temp:
            for rel, writer in writers.items():
                os.makedirs(os.path.dirname(os.path.join(temp, rel)), exist_ok=True)
                writer(os.path.join(temp, rel))
        return [os.path.join(out_dir, rel) for rel in writers]
    # an existing folder: the files are staged inside it (it may be the only place we can write)
    temp = _new_partial_folder(out_dir, "files")
    try:
        for rel, writer in writers.items():
            os.makedirs(os.path.dirname(os.path.join(temp, rel)), exist_ok=True)
            writer(os.path.join(temp, rel))
        with _signals_deferred():
            for rel in writers:
                os.makedirs(os.path.dirname(os.path.join(out_dir, rel)), exist_ok=True)
                apply_default_permissions(os.path.join(temp, rel))
                os.replace(os.path.join(temp, rel), os.path.join(out_dir, rel))
            if owned is not None:
                write_marker(out_dir, command, owned | set(writers), whole_folder=False)
            else:
                write_marker(out_dir, command, set((read_marker(out_dir) or {}).get("files", [])) | set(writers))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return [os.path.join(out_dir, rel) for rel in writers]


def remove_stale_outputs(out_dir: str, current: Iterable[str], subfolders: Iterable[str]) -> list[str]:
    """Remove the files below `subfolders` of out_dir that an earlier run listed in the marker and this run did not
    write (e.g. the plots of a run no longer compared). Other files are never touched. Returns the removed paths."""
    marker = read_marker(out_dir)
    if marker is None or not isinstance(marker.get("files"), list):
        return []
    current, prefixes = set(current), tuple(sub.rstrip("/") + "/" for sub in subfolders)
    removed = [
        rel
        for rel in marker["files"]
        if rel.startswith(prefixes)
        and rel not in current
        and ".." not in rel.split("/")
        and os.path.isfile(os.path.join(out_dir, rel))
    ]
    for rel in removed:
        os.remove(os.path.join(out_dir, rel))
        _remove_if_empty([os.path.dirname(os.path.join(out_dir, rel))])
    if removed:
        write_marker(
            out_dir,
            marker.get("written_by", "hymunet ?").replace("hymunet ", "", 1),
            set(marker["files"]) - set(removed),
            whole_folder=marker.get("whole_folder") is True,
        )
    return removed


# ---------------------------------------------------------------- atomic files


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ".partial", executable: bool = False):
    """Yields a temporary path beside `path` for the caller (or a compiler) to write; renamed onto `path` on success
    (mode 0666, or 0777 if `executable`, minus the umask), removed on any exception: readers, and concurrent writers
    of the same file, never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    os.close(fd)
    try:
        yield temp
        os.chmod(temp, (0o777 if executable else 0o666) & ~current_umask())
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write beside the target under a temporary name, then rename: readers never see half a file."""
    with atomic_path(path) as temp, open(temp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class StagedFile:
    """A file written now under a temporary name in its final folder and renamed into place by `commit()`: lets a
    command check that a second output can be written before it commits the first ("both or neither")."""

    def __init__(self, path: str, data: bytes, flag: str):
        self.path = os.path.abspath(path)
        self.temp = None
        folder = os.path.dirname(self.path)
        try:
            self._created = _make_parents(folder)
            fd, self.temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".partial", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            apply_default_permissions(self.temp)
        except OSError as e:
            if self.temp is not None and os.path.exists(self.temp):
                os.unlink(self.temp)
            _remove_if_empty(getattr(self, "_created", []))
            raise HyMUNetError(f"{flag}: cannot write {self.path}: {e.strerror or e}") from None

    def commit(self) -> None:
        os.replace(self.temp, self.path)
        self.temp = None

    def discard(self) -> None:
        """Remove the temporary file (and the folders made for it) unless it was committed."""
        if getattr(self, "temp", None) is None:
            return
        if os.path.exists(self.temp):
            os.unlink(self.temp)
        _remove_if_empty(getattr(self, "_created", []))


# ---------------------------------------------------------------- signals


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM / SIGHUP, so that `finally` and `except BaseException` clean-ups run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


@contextlib.contextmanager
def terminate_as_exception():
    """While active (main thread only), SIGTERM and SIGHUP raise Terminated; later ones are ignored so that the
    clean-up is not interrupted in turn."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGTERM, signal.SIGHUP)

    def handler(signum, frame):
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def default_signals_in_worker() -> None:
    """Pool initializer: forked workers must not inherit terminate_as_exception's handler (the parent cleans up)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
