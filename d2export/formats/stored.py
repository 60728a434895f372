"""Adapter tensors read when the merge reaches them, so memory does not grow with rank or with
the number of adapted modules.

Loading a checkpoint makes one pass over its weights file, in chunks of one reused buffer: the
bytes are hashed (the report's sha256, so the merge never reads the file again for it), and every
floating tensor is checked for NaN and Inf, so a bad checkpoint is still refused before anything
is written. Large tensors (factors, full tensors) then stay on disk as :class:`StoredTensor`
references, read again (from the page cache, usually) when the plan reaches their module; small
ones (magnitudes, biases, ``d2_tau``) are kept as arrays.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from ..arrays import SAFETENSORS_DTYPES, is_float, read_array, safetensors_header
from ..errors import D2ExportError

KEEP_BYTES = 64 * 2**10  # tensors up to this size are kept in memory
# The last factors read stay cached up to this size in all: code that asks for one module's
# factors block after block (the weight check's |B||A|) reads them from memory, and the cache's
# bound keeps memory independent of rank and of the number of modules.
RECENT_BYTES = 32 * 2**20
_RECENT: dict[tuple[Path, int], np.ndarray] = {}
_RECENT_LOCK = threading.Lock()
_SCAN_CHUNK = 8 * 2**20


def forget_recent() -> None:
    """Drop the cache of recent loads. A step that has read every module's factors in turn (the
    weight check, the construction of an unmerged model) leaves up to :data:`RECENT_BYTES` of
    copies there that nothing reads again, for the rest of the process: in verify, beside two
    models running (a small model's whole adapter fits it)."""
    with _RECENT_LOCK:
        _RECENT.clear()


class LazyArray:
    """A tensor whose data is read on use (``load()``, defined by each kind): numpy conversions go
    through it, so callers treat it as an array without anyone holding the data."""

    __slots__ = ()

    def load(self) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        value = self.load()
        return value if dtype is None else value.astype(dtype)

    def astype(self, dtype, **kwargs) -> np.ndarray:
        return self.load().astype(dtype, **kwargs)


class StoredTensor(LazyArray):
    """A tensor in a safetensors file: shape and dtype known, data read on use.

    It answers what the format readers and the plan ask (``shape``, ``ndim``, ``dtype``,
    ``size``), and reads itself for anything numeric (``np.asarray``, ``astype``, indexing),
    returning an owned array and keeping nothing.
    """

    __slots__ = ("dtype", "key", "offset", "path", "shape")

    def __init__(self, path: Path, key: str, offset: int, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.key, self.offset, self.dtype, self.shape = path, key, offset, dtype, shape

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def load(self) -> np.ndarray:
        """An owned copy of the data (from the small cache of recent loads, else from the file)."""
        with _RECENT_LOCK:
            cached = _RECENT.pop((self.path, self.offset), None)
            if cached is not None:
                _RECENT[(self.path, self.offset)] = cached  # now the most recent
                return cached.copy()
        value = self.read()
        if value.nbytes <= RECENT_BYTES:
            with _RECENT_LOCK:
                _RECENT[(self.path, self.offset)] = value.copy()
                while sum(v.nbytes for v in _RECENT.values()) > RECENT_BYTES:
                    _RECENT.pop(next(iter(_RECENT)))
        return value

    def read(self) -> np.ndarray:
        """The data, from the file (not the cache, which it leaves as it is)."""
        value = read_array(self.path, self.offset, self.dtype, self.shape)
        check_finite(value, self.key, self.path)  # the file may have changed since it was scanned
        return value

    def reshape(self, *shape) -> np.ndarray:
        return self.load().reshape(*shape)

    def __getitem__(self, index) -> np.ndarray:
        return self.load()[index]

    @property
    def T(self) -> np.ndarray:
        return self.load().T

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoredTensor({self.key!r}, {self.dtype}, {self.shape})"


def check_finite(value: np.ndarray, key: str, path: Path) -> None:
    if is_float(value.dtype) and value.size and not np.isfinite(value).all():
        raise D2ExportError(f"{path}: adapter tensor {key} contains NaN or Inf")


def scan_safetensors(path: Path, prefix: str = "") -> tuple[dict[str, np.ndarray | StoredTensor], str]:
    """Every tensor of a (validated) safetensors file, large ones as :class:`StoredTensor`, and
    the file's sha256, from one sequential pass that also refuses NaN and Inf. Keys lose ``prefix``."""
    header, start = safetensors_header(path)
    entries = []
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise D2ExportError(f"{path}: tensor {key} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        entries.append((start + begin, start + end, key.removeprefix(prefix), dtype, tuple(entry["shape"])))
    entries.sort()
    digest = hashlib.sha256()
    tensors: dict[str, np.ndarray | StoredTensor] = {}
    buffer = np.empty(_SCAN_CHUNK, np.uint8)
    with open(path, "rb") as handle:
        digest.update(handle.read(start))
        position = start
        for begin, end, key, dtype, shape in entries:
            if begin != position:
                raise D2ExportError(f"{path}: tensor {key} does not follow the one before it")
            if end - begin <= KEEP_BYTES:
                data = np.frombuffer(handle.read(end - begin), np.uint8)
                _take(digest, data, end - begin, path, key)
                value = data.view(dtype).reshape(shape).copy()
                check_finite(value, key, path)
                tensors[key] = value
            else:
                _scan(handle, buffer, digest, begin, end, dtype, key, path)
                tensors[key] = StoredTensor(path, key, begin, dtype, shape)
            position = end
        digest.update(handle.read())  # nothing, in a well-formed file
    return tensors, digest.hexdigest()


def _scan(handle, buffer: np.ndarray, digest, begin: int, end: int, dtype: np.dtype, key: str, path: Path) -> None:
    step = len(buffer) - len(buffer) % dtype.itemsize
    left = end - begin
    while left:
        size = min(step, left)
        got = handle.readinto(memoryview(buffer)[:size])
        _take(digest, buffer[:got], size, path, key)
        check_finite(buffer[:size].view(dtype), key, path)
        left -= size


def _take(digest, data: np.ndarray, expected: int, path: Path, key: str) -> None:
    if len(data) != expected:
        raise D2ExportError(f"{path}: file ends inside tensor {key}")
    digest.update(data)
