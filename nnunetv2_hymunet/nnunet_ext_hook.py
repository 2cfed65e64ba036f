"""Start-up hook (run by the `nnunetv2_hymunet_ext.pth` file the wheel puts into site-packages).

nnU-Net 2.8 finds trainers outside its own package only through the folders listed in the environment variable
`nnUNet_extTrainer`. Appending our shim folder at interpreter start-up makes `nnUNetv2_train -tr
nnUNetTrainerHyMUNet` and `nnUNetv2_predict -tr ...` work in any new shell with no manual step. A user-set value is
kept (ours is appended). Set HYMUNET_DISABLE_EXT_HOOK=1 to opt out. Imports nothing heavy: it runs in every
interpreter of the environment.
"""

import os

ENV_VAR = "nnUNet_extTrainer"
EXT_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nnunet_ext")


def with_ext_trainer_folder(folder: str, value: str | None) -> str:
    """`value` of nnUNet_extTrainer with `folder` appended unless it is already listed (the user's folders stay
    first: nnU-Net takes the first class of a name it finds)."""
    folder = os.path.abspath(folder)
    current = [p for p in (value or "").split(os.pathsep) if p]
    if any(os.path.abspath(p) == folder for p in current):
        return os.pathsep.join(current)
    return os.pathsep.join(current + [folder])


def register_ext_trainer_folder(environ=os.environ) -> None:
    """Add this package's trainer folder to nnUNet_extTrainer in `environ`, unless the hook is turned off."""
    if environ.get("HYMUNET_DISABLE_EXT_HOOK", "").lower() in ("1", "true", "yes"):
        return
    environ[ENV_VAR] = with_ext_trainer_folder(EXT_FOLDER, environ.get(ENV_VAR))


register_ext_trainer_folder()
