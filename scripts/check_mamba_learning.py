"""Which parameters train under a trainer's recipe: the gradient-driven relative change per parameter category.

Runs `train_step` of each trainer on the same synthetic batches from the same initialisation, next to a twin whose
loss is multiplied by zero (what weight decay alone does), and prints the median, min and max of
||w_run - w_twin|| / ||w_init|| per category (benchmark/learning_check.py).

  .venv/bin/python scripts/check_mamba_learning.py --steps 60
"""

import argparse

import numpy as np


def main(argv=None):
    import nnunetv2_hymunet.training as training
    from nnunetv2_hymunet.benchmark.learning_check import CATEGORIES, gradient_driven_change

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "-tr", "--trainers", nargs="+", default=["nnUNetTrainerHyMUNet", "nnUNetTrainerHyMUNet_nnUNetSGD"]
    )
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [name for name in args.trainers if name not in training.__all__]
    if unknown:
        parser.error(f"-tr {' '.join(unknown)}: not a HyM-UNet trainer (one of {', '.join(training.__all__)})")
    if args.steps < 1:
        parser.error("--steps must be a positive integer")
    rows = []
    for name in args.trainers:
        changes = gradient_driven_change(getattr(training, name), args.steps, args.seed)
        medians = {c: float(np.median(list(v.values()))) for c, v in changes.items()}
        rows.append((name, changes, medians))
    print(
        f"{args.steps} train_step calls of a small 2D plan (32x32, 4 stages), seed {args.seed}; "
        "gradient-driven relative change ||w_run - w_twin|| / ||w_init||, median [min, max] per category"
    )
    print("| trainer | " + " | ".join(CATEGORIES) + " | scan / conv (medians) |")
    print("|---|" + "---|" * (len(CATEGORIES) + 1))
    for name, changes, medians in rows:
        cells = [
            f"{medians[c]:.2g} [{min(changes[c].values()):.1g}, {max(changes[c].values()):.1g}]" for c in CATEGORIES
        ]
        print(f"| {name} | " + " | ".join(cells) + f" | {medians[CATEGORIES[2]] / medians[CATEGORIES[0]]:.2g} |")


if __name__ == "__main__":
    main()
