"""``python -m d2export.cli``."""

from . import run

run()
