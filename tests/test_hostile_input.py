"""The CLI under hostile and careless input: every refusal is exit code 1 (argparse: 2) with one line naming the culprit
flag or file and no traceback, and the file system afterwards holds the inputs untouched, nothing half-written and no
temporary folders. Covers convert (isic2018, drive, brats, brats-back, make-fake), evaluate, compare, plan, doctor and
demo, plus interrupts (SIGTERM, SIGKILL then a re-run) and umask-respecting permissions."""

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

import nibabel
import numpy as np
import pytest
from conftest import tiny_dataset_json, tiny_plans
from PIL import Image
from planner_inputs import write_planner_inputs

from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.conversion import fake_releases
from nnunetv2_hymunet.fs_safety import MARKER, OWNER_FILE

HYMUNET = os.path.join(os.path.dirname(sys.executable), "hymunet")
IMPOSSIBLE = "/proc/hymunet-no-such-folder/out"  # /proc takes no new folders, not even from root


# ---------------------------------------------------------------- helpers


def run(argv, capsys):
    """(exit code, stdout, stderr) of the in-process CLI; argparse errors exit through SystemExit."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def refused(argv, capsys, *culprits, code=1):
    """Run, expect a refusal whose error line names every culprit; return stderr."""
    got, _, err = run(argv, capsys)
    assert got == code, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1, err
    for culprit in culprits:
        assert str(culprit) in error_lines[0], (culprit, err)
    return err


def state(path) -> dict:
    """Every file and folder below `path` (hidden ones included) with size and modification time."""
    path = str(path)
    if not os.path.lexists(path):
        return {}
    if not os.path.isdir(path):
        info = os.lstat(path)
        return {".": (info.st_size, info.st_mtime_ns)}
    result = {}
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(folder, name)
            info = os.lstat(full)
            result[os.path.relpath(full, path)] = (stat.S_ISDIR(info.st_mode), info.st_size, info.st_mtime_ns)
    return result


def temporary_leftovers(*roots) -> list:
    """Hidden temporary folders or files our writers use, anywhere below the roots."""
    found = []
    for root in roots:
        for folder, dirs, files in os.walk(str(root)):
            for name in dirs + files:
                if ".partial" in name or ".replaced-" in name or name.startswith(".hymunet-write-test"):
                    found.append(os.path.join(folder, name))
    return found


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_nifti(path, array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def isic_release(tmp_path_factory):
    return fake_releases.make_fake_isic2018(
        str(tmp_path_factory.mktemp("isic") / "release"),
        num_cases=6,
        seed=3,
        image_size=32,
        num_validation=0,
        num_test=0,
    )


@pytest.fixture(scope="module")
def brats_release(tmp_path_factory):
    return fake_releases.make_fake_brats(
        str(tmp_path_factory.mktemp("brats") / "release"),
        release="2021",
        num_cases=2,
        seed=4,
        shape=(10, 11, 9),
        num_unlabelled=0,
    )


@pytest.fixture(scope="module")
def drive_release(tmp_path_factory):
    return fake_releases.make_fake_drive(
        str(tmp_path_factory.mktemp("drive") / "release"), num_cases=2, seed=5, scale=0.06
    )


@pytest.fixture
def brats_predictions(tmp_path):
    folder = tmp_path / "pred"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        nibabel.save(
            nibabel.Nifti1Image(rng.integers(0, 4, (6, 5, 4)).astype(np.uint8), np.eye(4)),
            str(folder / f"BraTS2021_0000{i}.nii.gz"),
        )
    (folder / "notes.txt").write_text("the user's own file")
    return folder


def png_run(root, n_cases=3, seed=0, ref_scale=1):
    """ref/ and pred/ folders of 2D PNG label maps (label 1 disks); pred shifted a little."""
    rng = np.random.default_rng(seed)
    ref_dir, pred_dir = root / "ref", root / "pred"
    ref_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:24, :28]
    for i in range(n_cases):
        ref = ((yy - 12) ** 2 + (xx - 14) ** 2 <= (5 + i) ** 2).astype(np.uint8)
        shift = int(rng.integers(-2, 3))
        pred = ((yy - 12 - shift) ** 2 + (xx - 14) ** 2 <= (5 + i) ** 2).astype(np.uint8)
        write_png(ref_dir / f"case_{i}.png", ref * ref_scale)
        write_png(pred_dir / f"case_{i}.png", pred)
    return ref_dir, pred_dir


def evaluate_args(ref, pred, out, *extra):
    return [str(a) for a in ("evaluate", ref, pred, "-o", out, "-q", *extra)]


def succeeds(argv) -> bool:
    return main([str(a) for a in argv]) == 0


# ================================================================ convert isic2018 / drive / brats


def test_convert_output_is_a_file(isic_release, tmp_path, capsys):
    target = tmp_path / "raw"
    target.write_text("not a folder")
    refused(["convert", "isic2018", "-i", isic_release, "-d", 501, "-o", target], capsys, "--output", target)
    assert target.read_text() == "not a folder"


@pytest.mark.parametrize("where", ["under_a_file", "impossible"])
def test_convert_output_cannot_be_created(isic_release, tmp_path, capsys, where):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    output = blocker / "raw" if where == "under_a_file" else IMPOSSIBLE
    before = state(isic_release)
    refused(["convert", "isic2018", "-i", isic_release, "-d", 501, "-o", output], capsys, "--output", output)
    assert state(isic_release) == before and sorted(os.listdir(tmp_path)) == ["file"]


def test_convert_output_is_the_input(isic_release, capsys):
    before = state(isic_release)
    refused(["convert", "isic2018", "-i", isic_release, "-d", 501, "-o", isic_release], capsys, "--output", "input")
    assert state(isic_release) == before


def test_convert_overwrite_never_replaces_its_input(brats_release, tmp_path, capsys):
    """The release sits in nnUNet_raw under the very id being written: --overwrite must not delete it."""
    raw = tmp_path / "raw"
    release = raw / "Dataset060_BraTS2021"
    shutil.copytree(brats_release, release)
    (release / MARKER).write_text("{}")  # even a folder that looks like ours is kept when it is the input
    before = state(raw)
    refused(["convert", "brats", "-i", release, "-d", 60, "-o", raw, "--overwrite"], capsys, "--overwrite", release)
    assert state(raw) == before


def test_convert_overwrite_never_replaces_a_foreign_dataset(drive_release, tmp_path, capsys):
    foreign = tmp_path / "raw" / "Dataset070_Mine"
    (foreign / "imagesTr").mkdir(parents=True)
    (foreign / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    before = state(tmp_path / "raw")
    refused(
        ["convert", "drive", "-i", drive_release, "-d", 70, "-o", tmp_path / "raw", "--overwrite"],
        capsys,
        foreign,
        "not written by hymunet",
    )
    assert state(tmp_path / "raw") == before


@pytest.mark.parametrize(
    "argv, culprit, code",
    [
        (["-d", "0"], "-d '0'", 1),
        (["-d", "abc"], "-d 'abc'", 1),
        (["-d", "Dataset71_X"], "-d 'Dataset71_X'", 1),
        (["-d", "Dataset071_X", "--name", "Y"], "--name", 1),
        (["-d", "71", "--name", "../evil"], "--name", 1),
        (["-d", "71", "-np", "0"], "--num-processes", 1),
    ],
)
def test_convert_bad_arguments(isic_release, tmp_path, capsys, argv, culprit, code):
    refused(["convert", "isic2018", "-i", isic_release, "-o", tmp_path / "raw", *argv], capsys, culprit, code=code)
    assert not (tmp_path / "raw").exists() and not temporary_leftovers(tmp_path)


def test_drive_unknown_fov_mode(drive_release, tmp_path, capsys):
    refused(
        ["convert", "drive", "-i", drive_release, "-d", 72, "-o", tmp_path, "--fov-mode", "outside"],
        capsys,
        "--fov-mode",
        code=2,
    )
    assert os.listdir(tmp_path) == []


def test_split_file_binary(isic_release, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    split = tmp_path / "folds.csv"
    split.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    refused(
        ["convert", "isic2018", "-i", isic_release, "-d", 73, "-o", tmp_path / "raw", "--split-file", split],
        capsys,
        "--split-file",
        split,
    )
    assert not (tmp_path / "raw").exists()


def test_split_file_folder(isic_release, tmp_path, capsys):
    refused(
        ["convert", "isic2018", "-i", isic_release, "-d", 73, "-o", tmp_path / "raw", "--split-file", tmp_path],
        capsys,
        "--split-file",
        "not a file",
    )
    assert not (tmp_path / "raw").exists()


def _isic_ids(release):
    folder = os.path.join(release, "ISIC2018_Task1-2_Training_Input")
    return sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".jpg"))


def test_split_file_with_byte_order_mark(isic_release, tmp_path, capsys, monkeypatch):
    """Excel's "CSV UTF-8" starts with a BOM; it must not turn the first id into an unknown one."""
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    ids = _isic_ids(isic_release)
    split = tmp_path / "folds.csv"
    split.write_bytes("\ufeff".encode() + "".join(f"{i},{k % 2}\n" for k, i in enumerate(ids)).encode())
    code, out, err = run(
        ["convert", "isic2018", "-i", isic_release, "-d", 74, "-o", tmp_path / "raw", "--split-file", split], capsys
    )
    assert code == 0, err
    folds = json.loads((tmp_path / "raw" / "Dataset074_ISIC2018" / "splits_final.json").read_text())
    assert [fold["val"] for fold in folds] == [ids[0::2], ids[1::2]]


