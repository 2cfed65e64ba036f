"""The `hymunet` command: one argparse entry point; each subcommand lives next to the code it drives.

Each module listed in SUBCOMMAND_MODULES exposes `add_subparsers(subparsers)`, which registers its
subcommand(s) and sets `func` to a plain function taking the parsed namespace. Modules keep heavy imports
(torch, nnunetv2) inside their functions so that `hymunet --help` stays fast.
"""

import argparse
import importlib
import sys

from nnunetv2_hymunet.errors import HyMUNetError

SUBCOMMAND_MODULES = (
    "nnunetv2_hymunet.demo",  # demo
    "nnunetv2_hymunet.planning.cli",  # plan
    "nnunetv2_hymunet.conversion.cli",  # convert
    "nnunetv2_hymunet.evaluation.cli",  # evaluate, compare
    "nnunetv2_hymunet.benchmark.cli",  # benchmark, profile
    "nnunetv2_hymunet.doctor",  # doctor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hymunet",
        description="HyM-UNet for nnU-Net v2: demo, dataset conversion, plans, evaluation, benchmarks, diagnostics. "
        "Training and prediction use the stock nnU-Net commands with -tr nnUNetTrainerHyMUNet.",
    )
    from nnunetv2_hymunet import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).add_subparsers(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except HyMUNetError as e:
        print(f"hymunet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
