"""Error types. Every failure a user can cause is a ``D2ExportError``: the CLI prints its message
as one line and exits 2, so messages must name the file or tensor and say what to do."""

from __future__ import annotations


class D2ExportError(Exception):
    """Bad input or usage: the CLI turns this into one line on stderr and exit code 2."""


class UnsupportedAdapterError(D2ExportError):
    """The adapter uses a feature that cannot be folded into plain weights (or is not supported yet)."""
