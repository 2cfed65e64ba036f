"""What a benchmark trainer copy is (`<Trainer>_bench`, `<Trainer>_bench_s<seed>`) and the short schedule it reads
(through nnunetv2_hymunet.nnunet_tools.read_schedule(SCHEDULE_ENV), as the demo trainer reads its own).

Light on purpose (no torch, no nnunetv2): the CLI, the runner and the trainer copies in ext_trainers/ all use it.
"""

import re

# environment variable -> trainer attribute it sets
SCHEDULE_ENV = {
    "HYMUNET_BENCH_EPOCHS": "num_epochs",
    "HYMUNET_BENCH_ITERATIONS": "num_iterations_per_epoch",
    "HYMUNET_BENCH_VAL_ITERATIONS": "num_val_iterations_per_epoch",
}
BENCH_SUFFIX = "_bench"
# <base>_bench or <base>_bench_s<seed>; the seed is part of the class name, so `--c` and nnUNetv2_predict (which look
# the class up by the name stored in the checkpoint) get the same seeded trainer back
BENCH_NAME = re.compile(r"^(?P<base>\w+?)_bench(?:_s(?P<seed>\d+))?$")


def bench_trainer_name(trainer: str, seed: int = None) -> str:
    """The benchmark copy of `trainer` (an existing copy's name is reduced to its base first)."""
    match = BENCH_NAME.match(trainer)
    base = match.group("base") if match else trainer
    return base + BENCH_SUFFIX + (f"_s{int(seed)}" if seed is not None else "")


def parse_bench_name(name: str):
    """(base trainer name, seed or None) for a benchmark copy's class name, or None for any other name."""
    match = BENCH_NAME.match(name)
    if not match:
        return None
    return match.group("base"), (int(match.group("seed")) if match.group("seed") is not None else None)
