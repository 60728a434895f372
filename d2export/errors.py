"""Error types. Every failure a user can cause is a ``D2ExportError``: the CLI prints its message
as one line and exits 2, so messages must name the file or tensor and say what to do."""

from __future__ import annotations


class D2ExportError(Exception):
    """Bad input or usage: the CLI turns this into one line on stderr and exit code 2."""


class UnsupportedAdapterError(D2ExportError):
    """The adapter uses a feature that cannot be folded into plain weights (or is not supported yet)."""


class OptionError(D2ExportError):
    """A bad or missing value of one named option. The library's message names the parameter
    (``dtype must be ...``); the CLI shows the flag it maps to (``--dtype must be ...``)."""

    def __init__(self, option: str, message: str):
        super().__init__(f"{option} {message}")
        self.option = option
        self.message = message
