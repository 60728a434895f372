"""What the command does for the process as a whole: the one error path (bad input -> one line,
exit 2; Ctrl-C -> exit 130; anything unexpected -> one line and exit 2, never 1), ``--debug``,
and the allocator setting that only a command, never the library, may make."""

from __future__ import annotations

import contextlib
import ctypes
import platform
import signal
import sys
import threading
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import D2ExportError, OptionError

err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)  # piped output: don't fold tables at 80
settings = {"debug": False, "verbose": False}

# Options whose flag is not the field name with "-" for "_" (negated or shortened flags).
FLAGS = {"past": "--no-past", "hash_inputs": "--no-hash", "onnx_dir": "--onnx", "max_task_gap_pp": "--max-task-gap",
         "validate": "--no-validate", "peft_reference": "--no-peft", "outputs": "--weights-only"}


def flag(option: str) -> str:
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def message(exc: BaseException) -> str:
    """The one line a user sees: the library's text, with an option named as its flag."""
    if isinstance(exc, OptionError):
        text = f"{flag(exc.option)} {exc.message}"
    else:
        text = str(exc).strip()
        text = text.splitlines()[0] if text else type(exc).__name__
    # a path that is not valid UTF-8 carries surrogate escapes, which no terminal encoding can print
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def fail(exc: BaseException, *, unexpected: bool = False) -> None:
    if settings["debug"]:
        raise exc
    line = message(exc)
    if unexpected:
        line = f"unexpected {type(exc).__name__}: {line} (rerun with --debug for the traceback)"
    err.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a container stop, a job scheduler's timeout), handled like Ctrl-C: the
    running operation unwinds, removing its partial output."""


def _terminate(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def reported(live=None, interrupted: str = "interrupted"):
    """Bad input -> one line and exit 2; Ctrl-C -> one line and exit 130 (SIGTERM likewise, exit
    143); an exception nobody anticipated -> one line and exit 2 (exit 1 means "verification
    failed", nothing else). Warnings from numpy, torch or transformers are not the user's to read
    (``--verbose`` and ``--debug`` show them). ``live``: the progress display to stop first, so the line is not
    drawn over it."""
    try:
        with _sigterm_as_interrupt(), warnings.catch_warnings():
            if not settings["verbose"]:
                warnings.simplefilter("ignore")
            yield
    except (typer.Exit, typer.Abort):
        raise
    except KeyboardInterrupt as exc:
        if live is not None:
            live.stop()
        if isinstance(exc, Terminated):
            err.print(interrupted.replace("interrupted", "terminated (SIGTERM)", 1), highlight=False)
            raise typer.Exit(128 + signal.SIGTERM) from None
        err.print(interrupted, highlight=False)
        raise typer.Exit(130) from None
    except Exception as exc:
        if live is not None:
            live.stop()
        fail(exc, unexpected=not isinstance(exc, D2ExportError))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def tune_malloc(*, streaming: bool = False) -> None:
    """Keep freed memory for reuse instead of handing it back to the kernel at once.

    glibc maps most large blocks afresh and unmaps them on free, and its adaptive threshold still
    trims the heap often, while a merge allocates the same few sizes (a tensor read, its merged
    copy) for every tensor: every tensor paid page faults for memory just freed. Fixed limits
    (blocks up to 32 MiB from the heap, trim past 256 MiB free) keep those pages for a few MB more
    peak RSS (bench/README.md has the figures). Process-wide, so only the command does it.

    ``streaming`` (verify's model runs) turns this around: each block's weights are loaded, used
    once and freed, between allocations of every other size, so heap-allocated blocks fragment the
    heap and RSS grows with the model; blocks from 1 MiB up are mapped on their own and given back
    at once.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, (1 if streaming else 32) * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, (16 if streaming else 256) * 2**20)


def lean_transformers() -> None:
    """Keep transformers from importing scikit-learn and SciPy with a model's code.

    When they are installed (sentence-transformers brings both), transformers imports them at the
    import of its generation and loss code, for what verify never runs on a model: assisted
    generation's confidence threshold (sklearn's ``roc_curve``) and detection models' matching
    losses (SciPy's ``linear_sum_assignment``). That import is on the path of every verify, before
    the first model loads (bench/README.md has its cost). transformers reads
    these flags through ``is_sklearn_available`` and ``is_scipy_available``. Process-wide, so only
    the command does it; a no-op where transformers keeps them otherwise."""
    with contextlib.suppress(ImportError):
        from transformers.utils import import_utils

        for flag in ("_sklearn_available", "_scipy_available"):
            if isinstance(getattr(import_utils, flag, None), bool):
                setattr(import_utils, flag, False)