def test_split_file_unwritable_preprocessed_commits_nothing(isic_release, tmp_path, capsys, monkeypatch):
    """Both or neither: the raw dataset is not committed when splits_final.json cannot be written, and the re-run with
    a writable nnUNet_preprocessed needs no --overwrite."""
    ids = _isic_ids(isic_release)
    split = tmp_path / "folds.csv"
    split.write_text("".join(f"{i},{k % 2}\n" for k, i in enumerate(ids)))
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    monkeypatch.setenv("nnUNet_preprocessed", str(blocker / "preprocessed"))
    raw = tmp_path / "raw"
    argv = ["convert", "isic2018", "-i", isic_release, "-d", 75, "-o", raw, "--split-file", split]
    refused(argv, capsys, "--split-file", "splits_final.json")
    assert not raw.exists() and blocker.read_text() == "x"
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert (tmp_path / "preprocessed" / "Dataset075_ISIC2018" / "splits_final.json").is_file()
    assert not temporary_leftovers(tmp_path)


def test_brats_uncompressed_nii_files_are_converted(brats_release, tmp_path, capsys):
    """`_seg.nii` (and .nii images) used to turn the case into an unlabelled test case without a word."""
    release = tmp_path / "release"
    shutil.copytree(brats_release, release)
    case = next(release.glob("*/BraTS2021_00000"))
    for path in sorted(case.glob("*_seg.nii.gz")) + sorted(case.glob("*_t1.nii.gz")):
        image = nibabel.load(str(path))
        nibabel.save(image, str(path)[:-3])
        path.unlink()
    code, out, err = run(["convert", "brats", "-i", release, "-d", 76, "-o", tmp_path / "raw"], capsys)
    assert code == 0, err
    dataset = tmp_path / "raw" / "Dataset076_BraTS2021"
    assert (dataset / "labelsTr" / "BraTS2021_00000.nii.gz").is_file() and not (dataset / "imagesTs").exists()
    copied = nibabel.load(str(dataset / "imagesTr" / "BraTS2021_00000_0000.nii.gz"))
    original = nibabel.load(str(case / "BraTS2021_00000_t1.nii"))
    assert np.array_equal(copied.get_fdata(), original.get_fdata()) and np.allclose(copied.affine, original.affine)


