"""Placeholder: this subcommand is being built (see the project's issues)."""


def _not_yet(args):
    print(f"hymunet {args.command}: not yet available in this version")
    return 2


def add_subparsers(subparsers):
    for name in ('evaluate', 'compare'):
        p = subparsers.add_parser(name, help="(not yet available)")
        p.set_defaults(func=_not_yet)
