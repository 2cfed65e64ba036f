"""Paired A/B of HyM-UNet design choices on the long-range task, in process, with the trainers' own train_step.

Every arm is a trainer class (nnUNetTrainerHyMUNet with knob or recipe changes, or a stock variant) trained on the
same stream of SynthOppositeKey2D batches (benchmark/suite.py: a blob whose class is given only by the marker
diametrically opposite it, beyond the conv-only receptive field) from the same conv weights for a given seed
(HyMUNet builds its Mamba layers on a private RNG state). The network is the one nnU-Net's 2d plans give a --side
image, cut to the depth whose conv-only receptive field is below the blob-marker distance (as nnUNetLongRangePlans).
Augmentation: random flips and quarter turns (the rule survives both). Score on held-out cases: blob-class accuracy
(the majority predicted foreground class inside the reference blob is the reference class) and blob Dice.

Each finished (arm, seed) is appended to OUT/runs.jsonl and skipped when the script is run again (resumable);
the summary (mean +- sd over seeds of the per-seed accuracy, paired Wilcoxon over seeds x cases against the first
arm) goes to OUT/summary.md.

  .venv/bin/python scripts/ab_design.py -o docs/design-ab --arms default nnUNetSGD noMamba --seeds 0 1 2
"""

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

ARMS = {
    # name: (trainer class name, knob overrides, trainer attribute overrides)
    "default": ("nnUNetTrainerHyMUNet", {}, {}),
    "nnUNetSGD": ("nnUNetTrainerHyMUNet_nnUNetSGD", {}, {}),
    "noMamba": ("nnUNetTrainerHyMUNet_noMamba", {}, {}),
    "merge_sum": ("nnUNetTrainerHyMUNet", {"direction_merge": "sum"}, {}),
    "merge_separate": ("nnUNetTrainerHyMUNet", {"direction_merge": "separate"}, {}),
    "dt_long": ("nnUNetTrainerHyMUNet", {"dt_min": 1e-4, "dt_max": 1e-2}, {}),
    "dt_short": ("nnUNetTrainerHyMUNet", {"dt_min": 1e-2, "dt_max": 1.0}, {}),
    "gate_channel": ("nnUNetTrainerHyMUNet", {"gate_norm": "channel"}, {}),
    "gate_none": ("nnUNetTrainerHyMUNet", {"gate_norm": "none"}, {}),
    "two_mamba_stages": ("nnUNetTrainerHyMUNet", {"n_mamba_stages": 2}, {}),
    "layer_scale": ("nnUNetTrainerHyMUNet", {"layer_scale": 0.1}, {}),
    "mamba_lr_3e-4": ("nnUNetTrainerHyMUNet", {}, {"mamba_lr": 3e-4}),
    "mamba_lr_3e-3": ("nnUNetTrainerHyMUNet", {}, {"mamba_lr": 3e-3}),
    "no_warmup": ("nnUNetTrainerHyMUNet", {}, {"mamba_warmup_fraction": 0.0}),
}
SIDE = 64  # what `hymunet benchmark make-suite` writes for SynthOppositeKey2D (size small)
EVAL_SEED = 10_000


def long_range_plans(side: int):
    """(plans, dataset_json): nnU-Net's 2d plans for side x side grey images, cut below the marker distance."""
    from nnunetv2_hymunet.benchmark.long_range import choose_stages, cut_plans
    from nnunetv2_hymunet.benchmark.presets import _configuration, _plans
    from nnunetv2_hymunet.benchmark.suite import min_marker_distance

    n_stages = int(np.log2(side / 4)) + 1
    features = [min(32 * 2**s, 512) for s in range(n_stages)]
    configuration = _configuration(2, (side, side), 2, (1.0, 1.0), features, 1, "nnUNetPlans_2d")
    configuration["use_mask_for_norm"] = [False]
    plans = _plans(
        "Dataset999_ABLongRange", "2d", configuration, "NaturalImage2DIO", (999.0, 1.0, 1.0), (1, side, side), 1
    )
    plans = cut_plans(plans, "2d", choose_stages(plans, "2d", min_marker_distance(side)), "nnUNetPlans")
    dataset_json = {
        "channel_names": {"0": "grey"},
        "labels": {"background": 0, "bright_key": 1, "dark_key": 2},
        "numTraining": 1,
        "file_ending": ".png",
    }
    return plans, dataset_json


