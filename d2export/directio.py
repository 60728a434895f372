"""A file written front to back around the page cache (``O_DIRECT``) where the filesystem allows.

Why by hand: neither Python's ``open`` nor safetensors writes around the page cache, and the cache is
what a merge pays for: a buffered write costs the kernel about ten times the CPU of a direct one
(pages allocated, copied and reclaimed under memory pressure; at 7B as much CPU as the merge's
products; bench/README.md, design choices: ``io_paths.py``). Direct writes need page-aligned
memory, offsets and lengths, so bytes are staged in page-aligned buffers (two: one is written
while the other fills) and the last partial page is padded, then cut off with ``ftruncate``.
Where ``O_DIRECT`` is refused (tmpfs, some network filesystems: ``EINVAL``), the same calls write
through the page cache.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ALIGN = 4096  # the largest logical block size of common devices; every direct write is a multiple
BUFFER_BYTES = 8 * 2**20  # one write to the device; smaller writes cost more kernel time per byte
# Off: every output goes through the page cache (a filesystem that accepts O_DIRECT and then
# misbehaves; tests of the buffered path).
DIRECT_WRITES = True


class OutputFile:
    """``write`` bytes in order, ``close`` to finish; ``direct`` says whether the cache is bypassed."""

    def __init__(self, path: Path, buffer_bytes: int = BUFFER_BYTES):
        self.path = path
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        direct = getattr(os, "O_DIRECT", 0) if DIRECT_WRITES else 0
        self.direct = False
        if direct:
            try:
                self._fd = os.open(path, flags | direct, 0o644)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
        if not self.direct:
            self._fd = os.open(path, flags, 0o644)
        # Two page-aligned buffers: the disk thread writes one while the caller fills the other, so
        # a write's wait on the device overlaps the copying and hashing of the next bytes instead of
        # holding the shard's writer (bench/README.md, merge_limit.py).
        size = max(ALIGN, buffer_bytes - buffer_bytes % ALIGN)
        self._buffers = [mmap.mmap(-1, size) for _ in range(2)]
        self._views = [memoryview(b) for b in self._buffers]
        self._view = self._views[0]
        self._fill = 0  # bytes staged in the buffer being filled
        self._offset = 0  # bytes handed to the disk thread
        self._disk = ThreadPoolExecutor(1, f"disk {path.name}")
        self._pending: Future | None = None  # the other buffer's write

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        while data:
            n = min(len(data), len(self._view) - self._fill)
            self._view[self._fill:self._fill + n] = data[:n]
            self._fill += n
            data = data[n:]
            if self._fill == len(self._view):
                self._flush()

    def close(self) -> None:
        """Write what is staged and close; raises ``OSError`` (a full disk shows here at the latest)."""
        if self._fd < 0:
            return
        try:
            self._wait()  # settles ``direct``: a refused direct write turns the rest buffered
            if self._fill:
                size = self._offset + self._fill
                if self.direct:  # a whole last page, then the file cut to its size
                    padded = -self._fill % ALIGN
                    self._view[self._fill:self._fill + padded] = bytes(padded)
                    self._fill += padded
                self._flush()
                self._wait()
                if self._offset != size:
                    os.ftruncate(self._fd, size)
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is staged (the caller removes the file)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):  # the error, if any, was the caller's to see first
                self._wait()
            self._disk.shutdown()
            fd, self._fd = self._fd, -1
            os.close(fd)
            del self._view, self._views
            for buffer in self._buffers:
                with contextlib.suppress(BufferError):  # a slice of it lives on in an error's traceback
                    buffer.close()

    def _flush(self) -> None:
        """Hand the filled buffer to the disk thread and go on in the other one, once its own write
        (handed over at the previous flush) is done."""
        self._wait()
        self._pending = self._disk.submit(self._write_at, self._view, self._fill, self._offset)
        self._offset += self._fill
        self._view = self._views[1] if self._view is self._views[0] else self._views[0]
        self._fill = 0

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # the write's OSError, raised to the caller

    def _write_at(self, view: memoryview, fill: int, offset: int) -> None:
        """On the disk thread: ``view[:fill]`` at ``offset``."""
        done = 0
        while done < fill:
            try:
                done += os.pwrite(self._fd, view[done:fill], offset + done)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                # accepted at open, refused at write (an alignment this device does not take):
                # the rest of the file goes through the page cache
                import fcntl  # O_DIRECT is Linux's, and so is this branch; fcntl is not on Windows

                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
