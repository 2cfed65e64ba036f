"""What the HyM-UNet training recipe adds to a training step: its optimizer step plus the per-group diagnostics,
against nnU-Net's torch.optim.SGD step, as a fraction of the whole train_step, on a built-in plan at its native patch.

Both optimizers update the same HyMUNet with the same gradients (from one real forward + backward of the plan's batch);
the rounds are interleaved and the medians reported. The per-epoch diagnostics work (a parameter snapshot at the epoch
start, norms at its end) is counted once per `--iterations-per-epoch` steps (nnU-Net: 250).

  .venv/bin/python scripts/bench_optimizer.py --plan isic-like-2d --repeats 3
"""

import argparse
import tempfile
import time

import numpy as np
import torch


def _batch(trainer, plan):
    from nnunetv2_hymunet.benchmark.learning_check import training_target

    configuration = plan.configuration_dict
    patch = configuration["patch_size"]
    n_in = len(plan.dataset_json["channel_names"])
    data = torch.randn(configuration["batch_size"], n_in, *patch)
    seg = (torch.rand(configuration["batch_size"], 1, *patch) > 0.5).float()
    return {"data": data, "target": training_target(trainer, seg)}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    from nnunetv2_hymunet.benchmark.learning_check import initialized_trainer
    from nnunetv2_hymunet.benchmark.presets import preset_plan
    from nnunetv2_hymunet.training import nnUNetTrainerHyMUNet

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", default="isic-like-2d")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--optimizer-repeats", type=int, default=10)
    parser.add_argument("--iterations-per-epoch", type=int, default=250)
    args = parser.parse_args(argv)

    plan = preset_plan(args.plan)
    with tempfile.TemporaryDirectory() as workdir:
        torch.manual_seed(0)
        trainer = initialized_trainer(nnUNetTrainerHyMUNet, plan.plans, plan.dataset_json, workdir, plan.configuration)
        network = trainer.network
        sgd = torch.optim.SGD(
            network.parameters(), trainer.initial_lr, weight_decay=trainer.weight_decay, momentum=0.99, nesterov=True
        )
        batch = _batch(trainer, plan)
        trainer.on_train_epoch_start()
        step_times = [_timed(lambda: trainer.train_step(batch)) for _ in range(args.repeats + 1)][1:]
        grads = {p: p.grad.clone() for p in network.parameters() if p.grad is not None}

        def restore_grads():
            for p, g in grads.items():
                p.grad = g.clone()

        hybrid, plain = [], []
        for _ in range(args.optimizer_repeats):  # interleaved rounds
            restore_grads()
            hybrid.append(_timed(trainer.optimizer.step))
            restore_grads()
            plain.append(_timed(sgd.step))
        diagnostics = trainer.param_group_diagnostics
        epoch_work = _timed(lambda: (diagnostics.start_epoch(), diagnostics.end_epoch()))
        step = float(np.median(step_times))
        new = float(np.median(hybrid)) + epoch_work / args.iterations_per_epoch
        old = float(np.median(plain))
    n_params = sum(p.numel() for p in network.parameters())
    print(
        f"plan {args.plan}, patch {plan.configuration_dict['patch_size']}, batch "
        f"{plan.configuration_dict['batch_size']}, {n_params / 1e6:.1f} M parameters, torch threads "
        f"{torch.get_num_threads()}"
    )
    print(
        "| train_step (median) | HybridOptimizer step + diagnostics | torch SGD step | extra work per step | "
        "extra / train_step |"
    )
    print("|---|---|---|---|---|")
    print(
        f"| {step:.2f} s | {new * 1e3:.1f} ms | {old * 1e3:.1f} ms | {(new - old) * 1e3:.1f} ms | "
        f"{100 * (new - old) / step:.2f} % |"
    )


if __name__ == "__main__":
    main()
