"""The HyM-UNet training recipe: parameter groups, the hybrid optimizer, per-group schedules, checkpoints, and proof
that the Mamba layers' own parameters learn under the trainer's `train_step`."""

import numpy as np
import pytest
import torch
from conftest import tiny_dataset_json, tiny_plans

from nnunetv2_hymunet.benchmark import learning_check
from nnunetv2_hymunet.training import diagnostics as diag
from nnunetv2_hymunet.training import (
    nnUNetTrainerHyMUNet,
    nnUNetTrainerHyMUNet_nnUNetSGD,
    nnUNetTrainerHyMUNet_noMamba,
)
from nnunetv2_hymunet.training.optimization import (
    GroupPolyLRScheduler,
    HybridOptimizer,
    split_parameters,
)

SCAN_PARAMETER_NAMES = ("A_log", "D", "dt_proj", "x_proj")


def _trainer(trainer_class, tmp_path, monkeypatch, name="run", plans=None):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / name / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / name / "preprocessed"))
    plans = dict(plans or tiny_plans(), continue_training=False)
    folder = tmp_path / name / "preprocessed" / plans["dataset_name"] / plans["configurations"]["2d"]["data_identifier"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "case.b2nd").touch()  # initialize() infers the dataset format from the file endings
    trainer = trainer_class(plans, "2d", 0, tiny_dataset_json(), torch.device("cpu"))
    trainer.initialize()
    return trainer


def _batches(trainer, n: int, seed: int = 0, size: int = 32):
    """Images with one bright square whose label is the square, targets at every deep-supervision scale."""
    return learning_check.square_batches(trainer, n, seed, size)


# --- optimizer ---


def _reference_params(seed=0):
    torch.manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64)),
        torch.nn.Parameter(torch.randn(7, dtype=torch.float64)),
    ]


