"""The one progress callback every long step reports through."""

from __future__ import annotations

from collections.abc import Callable

# (what is happening, units done, units in all; 0 when unknown). Merges count bytes written,
# benchmarks timed runs, verification and export report stages with (stage, 0, 0).
Progress = Callable[[str, int, int], None]


def silent(what: str, done: int, total: int) -> None:
    """The default: report nothing."""
