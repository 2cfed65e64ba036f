"""The one BraTS label convention inside nnU-Net, for every BraTS-like dataset of this package: the converter
(conversion/brats.py) writes it, the synthetic SynthRegions3D task (benchmark/suite.py) and the built-in brats-like-3d
profile plan (benchmark/presets.py) use it.

Labels are BraTS 2023's: 1 = NCR (necrotic / non-enhancing core), 2 = ED (edema), 3 = ET (enhancing tumour).
Regions: whole tumour (1, 2, 3), tumour core (1, 3), enhancing tumour (3). nnU-Net turns region probabilities into a
label map by painting, in order, each entry of `regions_class_order` where its region is predicted; the order that
reproduces these labels is (2, 1, 3): paint WT as ED, then TC as NCR over it, then ET over that.
Channels: 0 = T1, 1 = T1ce, 2 = T2, 3 = FLAIR.
"""

NCR, ED, ET = 1, 2, 3
DATASET_LABELS = (0, NCR, ED, ET)
REGION_LABELS = {"background": 0, "whole tumor": (NCR, ED, ET), "tumor core": (NCR, ET), "enhancing tumor": (ET,)}
REGIONS_CLASS_ORDER = (ED, NCR, ET)
CHANNEL_NAMES = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}


def dataset_json_fields() -> dict:
    """channel_names, labels and regions_class_order as nnU-Net's dataset.json holds them (JSON lists)."""
    return {
        "channel_names": dict(CHANNEL_NAMES),
        "labels": {k: (list(v) if isinstance(v, tuple) else v) for k, v in REGION_LABELS.items()},
        "regions_class_order": list(REGIONS_CLASS_ORDER),
    }
