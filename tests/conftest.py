"""Shared test helpers: nnU-Net folders in a temp dir, tiny generated datasets, running the stock nnU-Net CLIs.

Everything here is generic (no HyMUNet specifics) so that any test module can use it:
- `nnunet_folders`: a session-wide set of nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders.
- `nnunet_env(folders, **extra)`: an environment for nnU-Net subprocesses pointing at those folders.
- `run_cli(command, env, timeout)`: run a console command, fail the test with its output tail when it fails.
- `write_tiny_2d_dataset` / `write_tiny_3d_dataset`: small generated nnU-Net raw datasets.
- `tiny_plans(...)`: an in-memory nnU-Net plans dict (PlainConvUNet architecture) for unit tests.
- `fake_preprocessed_dataset(root, monkeypatch, name)`: nnU-Net folders with one fake preprocessed dataset.
"""

import os
import tempfile

import pytest

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.nnunet_tools import find_executable, run_logged


def executable(name: str) -> str:
    """A console script of the environment running the tests (nnUNetv2_train, hymunet, ...)."""
    return find_executable(name)


@pytest.fixture(scope="session")
def nnunet_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("nnunet")
    folders = {name: str(root / name) for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        os.makedirs(folder)
    return folders


def nnunet_env(folders: dict, **extra) -> dict:
    """Environment for nnU-Net subprocesses: our folders, one worker process, no compile, unbuffered output."""
    env = dict(os.environ)
    env.update(folders)
    env.update(
        {
            "nnUNet_def_n_proc": "1",
            "nnUNet_compile": "f",
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
        }
    )
    env.pop("nnUNet_n_proc_DA", None)  # 0 crashes plan_and_preprocess; training sets it explicitly
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_cli(command: list, env: dict, timeout: float = 600) -> str:
    """Run a command; return its combined output, or fail the test showing the end of it."""
    with tempfile.TemporaryDirectory() as folder:
        log = os.path.join(folder, "output.log")
        try:
            seconds = run_logged(command, log, env, timeout=timeout)
        except HyMUNetError as e:  # the log goes with the temporary folder: show more of it than the error quotes
            with open(log) as f:
                pytest.fail(f"{' '.join(map(str, command))}: {str(e).splitlines()[0]}\n{f.read()[-6000:]}")
        print(f"[{seconds:6.1f} s] {' '.join(os.path.basename(str(c)) for c in command[:2])} ...")
        with open(log) as f:
            return f.read()


def predict_command(dataset: dict, output: str, configuration: str, trainer: str, *extra: str) -> list:
    """nnUNetv2_predict on the dataset's imagesTs with fold 0 on the CPU, in the main process (-npp 0 -nps 0)."""
    return [
        "nnUNetv2_predict",
        "-i",
        os.path.join(dataset["raw"], "imagesTs"),
        "-o",
        output,
        "-d",
        str(dataset["id"]),
        "-c",
        configuration,
        "-tr",
        trainer,
        "-f",
        "0",
        "-device",
        "cpu",
        "-npp",
        "0",
        "-nps",
        "0",
        *extra,
    ]


def fake_preprocessed_dataset(root, monkeypatch, dataset: str):
    """nnUNet_raw / _preprocessed / _results under `root` (a pathlib.Path), set in the environment, holding one
    "preprocessed" 2d dataset (plans, one data file, gt_segmentations) that nnU-Net never reads: for the benchmark
    runner's bookkeeping. Returns root."""
    import json

    raw, pre, res = (root / n for n in ("raw", "pre", "res"))
    folder = pre / dataset
    (folder / "nnUNetPlans_2d").mkdir(parents=True)
    (folder / "nnUNetPlans_2d" / "case_000.b2nd").write_bytes(b"x")
    (folder / "gt_segmentations").mkdir()
    (folder / "nnUNetPlans.json").write_text(
        json.dumps({"configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"}}})
    )
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".png", "labels": {"background": 0, "x": 1}}))
    raw.mkdir()
    res.mkdir()
    for name, path in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre), ("nnUNet_results", res)):
        monkeypatch.setenv(name, str(path))
    return root


def write_tiny_2d_dataset(
    raw_root: str, dataset_id: int, num_train: int = 10, num_test: int = 2, size: int = 32, seed: int = 0
) -> str:
    """RGB PNG ISIC-like images with 0/1 masks; test masks in <dataset>/labelsTs (not read by nnU-Net)."""
    from nnunetv2_hymunet.demo_data import write_isic_like_dataset

    name = "Tiny2D"
    folder = os.path.join(raw_root, f"Dataset{dataset_id:03d}_{name}")
    return write_isic_like_dataset(
        raw_root, dataset_id, name, num_train, num_test, size, seed, os.path.join(folder, "labelsTs")
    )


