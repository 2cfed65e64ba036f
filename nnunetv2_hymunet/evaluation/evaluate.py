"""Evaluate a folder of predictions against a folder of references (nnU-Net layouts) and write
OUT/metrics.json, OUT/per_case.csv and OUT/summary.md.

Files are read with nnU-Net's own reader/writer classes (any file ending nnU-Net reads), so spacing comes from the
files: NIfTI & co. give millimetres; nnU-Net's 2D natural-image reader (PNG/BMP/TIF) gives spacing 1 and the
distances are then reported in pixels ("px"), never "mm". Cases are matched by file name; a prediction folder may
hold other files nnU-Net writes (json, .pkl, .npz) but no extra segmentation.

Labels: from `--dataset-json` (`labels`; list values are regions such as BraTS WT/TC/ET, evaluated as the union of
their values; an `ignore` label is excluded from every count like nnU-Net does). Without a dataset.json the labels
are the nonzero values found in the references (a value only ever predicted is not evaluated).

metrics.json schema (version 1); NaN and inf are written as the JSON tokens NaN / Infinity (as nnU-Net's
summary.json), readable by Python's json module:
    schema_version: 1
    ref_dir, pred_dir, fov_dir, dataset_json: absolute paths (fov_dir / dataset_json may be null)
    file_ending: e.g. ".png", ".nii.gz"
    units: "px" or "mm" (or the --units given); applies to hd, hd95, assd
    spacing_source: "files" or "argument"
    policy: {both_empty_overlap, both_empty_distance, one_empty_overlap, one_empty_distance, hd95_method,
             percentile, ignore_label, fov}
    labels: [{name, values, region, channel}]       evaluation order
    warnings: [text]   what the scores should be read with (e.g. values only ever predicted, --ignore-geometry)
    metrics: ["dice", "iou", "precision", "recall", "specificity", "hd", "hd95", "assd"(, "auc_roc", "auc_pr")]
    per_case: [{case, ref_file, pred_file, fov_file, npz_file, shape, spacing, n_voxels,
                metrics: {label: {metric: value, tp, fp, fn, tn}}}]
    per_label: {label: {metric: {mean, median, std, n}}}   per-image statistics; std is the sample std (ddof=1);
                                                            n counts the non-NaN cases
    foreground_mean: {metric: mean over labels of per_label[label][metric].mean}
    pooled: {label: {dice, iou, precision, recall, specificity, tp, fp, fn, tn}}   one confusion matrix summed
                                                            over all cases (dataset-level, "micro" scores)
    pooled_foreground_mean: {overlap metric: mean over labels of the pooled value}
    pooled_auc: {label: {auc_roc, auc_pr}}   all evaluated voxels of all cases pooled (present with probabilities)
    empty_cases: {label: {both_empty, reference_empty_only, prediction_empty_only}}   numbers of cases
"""

from __future__ import annotations

import csv
import math
import multiprocessing
import os
from dataclasses import dataclass

import numpy as np

from nnunetv2_hymunet.errors import HyMUNetError
from nnunetv2_hymunet.evaluation.aggregate import summarize
from nnunetv2_hymunet.evaluation.auc import auc_from_histograms, score_histograms
from nnunetv2_hymunet.evaluation.checks import (
    check_probabilities,
    check_scoring_mask,
    check_spacing,
    geometry_of,
    grid_mismatch,
    undeclared_values,
)
from nnunetv2_hymunet.evaluation.labels import Target, targets_from_dataset_json, targets_from_values
from nnunetv2_hymunet.evaluation.metrics import (
    COUNT_KEYS,
    HD95_METHODS,
    METRICS,
    EmptyPolicy,
    compute_case_metrics,
    overlap_from_counts,
)
from nnunetv2_hymunet.evaluation.outputs import write_json, write_output_folder, write_text
from nnunetv2_hymunet.fs_safety import check_files_target

AUC_METRICS = ("auc_roc", "auc_pr")
OUTPUT_FILES = ("metrics.json", "per_case.csv", "summary.md")
MAX_LABELS_WITHOUT_DATASET_JSON = 64  # more distinct values than this: an intensity image given as a label map
SCHEMA_VERSION = 1


