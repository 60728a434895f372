"""Libraries' warnings silenced while d2export calls them, safely across threads.

``warnings.catch_warnings`` saves and restores the process's one filter list: two threads inside
it at once restore each other's saved lists, and the one that leaves last can leave "ignore all"
behind for the host application for good. Here every caller shares one silence, counted: the
first in saves the filters, the last out restores them (while any is inside, the filters are
global on Python 3.11, so the host's own warnings are silenced for that time too)."""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager

_lock = threading.Lock()
_inside = 0
_saved: list = []


@contextmanager
def libraries_quiet():
    global _inside, _saved
    with _lock:
        if _inside == 0:
            _saved = list(warnings.filters)
            warnings.simplefilter("ignore")
        _inside += 1
    try:
        yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                warnings.filters[:] = _saved
                mutated = getattr(warnings, "_filters_mutated", None)  # the filters' cache, as catch_warnings does
                if mutated is not None:
                    mutated()
