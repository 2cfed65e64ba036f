"""`hymunet convert ...`: public releases -> nnU-Net raw datasets, BraTS predictions back, and fake releases.

Heavy imports happen inside the handlers so that `hymunet --help` stays fast.
"""

import argparse
import os

from nnunetv2_hymunet.errors import HyMUNetError

SHAPE_HELP = "volume shape as X,Y,Z voxels"


def _add_dataset_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    parser.add_argument("-i", "--input", required=True, help="the release folder (see the layout above)")
    parser.add_argument(
        "-d", "--dataset", required=True, help="the dataset to write: an id NNN (1-999) or a full name DatasetNNN_NAME"
    )
    parser.add_argument(
        "--name", default=None, help=f"dataset name after DatasetNNN_ when -d is an id (default: {default_name})"
    )
    parser.add_argument(
        "-o", "--output", default=None, help="nnU-Net raw folder to write DatasetNNN_NAME into (default: $nnUNet_raw)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing dataset with the same id that hymunet converted (otherwise that is "
        "an error; a dataset hymunet did not write is never replaced)",
    )
    parser.add_argument(
        "-np",
        "--num-processes",
        type=int,
        default=1,
        help="worker processes (output is byte-identical to a serial run; default 1)",
    )


def _dataset(args, default_name):
    """(id, name) from -d (an id or DatasetNNN_NAME) and --name."""
    from nnunetv2_hymunet.nnunet_tools import parse_new_dataset

    number, name = parse_new_dataset(args.dataset)
    if name is not None and args.name is not None and args.name != name:
        raise HyMUNetError(f"-d {args.dataset} names the dataset {name!r} but --name says {args.name!r}; give one")
    return number, name or args.name or default_name


def _output_root(args) -> str:
    from nnunetv2_hymunet.conversion.raw_dataset import resolve_output_root

    return resolve_output_root(args.output, {"--input": args.input})


def _run_isic2018(args) -> int:
    from nnunetv2_hymunet.conversion.isic2018 import convert_isic2018

    target = convert_isic2018(
        args.input, _output_root(args), *_dataset(args, "ISIC2018"), args.overwrite, args.num_processes, args.split_file
    )
    print(f"wrote {target}")
    return 0


def _run_drive(args) -> int:
    from nnunetv2_hymunet.conversion.drive import convert_drive

    target = convert_drive(
        args.input, _output_root(args), *_dataset(args, "DRIVE"), args.overwrite, args.num_processes, args.fov_mode
    )
    print(f"wrote {target}")
    return 0


def _run_brats(args) -> int:
    from nnunetv2_hymunet.conversion.brats import convert_brats

    target = convert_brats(
        args.input, _output_root(args), *_dataset(args, None), args.overwrite, args.num_processes, args.release
    )
    print(f"wrote {target}")
    return 0