def test_brats_ambiguous_and_misnamed_segmentations(brats_release, tmp_path, capsys):
    release = tmp_path / "release"
    shutil.copytree(brats_release, release)
    first, second = sorted(release.glob("*/BraTS2021_*"))
    seg = first / "BraTS2021_00000_seg.nii.gz"
    nibabel.save(nibabel.load(str(seg)), str(seg)[:-3])  # both .nii.gz and .nii
    other = second / "BraTS2021_00001_seg.nii.gz"
    other.rename(second / "BraTS2021_00001_Seg.nii.gz")  # would silently become an unlabelled case
    before = state(release)
    err = refused(["convert", "brats", "-i", release, "-d", 77, "-o", tmp_path / "raw"], capsys, "2 problem(s)")
    assert str(seg)[:-3] in err and "keep one" in err
    assert str(second / "BraTS2021_00001_Seg.nii.gz") in err and "looks like a segmentation" in err
    assert state(release) == before and not (tmp_path / "raw").exists()


# ---------------------------------------------------------------- stale temporary folders, interrupts


def _owner(folder, **record):
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps(record))
    (folder / "half-written.png").write_bytes(b"\x89PNG")


def test_stale_partial_folders_are_removed_only_when_their_owner_is_gone(isic_release, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    host = socket.gethostname()
    _owner(raw / ".Dataset080_ISIC2018.partial-dead", host=host, pid=dead_pid(), start=None)
    _owner(raw / ".Dataset080_ISIC2018.partial-alive", host=host, pid=os.getpid(), start=None)
    _owner(raw / ".Dataset080_ISIC2018.partial-elsewhere", host=host + "-other-node", pid=dead_pid(), start=None)
    (raw / ".Dataset080_ISIC2018.partial-unknown").mkdir()  # no owner record: not provably ours
    (raw / ".user-notes.partial-draft").write_text("a file of the user's")
    code, _, err = run(["convert", "isic2018", "-i", isic_release, "-d", 80, "-o", raw], capsys)
    assert code == 0, err
    assert sorted(os.listdir(raw)) == sorted(
        [
            "Dataset080_ISIC2018",
            ".Dataset080_ISIC2018.partial-alive",
            ".Dataset080_ISIC2018.partial-elsewhere",
            ".Dataset080_ISIC2018.partial-unknown",
            ".user-notes.partial-draft",
        ]
    )


def test_a_dataset_moved_aside_by_a_killed_run_is_restored(isic_release, tmp_path, capsys):
    raw = tmp_path / "raw"
    trash = raw / ".Dataset081_ISIC2018.replaced-x"
    _owner(trash, host=socket.gethostname(), pid=dead_pid(), start=None, restore_to=str(raw / "Dataset081_ISIC2018"))
    (trash / "old").mkdir()
    (trash / "old" / "dataset.json").write_text("{}")
    # the old dataset comes back first, so this run is refused as for any existing dataset
    refused(["convert", "isic2018", "-i", isic_release, "-d", 81, "-o", raw], capsys, "--overwrite")
    assert sorted(os.listdir(raw)) == ["Dataset081_ISIC2018"]
    assert (raw / "Dataset081_ISIC2018" / "dataset.json").read_text() == "{}"


@pytest.fixture(scope="module")
def large_isic_release(tmp_path_factory):
    return fake_releases.make_fake_isic2018(
        str(tmp_path_factory.mktemp("isic_large") / "release"), num_cases=60, seed=1, image_size=192
    )


def _start_and_signal(release, raw, sig):
    """Start a conversion, send `sig` once it has written a few cases into its temporary folder."""
    proc = subprocess.Popen(
        [HYMUNET, "convert", "isic2018", "-i", release, "-d", "90", "-o", str(raw)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in (os.listdir(raw) if raw.is_dir() else []) if ".partial-" in p]
        images = raw / partial[0] / "imagesTr" if partial else None
        if images is not None and images.is_dir() and len(os.listdir(images)) >= 3:
            proc.send_signal(sig)
            break
        time.sleep(0.005)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_during_convert_cleans_up(large_isic_release, tmp_path):
    raw = tmp_path / "raw"
    code, err = _start_and_signal(large_isic_release, raw, signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err and "Traceback" not in err
    assert not raw.exists()  # the run created it, and removed it with its temporary folder


def test_sigkill_leaves_a_partial_folder_that_the_next_run_removes(large_isic_release, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    code, _ = _start_and_signal(large_isic_release, raw, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert [p for p in os.listdir(raw) if ".partial-" in p]
    code, _, err = run(["convert", "isic2018", "-i", large_isic_release, "-d", 90, "-o", raw], capsys)
    assert code == 0, err
    assert os.listdir(raw) == ["Dataset090_ISIC2018"]


def test_a_failed_commit_puts_the_replaced_folder_back(tmp_path, monkeypatch):
    from nnunetv2_hymunet import fs_safety

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src):  # the final rename of the new folder
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(fs_safety.os, "replace", failing_replace)
    with pytest.raises(OSError):
        with fs_safety.AtomicFolder(str(target), "test") as temp:
            open(os.path.join(temp, "new.txt"), "w").close()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(target) == ["old.txt"]


# ================================================================ convert brats-back


def test_brats_back_output_is_its_input(brats_predictions, capsys):
    """The data-loss bug: --output = --input with --overwrite deleted the predictions."""
    before = state(brats_predictions)
    refused(
        ["convert", "brats-back", "-i", brats_predictions, "-o", brats_predictions, "--release", "2021", "--overwrite"],
        capsys,
        "--output",
        "is the input",
    )
    assert state(brats_predictions) == before


def test_brats_back_output_contains_its_input(brats_predictions, capsys):
    parent = brats_predictions.parent
    before = state(parent)
    refused(
        ["convert", "brats-back", "-i", brats_predictions, "-o", parent, "--release", "2021", "--overwrite"],
        capsys,
        "--output",
        "contains the input",
    )
    assert state(parent) == before


def test_brats_back_overwrite_only_replaces_its_own_output(brats_predictions, tmp_path, capsys):
    foreign = tmp_path / "someone_elses"
    foreign.mkdir()
    (foreign / "important.nii.gz").write_bytes(b"data")
    argv = ["convert", "brats-back", "-i", brats_predictions, "--release", "2021", "--overwrite"]
    refused(argv + ["-o", foreign], capsys, foreign, "not written by hymunet")
    assert (foreign / "important.nii.gz").read_bytes() == b"data"
    ours = tmp_path / "back"
    assert run(argv + ["-o", ours], capsys)[0] == 0
    assert run(argv + ["-o", ours], capsys)[0] == 0  # an earlier brats-back output is replaced
    assert sorted(os.listdir(ours)) == [MARKER, "BraTS2021_00000.nii.gz", "BraTS2021_00001.nii.gz"]
    refused(argv[:-1] + ["-o", ours], capsys, "--overwrite")  # still needs the flag
    assert not temporary_leftovers(tmp_path)


@pytest.mark.parametrize("kind", ["file", "under_a_file", "impossible"])
def test_brats_back_bad_output(brats_predictions, tmp_path, capsys, kind):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    output = {"file": blocker, "under_a_file": blocker / "out", "impossible": IMPOSSIBLE}[kind]
    refused(
        ["convert", "brats-back", "-i", brats_predictions, "-o", output, "--release", "2021"],
        capsys,
        "--output",
        output,
    )
    assert blocker.read_text() == "x" and sorted(os.listdir(tmp_path)) == ["blocker", "pred"]


# ================================================================ convert make-fake


@pytest.mark.parametrize(
    "argv, culprit, code",
    [
        (["isic2018", "--num-cases", "0"], "--num-cases", 1),  # used to mean "the default, 10"
        (["isic2018", "--seed", "-1"], "--seed", 1),
        (["drive", "--scale", "nan"], "--scale", 1),
        (["brats", "--num-unlabelled", "-1"], "--num-unlabelled", 1),
        (["brats", "--shape", "8,9"], "--shape", 2),
    ],
)
def test_make_fake_bad_arguments(tmp_path, capsys, argv, culprit, code):
    refused(["convert", "make-fake", argv[0], "-o", tmp_path / "fake", *argv[1:]], capsys, culprit, code=code)
    assert os.listdir(tmp_path) == []


def test_make_fake_into_a_file(tmp_path, capsys):
    target = tmp_path / "fake"
    target.write_text("mine")
    refused(["convert", "make-fake", "isic2018", "-o", target], capsys, "-o", target)
    assert target.read_text() == "mine"


# ================================================================ evaluate


def test_evaluate_empty_fov_mask_is_refused(tmp_path, capsys):
    """It used to give Dice 1.0 for an inverted prediction."""
    ref_dir, pred_dir = png_run(tmp_path, n_cases=2)
    write_png(pred_dir / "case_1.png", 1 - np.asarray(Image.open(ref_dir / "case_1.png")))
    fov = tmp_path / "fov"
    fov.mkdir()
    write_png(fov / "case_0.png", np.ones((24, 28)))
    write_png(fov / "case_1.png", np.zeros((24, 28)))
    refused(
        evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--fov", fov),
        capsys,
        "case_1",
        fov / "case_1.png",
        "selects no voxel",
    )
    assert not (tmp_path / "out").exists() and not temporary_leftovers(tmp_path)


def test_evaluate_undeclared_reference_values(tmp_path, capsys):
    """Raw 0/255 masks were scored as empty references."""
    ref_dir, pred_dir = png_run(tmp_path, ref_scale=255)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "lesion": 1}, "file_ending": ".png"}))
    refused(
        evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--dataset-json", dataset),
        capsys,
        ref_dir / "case_0.png",
        "[255]",
    )
    assert not (tmp_path / "out").exists()


