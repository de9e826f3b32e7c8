"""Command-line helpers every harness script uses: one-line errors, exit status 2, warnings.

A bad flag, file or value never ends in a traceback: argparse's own errors and every
:class:`~sketch_walk.core.errors.UsageError` raised below a script's ``main`` (a missing data file, a
checkpoint of the wrong method, a bad knob) print one line ``error: <message>`` on stderr and exit with
status 2, as argparse does for a bad flag.
"""
from __future__ import annotations

import argparse
import functools
import sys

from sketch_walk.core.errors import UsageError

__all__ = ["OneLineParser", "UsageError", "cli_main", "int_at_least", "warn"]


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``error: ...``, no usage block) and exit 2."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


def int_at_least(low: int):
    """An argparse ``type``: an integer >= ``low`` (the parser reports anything else as one line)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def cli_main(fn):
    """Decorate a script's ``main()`` so a :class:`UsageError` becomes one line on stderr and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)

    return wrapper


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr)
