"""The write side: safetensors shards streamed from a plan, an output folder that appears only
when complete, and sha256 of what was read and written."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .arrays import SAFETENSORS_NAMES
from .errors import D2ExportError, OptionError


class ShardWriter:
    """Writes one safetensors file whose tensors are all declared up front.

    The header (names, dtypes, shapes, offsets) is written first; tensors then arrive in the
    declared order and go straight to disk. The sha256 of the file is computed on the way.

    Writing and hashing run on a thread of their own (both release the GIL), so the next tensor is
    merged while this one goes to disk; at most ``queue_depth`` written tensors wait, so memory
    stays bounded. An error on that thread (a full disk) is raised by the next call.
    """

    def __init__(self, path: Path, entries: list[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, *, queue_depth: int = 2):
        self.path = path
        self._entries = entries
        self._next = 0
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            size = dtype.itemsize * math.prod(shape)
            header[name] = {"dtype": SAFETENSORS_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
        self.nbytes = 8 + len(blob) + offset
        self._hash = hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 - closed in close() or abort()
        self._jobs: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._drain, name=f"write {path.name}", daemon=True)
        self._thread.start()
        self._submit(None, [struct.pack("<Q", len(blob)) + blob], len(blob) + 8)

    def _drain(self) -> None:
        while (job := self._jobs.get()) is not None:
            name, chunks, nbytes = job
            if self._error is not None or self._stop:
                continue  # keep taking jobs so the producer never blocks on a dead writer
            try:
                written = 0
                for chunk in chunks:
                    self._file.write(chunk)
                    self._hash.update(chunk)
                    written += len(chunk)
                if written != nbytes:
                    raise RuntimeError(f"{name}: {written} bytes written, expected {nbytes}")
            except OSError as exc:  # a full disk, a vanished folder: bad for the user to fix, not a bug
                self._error = D2ExportError(f"{self.path}: cannot write ({exc.strerror or exc})")
            except BaseException as exc:  # handed to the producer by the next call
                self._error = exc

    def _submit(self, name: str | None, chunks, nbytes: int) -> None:
        self._raise_pending()
        self._jobs.put((name, chunks, nbytes))

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _expect(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> int:
        expected, want_dtype, want_shape = self._entries[self._next]
        if (name, dtype, tuple(shape)) != (expected, want_dtype, want_shape):
            raise RuntimeError(f"shard writer expected {expected} {want_dtype} {want_shape}, got {name} {dtype} "
                               f"{tuple(shape)}")
        self._next += 1
        return dtype.itemsize * math.prod(shape)

    def write(self, name: str, tensor: np.ndarray) -> None:
        """The next tensor. The writer keeps a reference until it is on disk: do not modify it."""
        nbytes = self._expect(name, tensor.dtype, tuple(tensor.shape))
        data = np.ascontiguousarray(tensor).reshape(-1).view(np.uint8)
        self._submit(name, [memoryview(data)], nbytes)

    def write_raw(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks) -> None:
        """The next tensor from its stored bytes (see :meth:`~d2export.reading.ModelFolder.read_bytes`); the chunks
        are read on the writer's thread, each written before the next is read."""
        self._submit(name, chunks, self._expect(name, dtype, shape))

    def close(self) -> str:
        """Finish the file; return its sha256."""
        if self._next != len(self._entries):
            raise RuntimeError(f"{self.path}: {len(self._entries) - self._next} tensors were never written")
        self._finish()
        self._raise_pending()
        return self._hash.hexdigest()

    def abort(self) -> None:
        self._stop = True
        self._finish()

    def _finish(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._file.close()


def sha256_file(path: Path, chunk: int = 8 * 2**20, stop: threading.Event | None = None) -> str | None:
    """The file's sha256; None if ``stop`` was set before the end (checked between chunks)."""
    digest = hashlib.sha256()
    # One reused buffer: a fresh bytes object per read, right after a merge has grown the heap,
    # fragments it and raises the peak RSS for nothing.
    buffer = memoryview(bytearray(chunk))
    with open(path, "rb") as handle:
        while size := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                return None
            digest.update(buffer[:size])
    return digest.hexdigest()


class InputHashes:
    """sha256 of the input files, computed on a thread of its own while the merge runs (hashlib and
    file reads release the GIL); :meth:`cancel` stops it within one chunk when the merge fails."""

    def __init__(self, paths: list[Path]):
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(paths,), name="hash inputs", daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        try:
            for path in paths:
                digest = sha256_file(path, stop=self._stop)
                if digest is None:
                    return
                self._hashes[path] = digest
        except BaseException as exc:  # raised by result()
            self._error = exc

    def result(self) -> dict[Path, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashes

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise D2ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None


def check_output_location(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that would overwrite or nest inside an input, or an existing folder
    without ``force``."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise OptionError("out", f"{out} overlaps the input {source}; choose another folder")
    if out.exists() and not force:
        raise OptionError("force", f"is not set and the output {out} already exists")
    if out.exists() and not out.is_dir():
        raise D2ExportError(f"output {out} exists and is not a folder")


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out`` only if the block completes.

    On any error or Ctrl-C the temporary folder is removed and ``out`` is left as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output is a folder like any other
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
