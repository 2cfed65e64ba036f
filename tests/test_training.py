"""Trainers: network construction from any U-Net plans, variants, compile policy, schedules, deep supervision."""

import inspect

import pytest
import torch
from conftest import tiny_dataset_json, tiny_plans
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

import nnunetv2_hymunet.training as training
from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.planning.architecture import HYMUNET_CLASS_NAME
from nnunetv2_hymunet.training import (
    nnUNetTrainerHyMUNet,
    nnUNetTrainerHyMUNet_5epochs,
    nnUNetTrainerHyMUNet_bidir,
    nnUNetTrainerHyMUNet_demo,
    nnUNetTrainerHyMUNet_noMamba,
    nnUNetTrainerHyMUNet_noMGF,
)


def _managers(plans: dict, configuration: str = "2d"):
    pm = PlansManager(plans)
    return pm, pm.get_configuration(configuration)


def _build(trainer_class, plans, configuration="2d", deep_supervision=True, in_channels=1, out_channels=2):
    pm, cm = _managers(plans, configuration)
    return trainer_class.build_network_architecture(pm, cm, in_channels, out_channels, deep_supervision)


def _trainer(trainer_class, tmp_path, monkeypatch, plans=None, dataset_json=None):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = dict(plans or tiny_plans(), continue_training=False)
    data_folder = tmp_path / "preprocessed" / plans["dataset_name"] / plans["configurations"]["2d"]["data_identifier"]
    data_folder.mkdir(parents=True, exist_ok=True)
    (data_folder / "case.b2nd").touch()  # initialize() infers the dataset format from the file endings
    return trainer_class(plans, "2d", 0, dataset_json or tiny_dataset_json(), torch.device("cpu"))


def test_every_trainer_is_exported_and_is_an_nnunet_trainer():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    classes = [getattr(training, name) for name in training.__all__]
    assert len(classes) == len(set(classes)) >= 15
    for cls in classes:
        assert issubclass(cls, nnUNetTrainer) and cls.__name__ in training.__all__


def test_signature_is_recognised_by_nnunet_on_class_and_instance(tmp_path, monkeypatch):
    # nnU-Net picks the 2.7+ calling convention by looking for 'plans_manager' in the signature (predictor: on the
    # class; trainer.initialize: on the instance), then passes the arguments positionally.
    assert (
        list(inspect.signature(nnUNetTrainerHyMUNet_noMGF.build_network_architecture).parameters)[0] == "plans_manager"
    )
    trainer = _trainer(nnUNetTrainerHyMUNet_noMGF, tmp_path, monkeypatch)
    assert "plans_manager" in inspect.signature(trainer.build_network_architecture).parameters
    trainer.initialize()
    assert type(trainer.network).__name__ == "HyMUNet" and trainer.network.fusion == "concat"


def test_variant_knobs_reach_the_network_built_for_prediction():
    plans = tiny_plans()
    assert _build(nnUNetTrainerHyMUNet, plans).fusion == "mgf"
    assert _build(nnUNetTrainerHyMUNet_noMGF, plans, deep_supervision=False).fusion == "concat"
    assert _build(nnUNetTrainerHyMUNet_bidir, plans).scan == "bidir"
    hybrid, plain = _build(nnUNetTrainerHyMUNet, plans), _build(nnUNetTrainerHyMUNet_noMamba, plans)
    assert hybrid.n_mamba_stages > 0 and plain.n_mamba_stages == 0
    assert any("mamba" in k for k in hybrid.state_dict()) and not any("mamba" in k for k in plain.state_dict())


def test_plans_that_already_name_hymunet_keep_their_knobs_unless_a_variant_forces_one():
    plans = tiny_plans()
    architecture = plans["configurations"]["2d"]["architecture"]
    architecture["network_class_name"] = HYMUNET_CLASS_NAME
    architecture["arch_kwargs"].update(scan="flat", d_state=8)
    net = _build(nnUNetTrainerHyMUNet, plans)
    assert net.scan == "flat"
    assert _build(nnUNetTrainerHyMUNet_bidir, plans).scan == "bidir"


@pytest.mark.parametrize("dim", [2, 3])
def test_builds_from_plain_and_resenc_plans_in_2d_and_3d(dim):
    plans = tiny_plans(dim=dim)
    configuration = "2d" if dim == 2 else "3d_fullres"
    net = _build(nnUNetTrainerHyMUNet, plans, configuration, deep_supervision=False)
    patch = plans["configurations"][configuration]["patch_size"]
    assert net(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)

    architecture = plans["configurations"][configuration]["architecture"]
    architecture["network_class_name"] = "dynamic_network_architectures.architectures.residual_unet.ResidualEncoderUNet"
    architecture["arch_kwargs"]["n_blocks_per_stage"] = architecture["arch_kwargs"].pop("n_conv_per_stage")
    architecture["arch_kwargs"].update(block="BasicBlockD", bottleneck_channels=None, stem_channels=None)
    net = _build(nnUNetTrainerHyMUNet, plans, configuration, deep_supervision=False)
    assert net(torch.randn(1, 1, *patch)).shape == (1, 2, *patch)


def test_non_unet_plans_give_a_clear_error():
    plans = tiny_plans()
    plans["configurations"]["2d"]["architecture"] = {
        "network_class_name": "nnunetv2.training.nnUNetTrainer.primus.Primus",
        "arch_kwargs": {"embed_dim": 8},
        "_kw_requires_import": [],
    }
    with pytest.raises(HyMUNetError, match="strides"):
        _build(nnUNetTrainerHyMUNet, plans)


def test_deep_supervision_toggle_and_every_parameter_gets_a_gradient():
    # With deep supervision on, all heads contribute, so DDP needs no find_unused_parameters.
    plans = tiny_plans()
    net = _build(nnUNetTrainerHyMUNet, plans, deep_supervision=True)
    outputs = net(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape[2:]) for o in outputs] == [(32, 32), (16, 16), (8, 8)]
    sum(o.square().mean() for o in outputs).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    net.decoder.deep_supervision = False
    assert net(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_torch_compile_is_opt_in(tmp_path, monkeypatch):
    trainer = _trainer(nnUNetTrainerHyMUNet, tmp_path, monkeypatch)
    trainer.device = torch.device("cuda")  # nnU-Net's default would compile on CUDA
    monkeypatch.delenv("nnUNet_compile", raising=False)
    assert trainer._do_i_compile() is False
    monkeypatch.setenv("nnUNet_compile", "true")
    assert trainer._do_i_compile() is True
    monkeypatch.setenv("nnUNet_compile", "f")
    assert trainer._do_i_compile() is False


def test_schedules(tmp_path, monkeypatch):
    assert _trainer(nnUNetTrainerHyMUNet_5epochs, tmp_path, monkeypatch).num_epochs == 5
    monkeypatch.setenv("HYMUNET_EPOCHS", "3")
    monkeypatch.setenv("HYMUNET_SAVE_EVERY", "1")
    demo = _trainer(nnUNetTrainerHyMUNet_demo, tmp_path, monkeypatch)
    assert (demo.num_epochs, demo.save_every) == (3, 1)
    assert demo.num_iterations_per_epoch == nnUNetTrainerHyMUNet_demo.schedule["num_iterations_per_epoch"]
    assert demo.my_init_kwargs["fold"] == 0  # nnU-Net's checkpoint init args still recorded
    monkeypatch.setenv("HYMUNET_ITERATIONS", "zero")
    with pytest.raises(HyMUNetError, match="HYMUNET_ITERATIONS"):
        _trainer(nnUNetTrainerHyMUNet_demo, tmp_path, monkeypatch)
