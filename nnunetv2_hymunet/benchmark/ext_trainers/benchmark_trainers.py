"""Short-schedule copies of nnU-Net's and our trainers for benchmark studies: `<Trainer>_bench`.

`hymunet benchmark run --epochs E --iterations I --val-iterations V` trains `<Trainer>_bench` instead of `<Trainer>`
and adds this folder to `nnUNet_extTrainer` for its nnU-Net subprocesses (to predict with such a model later, add it
yourself: `export nnUNet_extTrainer=<this folder>`). The schedule is read from the environment when the trainer
starts (HYMUNET_BENCH_EPOCHS, HYMUNET_BENCH_ITERATIONS, HYMUNET_BENCH_VAL_ITERATIONS); everything else, network
included, is the base trainer's. nnU-Net imports every module of this folder, so it holds only this one.
"""

import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunetv2_hymunet.training as hymunet_trainers

SCHEDULE_ENV = {"HYMUNET_BENCH_EPOCHS": "num_epochs", "HYMUNET_BENCH_ITERATIONS": "num_iterations_per_epoch",
                "HYMUNET_BENCH_VAL_ITERATIONS": "num_val_iterations_per_epoch"}
SUFFIX = "_bench"


def _bench_class(base):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        for variable, attribute in SCHEDULE_ENV.items():
            value = os.environ.get(variable, "").strip()
            if value:
                setattr(self, attribute, int(value))
        self.save_every = max(1, min(self.save_every, self.num_epochs))

    return type(base.__name__ + SUFFIX, (base,), {"__init__": __init__, "__module__": __name__})


BASES = [nnUNetTrainer] + [getattr(hymunet_trainers, name) for name in hymunet_trainers.__all__]
for _base in BASES:
    globals()[_base.__name__ + SUFFIX] = _bench_class(_base)
