"""nnU-Net must find our trainers in a new interpreter with no manual step, without losing its own."""

import os
import subprocess
import sys
from pathlib import Path

from nnunetv2_hymunet.nnunet_ext_hook import ENV_VAR, EXT_FOLDER, register_ext_trainer_folder

REPO = Path(__file__).resolve().parents[1]


def _fresh_python(code: str, **env_overrides) -> str:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    env.update(env_overrides)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_new_interpreter_gets_ext_folder():
    assert _fresh_python(f"import os; print(os.environ['{ENV_VAR}'])").strip() == EXT_FOLDER


def test_user_value_is_kept_and_ours_appended(tmp_path):
    printed = _fresh_python(f"import os; print(os.environ['{ENV_VAR}'])", **{ENV_VAR: str(tmp_path)}).strip()
    assert printed.split(os.pathsep) == [str(tmp_path), EXT_FOLDER]


def test_hook_is_idempotent_and_can_be_disabled():
    env = {ENV_VAR: EXT_FOLDER}
    register_ext_trainer_folder(env)
    assert env[ENV_VAR] == EXT_FOLDER
    env = {"HYMUNET_DISABLE_EXT_HOOK": "1"}
    register_ext_trainer_folder(env)
    assert ENV_VAR not in env


def test_nnunet_finds_ours_theirs_and_a_users_trainer(tmp_path):
    user_folder = tmp_path / "my_trainers"
    user_folder.mkdir()
    (user_folder / "my_trainer_module.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class nnUNetTrainerMine(nnUNetTrainer):\n    pass\n"
    )
    code = (
        "from nnunetv2_hymunet.training.discovery import find_trainer\n"
        "for name in ('nnUNetTrainerHyMUNet', 'nnUNetTrainerHyMUNet_noMGF', 'nnUNetTrainer_5epochs',"
        " 'nnUNetTrainerMine', 'nnUNetTrainerDoesNotExist'):\n"
        "    cls = find_trainer(name)\n"
        "    print(name, cls.__module__ if cls else None)\n"
    )
    found = dict(line.split() for line in _fresh_python(code, **{ENV_VAR: str(user_folder)}).splitlines())
    assert found["nnUNetTrainerHyMUNet"].startswith("nnunetv2_hymunet.training")
    assert found["nnUNetTrainerHyMUNet_noMGF"].startswith("nnunetv2_hymunet.training")
    assert found["nnUNetTrainer_5epochs"].startswith("nnunetv2.training")
    assert found["nnUNetTrainerMine"] == "my_trainer_module"
    assert found["nnUNetTrainerDoesNotExist"] == "None"


def test_ext_folder_holds_only_the_shim():
    # nnU-Net imports every module in the folder as a top-level module: anything else there would leak.
    assert sorted(p.name for p in Path(EXT_FOLDER).iterdir() if p.name != "__pycache__") == ["hymunet_trainers.py"]


def test_doctor_reports_discovery():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "hymunet"), "doctor"],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != ENV_VAR},
    )
    assert out.returncode == 0, out.stderr
    assert "start-up hook active" in out.stdout
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("nnU-Net finds nnUNetTrainerHyMUNet"))
    assert "NOT FOUND" not in line and "ERROR" not in line
