"""d2export.directio: files written around the page cache hold exactly the bytes given, whatever
the sizes and alignment, and fall back to buffered writes where O_DIRECT is refused."""

from __future__ import annotations

import errno
import itertools
import os

import numpy as np
import pytest

from d2export import directio
from d2export.directio import ALIGN, OutputFile


def _pieces(total: int, seed: int) -> list[bytes]:
    """Random bytes cut at random (mostly unaligned) points."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, total, dtype=np.uint8).tobytes()
    cuts = sorted({0, total, *rng.integers(0, total + 1, 7).tolist()})
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("total", [0, 1, ALIGN - 1, ALIGN, ALIGN + 1, 3 * 8192 + 17])
def test_file_holds_exactly_the_bytes_written(tmp_path, monkeypatch, direct, total):
    monkeypatch.setattr(directio, "DIRECT_WRITES", direct)
    pieces = _pieces(total, total)
    path = tmp_path / "f.bin"
    out = OutputFile(path, buffer_bytes=8192)  # several flushes, and a staged tail at close
    if not direct:
        assert not out.direct
    for piece in pieces:
        out.write(np.frombuffer(piece, np.uint8))  # any buffer, as the shard writer passes
    out.close()
    assert path.read_bytes() == b"".join(pieces)
    out.close()  # closing twice is harmless


def test_write_refused_by_the_device_goes_on_through_the_page_cache(tmp_path, monkeypatch):
    pwrite, calls = os.pwrite, []

    def refusing(fd, data, offset):
        calls.append(offset)
        if _flags(fd) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", refusing)
    pieces = _pieces(5 * ALIGN + 3, 1)
    out = OutputFile(tmp_path / "f.bin", buffer_bytes=2 * ALIGN)
    for piece in pieces:
        out.write(piece)
    out.close()
    assert (tmp_path / "f.bin").read_bytes() == b"".join(pieces)
    assert not out.direct and calls


def test_open_refused_with_o_direct_writes_buffered(tmp_path, monkeypatch):
    real_open = os.open

    def tmpfs_like(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", tmpfs_like)
    out = OutputFile(tmp_path / "f.bin")
    out.write(b"abc")
    out.close()
    assert not out.direct
    assert (tmp_path / "f.bin").read_bytes() == b"abc"


def test_other_open_errors_are_raised(tmp_path):
    with pytest.raises(FileNotFoundError):
        OutputFile(tmp_path / "missing" / "f.bin")


def test_abort_drops_what_is_staged(tmp_path):
    out = OutputFile(tmp_path / "f.bin", buffer_bytes=ALIGN)
    out.write(b"x" * (ALIGN + 10))
    out.abort()
    assert (tmp_path / "f.bin").stat().st_size == ALIGN  # the full page only; the caller removes the file
    out.abort()


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)
