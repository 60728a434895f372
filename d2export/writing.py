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
from .directio import OutputFile
from .errors import D2ExportError, OptionError
from .outlock import output_lock, remove_stale, stem


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
        self._file = OutputFile(path)  # closed in close() or abort()
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

    def check(self) -> None:
        """Raise the writer thread's error, if it has one (a producer waiting on it calls this)."""
        self._raise_pending()

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
        self._finish(abort=True)

    def _finish(self, abort: bool = False) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        if abort:
            self._file.abort()
            return
        try:  # closing writes the last staged bytes: a full disk can show only here
            self._file.close()
        except OSError as exc:
            if self._error is None:
                self._error = D2ExportError(f"{self.path}: cannot write ({exc.strerror or exc})")


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    """The file's sha256, read in chunks of one reused buffer."""
    digest = hashlib.sha256()
    # One reused buffer: a fresh bytes object per read, right after a merge has grown the heap,
    # fragments it and raises the peak RSS for nothing.
    buffer = memoryview(bytearray(chunk))
    with open(path, "rb") as handle:
        while size := handle.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


class ReadHashes:
    """sha256 of input files from the bytes the merge reads anyway, so nothing is read twice.

    The merge reads each file's tensors in order of offset (plans follow the files' order) and
    hands each piece to :meth:`update`; a thread of its own hashes them in that order (hashlib
    releases the GIL), at most ``queue_depth`` pieces behind. Bytes the merge skips (the header, a
    tensor it does not read) are read here when a later offset passes them, and the rest of the
    file by :meth:`result`. A file read out of order, or never, is hashed whole by :meth:`result`.
    """

    def __init__(self, paths: list[Path], known: dict[Path, str] | None = None, *, queue_depth: int = 8):
        self._known = dict(known or {})
        self._files = {path: _FileHash() for path in paths if path not in self._known}
        self._pieces: queue.Queue = queue.Queue(maxsize=queue_depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="hash inputs", daemon=True)
        self._thread.start()

    def update(self, path: Path, offset: int, data) -> None:
        """Hash ``data``, read at ``offset`` of ``path`` (keep it unchanged until hashed)."""
        if path in self._files and self._error is None:
            self._pieces.put((path, offset, data))

    def _run(self) -> None:
        while (piece := self._pieces.get()) is not None:
            if self._error is not None:
                continue
            path, offset, data = piece
            try:
                self._files[path].take(path, offset, data)
            except BaseException as exc:  # raised by result()
                self._error = exc

    def close(self) -> None:
        if self._thread.is_alive():
            self._pieces.put(None)
            self._thread.join()

    def result(self) -> dict[Path, str]:
        self.close()
        if self._error is not None:
            raise self._error
        hashes = dict(self._known)
        for path, state in self._files.items():
            hashes[path] = state.finish(path)
        return hashes


class _FileHash:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.position = 0
        self.in_order = True

    def take(self, path: Path, offset: int, data) -> None:
        if not self.in_order:
            return
        if offset < self.position:
            self.in_order = False  # read out of order: finish() hashes the whole file
            return
        if offset > self.position:
            self._hash_range(path, offset)
        self.digest.update(data)
        self.position += len(data)

    def finish(self, path: Path) -> str:
        if not self.in_order:
            return sha256_file(path)
        self._hash_range(path, path.stat().st_size)
        return self.digest.hexdigest()

    def _hash_range(self, path: Path, end: int, chunk: int = 8 * 2**20) -> None:
        with open(path, "rb") as handle:
            handle.seek(self.position)
            while self.position < end:
                data = handle.read(min(chunk, end - self.position))
                if not data:
                    raise D2ExportError(f"{path}: file shrank while it was read")
                self.digest.update(data)
                self.position += len(data)