def _run_brats_back(args) -> int:
    from nnunetv2_hymunet.conversion.brats import convert_brats_back

    target = convert_brats_back(args.input, args.output, args.release, args.overwrite, args.num_processes)
    print(f"wrote {target}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    return shape


def _run_make_fake(args) -> int:
    from nnunetv2_hymunet.conversion import fake_releases
    from nnunetv2_hymunet.fs_safety import AtomicFolder, check_output_path

    out = check_output_path(args.output, "-o")
    if os.path.isdir(out) and os.listdir(out):
        raise HyMUNetError(f"-o {out} exists and is not empty; choose a new folder for the fake release")
    # written into a temporary folder and renamed at the end, like every other output
    with AtomicFolder(out, f"convert make-fake {args.release_name}") as temp:
        if args.release_name == "isic2018":
            fake_releases.make_fake_isic2018(
                temp, 10 if args.num_cases is None else args.num_cases, args.seed, args.image_size
            )
        elif args.release_name == "drive":
            fake_releases.make_fake_drive(
                temp, 20 if args.num_cases is None else args.num_cases, args.seed, args.scale, args.with_test_manual
            )
        else:
            fake_releases.make_fake_brats(
                temp,
                args.release,
                4 if args.num_cases is None else args.num_cases,
                args.seed,
                args.shape,
                args.num_unlabelled,
            )
    print(f"wrote a fake {args.release_name} release to {out}")
    return 0


def add_subparsers(subparsers) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert ISIC 2018 / DRIVE / BraTS releases to nnU-Net raw datasets",
        description="Convert public releases to nnU-Net raw datasets (validated first, written atomically), map "
        "BraTS predictions back to release labels, or write small fake releases to try it out.",
    )
    kinds = convert.add_subparsers(dest="convert_kind", metavar="KIND", required=True)

    isic = kinds.add_parser(
        "isic2018",
        help="ISIC 2018 Task 1 lesion segmentation",
        description="Reads ISIC2018_Task1-2_{Training,Validation,Test}_Input and ISIC2018_Task1_*_GroundTruth under "
        "--input (Validation/Test optional). Training -> imagesTr/labelsTr; Validation and Test -> "
        "imagesTs/labelsTs, recorded in source_splits.json. Images become RGB PNGs, masks 0/255 -> 0/1.",
    )
    _add_dataset_arguments(isic, "ISIC2018")
    isic.add_argument(
        "--split-file",
        default=None,
        help='fixed folds for splits_final.json: a .json list of {"train": [ids], "val": [ids]} '
        "(nnU-Net's format), or a .csv/.txt of 'ISIC_0000000,fold' lines. Written to "
        "$nnUNet_preprocessed/DatasetNNN_NAME/ when that is set, else into the raw dataset folder",
    )
    isic.set_defaults(func=_run_isic2018)

    drive = kinds.add_parser(
        "drive",
        help="DRIVE retinal vessel segmentation",
        description="Reads training/{images,1st_manual,mask} and test/{images,mask[,1st_manual]} under --input. "
        "FOV masks are kept as 0/1 PNGs in fovTr/ and fovTs/.",
    )
    _add_dataset_arguments(drive, "DRIVE")
    drive.add_argument(
        "--fov-mode",
        choices=("plain", "ignore"),
        default="plain",
        help="plain: labels {background 0, vessel 1} (default). ignore: pixels outside the FOV get "
        "the ignore label 2, so nnU-Net neither trains on nor scores them",
    )
    drive.set_defaults(func=_run_drive)

    brats = kinds.add_parser(
        "brats",
        help="BraTS 2021 or 2023 GLI, region-based",
        description="Reads BraTS2021_NNNNN/ or BraTS-GLI-NNNNN-NNN/ case folders (up to two levels below --input). "
        "Labels become 1 NCR, 2 ED, 3 ET (2021's 4 -> 3); regions WT, TC, ET with regions_class_order "
        "(2, 1, 3). Cases without seg go to imagesTs.",
    )
    _add_dataset_arguments(brats, "BraTS2021 or BraTS2023")
    brats.add_argument(
        "--release",
        choices=("2021", "2023"),
        default=None,
        help="expected release (default: detected from the folder names)",
    )
    brats.set_defaults(func=_run_brats)

    back = kinds.add_parser(
        "brats-back",
        help="map nnU-Net BraTS predictions back to the release's labels",
        description="Converts every *.nii.gz in --input (labels 1 NCR, 2 ED, 3 ET) to the release labels "
        "(2021: ET = 4; 2023: unchanged), keeping file names and geometry.",
    )
    back.add_argument("-i", "--input", required=True, help="folder of nnU-Net predictions")
    back.add_argument(
        "-o", "--output", required=True, help="folder to write (new or empty; must not be or contain --input)"
    )
    back.add_argument("--release", choices=("2021", "2023"), required=True, help="label convention to write")
    back.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --output folder that an earlier brats-back wrote (never any other folder)",
    )
    back.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default 1)")
    back.set_defaults(func=_run_brats_back)

    fake = kinds.add_parser(
        "make-fake",
        help="write a small synthetic tree in a release's exact file naming",
        description="Synthetic stand-ins for trying the converters without the real data.",
    )
    fake.add_argument("release_name", choices=("isic2018", "drive", "brats"), help="which release layout")
    fake.add_argument("-o", "--output", required=True, help="new (or empty) folder to write")
    fake.add_argument(
        "--num-cases",
        type=int,
        default=None,
        help="training cases (default: isic2018 10, drive 20, brats 4); isic2018 adds N/5 validation "
        "and N/5 test cases, drive writes N test cases too",
    )
    fake.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fake.add_argument("--image-size", type=int, default=128, help="isic2018: largest image height in px (default 128)")
    fake.add_argument("--scale", type=float, default=1.0, help="drive: image scale, 1.0 = 565x584 (default 1.0)")
    fake.add_argument(
        "--with-test-manual",
        action="store_true",
        help="drive: also write test/1st_manual (the current public download lacks it)",
    )
    fake.add_argument("--release", choices=("2021", "2023"), default="2021", help="brats: naming scheme (default 2021)")
    fake.add_argument(
        "--shape", type=_parse_shape, default=(40, 48, 36), help=f"brats: {SHAPE_HELP} (default 40,48,36)"
    )
    fake.add_argument(
        "--num-unlabelled", type=int, default=1, help="brats: extra validation-style cases without seg (default 1)"
    )
    fake.set_defaults(func=_run_make_fake)