def test_evaluate_values_only_predicted_are_a_warning(tmp_path, capsys):
    ref_dir, pred_dir = png_run(tmp_path)
    write_png(pred_dir / "case_0.png", np.full((24, 28), 2))
    code, _, err = run(evaluate_args(ref_dir, pred_dir, tmp_path / "out"), capsys)
    assert code == 0 and "warning" in err and "2" in err and "--dataset-json" in err
    assert any("in no reference" in w for w in json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"])


def _nifti_pair(tmp_path, **pred_geometry):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    mask = np.zeros((6, 10, 12), np.uint8)
    mask[2:4, 3:7, 4:9] = 1
    write_nifti(ref_dir / "c.nii.gz", mask, origin=(10.0, -20.0, 5.0))
    write_nifti(pred_dir / "c.nii.gz", mask, **{"origin": (10.0, -20.0, 5.0), **pred_geometry})
    return ref_dir, pred_dir


@pytest.mark.parametrize(
    "geometry", [{"origin": (14.0, -20.0, 5.0)}, {"direction": (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)}]
)
def test_evaluate_misaligned_prediction(tmp_path, capsys, geometry):
    """A prediction on another grid was scored as if aligned."""
    ref_dir, pred_dir = _nifti_pair(tmp_path, **geometry)
    refused(
        evaluate_args(ref_dir, pred_dir, tmp_path / "out"),
        capsys,
        pred_dir / "c.nii.gz",
        next(iter(geometry)),
        "--ignore-geometry",
    )
    code, _, err = run(evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--ignore-geometry"), capsys)
    assert code == 0 and "warning" in err and "as if aligned" in err
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["warnings"]


def test_evaluate_geometry_within_tolerance_is_accepted(tmp_path, capsys):
    ref_dir, pred_dir = _nifti_pair(tmp_path, origin=(10.0 + 1e-4, -20.0, 5.0))
    code, _, err = run(evaluate_args(ref_dir, pred_dir, tmp_path / "out"), capsys)
    assert code == 0 and "warning" not in err


@pytest.mark.parametrize("spacing", [["0"], ["-1", "1"], ["nan"], ["inf"]])
def test_evaluate_bad_spacing(tmp_path, capsys, spacing):
    """--spacing 0 gave HD95 0, a negative spacing was accepted."""
    ref_dir, pred_dir = png_run(tmp_path)
    refused(evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--spacing", *spacing), capsys, "--spacing")
    assert not (tmp_path / "out").exists()


def _npz(pred_dir, case, probabilities):
    np.savez_compressed(pred_dir / f"{case}.npz", probabilities=np.asarray(probabilities, dtype=np.float32))


@pytest.mark.parametrize("bad", ["nan", "logits"])
def test_evaluate_bad_probabilities_name_the_case(tmp_path, capsys, bad):
    ref_dir, pred_dir = png_run(tmp_path, n_cases=2)
    for i in range(2):
        foreground = np.asarray(Image.open(pred_dir / f"case_{i}.png"), np.float32)[None]
        _npz(pred_dir, f"case_{i}", np.stack([1 - foreground, foreground]))
    foreground = np.asarray(Image.open(pred_dir / "case_1.png"), np.float32)[None]
    if bad == "nan":
        foreground[0, 0, 0] = np.nan
        message = "NaN"
    else:
        foreground = foreground * 8 - 4
        message = "logits"
    _npz(pred_dir, "case_1", np.stack([1 - foreground, foreground]))
    refused(evaluate_args(ref_dir, pred_dir, tmp_path / "out"), capsys, "case_1", pred_dir / "case_1.npz", message)


@pytest.mark.parametrize("value", ['"abc"', "1.5", "true", "-1"])
def test_evaluate_non_integer_label_in_dataset_json(tmp_path, capsys, value):
    ref_dir, pred_dir = png_run(tmp_path)
    dataset = tmp_path / "dataset.json"
    dataset.write_text('{"labels": {"background": 0, "lesion": %s}, "file_ending": ".png"}' % value)
    refused(evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--dataset-json", dataset), capsys, dataset, "lesion")


def test_evaluate_all_ignore_reference(tmp_path, capsys):
    ref_dir, pred_dir = png_run(tmp_path, n_cases=1)
    write_png(ref_dir / "case_0.png", np.full((24, 28), 2))
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"background": 0, "lesion": 1, "ignore": 2}, "file_ending": ".png"}))
    refused(
        evaluate_args(ref_dir, pred_dir, tmp_path / "out", "--dataset-json", dataset), capsys, "case_0", "ignore label"
    )


