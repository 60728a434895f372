"""The ``d2export`` command: a thin typer layer over the Python API.

Exit codes: 0 ok, 1 verification failed, 2 bad input, usage or a check that could not run (one
line on stderr; the traceback only with ``--debug``), 130 interrupted.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from typing import NoReturn

from .commands import app
from .process import message, settings, tune_malloc


def run() -> None:
    """The console entry point."""
    tune_malloc()
    try:
        app()
    except SystemExit as exc:
        _exit(exc.code)
    except Exception as exc:  # raised outside a command body, or re-raised for --debug
        if settings["debug"]:
            raise
        print(f"error: {message(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
        _exit(2)


def _exit(code: int | str | None) -> NoReturn:
    """Exit with ``code``, without tearing the interpreter down once torch is imported: finalizing
    torch's and transformers' modules and collecting their objects one by one costs about a second
    (docs/design.md §6, *Cost*) and leaves nothing behind that the process's end does not. What an
    exit must do still happens: the ``atexit`` hooks (temporary folders' finalizers among them) and
    flushing the standard streams. The command's own work is done, its files closed, and its thread
    pools joined, by then."""
    if "torch" not in sys.modules:
        sys.exit(code)
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can reach it
            stream.flush()
    os._exit(code or 0)


__all__ = ["app", "run"]
