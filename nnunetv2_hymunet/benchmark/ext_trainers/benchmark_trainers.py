"""Benchmark copies of any nnU-Net trainer: `<Trainer>_bench` (short schedule) and `<Trainer>_bench_s<seed>` (short
schedule, seeded).

`hymunet benchmark run` trains these copies instead of `<Trainer>` when it is given a short schedule (`--epochs E
--iterations I --val-iterations V`) or `--seeds`, and adds this folder to `nnUNet_extTrainer` for its nnU-Net
subprocesses (to predict with such a model later, add it yourself: `export nnUNet_extTrainer=<this folder>`).

- The schedule is read from the environment when the trainer starts (HYMUNET_BENCH_EPOCHS, HYMUNET_BENCH_ITERATIONS,
  HYMUNET_BENCH_VAL_ITERATIONS; unset: the base trainer's).
- A seeded copy seeds python's `random`, numpy and torch with its seed right before the network is built (at the
  start of `initialize`), so two seeds of one model differ in initial weights and in the augmentation draws
  (with nnUNet_n_proc_DA=0 the augmentation runs in the main process and draws from the seeded generators).
- A network of two stages trains without deep supervision (nnU-Net's weights would give it a NaN loss).
- On the CPU, an explicit OMP_NUM_THREADS sets torch's threads (nnUNetv2_train would use every CPU).
- Everything else, network included, is the base trainer's.

Copies are made on first access (a module `__getattr__`, which nnU-Net's class search reaches through `hasattr`), for
every base trainer nnU-Net can find: its own, ours, and those in `nnUNet_extTrainer` folders. nnU-Net imports every
module of this folder, so it holds only this one.
"""

import os
import random

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_hymunet.benchmark.schedule import SCHEDULE_ENV, parse_bench_name
from nnunetv2_hymunet.nnunet_tools import read_schedule


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


def honour_omp_num_threads(device) -> None:
    """On the CPU, nnUNetv2_train sets torch's threads to the machine's CPU count, whatever OMP_NUM_THREADS says. A
    benchmark that runs trainings side by side sets OMP_NUM_THREADS (e.g. 1 each): several processes with one OpenMP
    thread per CPU each spin at their barriers against each other, and networks with many small parallel regions
    (HyM-UNet's) slow down several times more than plain conv nets. Honoured only when it is a positive integer."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if torch.device(device).type == "cpu" and value.isdigit() and int(value) > 0:
        torch.set_num_threads(int(value))


def _bench_class(base, name: str, seed):
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),
    ):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        honour_omp_num_threads(device)
        for attribute, value in read_schedule(SCHEDULE_ENV).items():
            setattr(self, attribute, value)
        self.save_every = max(1, min(self.save_every, self.num_epochs))
        if len(self.configuration_manager.pool_op_kernel_sizes) < 3:
            # two stages give one deep-supervision output, whose weight nnU-Net zeroes (it drops the lowest
            # resolution) and then normalises: 0/0, a NaN loss. Without deep supervision the loss is the same DC+CE
            # on that one full-resolution output. (nnUNetLongRangePlans of 64 px images have two stages.)
            self.enable_deep_supervision = False

    def initialize(self):
        if seed is not None and not self.was_initialized:
            seed_everything(seed)
        base.initialize(self)

    attributes = {"__init__": __init__, "__module__": __name__, "__qualname__": name, "bench_seed": seed}
    if seed is not None:
        attributes["initialize"] = initialize
    return type(name, (base,), attributes)


def _find_base(name: str):
    from nnunetv2_hymunet.benchmark.models import find_trainer_class
    from nnunetv2_hymunet.errors import HyMUNetError

    try:
        return find_trainer_class(name)
    except HyMUNetError:
        return None


def __getattr__(name: str):
    parsed = parse_bench_name(name)
    base = _find_base(parsed[0]) if parsed else None
    if base is None or not issubclass(base, nnUNetTrainer):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    cls = _bench_class(base, name, parsed[1])
    globals()[name] = cls  # one class per name: pickling and a second lookup find the same object
    return cls
