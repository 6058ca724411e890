"""Shared CLI output: data on stdout (text or JSON), diagnostics on stderr, no tracebacks."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from regraft.errors import RegraftError

__all__ = ["emit", "fail", "info", "progress_printer"]


def emit(data: Any, text: str, as_json: bool) -> None:
    """Print ``data`` as JSON or ``text`` for people, on stdout, in one write (10,000 rows included)."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text + "\n")


def info(message: str) -> None:
    """A diagnostic line on stderr."""
    print(message, file=sys.stderr)


def fail(error: BaseException) -> int:
    """Print a user error as ``Error:``/``Hint:`` lines on stderr and return exit code 2.

    Set ``REGRAFT_DEBUG=1`` to get the traceback too.
    """
    if os.environ.get("REGRAFT_DEBUG"):
        import traceback

        traceback.print_exception(error, file=sys.stderr)
    message = error.message if isinstance(error, RegraftError) else str(error)
    print(f"Error: {message}", file=sys.stderr)
    hint = getattr(error, "hint", "")
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)
    return 2


def progress_printer(enabled: bool, model: Any = None):
    """A ``progress(done, total, key)`` callback drawing a bar on stderr after a second, or ``None``.

    ``None`` when disabled or when stderr is not a terminal; with ``model``, the
    bar shows megabytes and the rate too (see :mod:`regraft.cli.progress`).
    """
    from regraft.cli.progress import progress_bar

    return progress_bar(enabled, model)
