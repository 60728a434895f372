"""The read side of a model folder: its config and an index of its tensors, read one at a time.

``safe_open`` validates each file and lists its tensors; each tensor is then read from its offset
into an owned array (``arrays.read_array``), not memory-mapped: a mapping keeps every page read so
far resident (and counted in RSS), so a long-lived handle on a 5 GB shard looks like 5 GB of memory
to monitoring and container limits. Unchanged tensors are copied as bytes, never materialised.
The same class opens a base model and a merged folder (verify reads both).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from . import jsonfiles
from .arrays import SAFETENSORS_DTYPES, dtype_name, from_torch, is_float, numpy_dtype, read_array
from .errors import D2ExportError

CONFIG_NAME = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")


def read_json_object(path: Path, schema: dict | None = None, *, strict: bool = False) -> dict:
    """A JSON file that must hold an object (see :mod:`d2export.jsonfiles`); any problem is one
    :class:`D2ExportError` naming the file."""
    return jsonfiles.read_json_object(path, schema, strict=strict)


def read_config(folder: str | Path) -> dict:
    """``config.json`` of a Hugging Face model folder, its keys' types checked."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise D2ExportError(f"{folder}: no config.json, not a Hugging Face model folder")
    return read_json_object(path, jsonfiles.MODEL_CONFIG)


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
class ModelFolder:
    """A Hugging Face model folder (a base, or a merged one), indexed by tensor without loading any."""

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


    @classmethod
    def open(cls, path: str | Path, what: str = "model") -> ModelFolder:
        """Read ``config.json`` and index every tensor; ``what`` names the folder in messages."""
        path = Path(path)
        if not path.is_dir():
            raise D2ExportError(f"{what} folder not found: {path}")
        config = read_config(path)
        for name in jsonfiles.SIDE_FILES:
            if (path / name).is_file():
                jsonfiles.check_side_file(path / name)
        files, weight_map = _weight_files(path)
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            for info in _scan(path / file):
                if info.name in tensors:
                    raise D2ExportError(f"{path}: tensor {info.name} appears in two weight files")
                tensors[info.name] = info
        if weight_map is not None:
            _check_index(path, tensors, weight_map)
        return cls(path, config, tensors, files)

    def main_float_dtype(self) -> str:
        """The floating dtype holding most of the weights' bytes (``float32`` when there is none)."""
        counts: dict[str, int] = {}
        for info in self.tensors.values():
            if is_float(info.dtype):
                counts[dtype_name(info.dtype)] = counts.get(dtype_name(info.dtype), 0) + info.nbytes
        return max(counts, key=counts.__getitem__) if counts else "float32"

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _load_bin(path: Path) -> dict:
    """``pytorch_model.bin`` shards: only ``weights_only=True`` (a pickle can run code), mmap'd."""
    import torch  # only .bin bases need it

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2ExportError(f"{path}: cannot read with weights_only=True ({msg})") from None


_SHARD_NAME = re.compile(r"(.+)-\d+-of-(\d+)(\.[a-z]+)")


def _weight_files(path: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files in order, and the index's weight map where they are shards: the first of
    ``model.safetensors``, its shards' index, ``pytorch_model.bin``, its shards' index, as
    transformers' ``from_pretrained`` picks them (a folder holding a single file and stale shards
    loads the single file, and the merge must start from what the user loads)."""
    for name, index_name in (("model.safetensors", SAFE_INDEX), ("pytorch_model.bin", BIN_INDEX)):
        if (path / name).is_file():
            return [name], None
        index = path / index_name
        if index.is_file():
            weight_map = read_json_object(index, jsonfiles.SHARD_INDEX, strict=True)["weight_map"]
            files = list(dict.fromkeys(weight_map.values()))
            for file in files:
                if Path(file).name != file or file in (".", ".."):  # the index may not point out of the folder
                    raise D2ExportError(f"{index}: shard name {file!r} is not a file name in the folder")
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise D2ExportError(f"{path}: shard {missing[0]} named in {index_name} is missing")
            _check_no_omitted_shard(path, index, files)
            return files, weight_map
    raise D2ExportError(f"{path}: no model weights (model.safetensors, shards with an index, or pytorch_model.bin)")


def _check_no_omitted_shard(path: Path, index: Path, files: list[str]) -> None:
    """A file named like the index's shards (``model-00002-of-00003.safetensors``) that the index
    does not list would be silently left out of the output."""
    patterns = {(m.group(1), m.group(2), m.group(3)) for f in files if (m := _SHARD_NAME.fullmatch(f))}
    for item in sorted(path.iterdir()):
        match = _SHARD_NAME.fullmatch(item.name)
        if match and (match.group(1), match.group(2), match.group(3)) in patterns and item.name not in files:
            raise D2ExportError(f"{path}: shard {item.name} is not in {index.name}; the index is incomplete")


def _check_index(path: Path, tensors: dict[str, TensorInfo], weight_map: dict[str, str]) -> None:
    """The index must say where each tensor really is, and list every tensor."""
    for name, file in weight_map.items():
        info = tensors.get(name)
        if info is None:
            raise D2ExportError(f"{path}: the index puts tensor {name} in {file}, which does not hold it")
        if info.file != file:
            raise D2ExportError(f"{path}: the index puts tensor {name} in {file}, but it is in {info.file}")
    unlisted = next((n for n in tensors if n not in weight_map), None)
    if unlisted is not None:
        raise D2ExportError(f"{path}: tensor {unlisted} in {tensors[unlisted].file} is not in the index")


MAX_HEADER = 100 * 2**20  # safetensors' own limit
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")


def _header(file: Path) -> tuple[dict, int]:
    """The safetensors header, its length checked against the file before it is read."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER, size - 8):
            raise D2ExportError(f"{file}: not a valid safetensors file (header length {length}, file size {size})")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise D2ExportError(f"{file}: not a valid safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise D2ExportError(f"{file}: not a valid safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    for name in header:
        if not name or len(name) > 1024 or _BAD_NAME.search(name):
            raise D2ExportError(f"{file}: tensor name {name[:80]!r} is empty, too long or holds control characters")
    return header, 8 + length


def _scan(file: Path) -> Iterator[TensorInfo]:
    if file.suffix == ".safetensors":
        header, start = _header(file)  # before safe_open: nothing is read beyond the checked header
        try:
            with safe_open(file, framework="np") as handle:  # validates offsets and sizes against the file
                for name in handle.keys():
                    piece = handle.get_slice(name)
                    dtype = SAFETENSORS_DTYPES.get(piece.get_dtype())
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
