"""scripts/ab_design.py's summary: a run that gives every held-out blob one class is counted as such."""

import importlib.util
import os

import pytest

pytest.importorskip("scipy")

_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "scripts", "ab_design.py")


def _ab_design():
    spec = importlib.util.spec_from_file_location("ab_design", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_class_runs_are_recognised_and_counted():
    ab = _ab_design()
    truths = [1, 2, 2, 1, 2]
    always_two = [float(t == 2) for t in truths]
    nothing = [0.0] * 5
    reading = [1.0, 1.0, 0.0, 1.0, 1.0]  # right on blobs of both classes: not one fixed answer
    assert ab.one_class_for_every_blob(always_two, truths)
    assert ab.one_class_for_every_blob(nothing, truths)
    assert not ab.one_class_for_every_blob(reading, truths)

    def record(arm, seed, accuracy):
        return {
            "arm": arm,
            "seed": seed,
            "steps": 600,
            "side": 64,
            "loss_last": -0.3,
            "scores": {"accuracy": accuracy, "pixel_accuracy": accuracy, "dice": accuracy},
        }

    records = [record("default", 0, always_two), record("default", 1, reading), record("other", 0, reading)]
    rows = {
        line.split("|")[1].strip(): line for line in ab.summarise(records, ["default", "other"], truths).splitlines()
    }
    assert "| 1 of 2 |" in rows["default"]
    assert "| 0 of 1 |" in rows["other"]
