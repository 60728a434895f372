"""Reading base models and writing merged ones, tensor by tensor.

``safe_open`` validates each file and lists its tensors; each tensor is then read from its offset
into an owned array (``arrays.read_array``), not memory-mapped: a mapping keeps every page read so
far resident (and counted in RSS), so a long-lived handle on a 5 GB shard looks like 5 GB of memory
to monitoring and container limits. Unchanged tensors are copied as bytes, never materialised.
Writing uses :class:`ShardWriter`, which lays down the safetensors header from the plan first and
then streams each tensor's bytes as it is produced: a shard never has to be held in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import queue
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from .arrays import DTYPE_NAMES, DTYPES, from_torch, numpy_dtype, read_array, safetensors_header
from .errors import D2ExportError

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")



@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name inside the model folder
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int | None = None  # where its bytes start in a safetensors file (None for .bin)

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class BaseModel:
    """A Hugging Face model folder, indexed by tensor without loading any tensor."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]  # in file order
    files: list[str]  # weight files in order
    _bin: tuple[str, dict] | None = field(default=None, repr=False)  # the one .bin file loaded (mmap)

    @property
    def is_safetensors(self) -> bool:
        return self.files[0].endswith(".safetensors")

    def read(self, name: str) -> np.ndarray:
        """One tensor, as an owned array (read, not mapped: nothing of the file stays resident)."""
        info = self.tensors[name]
        if info.offset is not None:
            return read_array(self.path / info.file, info.offset, info.dtype, info.shape)
        if self._bin is None or self._bin[0] != info.file:  # .bin: one mmap'd file at a time
            self._bin = (info.file, _load_bin(self.path / info.file))
        return from_torch(self._bin[1][name]).copy()

    def read_bytes(self, name: str, chunk: int = 8 * 2**20) -> Iterator[memoryview]:
        """A safetensors tensor's stored bytes, in chunks of one reused buffer: copying a tensor
        unchanged never materialises it (a 32000 x 4096 embedding is 260 MB in bf16)."""
        info = self.tensors[name]
        if info.offset is None:
            raise ValueError(f"{name}: raw bytes are only available from safetensors files")
        buffer = memoryview(bytearray(min(chunk, max(info.nbytes, 1))))
        with open(self.path / info.file, "rb") as handle:
            handle.seek(info.offset)
            left = info.nbytes
            while left:
                size = handle.readinto(buffer[: min(left, len(buffer))])
                if not size:
                    raise D2ExportError(f"{self.path / info.file}: truncated inside tensor {name}")
                left -= size
                yield buffer[:size]

    def close(self) -> None:
        self._bin = None


def _load_bin(path: Path) -> dict:
    """``pytorch_model.bin`` shards: only ``weights_only=True`` (a pickle can run code), mmap'd."""
    import torch  # only .bin bases need it

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2ExportError(f"{path}: cannot read with weights_only=True ({msg})") from None


def open_base(path: str | Path) -> BaseModel:
    path = Path(path)
    if not path.is_dir():
        raise D2ExportError(f"base model folder not found: {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise D2ExportError(f"{path}: no config.json, not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise D2ExportError(f"{config_path}: invalid JSON ({exc.msg})") from None
    files = _weight_files(path)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for info in _scan(path / file):
            if info.name in tensors:
                raise D2ExportError(f"{path}: tensor {info.name} appears in two weight files")
            tensors[info.name] = info
    return BaseModel(path, config, tensors, files)


def _weight_files(path: Path) -> list[str]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise D2ExportError(f"{index}: not a valid shard index") from None
            files = list(dict.fromkeys(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise D2ExportError(f"{path}: shard {missing[0]} named in {index_name} is missing")
            return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return [name]
    raise D2ExportError(f"{path}: no model weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def _scan(file: Path) -> Iterator[TensorInfo]:
    if file.suffix == ".safetensors":
        try:
            with safe_open(file, framework="np") as handle:  # validates the file
                header, start = safetensors_header(file)
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise D2ExportError(f"{file}: tensor {name} has unsupported dtype {piece.get_dtype()}")
                    offset = start + header[name]["data_offsets"][0]
                    yield TensorInfo(name, file.name, dtype, tuple(piece.get_shape()), offset)
        except SafetensorError as exc:
            raise D2ExportError(f"{file}: not a valid safetensors file ({exc})") from None
    else:
        for name, tensor in _load_bin(file).items():
            if hasattr(tensor, "dtype") and hasattr(tensor, "shape"):  # a torch.Tensor
                yield TensorInfo(name, file.name, numpy_dtype(tensor.dtype), tuple(tensor.shape))


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
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
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
        """The next tensor from its stored bytes (see :meth:`BaseModel.read_bytes`); the chunks
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
    # One reused buffer: a fresh 8 MB bytes object per read, right after a merge has grown the
    # heap, added 100 MB to the peak RSS of a 320M merge (fragmentation), for nothing.
    buffer = memoryview(bytearray(chunk))
    with open(path, "rb") as handle:
        while size := handle.readinto(buffer):
            if stop is not None and stop.is_set():
                return None
            digest.update(buffer[:size])
    return digest.hexdigest()


def parse_size(text: str | int) -> int:
    """'200MB', '5GB' (decimal, as transformers counts), '512MiB', '2GiB', or a byte count."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise D2ExportError(f"invalid size {text!r}: use e.g. 200MB, 5GB or 2GiB")
    number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise D2ExportError(f"invalid size {text!r}: must be positive")
    return size


def check_output_location(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an output that would overwrite or nest inside an input, or an existing folder
    without ``force``."""
    target = out.resolve()
    for source in inputs:
        source = source.resolve()
        if target == source or target in source.parents or source in target.parents:
            raise D2ExportError(f"output {out} overlaps the input {source}; choose another --out")
    if out.exists() and not force:
        raise D2ExportError(f"output {out} already exists; pass --force to replace it")
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
