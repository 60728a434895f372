"""The lock that keeps two runs from writing the same output folder at once, and the clean-up of
temporary folders left by a run that was killed. Used by :func:`d2export.writing.atomic_output`."""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from .errors import D2ExportError


def stem(out: Path) -> str:
    """The output's name in its sibling temporary names, short enough to leave room for the suffixes."""
    raw = os.fsencode(out.name)
    return out.name if len(raw) <= 180 else hashlib.sha256(raw).hexdigest()[:24]


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``out``, released by the kernel if the
    process dies; the file is removed on the way out."""
    path = out.parent / f".{stem(out)}.lock"
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise D2ExportError(f"cannot create the output in {out.parent} ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise D2ExportError(f"another run is writing {out}; wait for it to finish") from None
        except OSError:  # a file system without locks (some network mounts): write unguarded
            break
        try:  # the holder before us may have removed the file after we opened it: lock the new one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


_TEMP_SUFFIX = re.compile(r"[a-z0-9_]{8}")  # what tempfile.mkdtemp appends to the prefix


def remove_stale(out: Path) -> None:
    """Temporary folders of this output left by a run that was killed (SIGKILL, power loss): named
    exactly as :func:`d2export.writing.atomic_output` names them for this output. Holding the
    lock, no live run is using them; anything else in the folder is left alone. A run killed
    between publishing's two renames left ``out`` missing and the output it replaced in an
    ``.old-`` folder: that output is put back, as if the killed run had never published."""
    for kind in ("old", "partial"):  # the old first: a partial is only ever a killed run's new output
        prefix = f".{stem(out)}.{kind}-"
        for item in out.parent.glob(glob.escape(prefix) + "*"):
            if _TEMP_SUFFIX.fullmatch(item.name[len(prefix):]) and item.is_dir() and not item.is_symlink():
                previous = item / "previous"
                if kind == "old" and not os.path.lexists(out) and os.path.lexists(previous):
                    try:
                        os.replace(previous, out)
                    except OSError as exc:  # the old output stays where it is: never removed unrestored
                        raise D2ExportError(f"cannot put back {out}, which a killed run left in {previous} "
                                            f"({exc.strerror or exc})") from None
                shutil.rmtree(item, ignore_errors=True)
