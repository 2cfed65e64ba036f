"""Whether nnU-Net's trainer search finds our trainers (reported by `hymunet doctor`)."""

import contextlib
import io
import os

from nnunetv2_hymunet.nnunet_ext_hook import ENV_VAR, EXT_FOLDER


def hook_active(environ=os.environ) -> bool:
    return any(os.path.abspath(p) == EXT_FOLDER for p in environ.get(ENV_VAR, "").split(os.pathsep) if p)


def find_trainer(name: str):
    """nnU-Net's own lookup (built-in trainers first, then nnUNet_extTrainer folders); None when not found."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):  # the search prints every module it inspects
        try:
            return recursive_find_trainer_class_by_name(name)
        except RuntimeError:  # raised by nnU-Net when no folder has the class
            return None


def discovery_report() -> dict:
    report = {
        f"{ENV_VAR} (this process)": os.environ.get(ENV_VAR, "(unset)"),
        "start-up hook active": hook_active(),
    }
    for name in ("nnUNetTrainerHyMUNet", "nnUNetTrainer"):
        try:
            cls = find_trainer(name)
        except Exception as e:  # an import error inside a searched module stops nnU-Net's search
            found = f"ERROR: {type(e).__name__}: {e}"
        else:
            found = f"{cls.__module__}.{cls.__name__}" if cls is not None else "NOT FOUND"
        report[f"nnU-Net finds {name}"] = found
    return report