@pytest.mark.parametrize("algorithm", ["sgd", "adamw"])
def test_hybrid_optimizer_matches_torch_sgd_and_adamw(algorithm):
    ours, theirs = _reference_params(), _reference_params()
    if algorithm == "sgd":
        opt = HybridOptimizer(
            [{"params": ours, "algorithm": "sgd", "lr": 0.05, "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}]
        )
        ref = torch.optim.SGD(theirs, 0.05, momentum=0.99, nesterov=True, weight_decay=3e-5)
    else:
        opt = HybridOptimizer(
            [{"params": ours, "algorithm": "adamw", "lr": 3e-3, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.1}]
        )
        ref = torch.optim.AdamW(theirs, 3e-3, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(7):
        grads = [torch.randn_like(p) for p in ours]
        for params, optimizer in ((ours, opt), (theirs, ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_hybrid_optimizer_rejects_an_unknown_algorithm():
    from nnunetv2_hymunet.errors import HyMUNetError

    with pytest.raises(HyMUNetError, match="algorithm"):
        HybridOptimizer([{"params": _reference_params(), "algorithm": "lion", "lr": 1e-3}])


def test_scheduler_keeps_each_groups_base_lr_and_warms_up():
    a, b = _reference_params()
    opt = HybridOptimizer(
        [
            {"params": [a], "algorithm": "sgd", "lr": 1e-2},
            {"params": [b], "algorithm": "adamw", "lr": 1e-3, "warmup_epochs": 3},
        ]
    )
    scheduler = GroupPolyLRScheduler(opt, max_steps=100)
    for epoch in (0, 1, 3, 50, 99):
        scheduler.step(epoch)
        poly = (1 - epoch / 100) ** 0.9
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * poly)  # nnU-Net's PolyLR for the CNN
        assert opt.param_groups[1]["lr"] == pytest.approx(1e-3 * poly * min(1.0, (epoch + 1) / 4))


# --- parameter groups ---


def test_parameter_groups_cover_every_parameter_once_and_exclude_scan_parameters_from_decay(tmp_path, monkeypatch):
    trainer = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch)
    split = split_parameters(trainer.network)
    names = [n for group in split.values() for n, _ in group]
    assert sorted(names) == sorted(n for n, _ in trainer.network.named_parameters())
    no_decay = {n for n, _ in split["mamba_no_decay"]}
    decay = {n for n, _ in split["mamba"]}
    for suffix in ("A_log", "mamba.D", "dt_proj.bias", "norm.weight", "norm.bias", "conv1d.bias"):
        assert any(n.endswith(suffix) for n in no_decay), suffix
        assert not any(n.endswith(suffix) for n in decay), suffix
    assert any(n.endswith("in_proj.weight") for n in decay) and any(n.endswith("x_proj.weight") for n in decay)
    assert not any("mamba" in n for n, _ in split["cnn"])

    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["cnn"]["algorithm"] == "sgd" and groups["cnn"]["weight_decay"] == trainer.weight_decay
    assert groups["mamba"]["algorithm"] == groups["mamba_no_decay"]["algorithm"] == "adamw"
    assert groups["mamba_no_decay"]["weight_decay"] == 0.0
    # nnU-Net logs param_groups[0]'s lr as "the" learning rate: it must be the CNN's
    assert trainer.optimizer.param_groups[0]["name"] == "cnn"


def test_no_mamba_control_and_old_recipe_build_their_optimizers(tmp_path, monkeypatch):
    control = _trainer(nnUNetTrainerHyMUNet_noMamba, tmp_path, monkeypatch, "control")
    assert [g["name"] for g in control.optimizer.param_groups] == ["cnn"]
    old = _trainer(nnUNetTrainerHyMUNet_nnUNetSGD, tmp_path, monkeypatch, "old")
    assert type(old.optimizer) is torch.optim.SGD and len(old.optimizer.param_groups) == 1


# --- checkpoints ---


def test_checkpoint_restores_every_optimizer_state(tmp_path, monkeypatch):
    first = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch, "a")
    first.on_train_epoch_start()
    batches = _batches(first, 4)
    for batch in batches[:3]:
        first.train_step(batch)
    path = str(tmp_path / "checkpoint.pth")
    first.save_checkpoint(path)

    second = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch, "b")
    second.load_checkpoint(path)
    state_a, state_b = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert [{k: v for k, v in g.items() if k != "params"} for g in state_a["param_groups"]] == [
        {k: v for k, v in g.items() if k != "params"} for g in state_b["param_groups"]
    ]
    kinds = set()
    for key, entry in state_a["state"].items():
        for name, value in entry.items():
            kinds.add(name)
            if torch.is_tensor(value):
                torch.testing.assert_close(value, state_b["state"][key][name], rtol=0, atol=0)
            else:
                assert value == state_b["state"][key][name]
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} <= kinds
    first.train_step(batches[3])
    second.train_step(batches[3])
    for (name, p), q in zip(first.network.named_parameters(), second.network.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# --- the Mamba layers learn ---


def _gradient_driven_change(trainer_class, steps: int):
    """Median relative change of conv weights and of scan parameters, minus what weight decay alone does."""
    changes = learning_check.gradient_driven_change(trainer_class, steps)
    conv, scan = changes[learning_check.CATEGORIES[0]], changes[learning_check.CATEGORIES[2]]
    assert len(conv) > 10 and {part for n in scan for part in SCAN_PARAMETER_NAMES if part in n} == set(
        SCAN_PARAMETER_NAMES
    )
    return float(np.median(list(conv.values()))), float(np.median(list(scan.values())))


def test_scan_parameters_move_at_least_a_hundredth_as_much_as_conv_weights(monkeypatch):
    monkeypatch.setenv("nnUNet_results", "")  # restored after the test (learning_check sets them)
    monkeypatch.setenv("nnUNet_preprocessed", "")
    conv, scan = _gradient_driven_change(nnUNetTrainerHyMUNet, steps=25)
    assert conv > 0 and scan >= 1e-2 * conv, (conv, scan)


def test_nnunet_sgd_recipe_leaves_the_scan_parameters_where_they_started(monkeypatch):
    monkeypatch.setenv("nnUNet_results", "")
    monkeypatch.setenv("nnUNet_preprocessed", "")
    # the failure the recipe fixes: shows that the test above can tell the two recipes apart
    conv, scan = _gradient_driven_change(nnUNetTrainerHyMUNet_nnUNetSGD, steps=25)
    assert conv > 0 and scan < 1e-2 * conv, (conv, scan)


def test_a_seeded_tiny_hymunet_overfits_through_train_step(tmp_path, monkeypatch):
    torch.manual_seed(0)
    trainer = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch)
    trainer.on_train_epoch_start()
    batches = _batches(trainer, 2, seed=3)
    losses = [float(trainer.train_step(batches[i % 2])["loss"]) for i in range(40)]
    first, last = np.mean(losses[:2]), np.mean(losses[-4:])
    assert np.isfinite(losses).all() and last < 0.5 * first, losses


