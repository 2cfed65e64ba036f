"""Round trips on fake releases: raw release -> nnU-Net raw dataset accepted by nnU-Net, values spot-checked."""

import filecmp
import json
import multiprocessing
import os
from glob import glob

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from nnunetv2_hymunet.cli import main
from nnunetv2_hymunet.conversion import fake_releases
from nnunetv2_hymunet.conversion.brats import convert_brats
from nnunetv2_hymunet.conversion.drive import convert_drive
from nnunetv2_hymunet.conversion.isic2018 import convert_isic2018
from nnunetv2_hymunet.conversion.synthetic import make_isic_like_case
from nnunetv2_hymunet.errors import HyMUNetError


def verify_with_nnunet(folder, monkeypatch):
    """nnU-Net's own verify_dataset_integrity (raises on any problem it finds)."""
    from nnunetv2.experiment_planning import verify_dataset_integrity as module

    # nnU-Net always opens a 'spawn' pool, which re-imports torch in the child (~5 s per call); 'fork' runs the very
    # same checks without that start-up cost
    fork = multiprocessing.get_context("fork")
    monkeypatch.setattr(module.multiprocessing, "get_context", lambda method=None: fork)
    module.verify_dataset_integrity(folder, num_processes=1)


def tree_files(root):
    return sorted(
        os.path.relpath(p, root) for p in glob(os.path.join(root, "**", "*"), recursive=True) if os.path.isfile(p)
    )


def assert_byte_identical(a, b):
    assert tree_files(a) == tree_files(b)
    for rel in tree_files(a):
        assert filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False), rel


# ----------------------------------------------------------------------------------------------------------- ISIC


@pytest.fixture(scope="module")
def isic_release(tmp_path_factory):
    return fake_releases.make_fake_isic2018(
        str(tmp_path_factory.mktemp("isic") / "release"), num_cases=5, seed=1, image_size=40
    )


def test_make_isic_like_case_is_fast_plain_and_sane():
    rng = np.random.default_rng(0)
    rgb, mask = make_isic_like_case(rng, 96, 128)
    assert rgb.shape == (96, 128, 3) and rgb.dtype == np.uint8
    assert mask.shape == (96, 128) and mask.dtype == bool
    assert 0.01 < mask.mean() < 0.9
    # the lesion is darker than the skin around it
    assert rgb[mask].mean() < rgb[~mask].mean()
    other_rgb, _ = make_isic_like_case(np.random.default_rng(1), 96, 128)
    assert not np.array_equal(rgb, other_rgb)


