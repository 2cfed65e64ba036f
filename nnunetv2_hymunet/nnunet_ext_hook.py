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


def register_ext_trainer_folder(environ=os.environ) -> None:
    if environ.get("HYMUNET_DISABLE_EXT_HOOK", "").lower() in ("1", "true", "yes"):
        return
    current = [p for p in environ.get(ENV_VAR, "").split(os.pathsep) if p]
    if not any(os.path.abspath(p) == EXT_FOLDER for p in current):
        environ[ENV_VAR] = os.pathsep.join(current + [EXT_FOLDER])


register_ext_trainer_folder()
