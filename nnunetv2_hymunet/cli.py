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
    from nnunetv2_hymunet.fs_safety import Terminated, terminate_as_exception

    try:
        with terminate_as_exception():  # SIGTERM (SLURM time limit) cleans up like Ctrl-C
            result = args.func(args)
    except HyMUNetError as e:
        print(f"hymunet {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the environment, not our code: a full disk, a folder that vanished, a permission
        where = f": {e.filename}" if e.filename else ""
        print(f"hymunet {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hymunet {args.command}: interrupted; partial output removed", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"hymunet {args.command}: stopped by {e.name}; partial output removed", file=sys.stderr)
        return 128 + e.signum
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
