"""The long-range task's network depth and score: conv-only receptive field, the `nnUNetLongRangePlans` plans, and
blob-class accuracy.

nnU-Net's U-Net on a small image sees the whole image at its bottleneck, so a task whose rule spans the image says
nothing about global context unless the network depth is fixed too. `nnUNetLongRangePlans` is the `nnUNetPlans` that
nnUNetv2_plan_and_preprocess wrote, with the same preprocessing (data identifier), cut to the deepest number of stages
whose conv-only receptive field is smaller than the dataset's minimum blob-marker distance (written into its
dataset.json by `hymunet benchmark make-suite`).

A two-stage network (what 64 px images get) has one deep-supervision output, which nnU-Net's loss weights would zero
(a NaN loss); `hymunet benchmark run` therefore always trains nnUNetLongRangePlans with its benchmark trainer copies,
which train such networks without deep supervision (the same loss on the one full-resolution output).

Receptive field (RF): the side, in input pixels, of the square of inputs that can change one output pixel through the
convolutions alone. Two ways, which agree on nnU-Net's PlainConvUNet (tested):
- `conv_receptive_field`: an analytic walk over the plans' conv stack (PlainConvUNet: n_conv_per_stage convs per
  encoder stage, the first one strided; per decoder stage a transposed conv with kernel = stride, which maps each
  output pixel to one input pixel, then n_conv_per_stage_decoder convs on the upsampled map and the skip);
- `measured_receptive_field`: the support of the gradient of output pixels with respect to the input, for the network
  a trainer builds from the plans, with its instance norms replaced by identity (norm_op=None: instance-norm statistics
  are the one global path a conv-only network has; the task defeats it by giving both classes the same global
  intensity statistics) in eval mode.
"""

import json
import os
from copy import deepcopy

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError

LONG_RANGE_PLANS = "nnUNetLongRangePlans"
SOURCE_PLANS = "nnUNetPlans"
DATASET_KEY = "hymunet_long_range"  # dataset.json / plans entry: {"min_marker_distance_px": D, ...}
CONV_ONLY_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerHyMUNet_noMamba")
MIN_STAGES = 2  # HyMUNet needs at least two


def _per_axis(value, dim: int) -> list:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dim


