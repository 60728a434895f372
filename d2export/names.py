"""The one place tensor and module names are matched across naming conventions.

A checkpoint may be saved with or without its architecture's base-model prefix (``BertModel``
stores ``embeddings.word_embeddings.weight``, ``BertForSequenceClassification`` stores
``bert.embeddings.word_embeddings.weight``), and an adapter trained on one may be merged into the
other. Every side (planning, the weight check, the run-time layers, the in-memory merge) asks
:func:`find_name` instead of trying the variants itself.
"""

from __future__ import annotations

from collections.abc import Callable, Container


def name_variants(name: str, prefix: str) -> list[str]:
    """``name`` as given, without the base-model prefix, and with it (in that order)."""
    if not prefix:
        return [name]
    return list(dict.fromkeys([name, name.removeprefix(prefix + "."), f"{prefix}.{name}"]))


def find_name(name: str, available: Container[str] | Callable[[str], bool], prefix: str = "") -> str | None:
    """The first variant of ``name`` that ``available`` holds (a container of names, or a
    predicate), or None."""
    holds = available if callable(available) else available.__contains__
    return next((n for n in name_variants(name, prefix) if holds(n)), None)
