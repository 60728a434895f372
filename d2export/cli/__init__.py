"""The ``d2export`` command: a thin typer layer over the Python API.

Exit codes: 0 ok, 1 verification failed, 2 bad input, usage or a check that could not run (one
line on stderr; the traceback only with ``--debug``), 130 interrupted.
"""

from __future__ import annotations

import sys

from .commands import app
from .process import message, settings, tune_malloc


def run() -> None:
    """The console entry point."""
    tune_malloc()
    try:
        app()
    except Exception as exc:  # raised outside a command body, or re-raised for --debug
        if settings["debug"]:
            raise
        print(f"error: {message(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        sys.exit(2)


__all__ = ["app", "run"]
