"""Bad input: non-zero exit, every offending file named, and no dataset folder (or partial folder) left behind."""

import gzip
import os
import shutil
import subprocess
import sys
from glob import glob

import nibabel
import numpy as np
import pytest
from PIL import Image

from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.conversion import fake_releases

HYMUNET = os.path.join(os.path.dirname(sys.executable), "hymunet")


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def assert_nothing_written(raw):
    leftovers = glob(os.path.join(str(raw), "Dataset*")) + glob(os.path.join(str(raw), ".Dataset*"))
    assert leftovers == []


@pytest.fixture(scope="module")
def isic_template(tmp_path_factory):
    return fake_releases.make_fake_isic2018(
        str(tmp_path_factory.mktemp("isic") / "release"),
        num_cases=6,
        seed=5,
        image_size=32,
        num_validation=0,
        num_test=0,
    )


@pytest.fixture
def bad_isic(isic_template, tmp_path):
    """A copy of the fake release with five different defects, one per file."""
    release = str(tmp_path / "isic")
    shutil.copytree(isic_template, release)
    images = os.path.join(release, "ISIC2018_Task1-2_Training_Input")
    truth = os.path.join(release, "ISIC2018_Task1_Training_GroundTruth")
    ids = sorted(f[:-4] for f in os.listdir(images) if f.endswith(".jpg"))
    bad = {}
    os.remove(os.path.join(truth, f"{ids[0]}_segmentation.png"))
    bad["missing mask"] = os.path.join(images, f"{ids[0]}.jpg")
    os.remove(os.path.join(images, f"{ids[1]}.jpg"))
    bad["orphan mask"] = os.path.join(truth, f"{ids[1]}_segmentation.png")
    with open(os.path.join(images, f"{ids[2]}.jpg"), "r+b") as f:
        f.truncate(40)
    bad["truncated jpeg"] = os.path.join(images, f"{ids[2]}.jpg")
    mask_path = os.path.join(truth, f"{ids[3]}_segmentation.png")
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = 128
    Image.fromarray(mask).save(mask_path)
    bad["non-binary mask"] = mask_path
    mask_path = os.path.join(truth, f"{ids[4]}_segmentation.png")
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask_path)
    bad["size mismatch"] = mask_path
    return release, bad


def test_isic_lists_every_bad_file_and_writes_nothing(bad_isic, tmp_path, capsys):
    release, bad = bad_isic
    raw = tmp_path / "raw"
    code, err = run_cli(["convert", "isic2018", "-i", release, "-d", "40", "-o", str(raw), "-np", "2"], capsys)
    assert code == 1
    for path in bad.values():
        assert path in err
    assert "has no mask" in err and "has no image" in err and "cannot be read" in err
    assert "mask values must be 0 and 255" in err and "differs from image size" in err
    assert "5 problem(s)" in err
    assert_nothing_written(raw)
    assert not raw.exists()  # the run created it and removes it again