def test_evaluate_output_is_the_prediction_folder(tmp_path, capsys):
    ref_dir, pred_dir = png_run(tmp_path)
    before = state(pred_dir)
    refused(evaluate_args(ref_dir, pred_dir, pred_dir), capsys, "-o", "PRED_FOLDER")
    refused(evaluate_args(ref_dir, pred_dir, tmp_path), capsys, "-o", "contains the input")
    assert state(pred_dir) == before


@pytest.mark.parametrize("kind", ["file", "impossible"])
def test_evaluate_bad_output(tmp_path, capsys, kind):
    ref_dir, pred_dir = png_run(tmp_path)
    output = tmp_path / "file" if kind == "file" else IMPOSSIBLE
    if kind == "file":
        output.write_text("x")
    refused(evaluate_args(ref_dir, pred_dir, output), capsys, "-o", output)


def test_evaluate_keeps_files_it_did_not_write(tmp_path, capsys):
    ref_dir, pred_dir = png_run(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    refused(evaluate_args(ref_dir, pred_dir, out), capsys, "summary.md", "did not write")
    assert os.listdir(out) == ["summary.md"] and (out / "summary.md").read_text() == "my notes"
    (out / "summary.md").rename(out / "notes.md")
    for _ in range(2):  # an existing folder: our files are added, then replaced on the re-run; the user's stay
        code, _, err = run(evaluate_args(ref_dir, pred_dir, out), capsys)
        assert code == 0, err
    assert sorted(os.listdir(out)) == [MARKER, "metrics.json", "notes.md", "per_case.csv", "summary.md"]
    assert (out / "notes.md").read_text() == "my notes" and not temporary_leftovers(tmp_path)


@pytest.mark.parametrize(
    "extra, culprit",
    [
        (["-np", "0"], "--num-processes"),
        (["--one-empty-distance", "-1"], "--one-empty-distance"),
        (["--one-empty-distance", "far"], "--one-empty-distance"),
        (["--percentile", "0"], "--percentile"),
        (["--percentile", "nan"], "--percentile"),
        (["--hd95", "median"], "--hd95"),
        (["--units", " "], "--units"),
    ],
)
def test_evaluate_bad_arguments(tmp_path, capsys, extra, culprit):
    ref_dir, pred_dir = png_run(tmp_path)
    refused(
        evaluate_args(ref_dir, pred_dir, tmp_path / "out", *extra),
        capsys,
        culprit,
        code=2 if culprit == "--hd95" else 1,
    )
    assert not (tmp_path / "out").exists()


def test_evaluate_reference_folder_as_prediction(tmp_path, capsys):
    ref_dir, _ = png_run(tmp_path)
    refused(evaluate_args(ref_dir, ref_dir, tmp_path / "out"), capsys, "REF_FOLDER", "PRED_FOLDER", "same folder")


def test_evaluate_rgb_reference_is_refused(tmp_path, capsys):
    ref_dir, pred_dir = png_run(tmp_path, n_cases=2)
    write_png(ref_dir / "case_1.png", np.zeros((24, 28, 3)))
    refused(evaluate_args(ref_dir, pred_dir, tmp_path / "out"), capsys, ref_dir / "case_1.png", "3 channels")


def test_evaluate_intensity_image_as_reference_is_refused(tmp_path, capsys):
    """Without a dataset.json every distinct value would become a label (and an HD computation)."""
    ref_dir, pred_dir = png_run(tmp_path, n_cases=1)
    write_png(ref_dir / "case_0.png", np.arange(24 * 28).reshape(24, 28) % 200)
    refused(evaluate_args(ref_dir, pred_dir, tmp_path / "out"), capsys, ref_dir / "case_0.png", "label map")


# ================================================================ compare


@pytest.fixture
def two_runs(tmp_path, capsys):
    ref_dir, pred_a = png_run(tmp_path / "a", n_cases=4, seed=0)
    _, pred_b = png_run(tmp_path / "b", n_cases=4, seed=1)
    runs = tmp_path / "run_a", tmp_path / "run_b"
    for pred, out in zip((pred_a, pred_b), runs):
        assert main(evaluate_args(ref_dir, pred, out)) == 0
    capsys.readouterr()
    return ref_dir, pred_a, pred_b, runs


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "cannot read as JSON"),
        ('{"schema_version": 1, "units": "px"}', "'labels' missing"),
        ("[1, 2]", "not an object"),
    ],
)
def test_compare_malformed_metrics_json(two_runs, tmp_path, capsys, content, message):
    run_a, run_b = two_runs[3]
    (run_b / "metrics.json").write_text(content)
    refused(["compare", run_a, run_b, "-o", tmp_path / "cmp"], capsys, run_b / "metrics.json", message)
    assert not (tmp_path / "cmp").exists()


