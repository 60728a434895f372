"""The one progress callback every long step reports through."""

from __future__ import annotations

import threading
from collections.abc import Callable

# (what is happening, units done, units in all; 0 when unknown). Merges count bytes written,
# benchmarks timed runs, verification and export report stages with (stage, 0, 0).
Progress = Callable[[str, int, int], None]


def silent(what: str, done: int, total: int) -> None:
    """The default: report nothing."""


class Stopped(Exception):
    """Raised inside a run (verify's weight check, a model's) once another part of it has failed."""


def stop_check(stop: threading.Event) -> Callable[..., None]:
    """A function that raises :class:`Stopped` once ``stop`` is set (whatever it is called with):
    a progress callback that ends a long step."""
    def check(*_args) -> None:
        if stop.is_set():
            raise Stopped
    return check
