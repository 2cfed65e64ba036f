"""What nnU-Net's planners (and so `hymunet plan`) read besides the plans: the raw dataset.json and the fingerprint."""

import json
import os


def write_planner_inputs(raw_root, preprocessed_folder, plans: dict, dataset_json: dict) -> None:
    """The raw dataset.json (with an empty imagesTr) and a dataset_fingerprint.json matching `plans` (every case of
    the plans' median shape and spacing)."""
    raw = os.path.join(str(raw_root), os.path.basename(str(preprocessed_folder)))
    os.makedirs(os.path.join(raw, "imagesTr"), exist_ok=True)
    with open(os.path.join(raw, "dataset.json"), "w") as f:
        json.dump(dataset_json, f)
    n = dataset_json["numTraining"]
    fingerprint = {
        "spacings": [plans["original_median_spacing_after_transp"]] * n,
        "shapes_after_crop": [plans["original_median_shape_after_transp"]] * n,
        "median_relative_size_after_cropping": 1.0,
        "foreground_intensity_properties_per_channel": plans["foreground_intensity_properties_per_channel"],
    }
    with open(os.path.join(str(preprocessed_folder), "dataset_fingerprint.json"), "w") as f:
        json.dump(fingerprint, f)
