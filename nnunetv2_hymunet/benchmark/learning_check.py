"""Does every part of the network learn under a trainer's recipe? The gradient-driven change of each parameter.

A run of the trainer's own `train_step` on synthetic batches (a bright square to segment) is compared with a twin run
from the same initialisation whose loss is multiplied by zero: the twin moves only by what weight decay (and
momentum on it) does, so `||w_run - w_twin|| / ||w_init||` is the change the gradients caused. The medians per
category tell whether the selective scan's own parameters (A_log, D, dt_proj, x_proj) train at all next to the convs.

Used by tests/test_training_recipe.py and scripts/check_mamba_learning.py.
"""

import os
import tempfile
from typing import Dict

import numpy as np
import torch

from nnunetv2_hymunet.training.optimization import is_mamba_parameter, is_selective_scan_parameter

CATEGORIES = ("conv weights", "Mamba in_proj / out_proj", "selective scan (A_log, D, dt_proj, x_proj)")


def small_2d_plans(side: int = 32, features=(8, 16, 32, 32)) -> tuple:
    """(plans, dataset_json) of a small 2D PlainConvUNet configuration, as nnU-Net writes them."""
    from nnunetv2_hymunet.benchmark.presets import _configuration, _plans

    configuration = _configuration(2, (side, side), 2, (1.0, 1.0), features, 1, "nnUNetPlans_2d")
    configuration["use_mask_for_norm"] = [False]
    plans = _plans(
        "Dataset998_LearningCheck", "2d", configuration, "NaturalImage2DIO", (999.0, 1.0, 1.0), (1, side, side), 1
    )
    dataset_json = {
        "channel_names": {"0": "grey"},
        "labels": {"background": 0, "square": 1},
        "numTraining": 1,
        "file_ending": ".png",
    }
    return plans, dataset_json


def initialized_trainer(
    trainer_class, plans: dict, dataset_json: dict, workdir: str, configuration: str = "2d", attributes: dict = None
):
    """`trainer_class` initialised on `plans` without a dataset on disk (for train_step on hand-made batches);
    `attributes` are set on the trainer before it initialises (e.g. num_epochs, enable_deep_supervision)."""
    os.environ["nnUNet_results"] = os.path.join(workdir, "results")
    os.environ["nnUNet_preprocessed"] = os.path.join(workdir, "preprocessed")
    identifier = plans["configurations"][configuration]["data_identifier"]
    folder = os.path.join(workdir, "preprocessed", plans["dataset_name"], identifier)
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, "case.b2nd"), "w").close()  # initialize() infers the dataset format from the files
    trainer = trainer_class(dict(plans, continue_training=False), configuration, 0, dataset_json, torch.device("cpu"))
    for name, value in (attributes or {}).items():
        setattr(trainer, name, value)
    trainer.initialize()
    return trainer


def training_target(trainer, seg: torch.Tensor):
    """A (batch, 1, *spatial) label map as the trainer's loss takes it: one map per deep-supervision scale, or the
    map itself when deep supervision is off."""
    if not trainer.enable_deep_supervision:
        return seg
    return [
        seg
        if all(s == 1 for s in scale)
        else torch.nn.functional.interpolate(seg, scale_factor=tuple(float(s) for s in scale), mode="nearest")
        for scale in trainer._get_deep_supervision_scales()
    ]


def square_batches(trainer, n: int, seed: int = 0, size: int = 32, batch_size: int = 2) -> list:
    """Images with one bright square labelled 1, targets at every deep-supervision scale of `trainer`."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n):
        data = rng.normal(0, 0.3, (batch_size, 1, size, size)).astype(np.float32)
        seg = np.zeros((batch_size, 1, size, size), dtype=np.float32)
        for b in range(batch_size):
            y, x = rng.integers(2, size - 12, 2)
            side = rng.integers(6, 11)
            data[b, 0, y : y + side, x : x + side] += 1.5
            seg[b, 0, y : y + side, x : x + side] = 1
        batches.append({"data": torch.from_numpy(data), "target": training_target(trainer, torch.from_numpy(seg))})
    return batches


def category(name: str, parameter: torch.Tensor) -> str:
    if is_selective_scan_parameter(name):
        return CATEGORIES[2]
    if is_mamba_parameter(name) and (".in_proj." in name or ".out_proj." in name):
        return CATEGORIES[1]
    if not is_mamba_parameter(name) and name.endswith("weight") and parameter.ndim >= 4:
        return CATEGORIES[0]
    return ""


def gradient_driven_change(
    trainer_class, steps: int = 25, seed: int = 0, plans=None, dataset_json=None, workdir: str = None
) -> Dict[str, Dict[str, float]]:
    """{category: {parameter name: relative gradient-driven change}} after `steps` train_step calls."""
    if plans is None:
        plans, dataset_json = small_2d_plans()
    with tempfile.TemporaryDirectory(dir=workdir) as folder:
        runs = []
        for name in ("run", "twin"):
            torch.manual_seed(seed)
            trainer = initialized_trainer(trainer_class, plans, dataset_json, os.path.join(folder, name))
            if name == "twin":  # the same trainer, but weight decay alone moves its weights
                loss = trainer.loss
                trainer.loss = lambda output, target, loss=loss: 0.0 * loss(output, target)
            runs.append(trainer)
        initial = {n: p.detach().clone() for n, p in runs[0].network.named_parameters()}
        batches = square_batches(runs[0], steps, seed)
        for trainer in runs:
            trainer.on_train_epoch_start()
            for batch in batches:
                trainer.train_step(batch)
        twin = dict(runs[1].network.named_parameters())
        out = {c: {} for c in CATEGORIES}
        for name, p in runs[0].network.named_parameters():
            c = category(name, p)
            if c:
                change = (p.detach() - twin[name].detach()).norm() / initial[name].norm().clamp_min(1e-12)
                out[c][name] = float(change)
    return out