@dataclass
class CaseTask:
    """Everything one worker needs for one case (picklable)."""

    case: str
    ref_file: str
    pred_file: str
    fov_file: str | None
    npz_file: str | None
    reader_class: type
    targets: list[Target] | None  # None: the nonzero values found in this case
    ignore_label: int | None
    spacing: tuple[float, ...] | None
    policy: EmptyPolicy
    hd95_method: str
    percentile: float
    query_workers: int = 1  # threads per case: all cores when cases run serially
    declared_values: frozenset | None = None  # label values dataset.json declares (None: no dataset.json)
    ignore_geometry: bool = False  # --ignore-geometry: origin/direction mismatches become warnings


def _supported_endings() -> list[str]:
    from nnunetv2.imageio.reader_writer_registry import LIST_OF_IO_CLASSES

    return sorted({e for cls in LIST_OF_IO_CLASSES for e in cls.supported_file_endings}, key=len, reverse=True)


def _ending_of(filename: str, endings: list[str]) -> str | None:
    lower = filename.lower()
    return next((e for e in endings if lower.endswith(e)), None)


def detect_file_ending(ref_dir: str) -> str:
    """The file ending nnU-Net reads that most files in ref_dir have."""
    endings = _supported_endings()
    found = [_ending_of(f, endings) for f in sorted(os.listdir(ref_dir)) if not f.startswith(".")]
    found = [e for e in found if e is not None]
    if not found:
        raise HyMUNetError(
            f"REF_FOLDER {ref_dir}: no segmentation files with an ending nnU-Net reads ({', '.join(endings)})"
        )
    return max(set(found), key=found.count)


def _segmentation_files(folder: str, file_ending: str) -> dict[str, str]:
    return {
        f[: -len(file_ending)]: os.path.join(folder, f)
        for f in sorted(os.listdir(folder))
        if f.lower().endswith(file_ending.lower()) and not f.startswith(".")
    }


def match_cases(ref_dir: str, pred_dir: str, file_ending: str) -> list[tuple[str, str, str]]:
    """[(case, ref_file, pred_file)]; every reference needs a prediction and every prediction a reference."""
    refs, preds = _segmentation_files(ref_dir, file_ending), _segmentation_files(pred_dir, file_ending)
    if not refs:
        raise HyMUNetError(f"REF_FOLDER {ref_dir}: no '*{file_ending}' files")
    missing = sorted(set(refs) - set(preds))
    if missing:
        raise HyMUNetError(
            f"PRED_FOLDER {pred_dir}: no prediction for {len(missing)} case(s): {', '.join(missing[:10])}"
            f"{' ...' if len(missing) > 10 else ''} (expected e.g. {missing[0]}{file_ending})"
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        raise HyMUNetError(
            f"PRED_FOLDER {pred_dir}: prediction(s) without a reference in {ref_dir}: {', '.join(extra[:10])}"
            f"{' ...' if len(extra) > 10 else ''}"
        )
    return [(case, refs[case], preds[case]) for case in refs]


def _read(reader, path: str, case: str, what: str):
    """(label array, spacing, geometry) of one file; a spacing that is not positive and finite is an error."""
    try:
        seg, properties = reader.read_seg(path)
    except Exception as e:  # any reader failure is the user's file, not our bug
        raise HyMUNetError(f"case {case}: cannot read {what} {path}: {type(e).__name__}: {e}") from None
    if seg.shape[0] != 1:
        raise HyMUNetError(
            f"case {case}: {what} {path} has {seg.shape[0]} channels (an RGB image?); expected a "
            "single-channel label map"
        )
    spacing = check_spacing(properties["spacing"], f"case {case}: {what} {path}")
    return np.asarray(seg[0]), spacing, geometry_of(properties)


def _as_labels(seg: np.ndarray, case: str, path: str) -> np.ndarray:
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)):
            raise HyMUNetError(f"case {case}: {path} holds NaN or infinite values; expected a label map")
        rounded = np.rint(seg)
        if not np.array_equal(rounded, seg):
            raise HyMUNetError(f"case {case}: {path} holds non-integer values; expected a label map")
        seg = rounded
    return seg.astype(np.int32, copy=False)


def _check_same_grid(task: CaseTask, ref: tuple, other_file: str, other: tuple, what: str, warnings: list) -> None:
    """Shape and spacing must match; an origin / direction mismatch is an error unless --ignore-geometry."""
    reason = grid_mismatch(ref, other)
    if reason is None:
        return
    message = f"case {task.case}: {what} {other_file}: {reason} ({task.ref_file})"
    shape_or_spacing = reason.startswith(("shape", "spacing"))
    if shape_or_spacing or not task.ignore_geometry:
        hint = "" if shape_or_spacing else "; pass --ignore-geometry to score it as if aligned"
        raise HyMUNetError(message + hint)
    warnings.append(message + "; scored as if aligned (--ignore-geometry)")


