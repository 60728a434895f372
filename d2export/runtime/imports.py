"""Importing torch, transformers and a model's code: with garbage collection paused, since every
object an import creates lives as long as the process and each collection it triggers only walks
the growing heap (docs/design.md §6, *Cost*). torch-free, so that it can wrap torch's own import."""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def uncollected():
    """Garbage collection paused for the duration."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