def make_trainer(arm: str, plans: dict, dataset_json: dict, workdir: str, num_epochs: int):
    import nnunetv2_hymunet.training as training
    from nnunetv2_hymunet.benchmark.learning_check import initialized_trainer

    class_name, knobs, attributes = ARMS[arm]
    base = getattr(training, class_name)
    cls = type(f"{class_name}_ab", (base,), {"hybrid_knobs": {**base.hybrid_knobs, **knobs}, **attributes})
    before = {"num_epochs": num_epochs}
    if plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] < 3:
        # one deep-supervision output, whose weight nnU-Net zeroes and normalises (0/0): train it without
        before["enable_deep_supervision"] = False
    return initialized_trainer(cls, plans, dataset_json, workdir, attributes=before)


def cases(seed: int, n: int, side: int):
    """n (z-scored image, label, blob mask) cases of the long-range task."""
    from nnunetv2_hymunet.benchmark.suite import long_range_case

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        image, label, masks = long_range_case(rng, side)
        image = image.astype(np.float32)
        out.append(((image - image.mean()) / (image.std() + 1e-8), label, masks["blob"]))
    return out


def batch_stream(trainer, seed: int, side: int, batch_size: int = 2):
    """Endless batches with random flips / quarter turns, targets at every deep-supervision scale."""
    from nnunetv2_hymunet.benchmark.learning_check import training_target
    from nnunetv2_hymunet.benchmark.suite import long_range_case

    rng = np.random.default_rng(seed)
    while True:
        images, labels = [], []
        for _ in range(batch_size):
            image, label, _ = long_range_case(rng, side)
            image = image.astype(np.float32)
            image = (image - image.mean()) / (image.std() + 1e-8)
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            image, label = np.rot90(image, k), np.rot90(label, k)
            if flip:
                image, label = image[:, ::-1], label[:, ::-1]
            images.append(image.copy())
            labels.append(label.copy())
        data = torch.from_numpy(np.stack(images)[:, None])
        seg = torch.from_numpy(np.stack(labels)[:, None].astype(np.float32))
        yield {"data": data, "target": training_target(trainer, seg)}


@torch.no_grad()
def evaluate(network, held_out) -> dict:
    network.eval()
    deep_supervision = network.decoder.deep_supervision
    network.decoder.deep_supervision = False
    correct, fraction, dice = [], [], []
    for image, label, blob in held_out:
        prediction = network(torch.from_numpy(image)[None, None]).argmax(1)[0].numpy()
        truth = int(label[blob][0])
        inside = prediction[blob]
        foreground = inside[inside > 0]
        majority = int(np.bincount(foreground, minlength=3)[1:].argmax() + 1) if foreground.size else 0
        correct.append(float(majority == truth))
        fraction.append(float((inside == truth).mean()))
        predicted = prediction == truth
        dice.append(float(2 * (predicted & blob).sum() / (predicted.sum() + blob.sum())))
    network.decoder.deep_supervision = deep_supervision
    network.train()
    return {"accuracy": correct, "pixel_accuracy": fraction, "dice": dice}