def write_tiny_3d_dataset(
    raw_root: str, dataset_id: int, num_train: int = 8, num_test: int = 1, shape=(24, 32, 32), seed: int = 0
) -> str:
    """Single-channel NIfTI volumes with a bright noisy ellipsoid labelled 1 (spacing 2 x 1 x 1 mm)."""
    from nnunetv2_hymunet.demo_data import write_blob_volume_dataset

    return write_blob_volume_dataset(raw_root, dataset_id, "Tiny3D", num_train, num_test, shape, seed)


def tiny_plans(
    dim: int = 2,
    patch_size=None,
    n_stages: int = 4,
    features=(8, 16, 32, 32),
    batch_size: int = 2,
    dataset_name: str = "Dataset900_Unit",
    plans_name: str = "nnUNetPlans",
) -> dict:
    """A complete nnU-Net 2.8 plans dict with one PlainConvUNet configuration (`2d` or `3d_fullres`)."""
    patch_size = list(patch_size or ([32, 32] if dim == 2 else [16, 32, 32]))
    strides = [[1] * dim] + [[2] * dim for _ in range(n_stages - 1)]
    if dim == 3:
        strides[1][0] = 1  # the first axis pooled once less, as nnU-Net does for anisotropic data
    conv = "torch.nn.modules.conv.Conv2d" if dim == 2 else "torch.nn.modules.conv.Conv3d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{dim}d"
    configuration = {
        "data_identifier": f"{plans_name}_{'2d' if dim == 2 else '3d_fullres'}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": batch_size,
        "patch_size": patch_size,
        "median_image_size_in_voxels": [float(p) for p in patch_size],
        "spacing": [1.0] * dim,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {
            "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {
                "n_stages": n_stages,
                "features_per_stage": list(features[:n_stages]),
                "conv_op": conv,
                "kernel_sizes": [[3] * dim] * n_stages,
                "strides": strides,
                "n_conv_per_stage": [2] * n_stages,
                "n_conv_per_stage_decoder": [2] * (n_stages - 1),
                "conv_bias": True,
                "norm_op": norm,
                "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                "dropout_op": None,
                "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU",
                "nonlin_kwargs": {"inplace": True},
            },
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
        },
        "batch_dice": True,
    }
    return {
        "dataset_name": dataset_name,
        "plans_name": plans_name,
        "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [1] * (3 - dim) + patch_size,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {"2d" if dim == 2 else "3d_fullres": configuration},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.5,
                "median": 0.5,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 0.2,
            }
        },
    }


def tiny_dataset_json(labels=None, regions_class_order=None) -> dict:
    dataset_json = {
        "channel_names": {"0": "MRI"},
        "labels": labels or {"background": 0, "fg": 1},
        "numTraining": 4,
        "file_ending": ".nii.gz",
    }
    if regions_class_order is not None:
        dataset_json["regions_class_order"] = regions_class_order
    return dataset_json


TINY_2D_ID = 801
TINY_3D_ID = 802


def _plan_tiny_dataset(nnunet_folders, folder: str, dataset_id: int, configuration: str) -> dict:
    """Plan and preprocess one configuration with the stock CLI; the dataset's paths and environment."""
    env = nnunet_env(nnunet_folders)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", configuration, "-np", "1", "-npfp", "1"], env)
    name = os.path.basename(folder)
    return {
        "id": dataset_id,
        "name": name,
        "raw": folder,
        "env": env,
        "preprocessed": os.path.join(nnunet_folders["nnUNet_preprocessed"], name),
        "results": os.path.join(nnunet_folders["nnUNet_results"], name),
    }


@pytest.fixture(scope="session")
def planned_tiny_2d(nnunet_folders) -> dict:
    """Tiny 2D RGB dataset (10 train + 2 test, 32 x 32 px), planned and preprocessed by the stock CLI (2d only)."""
    folder = write_tiny_2d_dataset(nnunet_folders["nnUNet_raw"], TINY_2D_ID)
    return _plan_tiny_dataset(nnunet_folders, folder, TINY_2D_ID, "2d")


@pytest.fixture(scope="session")
def planned_tiny_3d(nnunet_folders) -> dict:
    """Tiny 3D NIfTI dataset (8 train + 1 test volumes of 24 x 32 x 32), planned and preprocessed (3d_fullres)."""
    folder = write_tiny_3d_dataset(nnunet_folders["nnUNet_raw"], TINY_3D_ID)
    return _plan_tiny_dataset(nnunet_folders, folder, TINY_3D_ID, "3d_fullres")
