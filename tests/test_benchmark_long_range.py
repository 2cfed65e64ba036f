"""The long-range task (SynthOppositeKey2D): its rule, its distances against the conv-only receptive field, the
nnUNetLongRangePlans derivation and blob-class accuracy."""

import json

import numpy as np
import pytest

from nnunetv2_hymunet.benchmark.long_range import (
    DATASET_KEY,
    LONG_RANGE_PLANS,
    blob_class_scores,
    choose_stages,
    conv_receptive_field,
    cut_plans,
    measured_receptive_field,
    score_folder,
    write_long_range_plans,
)
from nnunetv2_hymunet.benchmark.presets import ProfilePlan, _configuration, _plans
from nnunetv2_hymunet.benchmark.suite import (
    LONG_RANGE_TASK,
    SIZES,
    chebyshev_distance,
    long_range_case,
    long_range_description,
    min_marker_distance,
)
from nnunetv2_hymunet.errors import HyMUNetError

BRIGHT, DARK = 242, 13  # round(0.95 * 255), round(0.05 * 255)


def _nnunet_like_plans(side: int, n_stages: int) -> dict:
    """The 2d plans nnU-Net 2.8 writes for side x side grey PNGs (3x3 convs, strides 1, 2, 2, ..., 2 convs/stage)."""
    features = [min(32 * 2**s, 512) for s in range(n_stages)]
    configuration = _configuration(2, (side, side), 2, (1.0, 1.0), features, 1, "nnUNetPlans_2d")
    return _plans(
        "Dataset974_SynthOppositeKey2D", "2d", configuration, "NaturalImage2DIO", (999.0, 1.0, 1.0), (1, side, side), 1
    )


DATASET_JSON = {
    "channel_names": {"0": "grey"},
    "labels": {"background": 0, "blob_key_bright": 1, "blob_key_dark": 2},
    "numTraining": 2,
    "file_ending": ".png",
}


@pytest.mark.parametrize("size", ["small", "tiny"])
def test_every_case_keeps_both_markers_out_of_the_conv_receptive_field(size):
    n_cases, side = SIZES[LONG_RANGE_TASK][size]
    _, rf, stages = long_range_description(side)
    plans = cut_plans(_nnunet_like_plans(side, int(np.log2(side / 4)) + 1), "2d", stages)
    assert max(conv_receptive_field(plans["configurations"]["2d"]["architecture"]["arch_kwargs"], 2)) == rf
    limit = min_marker_distance(side)
    assert rf < limit
    print(f"{size}: side {side}, {stages} stages, conv-only receptive field {rf} px < minimum distance {limit} px")
    rng = np.random.default_rng(0)  # the suite's seed for this task is 0 + its offset; any seed must hold
    classes = []
    for _ in range(n_cases):
        image, label, masks = long_range_case(rng, side)
        blob, key, decoy = masks["blob"], masks["key"], masks["decoy"]
        for a, b in ((blob, key), (blob, decoy), (key, decoy)):
            assert chebyshev_distance(a, b) >= limit > rf
        # the label is the key's brightness; one bright and one dark marker of the same size in every image, so the
        # global intensity statistics do not tell the classes apart
        key_bright = bool((image[key] == BRIGHT).all())
        assert (image[key] == (BRIGHT if key_bright else DARK)).all()
        assert (image[decoy] == (DARK if key_bright else BRIGHT)).all() and key.sum() == decoy.sum()
        assert set(np.unique(label[blob])) == {1 if key_bright else 2} and not label[~blob].any()
        # the key is opposite the blob through the centre, the decoy a quarter turn away
        centre = (side - 1) / 2
        b, k, d = (np.argwhere(m).mean(0) - centre for m in (blob, key, decoy))
        assert np.allclose(k, -b, atol=2.5) and abs(np.dot(b, d)) < 0.2 * np.dot(b, b)
        classes.append(1 if key_bright else 2)
    assert {1, 2} <= set(classes)


def test_chebyshev_distance():
    a, b = np.zeros((20, 20), bool), np.zeros((20, 20), bool)
    a[2, 3], b[9, 5] = True, True
    assert chebyshev_distance(a, b) == 7


def _plan(side: int, stages: int) -> ProfilePlan:
    plans = cut_plans(_nnunet_like_plans(side, int(np.log2(side / 4)) + 1), "2d", stages)
    return ProfilePlan(plans, "2d", DATASET_JSON, "test", (side, side))


def _analytic(plan: ProfilePlan) -> list:
    return conv_receptive_field(plan.configuration_dict["architecture"]["arch_kwargs"], 2)


def test_analytic_receptive_field_matches_the_gradient_support():
    """The analytic walk equals the measured field of nnU-Net's PlainConvUNet and bounds the conv-only HyM-UNet's."""
    for stages, expected in ((2, 15), (3, 35)):
        plan = _plan(64, stages)
        assert _analytic(plan) == [expected, expected]
        assert measured_receptive_field(plan, "nnUNetTrainer", repeats=1) == [expected, expected]
        assert max(measured_receptive_field(plan, "nnUNetTrainerHyMUNet_noMamba", repeats=1)) <= expected
    assert _analytic(_plan(128, 4)) == [79, 79]  # the transposed convs' phases add 4 px to a naive recurrence's 75


def test_analytic_receptive_field_matches_the_gradient_support_at_four_stages():
    plan = _plan(128, 4)
    assert measured_receptive_field(plan, "nnUNetTrainer", repeats=1) == _analytic(plan) == [79, 79]