def _apply_spacing_override(file_spacing: tuple[float, ...], override) -> tuple[float, ...]:
    if override is None:
        return file_spacing
    if len(override) > len(file_spacing):
        raise HyMUNetError(f"--spacing has {len(override)} values but the images have {len(file_spacing)} axes")
    return tuple(file_spacing[: len(file_spacing) - len(override)]) + tuple(float(s) for s in override)


def evaluate_case(task: CaseTask) -> dict:
    """Read one case and compute every metric for every target; raises HyMUNetError naming the case."""
    reader = task.reader_class()
    warnings: list[str] = []
    ref, ref_spacing, ref_geometry = _read(reader, task.ref_file, task.case, "reference")
    pred, pred_spacing, pred_geometry = _read(reader, task.pred_file, task.case, "prediction")
    ref_grid = (ref.shape, ref_spacing, ref_geometry)
    _check_same_grid(task, ref_grid, task.pred_file, (pred.shape, pred_spacing, pred_geometry), "prediction", warnings)
    ref, pred = _as_labels(ref, task.case, task.ref_file), _as_labels(pred, task.case, task.pred_file)
    if task.declared_values is not None:
        for what, path, seg in (("reference", task.ref_file, ref), ("prediction", task.pred_file, pred)):
            unknown = undeclared_values(seg, task.declared_values)
            if unknown:
                raise HyMUNetError(
                    f"case {task.case}: {what} {path} holds value(s) {unknown} that --dataset-json does "
                    f"not declare (declared: {sorted(task.declared_values)}); e.g. a 0/255 mask "
                    "must be converted to 0/1 first"
                )
    valid = None
    if task.fov_file is not None:
        fov, fov_spacing, fov_geometry = _read(reader, task.fov_file, task.case, "field-of-view mask")
        _check_same_grid(
            task, ref_grid, task.fov_file, (fov.shape, fov_spacing, fov_geometry), "field-of-view mask", warnings
        )
        valid = fov > 0
    if task.ignore_label is not None:
        not_ignored = ref != task.ignore_label
        valid = not_ignored if valid is None else valid & not_ignored
    check_scoring_mask(valid, task.case, task.fov_file, task.ignore_label)
    probabilities = None
    if task.npz_file is not None:
        probabilities = _read_probabilities(task.npz_file, task.case, ref.shape)
    targets = task.targets
    if targets is None:
        values = set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())
        if probabilities is not None:
            values |= set(range(1, probabilities.shape[0]))
        if len(values) > MAX_LABELS_WITHOUT_DATASET_JSON:
            raise HyMUNetError(
                f"case {task.case}: {task.ref_file} and {task.pred_file} hold {len(values)} distinct "
                "values, which looks like an image rather than a label map; pass --dataset-json to "
                "name the labels if it really is one"
            )
        targets = targets_from_values(values - {task.ignore_label})
    spacing = _apply_spacing_override(ref_spacing, task.spacing)
    metrics, histograms = {}, {}
    for target in targets:
        ref_mask = target.mask(ref)
        result = compute_case_metrics(
            target.mask(pred),
            ref_mask,
            spacing,
            valid,
            task.policy,
            task.hd95_method,
            task.percentile,
            workers=task.query_workers,
        )
        if probabilities is not None:
            if target.channel >= probabilities.shape[0]:
                raise HyMUNetError(
                    f"case {task.case}: {task.npz_file} has {probabilities.shape[0]} channels, label "
                    f"'{target.name}' needs channel {target.channel}"
                )
            histograms[target.name] = score_histograms(probabilities[target.channel], ref_mask, valid)
            result.update(auc_from_histograms(*histograms[target.name]))
        metrics[target.name] = result
    return {
        "case": task.case,
        "ref_file": task.ref_file,
        "pred_file": task.pred_file,
        "fov_file": task.fov_file,
        "npz_file": task.npz_file,
        "shape": list(ref.shape),
        "spacing": list(spacing),
        "n_voxels": int(ref.size if valid is None else np.count_nonzero(valid)),
        "metrics": metrics,
        "_histograms": histograms,
        "_warnings": warnings,
    }