# --- diagnostics ---


def test_per_group_diagnostics_reach_the_log_the_logger_and_a_plot(tmp_path, monkeypatch):
    trainer = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch)
    batches = _batches(trainer, 3)
    for epoch in range(2):
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(b) for b in batches]
        trainer.on_train_epoch_end(outputs)
        trainer.current_epoch += 1  # what nnU-Net's on_epoch_end does (which also needs validation values)
    history = trainer.logger.get_value(diag.LOGGER_KEY, step=None)
    assert len(history) == 2
    for entry in history:
        assert set(entry) == set(diag.WATCH_GROUPS)
        for group, values in entry.items():
            assert values["grad_norm"] > 0 and 0 < values["update_ratio"] < 1, (group, values)
    log = open(trainer.log_file).read()
    assert log.count("Parameter groups") == 2 and "selective_scan: grad norm" in log
    assert "Learning rate per parameter group: cnn" in log
    assert (tmp_path / "run" / "results").rglob(diag.PLOT_NAME).__next__().stat().st_size > 0


def test_grad_scaler_unscales_and_skips_inf_steps_with_the_hybrid_optimizer():
    # nnU-Net's AMP path (train_step on CUDA): scale(loss).backward(), unscale_(optimizer), clip, step, update.
    # GradScaler works on CPU tensors too, so the same sequence is checked here against an unscaled twin.
    scaled_params, plain_params = _reference_params(), _reference_params()

    def groups(params):
        return [
            {"params": [params[0]], "algorithm": "sgd", "lr": 1e-2, "momentum": 0.99, "nesterov": True},
            {"params": [params[1]], "algorithm": "adamw", "lr": 1e-3},
        ]

    scaled, plain = HybridOptimizer(groups(scaled_params)), HybridOptimizer(groups(plain_params))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for step in range(3):
        for params, optimizer in ((scaled_params, scaled), (plain_params, plain)):
            optimizer.zero_grad()
            loss = sum((p**2).sum() for p in params)
            if optimizer is scaled:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
    for a, b in zip(scaled_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    before = [p.detach().clone() for p in scaled_params]
    scaled.zero_grad()
    scaler.scale(scaled_params[0].sum() * float("inf")).backward()
    scaler.unscale_(scaled)
    scaler.step(scaled)  # skipped: the gradients are not finite
    scaler.update()
    for a, b in zip(scaled_params, before):
        assert torch.equal(a.detach(), b)


# --- start-up memory check ---


def test_start_up_says_when_hymunet_will_not_fit_where_nnunet_planned_and_names_the_fix(tmp_path, monkeypatch):
    trainer = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch)
    ratio = trainer.activation_memory_ratio()
    assert 0.8 < ratio < 2.0  # HyMUNet's estimate over PlainConvUNet's at the same patch (the Mamba stage adds some)
    trainer.memory_headroom = 1.01 * ratio  # plans with room for it: no warning
    assert trainer.check_activation_memory() == pytest.approx(ratio)
    assert "WARNING" not in open(trainer.log_file).read()
    trainer.memory_headroom = 0.5 * ratio  # as if the plans left no room
    trainer.check_activation_memory()
    log = open(trainer.log_file).read()
    assert "WARNING: HyMUNet keeps" in log and "hymunet plan -d Dataset900_Unit -c 2d" in log
    assert "-p nnUNetHyMUNetPlans" in log