def conv_receptive_field(arch_kwargs: dict, dim: int) -> list:
    """Receptive field side per axis of a PlainConvUNet described by plans `arch_kwargs`: an exact walk of index
    intervals back from an output pixel to the input, through the decoder, its transposed convs and the skips (the
    largest over the output pixels of one total-stride period, since the transposed convs make it depend on the
    pixel's phase)."""
    n = arch_kwargs["n_stages"]
    kernels = [_per_axis(k, dim) for k in arch_kwargs["kernel_sizes"]]
    strides = [_per_axis(s, dim) for s in arch_kwargs["strides"]]
    n_conv = _per_axis(arch_kwargs["n_conv_per_stage"], n)
    n_conv_decoder = _per_axis(arch_kwargs["n_conv_per_stage_decoder"], n - 1)

    def conv_back(interval, kernel, stride):  # nnU-Net pads (kernel - 1) // 2
        pad = (kernel - 1) // 2
        return interval[0] * stride - pad, interval[1] * stride - pad + kernel - 1

    def encoder_back(stage, interval, axis):
        for c in range(n_conv[stage] - 1, -1, -1):
            interval = conv_back(interval, kernels[stage][axis], strides[stage][axis] if c == 0 else 1)
        return interval if stage == 0 else encoder_back(stage - 1, interval, axis)

    def decoder_back(stage, interval, axis):
        if stage == n - 1:
            return encoder_back(stage, interval, axis)
        for _ in range(n_conv_decoder[stage]):
            interval = conv_back(interval, kernels[stage][axis], 1)
        stride = strides[stage + 1][axis]
        up = decoder_back(stage + 1, (interval[0] // stride, interval[1] // stride), axis)
        skip = encoder_back(stage, interval, axis)
        return min(up[0], skip[0]), max(up[1], skip[1])

    rf = []
    for axis in range(dim):
        period = int(np.prod([s[axis] for s in strides]))
        spans = [decoder_back(0, (x, x), axis) for x in range(period)]
        rf.append(max(hi - lo + 1 for lo, hi in spans))
    return rf


def cut_plans(plans: dict, configuration: str, n_stages: int, plans_name: str = LONG_RANGE_PLANS) -> dict:
    """A copy of `plans` with only `configuration`, its network cut to its first `n_stages` stages."""
    plans = deepcopy(plans)
    config = plans["configurations"][configuration]
    kwargs = config["architecture"]["arch_kwargs"]
    if not MIN_STAGES <= n_stages <= kwargs["n_stages"]:
        raise HyMUNetError(f"--stages {n_stages}: must be between {MIN_STAGES} and the plans' {kwargs['n_stages']}")
    for key in ("features_per_stage", "kernel_sizes", "strides", "n_conv_per_stage", "n_blocks_per_stage"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key][:n_stages]
    if isinstance(kwargs.get("n_conv_per_stage_decoder"), list):
        kwargs["n_conv_per_stage_decoder"] = kwargs["n_conv_per_stage_decoder"][: n_stages - 1]
    kwargs["n_stages"] = n_stages
    plans["configurations"] = {configuration: config}
    plans["plans_name"] = plans_name
    return plans


def _without_spatial_norms(network) -> None:
    """Replace every norm that pools over space (instance/group norm) by identity, wherever a module built one."""
    from torch import nn
    from torch.nn.modules.instancenorm import _InstanceNorm

    for module in list(network.modules()):
        for name, child in module.named_children():
            if isinstance(child, (_InstanceNorm, nn.GroupNorm)):
                setattr(module, name, nn.Identity())


def measured_receptive_field(plan, trainer: str, repeats: int = 2) -> list:
    """Receptive field side per axis of `trainer`'s network on `plan` (a presets.ProfilePlan), measured as the
    bounding box of the input-gradient support of output pixels at every phase of the total stride around the
    centre. Returns the patch size on an axis where the support reaches the border (the whole input)."""
    import torch

    from nnunetv2_hymunet.benchmark.models import build_training_network, set_deep_supervision

    # built as the trainer builds it, then every spatial norm swapped for identity: the network norm_op=None
    # describes, without the residual init that zeroes a norm's weight (which would hide a branch from the gradient)
    network, _, input_channels, _ = build_training_network(trainer, plan)
    set_deep_supervision(network, False)
    _without_spatial_norms(network)
    arch = plan.configuration_dict["architecture"]["arch_kwargs"]
    network = network.eval()
    patch = [int(p) for p in plan.configuration_dict["patch_size"]]
    total_stride = np.prod(np.array([_per_axis(s, len(patch)) for s in arch["strides"]]), axis=0)
    generator = torch.Generator().manual_seed(0)
    rf = [0] * len(patch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convs: extra threads only spin (many times slower on a busy machine)
    try:
        _support_extents(network, input_channels, patch, total_stride, repeats, generator, rf)
    finally:
        torch.set_num_threads(threads)
    return rf


def _support_extents(network, input_channels, patch, total_stride, repeats, generator, rf) -> None:
    import torch

    for phase in range(int(total_stride.max())):
        centre = tuple(p // 2 + phase % int(t) for p, t in zip(patch, total_stride))
        support = torch.zeros(patch, dtype=torch.bool)
        for _ in range(repeats):  # a second input guards against an exactly zero gradient by chance
            x = torch.randn((1, input_channels, *patch), generator=generator, requires_grad=True)
            network(x)[(0, slice(None), *centre)].sum().backward()
            support |= x.grad[0].abs().sum(0) > 0
        for axis in range(len(patch)):
            other = tuple(a for a in range(len(patch)) if a != axis)
            hit = np.nonzero(support.any(dim=other).numpy() if other else support.numpy())[0]
            touches = hit[0] == 0 or hit[-1] == patch[axis] - 1
            rf[axis] = max(rf[axis], patch[axis] if touches else int(hit[-1] - hit[0] + 1))


def read_min_distance(dataset_json: dict, source: str) -> int:
    info = dataset_json.get(DATASET_KEY)
    if not isinstance(info, dict) or not isinstance(info.get("min_marker_distance_px"), (int, float)):
        raise HyMUNetError(
            f"{source} has no {DATASET_KEY}.min_marker_distance_px: not a long-range dataset of "
            "`hymunet benchmark make-suite`; give --stages"
        )
    return int(info["min_marker_distance_px"])


def choose_stages(plans: dict, configuration: str, min_distance: int) -> int:
    """The deepest cut of `plans` (most stages) whose analytic receptive field is smaller than `min_distance`."""
    config = plans["configurations"][configuration]
    dim = len(config["patch_size"])
    for n in range(config["architecture"]["arch_kwargs"]["n_stages"], MIN_STAGES - 1, -1):
        cut = cut_plans(plans, configuration, n)["configurations"][configuration]["architecture"]["arch_kwargs"]
        if max(conv_receptive_field(cut, dim)) < min_distance:
            return n
    raise HyMUNetError(f"even {MIN_STAGES} stages see more than the minimum blob-marker distance of {min_distance} px")


def write_long_range_plans(
    dataset: str,
    configuration: str = "2d",
    source_plans: str = SOURCE_PLANS,
    n_stages: int = None,
    trainers=CONV_ONLY_TRAINERS,
    log=print,
) -> str:
    """Write $nnUNet_preprocessed/<dataset>/nnUNetLongRangePlans.json; returns its path. Refuses (HyMUNetError) when a
    conv-only network of `trainers` would see from a blob to a marker."""
    from nnunetv2_hymunet.benchmark.presets import ProfilePlan, dataset_plan
    from nnunetv2_hymunet.fs_safety import atomic_write_text

    plan = dataset_plan(dataset, configuration, source_plans)
    folder = os.path.dirname(plan.source)
    dataset_json_file = os.path.join(folder, "dataset.json")
    arch = plan.configuration_dict["architecture"]["arch_kwargs"]
    dim = len(plan.configuration_dict["patch_size"])
    min_distance = None
    if n_stages is None or DATASET_KEY in plan.dataset_json:
        min_distance = read_min_distance(plan.dataset_json, dataset_json_file)
    n_stages = n_stages or choose_stages(plan.plans, configuration, min_distance)
    plans = cut_plans(plan.plans, configuration, n_stages)
    cut = ProfilePlan(plans, configuration, plan.dataset_json, plan.source, plan.case_shape)
    analytic = conv_receptive_field(plans["configurations"][configuration]["architecture"]["arch_kwargs"], dim)

    def refuse_unless_below(largest):
        if min_distance is not None and largest >= min_distance:
            raise HyMUNetError(
                f"{plan.source}: with {n_stages} stages the conv-only receptive field ({largest} px) is "
                f"not smaller than the minimum blob-marker distance ({min_distance} px); use fewer "
                "--stages"
            )

    refuse_unless_below(max(analytic))  # before the (slower) measurement
    measured = {t: measured_receptive_field(cut, t) for t in trainers}
    log(
        f"{LONG_RANGE_PLANS}: {n_stages} stages of {source_plans}'s {arch['n_stages']}; conv-only receptive field "
        f"{'x'.join(map(str, analytic))} px (analytic walk), measured "
        + ", ".join(f"{t} {'x'.join(map(str, m))}" for t, m in measured.items())
        + (f"; minimum blob-marker distance {min_distance} px" if min_distance else "")
    )
    refuse_unless_below(max(max(m) for m in measured.values()) if measured else 0)
    plans[DATASET_KEY] = {
        "source_plans": source_plans,
        "n_stages": n_stages,
        "receptive_field_px": analytic,
        "measured_receptive_field_px": measured,
        "min_marker_distance_px": min_distance,
    }
    path = os.path.join(folder, LONG_RANGE_PLANS + ".json")
    atomic_write_text(path, json.dumps(plans, indent=4))
    log(f"wrote {path}")
    return path


# ---------------------------------------------------------------- blob-class accuracy


def blob_class_scores(prediction: np.ndarray, reference: np.ndarray) -> dict:
    """Per case: the reference blob's class, the majority foreground class predicted inside the blob (0 when no blob
    pixel is predicted foreground, or on a tie), accuracy (1 when they agree, else 0) and the fraction of blob pixels
    predicted with the reference class."""
    blob = reference > 0
    if not blob.any():
        raise HyMUNetError("reference has no blob")
    classes = np.unique(reference[blob])
    if classes.size != 1:
        raise HyMUNetError(f"reference blob has several classes {classes.tolist()}")
    reference_class = int(classes[0])
    predicted = prediction[blob].astype(np.int64)
    counts = np.bincount(predicted[predicted > 0], minlength=reference_class + 1)
    top = np.flatnonzero(counts == counts.max()) if counts.max() > 0 else []
    majority = int(top[0]) if len(top) == 1 else 0
    return {
        "reference_class": reference_class,
        "predicted_class": majority,
        "accuracy": float(majority == reference_class),
        "fraction": float(np.mean(predicted == reference_class)),
    }


def score_folder(pred_dir: str, ref_dir: str, dataset_json_file: str) -> dict:
    """Blob-class scores of every prediction in pred_dir against the file of the same name in ref_dir."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    from nnunetv2_hymunet.benchmark.presets import read_json_file

    dataset_json = read_json_file(dataset_json_file, "dataset.json")
    ending = dataset_json["file_ending"]
    names = sorted(n for n in os.listdir(pred_dir) if n.endswith(ending))
    if not names:
        raise HyMUNetError(f"{pred_dir}: no {ending} predictions to score")
    reader = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(pred_dir, names[0]))()
    per_case = []
    for name in names:
        reference = os.path.join(ref_dir, name)
        if not os.path.isfile(reference):
            raise HyMUNetError(f"{reference}: missing reference for prediction {os.path.join(pred_dir, name)}")
        scores = blob_class_scores(reader.read_seg(os.path.join(pred_dir, name))[0], reader.read_seg(reference)[0])
        per_case.append({"case": name[: -len(ending)], **scores})
    return {
        "per_case": per_case,
        "accuracy": float(np.mean([c["accuracy"] for c in per_case])),
        "fraction": float(np.mean([c["fraction"] for c in per_case])),
    }


def is_long_range_dataset(dataset_json_file: str) -> bool:
    from nnunetv2_hymunet.benchmark.presets import read_json_file

    return DATASET_KEY in read_json_file(dataset_json_file, "dataset.json")