def test_measured_field_of_a_mamba_network_is_the_whole_patch():
    assert measured_receptive_field(_plan(32, 3), "nnUNetTrainerHyMUNet", repeats=1) == [32, 32]


def test_choose_stages_and_cut_plans():
    plans = _nnunet_like_plans(128, 6)
    assert choose_stages(plans, "2d", 41) == 3 and choose_stages(plans, "2d", 80) == 4
    with pytest.raises(HyMUNetError, match="even 2 stages"):
        choose_stages(plans, "2d", 10)
    cut = cut_plans(plans, "2d", 3)
    kwargs = cut["configurations"]["2d"]["architecture"]["arch_kwargs"]
    assert kwargs["n_stages"] == 3 and len(kwargs["features_per_stage"]) == 3 and len(kwargs["strides"]) == 3
    assert len(kwargs["n_conv_per_stage_decoder"]) == 2 and cut["plans_name"] == LONG_RANGE_PLANS
    # same preprocessing: the data identifier and everything outside the network are kept
    assert cut["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] == 6  # input untouched
    with pytest.raises(HyMUNetError, match="--stages 7"):
        cut_plans(plans, "2d", 7)


@pytest.fixture
def preprocessed(tmp_path, monkeypatch):
    folder = tmp_path / "pre" / "Dataset974_SynthOppositeKey2D"
    folder.mkdir(parents=True)
    (folder / "nnUNetPlans.json").write_text(json.dumps(_nnunet_like_plans(64, 5)))
    (folder / "dataset.json").write_text(json.dumps({**DATASET_JSON, DATASET_KEY: {"min_marker_distance_px": 20}}))
    for name in ("nnUNet_raw", "nnUNet_results"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    return folder


def test_write_long_range_plans(preprocessed):
    messages = []
    path = write_long_range_plans("974", trainers=("nnUNetTrainer",), log=messages.append)
    plans = json.loads(open(path).read())
    assert path.endswith(f"{LONG_RANGE_PLANS}.json") and plans["plans_name"] == LONG_RANGE_PLANS
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] == 2
    assert plans["configurations"]["2d"]["data_identifier"] == "nnUNetPlans_2d"  # nnUNetPlans' preprocessed data
    assert plans[DATASET_KEY]["receptive_field_px"] == [15, 15]
    assert plans[DATASET_KEY]["measured_receptive_field_px"] == {"nnUNetTrainer": [15, 15]}
    assert "receptive field 15x15 px" in messages[0] and "minimum blob-marker distance 20 px" in messages[0]
    with pytest.raises(HyMUNetError, match=r"receptive field \(35 px\) is not smaller than .*\(20 px\)"):
        write_long_range_plans("974", n_stages=3, trainers=("nnUNetTrainer",), log=messages.append)
    (preprocessed / "dataset.json").write_text(json.dumps(DATASET_JSON))  # not a long-range dataset
    with pytest.raises(HyMUNetError, match="give --stages"):
        write_long_range_plans("974", trainers=(), log=messages.append)


def test_blob_class_scores():
    reference = np.zeros((6, 6), np.uint8)
    reference[1:4, 1:4] = 2  # 9 blob pixels of class 2
    assert blob_class_scores(reference, reference) == {
        "reference_class": 2,
        "predicted_class": 2,
        "accuracy": 1.0,
        "fraction": 1.0,
    }
    wrong = blob_class_scores(np.where(reference > 0, 1, 0), reference)
    assert wrong["accuracy"] == 0.0 and wrong["fraction"] == 0.0 and wrong["predicted_class"] == 1
    mostly = reference.copy()
    mostly[1, 1:3] = 1  # 7 right, 2 wrong
    scores = blob_class_scores(mostly, reference)
    assert scores["accuracy"] == 1.0 and scores["fraction"] == pytest.approx(7 / 9)
    partly = np.zeros_like(reference)
    partly[1, 1] = 2  # one pixel found, of the right class, the rest background: still the majority class
    assert blob_class_scores(partly, reference)["accuracy"] == 1.0
    assert blob_class_scores(np.zeros_like(reference), reference)["predicted_class"] == 0  # nothing found: wrong
    tie = np.zeros_like(reference)
    tie[1, 1:3], tie[2, 1:3] = 1, 2
    assert blob_class_scores(tie, reference)["accuracy"] == 0.0  # 2 vs 2: no majority
    with pytest.raises(HyMUNetError, match="no blob"):
        blob_class_scores(reference, np.zeros_like(reference))


def test_score_folder_reads_pngs(tmp_path):
    from PIL import Image

    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir()
    ref.mkdir()
    reference = np.zeros((8, 8), np.uint8)
    reference[2:5, 2:5] = 1
    for name, prediction in (("a", reference), ("b", np.where(reference > 0, 2, 0).astype(np.uint8))):
        Image.fromarray(reference).save(ref / f"{name}.png")
        Image.fromarray(prediction).save(pred / f"{name}.png")
    dataset_json = tmp_path / "dataset.json"
    dataset_json.write_text(json.dumps(DATASET_JSON))
    scores = score_folder(str(pred), str(ref), str(dataset_json))
    assert [c["case"] for c in scores["per_case"]] == ["a", "b"]
    assert scores["accuracy"] == 0.5 and [c["accuracy"] for c in scores["per_case"]] == [1.0, 0.0]
    (ref / "b.png").unlink()
    with pytest.raises(HyMUNetError, match="b.png: missing reference"):
        score_folder(str(pred), str(ref), str(dataset_json))
