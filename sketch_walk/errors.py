"""One error type for bad user input, and the wrapper that turns it into a one-line message.

Every script's ``main`` is wrapped with :func:`cli_main`: a :class:`UsageError` prints
``error: <message>`` on stderr and exits with status 2 (usage), as argparse does for bad flags.
"""
from __future__ import annotations

import functools
import sys


class UsageError(Exception):
    """Bad input from the user: a flag, file or value. The message names it and says what to do."""


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