def _read_probabilities(npz_file: str, case: str, spatial_shape) -> np.ndarray:
    try:
        with np.load(npz_file) as data:
            probabilities = data["probabilities"]
    except Exception as e:
        raise HyMUNetError(f"case {case}: cannot read probabilities from {npz_file}: {type(e).__name__}: {e}") from None
    if probabilities.ndim != len(spatial_shape) + 1 or tuple(probabilities.shape[1:]) != tuple(spatial_shape):
        raise HyMUNetError(
            f"case {case}: {npz_file} probabilities have shape {probabilities.shape}, expected (C, "
            f"{', '.join(map(str, spatial_shape))}) like the reference"
        )
    check_probabilities(probabilities, case, npz_file)
    return probabilities


def _both_empty_metrics(n_voxels: int, policy: EmptyPolicy, with_auc: bool) -> dict:
    """What compute_case_metrics returns for a target absent from reference and prediction."""
    result = {**overlap_from_counts(0, 0, 0, n_voxels, policy), "hd": 0.0, "hd95": 0.0, "assd": 0.0}
    if with_auc:
        result.update(auc_roc=float("nan"), auc_pr=float("nan"))
    return {**result, "tp": 0, "fp": 0, "fn": 0, "tn": n_voxels}


def _run_cases(tasks: list[CaseTask], num_workers: int, progress: bool):
    """Yield evaluate_case results in task order (serial, or over a process pool)."""
    from tqdm import tqdm

    bar = dict(total=len(tasks), desc="evaluate", unit="case", disable=not progress)
    if num_workers <= 1 or len(tasks) <= 1:
        yield from tqdm(map(evaluate_case, tasks), **bar)
        return
    # spawn (as nnU-Net does): no fork of a process that may hold threads.
    with multiprocessing.get_context("spawn").Pool(min(num_workers, len(tasks))) as pool:
        yield from tqdm(pool.imap(evaluate_case, tasks), **bar)


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def evaluate_folders(
    ref_dir: str,
    pred_dir: str,
    out_dir: str,
    dataset_json: str | None = None,
    fov_dir: str | None = None,
    spacing=None,
    units: str | None = None,
    num_workers: int = 1,
    policy: EmptyPolicy = EmptyPolicy(),
    hd95_method: str = "max_directed",
    percentile: float = 95.0,
    npz: bool | None = None,
    progress: bool = False,
    ignore_geometry: bool = False,
) -> dict:
    """Evaluate pred_dir against ref_dir, write out_dir/{metrics.json, per_case.csv, summary.md}; return the
    metrics.json content (schema in the module docstring).

    spacing: values for the last len(spacing) array axes, replacing the files' spacing (e.g. the pixel size of
    a 2D dataset); units then defaults to "mm". npz: None = use nnU-Net's CASE.npz probabilities when every case has
    one, True = require them, False = ignore them.
    """
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2.imageio.reader_writer_registry import (
        determine_reader_writer_from_dataset_json,
        determine_reader_writer_from_file_ending,
    )

    if hd95_method not in HD95_METHODS:
        raise HyMUNetError(f"--hd95 must be one of {', '.join(HD95_METHODS)}, got {hd95_method!r}")
    if not 0 < percentile <= 100:
        raise HyMUNetError(f"--percentile must be in (0, 100], got {percentile}")
    if num_workers < 1:
        raise HyMUNetError(f"-np/--num-processes must be at least 1, got {num_workers}")
    if units is not None and not units.strip():
        raise HyMUNetError("--units: empty unit name")
    if spacing is not None:
        spacing = check_spacing(spacing, "--spacing")
    for flag, folder in (("REF_FOLDER", ref_dir), ("PRED_FOLDER", pred_dir), ("--fov", fov_dir)):
        if folder is not None and not os.path.isdir(folder):
            raise HyMUNetError(f"{flag} {folder}: not a folder")
    ref_dir, pred_dir = os.path.abspath(ref_dir), os.path.abspath(pred_dir)
    fov_dir = os.path.abspath(fov_dir) if fov_dir is not None else None
    if os.path.realpath(ref_dir) == os.path.realpath(pred_dir):
        raise HyMUNetError(f"REF_FOLDER and PRED_FOLDER are the same folder {ref_dir}; every score would be perfect")
    if dataset_json is not None and not os.path.isfile(dataset_json):
        raise HyMUNetError(f"--dataset-json {dataset_json}: not a file")
    inputs = {"REF_FOLDER": ref_dir, "PRED_FOLDER": pred_dir, "--fov": fov_dir, "--dataset-json": dataset_json}
    check_files_target(out_dir, OUTPUT_FILES, "-o", inputs)  # before the work, not after it

    targets, ignore_label, dataset = None, None, None
    if dataset_json is not None:
        dataset_json = os.path.abspath(dataset_json)
        try:
            dataset = load_json(dataset_json)
        except Exception as e:
            raise HyMUNetError(f"--dataset-json {dataset_json}: cannot read: {type(e).__name__}: {e}") from None
        targets, ignore_label = targets_from_dataset_json(dataset, dataset_json)
        if "file_ending" in dataset and not (isinstance(dataset["file_ending"], str) and dataset["file_ending"]):
            raise HyMUNetError(f"--dataset-json {dataset_json}: 'file_ending' must be a text such as \".nii.gz\"")
    file_ending = dataset["file_ending"] if dataset and "file_ending" in dataset else detect_file_ending(ref_dir)
    try:
        if dataset is not None and "file_ending" in dataset:
            reader_class = determine_reader_writer_from_dataset_json(dataset, verbose=False)
        else:
            reader_class = determine_reader_writer_from_file_ending(file_ending, verbose=False)
    except RuntimeError as e:
        raise HyMUNetError(f"no nnU-Net reader for file ending {file_ending!r}: {e}") from None

    cases = match_cases(ref_dir, pred_dir, file_ending)
    npz_files = {case: os.path.join(pred_dir, case + ".npz") for case, _, _ in cases}
    have_npz = [c for c, f in npz_files.items() if os.path.isfile(f)]
    if npz is True and len(have_npz) < len(cases):
        missing = sorted(set(npz_files) - set(have_npz))
        raise HyMUNetError(
            f"--npz: no probabilities for case(s) {', '.join(missing[:10])} (expected {npz_files[missing[0]]})"
        )
    use_npz = npz is True or (npz is None and len(have_npz) == len(cases))
    fov_files = {}
    if fov_dir is not None:
        for case, ref_file, _ in cases:
            fov_files[case] = os.path.join(fov_dir, os.path.basename(ref_file))
            if not os.path.isfile(fov_files[case]):
                raise HyMUNetError(f"case {case}: no field-of-view mask {fov_files[case]} in --fov {fov_dir}")

    declared = None
    if targets is not None:
        declared = frozenset({0} | {v for t in targets for v in t.values} | ({ignore_label} - {None}))
    tasks = [
        CaseTask(
            case,
            ref_file,
            pred_file,
            fov_files.get(case),
            npz_files[case] if use_npz else None,
            reader_class,
            targets,
            ignore_label,
            None if spacing is None else tuple(float(s) for s in spacing),
            policy,
            hd95_method,
            float(percentile),
            query_workers=-1 if num_workers <= 1 else 1,
            declared_values=declared,
            ignore_geometry=ignore_geometry,
        )
        for case, ref_file, pred_file in cases
    ]
    per_case, histograms, warnings = [], {}, []
    for record in _run_cases(tasks, num_workers, progress):
        warnings += record.pop("_warnings")
        # Probability histograms are summed as results arrive (about 1 MB per case and label).
        for name, (pos, neg) in record.pop("_histograms").items():
            histograms[name] = (
                (pos, neg) if name not in histograms else (histograms[name][0] + pos, histograms[name][1] + neg)
            )
        per_case.append(record)

    metric_names = list(METRICS) + (list(AUC_METRICS) if use_npz else [])
    if targets is None:  # labels = nonzero values found in the references
        found = set()
        for record in per_case:
            found |= {name for name, m in record["metrics"].items() if m["tp"] + m["fn"] > 0}
        targets = targets_from_values(int(name) for name in found)
        predicted_only = sorted({name for record in per_case for name in record["metrics"]} - found, key=int)
        if predicted_only:
            warnings.append(
                f"value(s) {', '.join(predicted_only)} occur in predictions but in no reference, so they "
                "are not scored (without --dataset-json the labels are the values found in the "
                "references); pass --dataset-json to score every declared label"
            )
        for record in per_case:
            record["metrics"] = {
                t.name: record["metrics"].get(t.name) or _both_empty_metrics(record["n_voxels"], policy, use_npz)
                for t in targets
            }
    target_names = [t.name for t in targets]
    if not target_names:
        raise HyMUNetError(f"REF_FOLDER {ref_dir}: every reference is empty; pass --dataset-json to name the labels")

    if units is None:
        units = "px" if issubclass(reader_class, NaturalImage2DIO) and spacing is None else "mm"
    result = {
        "schema_version": SCHEMA_VERSION,
        "ref_dir": ref_dir,
        "pred_dir": pred_dir,
        "fov_dir": fov_dir,
        "dataset_json": dataset_json,
        "file_ending": file_ending,
        "units": units,
        "spacing_source": "files" if spacing is None else "argument",
        "policy": {
            **policy.as_dict(),
            "hd95_method": hd95_method,
            "percentile": float(percentile),
            "ignore_label": ignore_label,
            "fov": fov_dir is not None,
        },
        "labels": [t.as_dict() for t in targets],
        "warnings": warnings,
        "metrics": metric_names,
        "per_case": per_case,
        **summarize(per_case, target_names, metric_names, policy),
    }
    if use_npz:
        result["pooled_auc"] = {
            name: auc_from_histograms(*histograms[name])
            if name in histograms
            else {"auc_roc": float("nan"), "auc_pr": float("nan")}
            for name in target_names
        }
    result = _json_safe(result)
    writers = {
        "metrics.json": lambda p: write_json(p, result),
        "per_case.csv": lambda p: write_per_case_csv(p, result),
        "summary.md": lambda p: write_text(p, summary_markdown(result)),
    }
    write_output_folder(out_dir, writers, command="evaluate", inputs=inputs)
    return result


