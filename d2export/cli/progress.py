"""Progress on stderr: a live bar on a terminal, periodic log lines otherwise (CI logs, pipes)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..progress import Progress as ProgressCallback
from .process import err

# When not on a terminal: a line at most this often, the first one only after this long, so a
# short run's log stays clean (and an error stays the one line on stderr) while a long one shows life.
LOG_EVERY_S = 10.0


class _LogLines:
    """The non-terminal display: periodic lines saying where the work is."""

    def __init__(self, title: str):
        self.title = title
        self.last_time = time.monotonic()

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last_time < LOG_EVERY_S:
            return
        self.last_time = now
        share = f" {done / total:.0%}" if total else ""
        err.print(f"{self.title}:{share} {escape(what)}", highlight=False, markup=True, soft_wrap=True)

    def stop(self) -> None:
        """Nothing to take down (the interface the error path expects of a live display)."""


@contextlib.contextmanager
def progress_display(title: str, *, quiet: bool = False) -> Iterator[tuple[ProgressCallback, object]]:
    """Yield ``(callback, display)``: the callback takes ``(what, done, total)``; ``display`` has
    ``stop()`` for the error path."""
    if quiet:
        yield (lambda what, done, total: None), None
        return
    if not err.is_terminal:
        lines = _LogLines(title)
        yield lines, lines
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(title, total=None)

        def update(what: str, done: int, total: int) -> None:
            bar.update(task, description=escape(f"{title}: {what}"[-60:]), completed=done, total=total or None)

        yield update, bar