def run_arm(arm: str, seed: int, steps: int, steps_per_epoch: int, held_out, side: int, log) -> dict:
    plans, dataset_json = long_range_plans(side)
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(seed)
        np.random.seed(seed)
        trainer = make_trainer(arm, plans, dataset_json, workdir, num_epochs=max(1, steps // steps_per_epoch))
        stream = batch_stream(trainer, seed, side)
        losses, start = [], time.time()
        for step in range(steps):
            if step % steps_per_epoch == 0:
                trainer.current_epoch = step // steps_per_epoch
                trainer.on_train_epoch_start()
            losses.append(float(trainer.train_step(next(stream))["loss"]))
            if step % steps_per_epoch == steps_per_epoch - 1 or step == steps - 1:
                trainer.on_train_epoch_end([{"loss": np.array(losses[-steps_per_epoch:])}])
        seconds = time.time() - start
        scores = evaluate(trainer.network, held_out)
        groups = trainer.logger.get_value("hymunet_param_groups", step=None)
    log(
        f"{arm} seed {seed}: accuracy {np.mean(scores['accuracy']):.3f}, dice {np.mean(scores['dice']):.3f}, "
        f"loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f}, {seconds:.0f} s"
    )
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "side": side,
        "seconds": seconds,
        "loss_first": float(np.mean(losses[:20])),
        "loss_last": float(np.mean(losses[-20:])),
        "scores": scores,
        "param_groups_last_epoch": groups[-1],
    }


def one_class_for_every_blob(accuracy, truths) -> bool:
    """Whether a run's per-case blob-class hits are what one fixed answer (class 1, class 2, or no foreground) for
    every held-out blob would score: the network ignored the key."""
    hits = np.asarray(accuracy, dtype=bool)
    truths = np.asarray(truths)
    return any(np.array_equal(hits, truths == answer) for answer in (0, 1, 2))


def summarise(records: list, arms: list, truths) -> str:
    """The table of summary.md; truths: the held-out blobs' classes, in the order of each run's per-case scores."""
    from scipy.stats import wilcoxon

    reference = arms[0]
    by_arm = {a: {r["seed"]: r for r in records if r["arm"] == a} for a in arms}
    lines = [
        "| arm | seeds | blob-class accuracy (mean ± sd over seeds) | runs giving every blob one class | blob Dice | "
        f"final loss | Δ accuracy vs {reference} | paired Wilcoxon p (seeds × cases) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        runs = by_arm[arm]
        if not runs:
            continue
        acc = [np.mean(r["scores"]["accuracy"]) for r in runs.values()]
        dice = [np.mean(r["scores"]["dice"]) for r in runs.values()]
        loss = [r["loss_last"] for r in runs.values()]
        constant = sum(one_class_for_every_blob(r["scores"]["accuracy"], truths) for r in runs.values())
        common = sorted(set(runs) & set(by_arm[reference]))
        delta, p = "", ""
        if arm != reference and common:
            a = np.concatenate([runs[s]["scores"]["pixel_accuracy"] for s in common])
            b = np.concatenate([by_arm[reference][s]["scores"]["pixel_accuracy"] for s in common])
            delta = f"{np.mean([np.mean(runs[s]['scores']['accuracy']) for s in common]) - np.mean([np.mean(by_arm[reference][s]['scores']['accuracy']) for s in common]):+.3f}"  # noqa: E501
            p = f"{wilcoxon(a, b).pvalue:.3g}" if np.any(a != b) else "1"
        sd = lambda v: np.std(v, ddof=1) if len(v) > 1 else float("nan")  # noqa: E731
        lines.append(
            f"| {arm} | {len(runs)} | {np.mean(acc):.3f} ± {sd(acc):.3f} | {constant} of {len(runs)} | "
            f"{np.mean(dice):.3f} ± "
            f"{sd(dice):.3f} | {np.mean(loss):.3f} | {delta} | {p} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", required=True, help="folder for runs.jsonl and summary.md")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=["default", "nnUNetSGD", "noMamba"],
        choices=sorted(ARMS),
        help="the first arm is the reference of the paired tests",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="train_step calls per run")
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="lr schedule and diagnostics granularity")
    parser.add_argument("--eval-cases", type=int, default=40)
    parser.add_argument("--side", type=int, default=SIDE, help="image side in px (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    for flag in ("steps", "steps_per_epoch", "eval_cases", "side"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.output, exist_ok=True)
    runs_file = os.path.join(args.output, "runs.jsonl")
    records = [json.loads(line) for line in open(runs_file)] if os.path.isfile(runs_file) else []
    done = {(r["arm"], r["seed"], r["steps"], r.get("side", 128)) for r in records}
    held_out = cases(EVAL_SEED, args.eval_cases, args.side)
    for seed in args.seeds:
        for arm in args.arms:
            if (arm, seed, args.steps, args.side) in done:
                continue
            record = run_arm(
                arm, seed, args.steps, args.steps_per_epoch, held_out, args.side, lambda m: print(m, flush=True)
            )
            with open(runs_file, "a") as f:
                f.write(json.dumps(record) + "\n")
            records.append(record)
    records = [r for r in records if r["steps"] == args.steps and r.get("side", 128) == args.side]
    table = summarise(records, args.arms, [int(label[blob][0]) for _, label, blob in held_out])
    command = (
        ("OMP_NUM_THREADS=1 " if args.threads == 1 else "")
        + ".venv/bin/python scripts/ab_design.py "
        + " ".join(
            [
                "-o",
                args.output,
                "--side",
                str(args.side),
                "--arms",
                *args.arms,
                "--seeds",
                *map(str, args.seeds),
                "--steps",
                str(args.steps),
                *(["--threads", str(args.threads)] if args.threads else []),
                "--steps-per-epoch",
                str(args.steps_per_epoch),
                "--eval-cases",
                str(args.eval_cases),
            ]
        )
    )
    text = (
        f"# Design A/B on the long-range task\n\nCommand: `{command}`\n\n{table}\n\n"
        "Paired test: Wilcoxon signed-rank on the per-case fraction of blob pixels given the right class, "
        "pairs (seed, case) against the first arm (same seed = same conv init and the same batches). Every seed is "
        "scored on the same held-out cases, so a run that gives every blob one class scores that class's share of "
        "them whatever the arm.\n"
    )
    with open(os.path.join(args.output, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
