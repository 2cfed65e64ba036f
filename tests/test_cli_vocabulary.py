"""Every `hymunet` subcommand speaks nnU-Net's flag vocabulary: one short and one long spelling per meaning."""

import argparse

import pytest

from nnunetv2_hymunet.cli import build_parser

# nnU-Net's short flags and the one long name each has in hymunet
VOCABULARY = {
    "-d": "--dataset",
    "-i": "--input",
    "-o": "--output",
    "-c": "--configuration",
    "-tr": "--trainers",
    "-f": "--folds",
    "-p": "--plans",
    "-np": "--num-processes",
}
RETIRED = {
    "--dataset-id",
    "--num-workers",
    "--workers",
    "--ref",
    "--pred",
    "--models",
    "--plans-name",
    "--configurations",
    "--trainer",
    "--fold",
    "--dataset-name",
}
# subcommand -> flags it must take
REQUIRED = {
    "plan": {"-d", "-c", "-p"},
    "convert isic2018": {"-d", "-i", "-o", "-np"},
    "convert drive": {"-d", "-i", "-o", "-np"},
    "convert brats": {"-d", "-i", "-o", "-np"},
    "convert brats-back": {"-i", "-o", "-np"},
    "convert make-fake": {"-o"},
    "evaluate": {"-o", "-np"},
    "compare": {"-o"},
    "profile": {"-d", "-c", "-p", "-tr", "-o"},
    "benchmark run": {"-d", "-c", "-tr", "-f", "-o", "-np"},
    "benchmark make-suite": {"-o"},
    "benchmark long-range-plans": {"-d", "-c", "-p"},
}


def _subcommands(parser: argparse.ArgumentParser, prefix: str = ""):
    """(name, parser) of every leaf subcommand."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        yield prefix, parser
    for action in children:
        for name, child in action.choices.items():
            yield from _subcommands(child, f"{prefix} {name}".strip())


SUBCOMMANDS = dict(_subcommands(build_parser()))


def _options(parser: argparse.ArgumentParser) -> list:
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_the_tree_is_walked():
    assert set(REQUIRED) <= set(SUBCOMMANDS) and "doctor" in SUBCOMMANDS and "demo" in SUBCOMMANDS


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_meaning_has_one_short_and_one_long_spelling(name):
    parser = SUBCOMMANDS[name]
    for action in _options(parser):
        flags = set(action.option_strings)
        assert not flags & RETIRED, f"hymunet {name}: retired spelling {sorted(flags & RETIRED)}"
        for short, long in VOCABULARY.items():
            if short in flags or long in flags:
                assert {short, long} <= flags, f"hymunet {name}: {sorted(flags)} must be spelled {short}/{long}"
                assert action.dest.replace("_", "-") in (long[2:], long[2:] + "s", "configurations"), (
                    f"hymunet {name}: {long} stored as {action.dest}"
                )
        # every other short flag is a single letter that nnU-Net does not use for something else
        for flag in flags:
            if not flag.startswith("--"):
                assert flag in VOCABULARY or flag in ("-q", "-djfile"), f"hymunet {name}: unexpected short {flag}"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_subcommands_take_the_flags_of_their_job(name):
    present = {flag for action in _options(SUBCOMMANDS[name]) for flag in action.option_strings}
    assert REQUIRED[name] <= present, f"hymunet {name} lacks {sorted(REQUIRED[name] - present)}"


def test_a_dataset_is_spelled_d_everywhere_and_is_not_an_integer():
    """-d is nnU-Net's name-or-id: never parsed as int by argparse (an id and DatasetNNN_Name both work)."""
    for name, parser in SUBCOMMANDS.items():
        for action in _options(parser):
            if "dataset" in action.dest and action.dest != "dataset_json":
                assert "-d" in action.option_strings, f"hymunet {name}: {action.option_strings}"
                assert action.type is None, f"hymunet {name}: -d must accept a name, not only {action.type}"


def test_evaluate_mirrors_nnunet_evaluate_folder():
    parser = SUBCOMMANDS["evaluate"]
    positionals = [a.dest for a in parser._actions if not a.option_strings]
    assert positionals == ["ref", "pred"]  # nnUNetv2_evaluate_folder gt_folder pred_folder
    args = parser.parse_args(["REF", "PRED", "-o", "OUT", "-djfile", "d.json", "-np", "3"])
    assert (args.ref, args.pred, args.output, args.dataset_json, args.num_processes) == (
        "REF",
        "PRED",
        "OUT",
        "d.json",
        3,
    )


def test_benchmark_run_takes_several_datasets_and_folds():
    args = SUBCOMMANDS["benchmark run"].parse_args(
        ["-d", "971", "Dataset972_X", "-c", "2d", "-tr", "nnUNetTrainer", "-f", "0", "1", "-np", "2", "-o", "out"]
    )
    assert args.dataset == ["971", "Dataset972_X"] and args.folds == [0, 1] and args.num_processes == 2