def test_console_script_reports_bad_input(bad_isic, tmp_path):
    release, bad = bad_isic
    raw = tmp_path / "raw"
    raw.mkdir()
    result = subprocess.run(
        [HYMUNET, "convert", "isic2018", "--input", release, "--dataset", "41", "--output", str(raw)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert bad["truncated jpeg"] in result.stderr and "Traceback" not in result.stderr
    assert_nothing_written(raw)
    assert raw.exists()  # a folder that was there before stays


def test_missing_output_and_bad_arguments_are_reported(isic_template, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    code, err = run_cli(["convert", "isic2018", "-i", isic_template, "-d", "42"], capsys)
    assert code == 1 and "--output" in err and "nnUNet_raw" in err
    code, err = run_cli(["convert", "isic2018", "-i", isic_template, "-d", "1000", "-o", str(tmp_path)], capsys)
    assert code == 1 and "-d '1000'" in err
    code, err = run_cli(["convert", "isic2018", "-i", str(tmp_path / "nope"), "-d", "42", "-o", str(tmp_path)], capsys)
    assert code == 1 and str(tmp_path / "nope") in err
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "env_raw"))
    assert main(["convert", "isic2018", "-i", isic_template, "-d", "42"]) == 0
    assert os.path.isdir(tmp_path / "env_raw" / "Dataset042_ISIC2018" / "imagesTr")


def test_existing_dataset_id_needs_overwrite(isic_template, tmp_path, capsys):
    raw = tmp_path / "raw"
    old = raw / "Dataset043_SomethingElse"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("old")
    code, err = run_cli(["convert", "isic2018", "-i", isic_template, "-d", "43", "-o", str(raw)], capsys)
    assert code == 1 and "Dataset043_SomethingElse" in err and "--overwrite" in err
    assert (old / "keep.txt").read_text() == "old"
    assert sorted(os.listdir(raw)) == ["Dataset043_SomethingElse"]
    # --overwrite replaces only what hymunet wrote: a foreign dataset with the same id stays
    code, err = run_cli(["convert", "isic2018", "-i", isic_template, "-d", "43", "-o", str(raw), "--overwrite"], capsys)
    assert code == 1 and "Dataset043_SomethingElse" in err and "not written by hymunet" in err
    assert (old / "keep.txt").read_text() == "old" and sorted(os.listdir(raw)) == ["Dataset043_SomethingElse"]
    shutil.rmtree(old)
    assert main(["convert", "isic2018", "-i", isic_template, "-d", "43", "-o", str(raw), "--name", "First"]) == 0
    assert main(["convert", "isic2018", "-i", isic_template, "-d", "43", "-o", str(raw), "--overwrite"]) == 0
    assert sorted(os.listdir(raw)) == ["Dataset043_ISIC2018"]


def test_failed_overwrite_keeps_the_old_dataset(bad_isic, isic_template, tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["convert", "isic2018", "-i", isic_template, "-d", "44", "-o", str(raw)]) == 0
    before = sorted(os.listdir(raw / "Dataset044_ISIC2018" / "imagesTr"))
    code, _ = run_cli(["convert", "isic2018", "-i", bad_isic[0], "-d", "44", "-o", str(raw), "--overwrite"], capsys)
    assert code == 1
    assert sorted(os.listdir(raw)) == ["Dataset044_ISIC2018"]
    assert sorted(os.listdir(raw / "Dataset044_ISIC2018" / "imagesTr")) == before


@pytest.fixture(scope="module")
def drive_template(tmp_path_factory):
    return fake_releases.make_fake_drive(
        str(tmp_path_factory.mktemp("drive") / "release"), num_cases=3, seed=6, scale=0.08
    )


def test_drive_bad_files(drive_template, tmp_path, capsys):
    release = str(tmp_path / "drive")
    shutil.copytree(drive_template, release)
    missing_fov = os.path.join(release, "training", "images", "21_training.tif")
    os.remove(os.path.join(release, "training", "mask", "21_training_mask.gif"))
    small_manual = os.path.join(release, "training", "1st_manual", "22_manual1.gif")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(small_manual)
    broken_test_fov = os.path.join(release, "test", "mask", "02_test_mask.gif")
    with open(broken_test_fov, "wb") as f:
        f.write(b"GIF89a not really")
    raw = tmp_path / "raw"
    code, err = run_cli(["convert", "drive", "-i", release, "-d", "50", "-o", str(raw)], capsys)
    assert code == 1
    for path in (missing_fov, small_manual, broken_test_fov):
        assert path in err
    assert "3 problem(s)" in err
    assert_nothing_written(raw)


@pytest.fixture(scope="module")
def brats_template(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("brats") / "release")
    return fake_releases.make_fake_brats(path, release="2021", num_cases=4, seed=7, shape=(10, 11, 9), num_unlabelled=0)


def test_brats_bad_files(brats_template, tmp_path, capsys):
    release = str(tmp_path / "brats")
    shutil.copytree(brats_template, release)
    cases = sorted(glob(os.path.join(release, "*", "BraTS2021_*")))
    missing = os.path.join(cases[0], "BraTS2021_00000_t1ce.nii.gz")
    os.remove(missing)
    wrong_labels = os.path.join(cases[1], "BraTS2021_00001_seg.nii.gz")
    seg = nibabel.load(wrong_labels)
    data = np.asarray(seg.dataobj).copy()
    data[0, 0, 0] = 3  # label 3 does not exist in BraTS 2021
    nibabel.save(nibabel.Nifti1Image(data, seg.affine, seg.header), wrong_labels)
    wrong_shape = os.path.join(cases[2], "BraTS2021_00002_flair.nii.gz")
    nibabel.save(nibabel.Nifti1Image(np.zeros((10, 11, 8), np.int16), seg.affine), wrong_shape)
    corrupt = os.path.join(cases[3], "BraTS2021_00003_t2.nii.gz")
    with open(corrupt, "rb") as f:
        payload = gzip.decompress(f.read())
    with open(corrupt, "wb") as f:
        f.write(gzip.compress(payload)[:-60])  # cut off the end of the stream
    raw = tmp_path / "raw"
    code, err = run_cli(["convert", "brats", "-i", release, "-d", "60", "-o", str(raw), "-np", "2"], capsys)
    assert code == 1
    for path in (missing, wrong_labels, wrong_shape, corrupt):
        assert path in err
    assert "missing modality" in err and "found also [3]" in err and "shape" in err and "cannot be read" in err
    assert_nothing_written(raw)


def test_brats_release_mismatch_and_mixed_naming(brats_template, tmp_path, capsys):
    code, err = run_cli(
        ["convert", "brats", "-i", brats_template, "-d", "61", "-o", str(tmp_path / "raw"), "--release", "2023"], capsys
    )
    assert code == 1 and "2021" in err
    mixed = tmp_path / "mixed"
    shutil.copytree(brats_template, mixed)
    os.makedirs(mixed / "BraTS-GLI-00000-000")
    code, err = run_cli(["convert", "brats", "-i", str(mixed), "-d", "61", "-o", str(tmp_path / "raw")], capsys)
    assert code == 1 and "mixes" in err
    assert_nothing_written(tmp_path / "raw")


def test_brats_back_rejects_labels_outside_the_dataset_space(tmp_path, capsys):
    predictions = tmp_path / "pred"
    predictions.mkdir()
    good = np.zeros((4, 4, 4), np.uint8)
    good[1, 1, 1] = 3
    nibabel.save(nibabel.Nifti1Image(good, np.eye(4)), str(predictions / "BraTS2021_00001.nii.gz"))
    bad = good.copy()
    bad[2, 2, 2] = 4  # already a release label: converting it "back" again would be wrong
    bad_path = str(predictions / "BraTS2021_00002.nii.gz")
    nibabel.save(nibabel.Nifti1Image(bad, np.eye(4)), bad_path)
    out = tmp_path / "out"
    code, err = run_cli(["convert", "brats-back", "-i", str(predictions), "-o", str(out), "--release", "2021"], capsys)
    assert code == 1 and bad_path in err and "BraTS2021_00001" not in err
    assert not out.exists() and os.listdir(tmp_path) == ["pred"]