def test_isic_round_trip(isic_release, tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    target = convert_isic2018(isic_release, str(tmp_path / "raw"), 11)
    assert os.path.basename(target) == "Dataset011_ISIC2018"
    verify_with_nnunet(target, monkeypatch)

    dataset = json.load(open(os.path.join(target, "dataset.json")))
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert dataset["labels"] == {"background": 0, "lesion": 1}
    assert dataset["numTraining"] == 5 and dataset["file_ending"] == ".png"

    record = json.load(open(os.path.join(target, "source_splits.json")))["splits"]
    assert len(record["training"]["cases"]) == 5
    assert len(record["validation"]["cases"]) == 1 and len(record["test"]["cases"]) == 1
    assert record["validation"]["labels"] == "labelsTs"

    for split, folder in (("training", "ISIC2018_Task1-2_Training_Input"), ("test", "ISIC2018_Task1-2_Test_Input")):
        case_id = record[split]["cases"][0]
        out_images, out_labels = ("imagesTr", "labelsTr") if split == "training" else ("imagesTs", "labelsTs")
        source = np.asarray(Image.open(os.path.join(isic_release, folder, f"{case_id}.jpg")))
        converted = np.asarray(Image.open(os.path.join(target, out_images, f"{case_id}_0000.png")))
        assert converted.shape == source.shape and np.array_equal(converted, source)  # lossless re-encode
        truth_folder = folder.replace("Task1-2", "Task1").replace("Input", "GroundTruth")
        mask = np.asarray(Image.open(os.path.join(isic_release, truth_folder, f"{case_id}_segmentation.png")))
        label = np.asarray(Image.open(os.path.join(target, out_labels, f"{case_id}.png")))
        assert set(np.unique(label)) == {0, 1}
        assert np.array_equal(label == 1, mask == 255)
    # ATTRIBUTION.txt / LICENSE.txt were skipped, not converted
    assert all(f.startswith("ISIC_") for f in os.listdir(os.path.join(target, "imagesTr")))


def test_isic_parallel_output_is_byte_identical(isic_release, tmp_path):
    serial = convert_isic2018(isic_release, str(tmp_path / "serial"), 12, num_workers=1)
    parallel = convert_isic2018(isic_release, str(tmp_path / "parallel"), 12, num_workers=2)
    assert_byte_identical(serial, parallel)


def _training_ids(release):
    names = os.listdir(os.path.join(release, "ISIC2018_Task1-2_Training_Input"))
    return sorted(n[:-4] for n in names if n.endswith(".jpg"))


def test_isic_split_file_csv_goes_to_preprocessed(isic_release, tmp_path, monkeypatch, capsys):
    ids = _training_ids(isic_release)
    split_csv = tmp_path / "folds.csv"
    # header, bare numeric ids and a comment are all accepted
    split_csv.write_text("id,fold\n" + "".join(f"{i[5:]},{k % 2}  # fold\n" for k, i in enumerate(ids)))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    code = main(
        [
            "convert",
            "isic2018",
            "-i",
            isic_release,
            "-d",
            "13",
            "-o",
            str(tmp_path / "raw"),
            "--split-file",
            str(split_csv),
        ]
    )
    assert code == 0
    splits = json.load(open(tmp_path / "pre" / "Dataset013_ISIC2018" / "splits_final.json"))
    assert [sorted(f["val"]) for f in splits] == [ids[0::2], ids[1::2]]
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == ids
    assert not os.path.exists(tmp_path / "raw" / "Dataset013_ISIC2018" / "splits_final.json")
    assert "splits_final.json" in capsys.readouterr().out


def test_isic_split_file_json_without_preprocessed_lands_in_raw(isic_release, tmp_path, monkeypatch, capsys):
    ids = _training_ids(isic_release)
    folds = [{"train": [i for i in ids if i != v], "val": [v]} for v in ids]
    split_json = tmp_path / "splits.json"
    split_json.write_text(json.dumps(folds))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    target = convert_isic2018(isic_release, str(tmp_path / "raw"), 14, split_file=str(split_json))
    written = json.load(open(os.path.join(target, "splits_final.json")))
    assert written == [{"train": sorted(f["train"]), "val": f["val"]} for f in folds]
    assert "nnUNet_preprocessed is not set" in capsys.readouterr().out


def test_isic_split_file_that_misses_a_case_is_rejected(isic_release, tmp_path):
    ids = _training_ids(isic_release)
    split_csv = tmp_path / "folds.csv"
    split_csv.write_text("".join(f"{i},{k % 2}\n" for k, i in enumerate(ids[:-1])))
    with pytest.raises(HyMUNetError, match=ids[-1]):
        convert_isic2018(isic_release, str(tmp_path / "raw"), 15, split_file=str(split_csv))
    assert not os.path.exists(tmp_path / "raw" / "Dataset015_ISIC2018")


# ---------------------------------------------------------------------------------------------------------- DRIVE


@pytest.fixture(scope="module")
def drive_release(tmp_path_factory):
    return fake_releases.make_fake_drive(
        str(tmp_path_factory.mktemp("drive") / "release"), num_cases=3, seed=2, scale=0.1
    )


@pytest.fixture(scope="module")
def drive_release_with_test_manual(tmp_path_factory):
    return fake_releases.make_fake_drive(
        str(tmp_path_factory.mktemp("drive_m") / "release"), num_cases=2, seed=3, scale=0.1, with_test_manual=True
    )


def _gif(path):
    return np.asarray(Image.open(path).convert("L"))


def test_fake_drive_matches_the_current_download(drive_release):
    assert sorted(os.listdir(os.path.join(drive_release, "training"))) == ["1st_manual", "images", "mask"]
    assert sorted(os.listdir(os.path.join(drive_release, "test"))) == ["images", "mask"]
    assert sorted(os.listdir(os.path.join(drive_release, "test", "images"))) == [
        "01_test.tif",
        "02_test.tif",
        "03_test.tif",
    ]
    # the GIF trap: Pillow opens them as palette images; converted to L they are 2-D 0/255
    gif = os.path.join(drive_release, "training", "1st_manual", "21_manual1.gif")
    assert Image.open(gif).mode == "P"
    assert _gif(gif).ndim == 2 and set(np.unique(_gif(gif))) == {0, 255}


def test_drive_plain_round_trip(drive_release, tmp_path, monkeypatch):
    target = convert_drive(drive_release, str(tmp_path / "raw"), 21)
    verify_with_nnunet(target, monkeypatch)
    dataset = json.load(open(os.path.join(target, "dataset.json")))
    assert dataset["labels"] == {"background": 0, "vessel": 1} and dataset["numTraining"] == 3
    assert not os.path.exists(os.path.join(target, "labelsTs"))  # the test set has no manuals here
    assert sorted(os.listdir(os.path.join(target, "imagesTs"))) == [f"DRIVE_0{i}_0000.png" for i in (1, 2, 3)]
    assert sorted(os.listdir(os.path.join(target, "fovTs"))) == [f"DRIVE_0{i}.png" for i in (1, 2, 3)]

    manual = _gif(os.path.join(drive_release, "training", "1st_manual", "22_manual1.gif"))
    label = np.asarray(Image.open(os.path.join(target, "labelsTr", "DRIVE_22.png")))
    assert np.array_equal(label, (manual >= 128).astype(np.uint8))
    fov = np.asarray(Image.open(os.path.join(target, "fovTs", "DRIVE_02.png")))
    assert np.array_equal(fov, (_gif(os.path.join(drive_release, "test", "mask", "02_test_mask.gif")) >= 128))
    image = np.asarray(Image.open(os.path.join(target, "imagesTr", "DRIVE_22_0000.png")))
    assert np.array_equal(
        image, np.asarray(Image.open(os.path.join(drive_release, "training", "images", "22_training.tif")))
    )


def test_drive_ignore_mode_with_test_manual(drive_release_with_test_manual, tmp_path, monkeypatch):
    release = drive_release_with_test_manual
    target = convert_drive(release, str(tmp_path / "raw"), 22, fov_mode="ignore", num_workers=2)
    verify_with_nnunet(target, monkeypatch)
    dataset = json.load(open(os.path.join(target, "dataset.json")))
    assert dataset["labels"] == {"background": 0, "vessel": 1, "ignore": 2}
    label = np.asarray(Image.open(os.path.join(target, "labelsTs", "DRIVE_01.png")))
    fov = _gif(os.path.join(release, "test", "mask", "01_test_mask.gif")) >= 128
    manual = _gif(os.path.join(release, "test", "1st_manual", "01_manual1.gif")) >= 128
    assert np.all(label[~fov] == 2)
    assert np.array_equal(label[fov], manual[fov].astype(np.uint8))
    # nnU-Net's metric code drops ignore pixels: the Dice of the manual itself inside the FOV is 1
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    tp, fp, fn, _ = compute_tp_fp_fn_tn(label == 1, manual, ignore_mask=label == 2)
    assert fp == 0 and fn == 0 and tp == manual[fov].sum()


# ---------------------------------------------------------------------------------------------------------- BraTS

RELEASE_LABEL_MAP = {"2021": {1: 1, 2: 2, 4: 3}, "2023": {1: 1, 2: 2, 3: 3}}


@pytest.fixture(scope="module", params=["2021", "2023"])
def brats_release(request, tmp_path_factory):
    path = str(tmp_path_factory.mktemp(f"brats{request.param}") / "release")
    fake_releases.make_fake_brats(
        path, release=request.param, num_cases=3, seed=4, shape=(14, 16, 12), num_unlabelled=1
    )
    return request.param, path


def _seg_files(release_dir):
    return sorted(glob(os.path.join(release_dir, "*", "*", "*seg.nii.gz")))


def test_brats_round_trip_geometry_and_labels(brats_release, tmp_path, monkeypatch):
    year, release_dir = brats_release
    target = convert_brats(release_dir, str(tmp_path / "raw"), 31)
    assert os.path.basename(target) == f"Dataset031_BraTS{year}"
    verify_with_nnunet(target, monkeypatch)
    dataset = json.load(open(os.path.join(target, "dataset.json")))
    assert dataset["numTraining"] == 3 and len(dataset["channel_names"]) == 4
    assert dataset["regions_class_order"] == [2, 1, 3]
    assert len(os.listdir(os.path.join(target, "imagesTs"))) == 4  # the unlabelled case, 4 channels

    for seg_path in _seg_files(release_dir):
        case_id = os.path.basename(os.path.dirname(seg_path))
        converted_path = os.path.join(target, "labelsTr", f"{case_id}.nii.gz")
        source, converted = sitk.ReadImage(seg_path), sitk.ReadImage(converted_path)
        assert source.GetSpacing() == converted.GetSpacing()
        assert source.GetOrigin() == converted.GetOrigin()
        assert source.GetDirection() == converted.GetDirection()
        original = sitk.GetArrayFromImage(source)
        expected = np.zeros_like(original)
        for release_label, dataset_label in RELEASE_LABEL_MAP[year].items():
            expected[original == release_label] = dataset_label
        assert np.array_equal(sitk.GetArrayFromImage(converted), expected)
        # the four channels are the release files, byte for byte, in T1, T1ce, T2, FLAIR order
        suffixes = ("t1", "t1ce", "t2", "flair") if year == "2021" else ("t1n", "t1c", "t2w", "t2f")
        separator = "_" if year == "2021" else "-"
        for channel, suffix in enumerate(suffixes):
            assert filecmp.cmp(
                os.path.join(os.path.dirname(seg_path), f"{case_id}{separator}{suffix}.nii.gz"),
                os.path.join(target, "imagesTr", f"{case_id}_{channel:04d}.nii.gz"),
                shallow=False,
            )


def _regions_to_segmentation(labels, dataset_json, regions_class_order):
    """What nnU-Net does at inference: region masks (as probabilities) -> label map via regions_class_order."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    manager = LabelManager(dataset_json["labels"], regions_class_order=regions_class_order)
    # the region targets nnU-Net trains on
    regions = np.stack([np.isin(labels, region) for region in manager.foreground_regions]).astype(np.float32)
    return np.asarray(manager.convert_probabilities_to_segmentation(regions))


def test_brats_regions_and_back_conversion_reproduce_release_labels(brats_release, tmp_path):
    year, release_dir = brats_release
    target = convert_brats(release_dir, str(tmp_path / "raw"), 32)
    dataset = json.load(open(os.path.join(target, "dataset.json")))
    predictions = tmp_path / "pred"
    predictions.mkdir()
    seen_labels = set()
    swapped_somewhere = False
    for seg_path in _seg_files(release_dir):
        case_id = os.path.basename(os.path.dirname(seg_path))
        label_image = nibabel.load(os.path.join(target, "labelsTr", f"{case_id}.nii.gz"))
        labels = np.asarray(label_image.dataobj)
        seen_labels |= set(np.unique(labels).tolist())
        predicted = _regions_to_segmentation(labels, dataset, dataset["regions_class_order"])
        assert np.array_equal(predicted, labels)
        # the naive order paints NCR and ED the wrong way round: the check above can fail
        swapped_somewhere |= not np.array_equal(_regions_to_segmentation(labels, dataset, [1, 2, 3]), labels)
        nibabel.save(
            nibabel.Nifti1Image(predicted.astype(np.uint8), label_image.affine, label_image.header),
            str(predictions / f"{case_id}.nii.gz"),
        )
    (predictions / "dataset.json").write_text("{}")  # nnU-Net writes these next to predictions; they are skipped
    assert {1, 2, 3} <= seen_labels and swapped_somewhere

    out = tmp_path / "back"
    assert main(["convert", "brats-back", "-i", str(predictions), "-o", str(out), "--release", year]) == 0
    written = sorted(f for f in os.listdir(out) if not f.startswith("."))  # .hymunet-output: the tool's marker
    assert written == sorted(f"{os.path.basename(os.path.dirname(p))}.nii.gz" for p in _seg_files(release_dir))
    for seg_path in _seg_files(release_dir):
        case_id = os.path.basename(os.path.dirname(seg_path))
        original, back = sitk.ReadImage(seg_path), sitk.ReadImage(str(out / f"{case_id}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(original))
        assert back.GetOrigin() == original.GetOrigin() and back.GetDirection() == original.GetDirection()
        assert back.GetSpacing() == original.GetSpacing()


def test_brats_parallel_output_is_byte_identical(brats_release, tmp_path):
    _, release_dir = brats_release
    serial = convert_brats(release_dir, str(tmp_path / "serial"), 33, num_workers=1)
    parallel = convert_brats(release_dir, str(tmp_path / "parallel"), 33, num_workers=2)
    assert_byte_identical(serial, parallel)


def test_make_fake_cli_writes_each_layout(tmp_path):
    assert (
        main(
            [
                "convert",
                "make-fake",
                "brats",
                "-o",
                str(tmp_path / "b"),
                "--release",
                "2023",
                "--num-cases",
                "1",
                "--shape",
                "8,9,10",
                "--num-unlabelled",
                "0",
            ]
        )
        == 0
    )
    case = tmp_path / "b" / "ASNR-MICCAI-BraTS2023-GLI-Challenge-TrainingData" / "BraTS-GLI-00000-000"
    assert sorted(os.listdir(case)) == [f"BraTS-GLI-00000-000-{s}.nii.gz" for s in ("seg", "t1c", "t1n", "t2f", "t2w")]
    assert nibabel.load(str(case / "BraTS-GLI-00000-000-seg.nii.gz")).shape == (8, 9, 10)
    assert (
        main(["convert", "make-fake", "isic2018", "-o", str(tmp_path / "i"), "--num-cases", "2", "--image-size", "24"])
        == 0
    )
    truth = tmp_path / "i" / "ISIC2018_Task1_Training_GroundTruth"
    assert {"ATTRIBUTION.txt", "LICENSE.txt"} <= set(os.listdir(truth))
    assert (
        main(
            [
                "convert",
                "make-fake",
                "drive",
                "-o",
                str(tmp_path / "d"),
                "--num-cases",
                "1",
                "--scale",
                "0.06",
                "--with-test-manual",
            ]
        )
        == 0
    )
    assert os.listdir(tmp_path / "d" / "test" / "1st_manual") == ["01_manual1.gif"]
    # a non-empty folder is refused
    assert main(["convert", "make-fake", "drive", "-o", str(tmp_path / "d")]) == 1