def test_compare_metric_value_that_is_not_a_number(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs[3]
    metrics = json.loads((run_b / "metrics.json").read_text())
    metrics["per_case"][1]["metrics"]["1"]["dice"] = "high"
    (run_b / "metrics.json").write_text(json.dumps(metrics))
    refused(["compare", run_a, run_b, "-o", tmp_path / "cmp"], capsys, run_b / "metrics.json", "case_1", "dice")


def test_compare_negative_overlays(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs[3]
    refused(["compare", run_a, run_b, "-o", tmp_path / "cmp", "--overlays", "-3"], capsys, "--overlays")
    assert not (tmp_path / "cmp").exists()


def test_compare_different_case_sets(two_runs, tmp_path, capsys):
    ref_dir, pred_a, pred_b, (run_a, _) = two_runs
    fewer_ref, fewer_pred = tmp_path / "ref3", tmp_path / "pred3"
    shutil.copytree(ref_dir, fewer_ref)
    shutil.copytree(pred_b, fewer_pred)
    (fewer_ref / "case_3.png").unlink()
    (fewer_pred / "case_3.png").unlink()
    run_c = tmp_path / "run_c"
    assert main(evaluate_args(fewer_ref, fewer_pred, run_c)) == 0
    refused(["compare", run_a, run_c, "-o", tmp_path / "cmp"], capsys, "different cases", "case_3", "--common-cases")
    code, _, err = run(["compare", run_a, run_c, "-o", tmp_path / "cmp", "--common-cases"], capsys)
    assert code == 0 and "note" in err
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert all(t["n"] == 3 for t in result["tests"]) and result["runs"][0]["n_cases"] == 3


def test_compare_different_references(two_runs, tmp_path, capsys):
    ref_dir, pred_a, pred_b, (run_a, _) = two_runs
    other_ref = tmp_path / "other_ref"
    shutil.copytree(ref_dir, other_ref)
    write_png(other_ref / "case_2.png", np.zeros((24, 28)))
    write_png(other_ref / "case_2.png", np.pad(np.ones((4, 4)), ((2, 18), (2, 22))))
    run_c = tmp_path / "run_c"
    assert main(evaluate_args(other_ref, pred_b, run_c)) == 0
    refused(["compare", run_a, run_c, "-o", tmp_path / "cmp"], capsys, "different references", "case_2")


@pytest.mark.parametrize("extra", [["--hd95", "pooled"], ["--percentile", "99"]])
def test_compare_different_hd95_definitions_are_marked(two_runs, tmp_path, capsys, extra):
    ref_dir, pred_a, pred_b, (run_a, _) = two_runs
    run_c = tmp_path / "run_c"
    assert main(evaluate_args(ref_dir, pred_b, run_c, *extra)) == 0
    code, _, err = run(["compare", run_a, run_c, "-o", tmp_path / "cmp"], capsys)
    assert code == 0 and "hd95 is not comparable" in err
    result = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    hd95 = next(t for t in result["tests"] if t["metric"] == "hd95")
    dice = next(t for t in result["tests"] if t["metric"] == "dice")
    assert math.isnan(hd95["p_value"]) and hd95["note"].startswith("not comparable")
    assert not math.isnan(dice["p_value"]) or dice["note"] == "identical values"
    assert "NOT comparable" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_compare_different_fov_is_refused(two_runs, tmp_path, capsys):
    ref_dir, pred_a, pred_b, (run_a, _) = two_runs
    fov = tmp_path / "fov"
    fov.mkdir()
    for i in range(4):
        write_png(fov / f"case_{i}.png", np.ones((24, 28)))
    run_c = tmp_path / "run_c"
    assert main(evaluate_args(ref_dir, pred_b, run_c, "--fov", fov)) == 0
    refused(["compare", run_a, run_c, "-o", tmp_path / "cmp"], capsys, "field-of-view")


def test_compare_rerun_removes_its_own_stale_plots_only(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs[3]
    out = tmp_path / "cmp"
    assert succeeds(["compare", run_a, run_b, "-o", out, "--overlays", "2"])
    assert len(list((out / "overlays" / "run_a").glob("*.png"))) == 2
    (out / "overlays" / "my_sketch.png").write_bytes(b"user")
    assert succeeds(["compare", run_a, run_b, "-o", out, "--overlays", "1"])
    assert len(list((out / "overlays" / "run_a").glob("*.png"))) == 1  # not 2: the old worst case is gone
    assert (out / "overlays" / "my_sketch.png").read_bytes() == b"user"  # not written by compare: kept


def test_compare_same_run_twice_and_output_into_a_run(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs[3]
    refused(["compare", run_a, run_a, "-o", tmp_path / "cmp"], capsys, run_a, "more than once")
    before = state(run_a)
    refused(["compare", run_a, run_b, "-o", run_a], capsys, "-o", run_a)
    assert state(run_a) == before


# ================================================================ plan


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    root = tmp_path / "preprocessed"
    folder = root / "Dataset900_Unit"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(tiny_plans(patch_size=[64, 64], batch_size=12)))
    (folder / "dataset.json").write_text(json.dumps(tiny_dataset_json()))
    write_planner_inputs(tmp_path / "raw", folder, tiny_plans(patch_size=[64, 64]), tiny_dataset_json())
    monkeypatch.setenv("nnUNet_preprocessed", str(root))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    return folder


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "sub/dir", "x.json", ""])
def test_plan_name_cannot_leave_the_preprocessed_folder(preprocessed, tmp_path, capsys, name):
    before = state(tmp_path)
    refused(["plan", "-d", "Dataset900_Unit", "-p", name], capsys, "--plans")
    assert state(tmp_path) == before


@pytest.mark.parametrize("value", ["0", "-2", "nan", "inf"])
def test_plan_bad_gpu_memory(preprocessed, capsys, value):
    """0 used to plan silently for 8 GB; nan gave a traceback."""
    refused(["plan", "-d", "Dataset900_Unit", "--gpu-memory-gb", value], capsys, "--gpu-memory-gb")
    assert sorted(os.listdir(preprocessed)) == ["dataset.json", "dataset_fingerprint.json", "nnUNetPlans.json"]


def test_plan_never_replaces_plans_it_did_not_write(preprocessed, capsys):
    foreign = preprocessed / "nnUNetResEncUNetMPlans.json"
    foreign.write_text(json.dumps(tiny_plans(plans_name="nnUNetResEncUNetMPlans")))
    before = foreign.read_text()
    refused(["plan", "-d", "Dataset900_Unit", "-p", "nnUNetResEncUNetMPlans"], capsys, foreign)
    assert foreign.read_text() == before


def test_plan_malformed_source_plans(preprocessed, capsys):
    (preprocessed / "nnUNetPlans.json").write_text(json.dumps({"plans_name": "nnUNetPlans"}))
    refused(["plan", "-d", "Dataset900_Unit"], capsys, "malformed", "configurations")


# ================================================================ doctor, demo, top level


def test_doctor_unknown_argument(capsys):
    refused(["doctor", "--fix"], capsys, "--fix", code=2)


def test_doctor_reports_a_bad_backend_setting_instead_of_failing(capsys, monkeypatch):
    monkeypatch.setenv("HYMUNET_SCAN_BACKEND", "gpu-please")
    code, out, err = run(["doctor"], capsys)
    assert code == 0 and "Traceback" not in err
    assert "unavailable: HYMUNET_SCAN_BACKEND='gpu-please'" in out


@pytest.mark.parametrize(
    "argv, culprit, code",
    [
        (["--train-cases", "2"], "--train-cases", 1),
        (["--test-cases", "0"], "--test-cases", 1),
        (["--size", "8"], "--size", 1),
        (["--epochs", "0"], "--epochs", 1),
        (["--seed", "-1"], "--seed", 1),
        (["--device", "tpu"], "--device", 2),
    ],
)
def test_demo_bad_arguments(tmp_path, capsys, argv, culprit, code):
    refused(["demo", "--workdir", tmp_path / "work", *argv], capsys, culprit, code=code)
    assert os.listdir(tmp_path) == []


def test_demo_workdir_is_a_file(tmp_path, capsys):
    target = tmp_path / "work"
    target.write_text("mine")
    refused(["demo", "--workdir", target], capsys, "--workdir", target)
    assert target.read_text() == "mine"


def test_missing_subcommand_kind(capsys):
    refused(["convert"], capsys, "KIND", code=2)


# ================================================================ permissions follow the umask


def test_outputs_follow_the_umask(isic_release, brats_predictions, preprocessed, tmp_path, capsys):
    """Folders were created 0700 and plans files 0600 whatever the umask (shared group folders broke)."""
    previous = os.umask(0o002)
    try:
        assert succeeds(["convert", "isic2018", "-i", isic_release, "-d", 91, "-o", tmp_path / "raw"])
        assert succeeds(
            ["convert", "brats-back", "-i", brats_predictions, "-o", tmp_path / "back", "--release", "2021"]
        )
        assert main(["plan", "-d", "Dataset900_Unit", "-c", "2d"]) == 0
        ref_dir, pred_dir = png_run(tmp_path / "eval")
        assert main(evaluate_args(ref_dir, pred_dir, tmp_path / "evaluated")) == 0
    finally:
        os.umask(previous)
    modes = {
        path: stat.S_IMODE(os.stat(path).st_mode)
        for path in (tmp_path / "raw" / "Dataset091_ISIC2018", tmp_path / "back", tmp_path / "evaluated")
    }
    assert all(mode == 0o775 for mode in modes.values()), modes
    assert stat.S_IMODE(os.stat(preprocessed / "nnUNetHyMUNetPlans.json").st_mode) == 0o664
    assert stat.S_IMODE(os.stat(tmp_path / "evaluated" / "metrics.json").st_mode) == 0o664