def write_json(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` as indented JSON, atomically (a reader never sees half a file)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    # backslashreplace: a path that is not valid UTF-8 (a surrogate escape) is written visibly
    # escaped instead of failing the whole run after the weights were written.
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise D2ExportError(f"{path}: cannot write ({exc.strerror or exc})") from None


def check_output_location(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that would overwrite or nest inside an input, the current folder or one
    of its parents, a path whose parent is not a folder, or an existing folder without ``force``."""
    target = _resolved(out)
    for source in inputs:
        source = _resolved(source)
        if target == source or target in source.parents or source in target.parents:
            raise OptionError("out", f"{out} overlaps the input {source}; choose another folder")
    cwd = _resolved(Path.cwd())
    if target == cwd or target in cwd.parents:
        raise OptionError("out", f"{out} is the current folder or holds it; name a new folder")
    parent = target.parent
    for folder in (parent, *parent.parents):  # the first one that exists must be a folder we may write in
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise OptionError("out", f"{out}: {folder} exists and is not a folder")
            why = unwritable(folder)
            if why is not None:
                raise OptionError("out", f"{out}: cannot write in {folder} ({why})")
            break
    if len(os.fsencode(target.name)) > _name_max(parent):
        raise OptionError("out", f"{out}: the folder name is too long for the file system")
    if out.exists() and not force:
        raise OptionError("force", f"is not set and the output {out} already exists")
    if out.exists() and not out.is_dir():
        raise D2ExportError(f"output {out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not _a_model_folder(out):
        raise OptionError("force", f"replaces a model folder or an earlier output; {out} holds neither (no "
                          f"{', '.join(REPLACEABLE)}): choose another folder, or empty it first")


# What a folder --force may replace holds one of these: a model folder (ours or another tool's), an
# ONNX export. A folder of other files (someone's notes, a checkout) is refused instead of deleted.
REPLACEABLE = ("config.json", "d2export_report.json", "onnx_report.json", "*.safetensors", "*.onnx")


def _a_model_folder(folder: Path) -> bool:
    return any(path.is_file() for pattern in REPLACEABLE for path in folder.glob(pattern))


def unwritable(folder: Path) -> str | None:
    """Why no folder can be made in ``folder``, as far as the system tells before trying (None: it
    can): so that ``merge --dry-run`` refuses what the merge would, and the merge before its work."""
    with contextlib.suppress(OSError):
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    if not os.access(folder, os.W_OK | os.X_OK):
        return "permission denied"
    return None


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop, a path through a file
        raise OptionError("out", f"{path} cannot be resolved ({getattr(exc, 'strerror', None) or exc})") from None


def _name_max(folder: Path) -> int:
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


@contextlib.contextmanager
def atomic_output(out: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out`` only if the block completes.

    On any error, Ctrl-C or SIGTERM the temporary folder is removed and ``out`` is left as it was.
    A lock beside ``out`` keeps two runs from writing the same output at once; holding it, a run
    removes the temporary folders earlier runs left for the same output when they were killed, and
    an output that appears while the block runs (created by another program) is never replaced.
    Filesystem errors (full disk, read-only folder) are one :class:`D2ExportError`. With
    ``replace=False`` an existing ``out`` is refused once the lock is held, so that of two runs
    that both found ``out`` missing, only the first succeeds.
    """
    out = Path(os.path.abspath(out))
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise D2ExportError(f"cannot create the output's folder {out.parent} ({exc.strerror or exc})") from None
    try:
        with output_lock(out):
            yield from _write_into(out, replace)
    except BaseException:
        for folder in missing:  # deepest first: a failed run leaves no folder it made either
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def _write_into(out: Path, replace: bool) -> Iterator[Path]:
    """The temporary folder's life, under the lock."""
    remove_stale(out)
    existed = out.exists()
    if existed and not replace:
        raise OptionError("force", f"is not set and the output {out} already exists")
    tmp = _make_temp(out, "partial")
    try:
        yield tmp
        _publish(tmp, out, existed)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f": {exc.filename}" if exc.filename else ""
        raise D2ExportError(f"cannot write the output {out} ({exc.strerror or exc}{where})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temp(out: Path, kind: str) -> Path:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{stem(out)}.{kind}-", dir=out.parent))
    except OSError as exc:
        raise D2ExportError(f"cannot create the output in {out.parent} ({exc.strerror or exc})") from None
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the output is a folder like any other
    return tmp


def _publish(tmp: Path, out: Path, existed: bool) -> None:
    if out.exists() and not existed:
        raise D2ExportError(f"{out} appeared while this run was writing it; it was left as it is")
    if out.exists():
        old = _make_temp(out, "old")
        os.replace(out, old / "previous")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
