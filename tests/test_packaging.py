"""The built wheel works on its own: it ships the presets, the C kernel source and the start-up hook, and
`hymunet plan --preset` and `hymunet doctor` run from it in a throw-away venv that cannot see the checkout.

The throw-away venv has no site-packages of its own but the wheel; torch, nnunetv2 and the other dependencies come
from this environment's site-packages, chained behind it by a plain path line in a .pth file. A plain path line does
not process the .pth files of that folder, so the editable install's path hook (which puts the checkout on sys.path)
and its start-up hook stay inactive there.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import tiny_dataset_json, tiny_plans
from planner_inputs import write_planner_inputs

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(command, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # offline: hatchling is in the test extra, so no isolated build environment has to be downloaded
    built = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            out,
            REPO,
        ],
        cwd=out,
        env=dict(os.environ),
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("nnunetv2_hymunet-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("installed")
    venv = root / "venv"
    work = root / "work"  # the cwd of every command: not the checkout, so '' on sys.path finds nothing of ours
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "nnUNet_extTrainer", "HYMUNET_SCAN_BACKEND")}
    env["HYMUNET_CACHE_DIR"] = str(root / "cache")  # the C kernel is built from the wheel's source
    created = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work, env=env)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work, env=env)
    site = Path(site.stdout.strip())
    (site / "_project_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # --ignore-installed: pip must not try to replace the editable install it sees through the chained folder
    pip = _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
        cwd=work,
        env=env,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    return {"root": root, "venv": venv, "site": site, "python": python, "work": work, "env": env}


def test_wheel_holds_presets_kernel_source_and_startup_hook(wheel):
    from nnunetv2_hymunet.planning.presets import bundled_preset_names

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        pth = zf.read("nnunetv2_hymunet_ext.pth").decode()
    assert bundled_preset_names()
    for name in bundled_preset_names():
        assert f"nnunetv2_hymunet/presets/{name}.json" in names
    assert "nnunetv2_hymunet/ssm/scan_native.c" in names
    assert "nnunetv2_hymunet/nnunet_ext/hymunet_trainers.py" in names
    assert pth.strip() == "import nnunetv2_hymunet.nnunet_ext_hook"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".so")]


def test_the_installed_wheel_is_what_gets_imported(installed):
    probe = _run(
        [
            installed["python"],
            "-c",
            "import os, sys, nnunetv2_hymunet, nnunetv2; "
            "print(nnunetv2_hymunet.__file__); print(nnunetv2.__file__); print(os.environ['nnUNet_extTrainer']); "
            "print(os.pathsep.join(sys.path))",
        ],
        cwd=installed["work"],
        env=installed["env"],
    )
    assert probe.returncode == 0, probe.stderr
    ours, nnunet, ext, path = probe.stdout.split("\n")[:4]
    assert str(REPO) not in [os.path.abspath(p) for p in path.split(os.pathsep) if p]
    assert Path(ours).is_relative_to(installed["site"]), ours
    assert not Path(ours).is_relative_to(REPO)
    assert Path(nnunet).is_relative_to(sysconfig.get_paths()["purelib"])  # the dependencies come from this env
    assert Path(ext).is_relative_to(installed["site"])  # the wheel's start-up hook ran, not the editable one


def test_plan_with_a_bundled_preset(installed):
    preprocessed = installed["root"] / "nnUNet_preprocessed"
    dataset = preprocessed / "Dataset900_Unit"
    dataset.mkdir(parents=True)
    plans = tiny_plans(patch_size=[64, 64], n_stages=4, features=(16, 32, 64, 128), batch_size=12)
    (dataset / "nnUNetPlans.json").write_text(json.dumps(plans))
    (dataset / "dataset.json").write_text(json.dumps(tiny_dataset_json()))
    write_planner_inputs(installed["root"] / "raw", dataset, plans, tiny_dataset_json())
    env = dict(
        installed["env"],
        nnUNet_preprocessed=str(preprocessed),
        nnUNet_raw=str(installed["root"] / "raw"),
        nnUNet_results=str(installed["root"] / "results"),
    )
    hymunet = installed["venv"] / "bin" / "hymunet"
    result = _run(
        [hymunet, "plan", "-d", "Dataset900_Unit", "-c", "2d", "--preset", "isic2018_2d"],
        cwd=installed["work"],
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    written = dataset / "nnUNetHyMUNetPlans.json"
    assert f"wrote {written}" in result.stdout
    configuration = json.loads(written.read_text())["configurations"]["2d"]
    assert configuration["architecture"]["network_class_name"] == "nnunetv2_hymunet.network.HyMUNet"
    assert configuration["patch_size"] == [256, 256]  # the preset's, so the packaged JSON was read
    assert configuration["architecture"]["arch_kwargs"]["scan"] == "cross"

    missing = _run(
        [hymunet, "plan", "-d", "Dataset900_Unit", "-c", "2d", "--preset", "no_such_preset"],
        cwd=installed["work"],
        env=env,
    )
    assert missing.returncode == 1
    assert "no_such_preset" in missing.stderr and "isic2018_2d" in missing.stderr


def test_doctor(installed):
    result = _run([installed["venv"] / "bin" / "hymunet", "doctor"], cwd=installed["work"], env=installed["env"])
    assert result.returncode == 0, result.stdout + result.stderr
    # lines are "KEY<padding>  VALUE"; keys hold single spaces only
    report = dict((p.strip() for p in line.split("  ", 1)) for line in result.stdout.splitlines() if line.strip())
    assert report["start-up hook active"] == "True"
    assert report["nnU-Net finds nnUNetTrainerHyMUNet"].startswith("nnunetv2_hymunet.training")
    assert report["nnU-Net finds nnUNetTrainer"] == "nnunetv2.training.nnUNetTrainer.nnUNetTrainer.nnUNetTrainer"
    compilers = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    if any(shutil.which(cc) for cc in compilers):  # then the wheel's C source must build
        assert report["native scan kernel (C)"].startswith("built with")
        assert str(installed["root"] / "cache") in report["native scan kernel (C)"]
        assert report["scan backend on cpu"] == "native"
        assert list((installed["root"] / "cache").glob("*.so"))
