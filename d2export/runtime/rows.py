"""Streamed weights read a block of rows at a time (docs/design.md §6, *Bounded memory*): the
forward of a linear layer or an embedding of a model streamed in float32 (:func:`read_by_rows`),
and of a wrapper that computes with its base's weight itself (:func:`by_rows`, for the run-time
adapter layer), over the weight maps of :mod:`.streaming`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from . import streaming
from .streaming import _Overlay, _Reused, check_stop


class _FileRows:
    """Rows of a weight in its file, read as float32 into buffers of the pool's: blocks of
    contiguous rows (at most ``step``) or the rows of given ids."""

    def __init__(self, reused: _Reused, file: str, offset: int, dtype: torch.dtype, shape: tuple[int, ...],
                 step: int):
        self.reused, self.file, self.offset, self.dtype = reused, file, offset, dtype
        self.shape, self.step = shape, step
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop``, in a buffer reused at the next call."""
        out = self.reused.buffer(("rows", (self.step, *self.shape[1:])), torch.float32)[:stop - start]
        with open(self.file, "rb", buffering=0) as handle:
            self.reused.read_into(handle, self.offset + start * self.row_bytes, self.dtype, out.view(-1))
        return out

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """The rows of the sorted ``ids``, in a new tensor."""
        if len(ids) and not 0 <= int(ids[0]) <= int(ids[-1]) < self.shape[0]:  # as torch's embedding says it
            raise IndexError("index out of range in self")
        out = torch.empty((len(ids), *self.shape[1:]), dtype=torch.float32)
        with open(self.file, "rb", buffering=0) as handle:
            for i, row in enumerate(ids.tolist()):
                self.reused.read_into(handle, self.offset + row * self.row_bytes, self.dtype, out[i].view(-1))
        return out


class _TensorRows:
    """The same as :class:`_FileRows`, of a weight in memory (resident, an overlay's value, or
    read whole by accelerate's loader)."""

    def __init__(self, value: torch.Tensor):
        self.value = value.float()

    def block(self, start: int, stop: int) -> torch.Tensor:
        return self.value[start:stop]

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return self.value[ids]


class _ComputedRows:
    """The same as :class:`_FileRows`, of a weight computed a block of rows at a time (the
    correctly rounded merge where verify cannot take the folder's tensors: computed at every pass,
    and whole it was a fresh weight-sized array each time), converted into the pool's row buffer."""

    def __init__(self, make: Callable[[int, int], torch.Tensor], reused: _Reused, step: int):
        self.make, self.reused, self.step = make, reused, step

    def block(self, start: int, stop: int) -> torch.Tensor:
        value = self.make(start, stop)
        out = self.reused.buffer(("rows", (self.step, *value.shape[1:])), torch.float32)[:stop - start]
        return out.copy_(value)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.make(row, row + 1).float() for row in ids.tolist()])


class _ByRows:
    """The forward of a linear layer, or of a streamed embedding, of a model streamed in float32:
    a linear layer computes its output features a block of weight rows at a time, an embedding
    reads only the rows of its ids. accelerate's forward loads a streamed module's whole weight
    first, into a buffer kept for the next pass, so each model running held its largest weights
    whole at once: its embedding and head and a block's linear layers (docs/design.md §6,
    *Bounded memory*, and bench/README.md have the sizes).

    An embedding's rows are the same values either way. A block of output features of a product
    need not be bit for bit the same columns of the whole product (BLAS may take another kernel
    for a narrow block), so every linear layer of such a model takes this path, resident ones too,
    with blocks set by its shape alone: the folder and the correctly rounded merge, which verify
    requires to be equal to the bit, compute each layer alike wherever either holds the weight
    (an embedding resized after loading stays resident in one and streams in the other). A
    module whose hook does more than offload, or whose weight is tied, keeps accelerate's forward."""

    def __init__(self, module: nn.Module, forward: Callable):
        self.module, self.forward = module, forward
        width = module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
        self.step = max(1, streaming.READ_CHUNK // (2 * width))  # rows of about READ_CHUNK bytes of a 16-bit file

    @staticmethod
    def applies(module: nn.Module) -> bool:
        """A module whose forward is the plain one of its class (an embedding with max_norm
        rescales the rows it reads, in the weight)."""
        if isinstance(module, nn.Embedding):
            return type(module).forward is nn.Embedding.forward and module.max_norm is None
        return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward

    def __call__(self, *args, **kwargs):
        rows = self.rows() if len(args) == 1 and not kwargs else None
        if rows is None:
            return self.forward(*args, **kwargs)
        (x,) = args
        if isinstance(self.module, nn.Embedding):
            ids, where = torch.unique(x, return_inverse=True)
            return rows.gather(ids)[where]
        return self.product(x, rows, self.bias())

    def product(self, x: torch.Tensor, rows: _FileRows | _TensorRows, bias: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``x`` times the transposed weight (plus ``bias``), a block of output features at a time."""
        features = self.module.out_features
        if features <= self.step:  # one block: its product is the output (no second copy of it)
            return F.linear(x, rows.block(0, features), bias)
        out = x.new_empty((*x.shape[:-1], features))
        for start in range(0, features, self.step):
            stop = min(start + self.step, features)
            out[..., start:stop] = F.linear(x, rows.block(start, stop), None if bias is None else bias[start:stop])
        return out

    def bias(self) -> torch.Tensor | None:
        bias = self.module.bias
        return self.module._hf_hook.weights_map["bias"] if bias is not None and bias.is_meta else bias

    def rows(self) -> _FileRows | _TensorRows | None:
        """The weight's rows as this forward reads them (None: it takes accelerate's forward)."""
        maps = self._weight_maps()
        if not maps:
            return None if maps is None else _TensorRows(self.module.weight)
        check_stop()
        for overlay in maps[:-1]:
            if "weight" in overlay.rows:
                return _ComputedRows(overlay.rows["weight"], maps[-1], self.step)
            if "weight" in overlay.values:
                return _TensorRows(maps[0]["weight"])
        stored = maps[-1].stored("weight", with_float32=True)
        return _FileRows(maps[-1], *stored, self.step) if stored else _TensorRows(maps[-1]["weight"])

    def _weight_maps(self) -> list[Mapping] | None:
        """A streamed module's weight maps, outermost first, ending in a :class:`_Reused`; [] for a
        resident linear layer (accelerate may hook it, to place its inputs); None otherwise."""
        hook = getattr(self.module, "_hf_hook", None)
        if not getattr(hook, "offload", False):
            return None if isinstance(self.module, nn.Embedding) or self.module.weight.is_meta else []
        maps = [hook.weights_map]
        while isinstance(maps[-1], _Overlay):
            maps.append(maps[-1].inner)
        return maps if isinstance(maps[-1], _Reused) else None


def by_rows(module: nn.Module) -> _ByRows | None:
    """The forward of :func:`read_by_rows` of a linear layer that reads its weight by rows, for a
    wrapper that computes with the weight itself (the run-time adapter layer); else None."""
    forward = module.__dict__.get("forward")
    return forward if isinstance(forward, _ByRows) and isinstance(module, nn.Linear) and (
        forward._weight_maps() is not None) else None


def read_by_rows(model: nn.Module) -> nn.Module:
    """Give ``model``'s linear layers and embeddings the forward of :class:`_ByRows`: a model whose
    weights :func:`.streaming.reuse_buffers` reads, and again after a module is replaced (a resized
    vocabulary)."""
    for module in model.modules():
        if _ByRows.applies(module) and not isinstance(module.forward, _ByRows):
            module.forward = _ByRows(module, module.forward)
    return model


__all__ = ["by_rows", "read_by_rows"]
