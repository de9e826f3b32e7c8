"""The one error type for bad user input (a flag, file or value), shared by the core, both methods and the harness.

Library code raises :class:`UsageError` with a message that names what was wrong and what to do; the
command-line scripts turn it into one ``error: ...`` line and exit status 2 (``eval/ruler/cli.py``).
"""
from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user: a flag, file or value. The message names it and says what to do."""
