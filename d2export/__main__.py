"""``python -m d2export``: the same as the ``d2export`` command."""

from .cli import run

run()
