"""Tensors as numpy arrays, in the dtypes safetensors stores (bfloat16 and float8 from ml_dtypes),
read straight from safetensors files; and the conversion to and from torch where a model runs.

The merge path (reading, planning, the algebra, writing) uses only these, so a merge never imports
torch: importing it costs a large share of a whole merge's time and memory (bench/README.md).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np

from .errors import D2ExportError

if TYPE_CHECKING:
    import torch

bfloat16 = np.dtype(ml_dtypes.bfloat16)
float16, float32, float64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

# safetensors' dtype names
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": float64, "F32": float32, "F16": float16, "BF16": bfloat16,
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT_DTYPES = frozenset({float64, float32, float16, bfloat16,
                          SAFETENSORS_DTYPES["F8_E4M3"], SAFETENSORS_DTYPES["F8_E5M2"]})
# dtypes numpy cannot hand to torch.from_numpy: moved as same-size integers and viewed back
_VIA_INT = {bfloat16: (np.int16, "bfloat16"), SAFETENSORS_DTYPES["F8_E4M3"]: (np.uint8, "float8_e4m3fn"),
            SAFETENSORS_DTYPES["F8_E5M2"]: (np.uint8, "float8_e5m2")}


def is_float(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in FLOAT_DTYPES


def dtype_name(dtype: np.dtype) -> str:
    """``bfloat16``, ``float32``, ...: the names torch and config.json use."""
    return np.dtype(dtype).name


finfo = ml_dtypes.finfo  # numpy's finfo, extended to bfloat16 and float8


def safetensors_header(path: Path) -> tuple[dict, int]:
    """(header, absolute offset of the data section); ``__metadata__`` removed. A tensor's
    ``data_offsets`` count from the start of the data section."""
    with open(path, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def read_array(path: Path, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """An owned array from ``nbytes`` at ``offset`` in ``path`` (read, not memory-mapped: nothing
    stays resident after the caller drops it)."""
    nbytes = dtype.itemsize * math.prod(shape)
    data = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as handle:
        handle.seek(offset)
        if handle.readinto(memoryview(data)) != nbytes:
            raise D2ExportError(f"{path}: file ends inside a tensor")
    return data.view(dtype).reshape(shape)


def to_torch(array: np.ndarray) -> torch.Tensor:
    import torch

    via = _VIA_INT.get(array.dtype)
    if via is None:
        return torch.from_numpy(np.ascontiguousarray(array))
    return torch.from_numpy(np.ascontiguousarray(array).view(via[0])).view(getattr(torch, via[1]))


_BY_TORCH_NAME = {torch_name: dtype for dtype, (_, torch_name) in _VIA_INT.items()}


def numpy_dtype(torch_dtype: torch.dtype) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    return _BY_TORCH_NAME[name] if name in _BY_TORCH_NAME else np.dtype(name)


def from_torch(tensor: torch.Tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu().contiguous()
    dtype = numpy_dtype(tensor.dtype)
    if dtype in _VIA_INT:
        return tensor.view(getattr(torch, np.dtype(_VIA_INT[dtype][0]).name)).numpy().view(dtype)
    return tensor.numpy()
