"""Importing torch, transformers and a model's code: with garbage collection paused, since every
object an import creates lives as long as the process and each collection it triggers only walks
the growing heap (docs/design.md §6, *Cost*). torch-free, so that it can wrap torch's own import."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path


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


@contextmanager
def frozen_imports(folder: Path):
    """The model code imported, and every object alive then (torch's, transformers') left out of
    garbage collection for the duration: each model dropped between runs needs a full collection
    (its modules and hooks form cycles), which otherwise walks those few hundred thousand objects
    too, with both model threads stopped. The imports themselves run with collection paused
    (:func:`uncollected`; docs/design.md §6, *Cost*)."""
    from .models import import_model_code  # torch: only once the caller imports it

    # a host that froze its own heap (a pre-fork server, gc.freeze before forking) keeps it frozen:
    # unfreezing moves every frozen object back, the host's too, so then this leaves its own frozen
    hosts = gc.get_freeze_count() > 0
    with uncollected():
        try:
            import_model_code(folder)
            frozen = True
        except Exception:  # loading the model says what is wrong, in its own words
            frozen = False
        if frozen:
            gc.freeze()
    try:
        yield
    finally:
        if frozen and not hosts:
            gc.unfreeze()