def write_per_case_csv(path: str, result: dict) -> None:
    """One row per case and label: case, label, every metric, tp, fp, fn, tn."""
    columns = result["metrics"] + list(COUNT_KEYS)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "label"] + columns)
        for record in result["per_case"]:
            for label, m in record["metrics"].items():
                writer.writerow([record["case"], label] + [m.get(c, "") for c in columns])


def _fmt(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def metric_header(metric: str, units: str) -> str:
    """Column title; distance metrics carry their unit, e.g. "hd95 (px)"."""
    return f"{metric} ({units})" if metric in ("hd", "hd95", "assd") else metric


def summary_markdown(result: dict) -> str:
    """Human-readable summary: per-image statistics and pooled scores side by side, units and policy stated."""
    policy = result["policy"]
    one_empty = policy["one_empty_distance"]
    if one_empty == "diagonal":
        one_empty = f"= the image diagonal ({result['units']})"
    hd95_words = "max of the two directed" if policy["hd95_method"] == "max_directed" else "pooled"
    lines = [
        "# Evaluation summary",
        "",
        f"- references: `{result['ref_dir']}`",
        f"- predictions: `{result['pred_dir']}`",
        f"- cases: {len(result['per_case'])}; distances in **{result['units']}** "
        f"(spacing from {result['spacing_source']})",
        f"- HD95: {policy['hd95_method']} ({hd95_words} {policy['percentile']:g}th percentile)",
        f"- empty masks: both empty -> overlap {policy['both_empty_overlap']}, distances 0; exactly one empty -> "
        f"overlap 0, distances {one_empty}",
    ]
    if result["fov_dir"]:
        lines.append(f"- restricted to the field-of-view masks in `{result['fov_dir']}`")
    for warning in result.get("warnings", []):
        lines.append(f"- **warning:** {warning}")
    if policy.get("ignore_label") is not None:
        lines.append(f"- voxels with the ignore label {policy['ignore_label']} are excluded")
    for label in result["labels"]:
        name = label["name"]
        empty = result["empty_cases"][name]
        lines += [
            "",
            f"## {name} (values {label['values']}{', region' if label['region'] else ''})",
            "",
            f"Cases with both masks empty: {empty['both_empty']}, reference empty only: "
            f"{empty['reference_empty_only']}, prediction empty only: {empty['prediction_empty_only']}.",
            "",
            "| metric | per-image mean | median | std | n | pooled (dataset-level) |",
            "|---|---|---|---|---|---|",
        ]
        pooled = dict(result["pooled"][name])
        pooled.update(result.get("pooled_auc", {}).get(name, {}))
        for metric in result["metrics"]:
            s = result["per_label"][name][metric]
            lines.append(
                f"| {metric_header(metric, result['units'])} | {_fmt(s['mean'])} | {_fmt(s['median'])} | "
                f"{_fmt(s['std'])} | {s['n']} | {_fmt(pooled[metric]) if metric in pooled else '-'} |"
            )
    lines += [
        "",
        "Per-image: the metric per case, then mean / median / sample std over cases (nnU-Net, HyM-UNet paper style; "
        "NaN cases are left out and n counts the rest). Pooled: one confusion matrix summed over all cases "
        "(VM-UNet family style); distances have no pooled form.",
        "",
    ]
    return "\n".join(lines)
