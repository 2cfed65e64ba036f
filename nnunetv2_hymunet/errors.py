"""User-facing errors: the CLI prints their message (which names the offending file or argument) and exits 1."""


class HyMUNetError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
