"""`hymunet evaluate` and `hymunet compare`: argparse front ends of evaluate_folders and compare_runs."""

from __future__ import annotations

import sys

from nnunetv2_hymunet.errors import HyMUNetError


def run_evaluate(args) -> int:
    from nnunetv2_hymunet.evaluation.evaluate import evaluate_folders
    from nnunetv2_hymunet.evaluation.metrics import EmptyPolicy

    try:
        policy = EmptyPolicy.from_strings(args.both_empty, args.one_empty_distance)
    except ValueError as e:
        raise HyMUNetError(f"--one-empty-distance: {e}") from None
    result = evaluate_folders(
        args.ref,
        args.pred,
        args.output,
        dataset_json=args.dataset_json,
        fov_dir=args.fov,
        spacing=args.spacing,
        units=args.units,
        num_workers=args.num_processes,
        policy=policy,
        hd95_method=args.hd95,
        percentile=args.percentile,
        npz=args.npz,
        progress=not args.quiet,
        ignore_geometry=args.ignore_geometry,
    )
    for warning in result["warnings"]:
        print(f"hymunet evaluate: warning: {warning}", file=sys.stderr)
    print(f"evaluated {len(result['per_case'])} cases; distances in {result['units']}")
    for label in result["labels"]:
        name = label["name"]
        stats, pooled = result["per_label"][name], result["pooled"][name]
        print(
            f"  {name}: Dice {stats['dice']['mean']:.4f} (per-image mean, pooled {pooled['dice']:.4f}), "
            f"IoU {stats['iou']['mean']:.4f}, HD95 {stats['hd95']['mean']:.3f} {result['units']}"
        )
    print(f"wrote {args.output}/metrics.json, per_case.csv, summary.md")
    return 0


def run_compare(args) -> int:
    from nnunetv2_hymunet.evaluation.compare import compare_runs

    result = compare_runs(
        args.runs, args.output, overlays=args.overlays, metrics=args.metrics, common_cases=args.common_cases
    )
    for metric, reason in result["not_comparable"].items():
        print(f"hymunet compare: warning: {metric} is not comparable ({reason}); no p-value for it", file=sys.stderr)
    for note in result["notes"]:
        print(f"hymunet compare: note: {note}", file=sys.stderr)
    print(f"compared {len(result['runs'])} runs on {len(result['labels'])} label(s); wrote {args.output}")
    return 0


def add_subparsers(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="Dice, IoU, precision, recall, specificity, HD, HD95, ASSD (and AUC) of a prediction folder",
        description="Evaluate nnU-Net predictions against references: per-case metrics, per-image mean/median/std "
        "and pooled (dataset-level) scores side by side. Writes OUT/metrics.json, OUT/per_case.csv, OUT/summary.md. "
        "Distances use the spacing stored in the files (2D PNG/BMP/TIF: pixels, reported as 'px').",
    )
    # positional REF_FOLDER PRED_FOLDER, -djfile, -o, -np: the order and spellings of nnUNetv2_evaluate_folder
    p.add_argument(
        "ref", metavar="REF_FOLDER", help="folder of reference segmentations (e.g. nnUNet_raw/DatasetX/labelsTs)"
    )
    p.add_argument("pred", metavar="PRED_FOLDER", help="folder of predictions with the same file names")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output folder (created; in an existing folder only files hymunet wrote are replaced; it must "
        "not be or contain an input)",
    )
    p.add_argument(
        "-djfile",
        "--dataset-json",
        dest="dataset_json",
        help="dataset.json: labels/regions, ignore label, file ending. Without it the "
        "labels are the nonzero values found in the references",
    )
    p.add_argument(
        "--fov", help="folder of field-of-view masks named like the references (DRIVE); only voxels inside count"
    )
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        help="spacing for the last N array axes instead of the "
        "files' spacing (e.g. the pixel size in mm of a 2D dataset)",
    )
    p.add_argument(
        "--units", help="name of the distance unit (default: px for 2D natural images without --spacing, mm otherwise)"
    )
    p.add_argument(
        "--both-empty",
        choices=("one", "nan"),
        default="one",
        help="Dice/IoU/precision/recall when "
        "reference and prediction are both empty: 1 (default) or NaN (nnU-Net; dropped from means)",
    )
    p.add_argument(
        "--one-empty-distance",
        default="diagonal",
        help="HD/HD95/ASSD when exactly one mask is empty: "
        "'diagonal' (default: the image diagonal in physical units, as BraTS), 'nan', 'inf' or a number",
    )
    p.add_argument(
        "--hd95",
        choices=("max_directed", "pooled"),
        default="max_directed",
        help="HD95 definition: max "
        "of the two directed percentiles (default; MONAI, DeepMind, MetricsReloaded) or the percentile "
        "of both directions pooled (medpy)",
    )
    p.add_argument("--percentile", type=float, default=95.0, help="percentile of the 'hd95' metric (default 95)")
    npz = p.add_mutually_exclusive_group()
    npz.add_argument(
        "--npz",
        dest="npz",
        action="store_true",
        default=None,
        help="require nnU-Net's CASE.npz "
        "probabilities (--save_probabilities) next to the predictions and report AUC-ROC / AUC-PR "
        "(default: used when every case has one)",
    )
    npz.add_argument("--no-npz", dest="npz", action="store_false", help="ignore CASE.npz probabilities")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="parallel processes over cases (default 1)")
    p.add_argument(
        "--ignore-geometry",
        action="store_true",
        help="score predictions / FOV masks whose origin or direction differs from the reference's as if "
        "aligned (a warning per case; default: an error). Shape and spacing must always match",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)

    c = subparsers.add_parser(
        "compare",
        help="tables, paired Wilcoxon tests and box plots of several evaluated runs",
        description="Compare output folders of 'hymunet evaluate': per-label tables, paired Wilcoxon signed-rank "
        "tests per metric (cases matched by name), box plots (PNG) and optional contour overlays of the worst cases. "
        "Runs that scored different references, voxels (FOV, ignore label) or cases are refused; a metric defined "
        "differently in the runs (HD95 method or percentile, empty-mask policy, spacing) is marked and gets no "
        "p-value.",
    )
    c.add_argument("runs", nargs="+", help="two or more output folders of 'hymunet evaluate'")
    c.add_argument("-o", "--output", required=True, help="output folder")
    c.add_argument(
        "--overlays",
        type=int,
        default=0,
        metavar="N",
        help="contour overlays of the N worst cases "
        "(lowest mean Dice) of each run (reads the files recorded in metrics.json)",
    )
    c.add_argument("--metrics", nargs="+", help="metrics to compare (default: all evaluated in every run)")
    c.add_argument(
        "--common-cases",
        action="store_true",
        help="runs that evaluated different cases are refused; with this flag tables and tests use only "
        "the cases every run evaluated",
    )
    c.set_defaults(func=run_compare)
