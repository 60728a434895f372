"""The whole tensors an adapter saves besides its factors, in every form PEFT writes them, and
PEFT's trainable tokens (docs/design.md §4.4).

PEFT 0.21 saves a ``modules_to_save`` module both as ``X.weight`` (its own state dict) and, when the
vocabulary was resized or embeddings are targeted, as ``X.modules_to_save.weight`` beside the
untouched ``X.original_module.weight``; older versions kept the adapter name
(``X.modules_to_save.default.weight``). A LoRA-targeted embedding saves its (resized) base as
``X.base_layer.weight``. Trainable tokens (``trainable_token_indices``) save the new values of the
chosen rows as ``X.token_adapter.trainable_tokens_delta`` ``[n, dim]``, and the resized base as
``X.token_adapter.base_layer.weight`` when the vocabulary changed. Despite its name the "delta" is no
difference: PEFT's layer ``index_copy``s it over those rows of the weight.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..arrays import is_float, read_array
from ..errors import D2ExportError
from .stored import LazyArray, StoredTensor

# Wrapper infixes whose tensors stand for the module's own parameter (all forms, adapter name or not).
_INFIXES = re.compile(r"\.(?:modules_to_save(?:\.default)?|base_layer)\.")
_ORIGINAL = ".original_module."  # the base's copy inside a ModulesToSaveWrapper: the adapted model never uses it
_TOKENS = ".token_adapter."
_DELTA = ".token_adapter.trainable_tokens_delta"


class TokenRows(LazyArray):
    """A weight whose rows ``indices`` take ``values`` (PEFT's trainable tokens), over ``start``: the
    adapter's saved copy of the base, or (``start`` None) the base's own tensor, bound by the plan.

    It answers what the plan, the merge and the weight check ask of a full tensor (``shape``,
    ``dtype``, ``ndim``, ``astype``, ``np.asarray``), and folds the rows in when read, so the base's
    tensor is read only when its turn comes."""

    def __init__(self, indices: np.ndarray, values: np.ndarray, start=None, *,
                 read: Callable[[], np.ndarray] | None = None, shape: tuple[int, ...] | None = None,
                 dtype: np.dtype | None = None):
        self.indices, self.values, self.start, self._read = indices, values, start, read
        self.shape = tuple(start.shape) if start is not None else shape
        self.dtype = start.dtype if start is not None else dtype

    @property
    def needs_base(self) -> bool:
        return self.start is None and self._read is None

    def over(self, read: Callable[[], np.ndarray], shape: tuple[int, ...], dtype: np.dtype) -> TokenRows:
        """These rows over the base's tensor (read on use)."""
        return TokenRows(self.indices, self.values, read=read, shape=tuple(shape), dtype=dtype)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def load(self) -> np.ndarray:
        if self.needs_base:
            raise RuntimeError("trainable tokens not bound to a base tensor")
        base = np.asarray(self.start) if self.start is not None else self._read()
        value = np.array(base, copy=True)
        # PEFT casts the trained rows to the weight's dtype before index_copy: so do we
        value[self.indices] = np.asarray(self.values).astype(value.dtype)
        return value

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"TokenRows({len(self.indices)} rows, {self.dtype}, {self.shape})"


def saved_tensors(path: Path, config: dict, rest: dict) -> dict:
    """Base tensor name -> the adapter's full tensor (an array, a stored tensor or :class:`TokenRows`)."""
    plain: dict[str, object] = {}
    wrapped: dict[str, object] = {}  # from a wrapper infix: the module's trained value
    token_starts: dict[str, object] = {}
    deltas: dict[str, object] = {}
    for key, tensor in rest.items():
        if _ORIGINAL in key:
            continue
        if key.endswith(_DELTA):
            deltas[key[: -len(_DELTA)]] = tensor
        elif _TOKENS in key:
            module, _, param = key.partition(_TOKENS)
            if param != "base_layer.weight":
                raise D2ExportError(f"{path}: adapter tensor {key} is not part of a known trainable-token layout")
            token_starts[f"{module}.weight"] = tensor
        elif "lora_" in key or "d2_" in key:
            raise D2ExportError(f"{path}: adapter tensor {key} is not part of a known adapter layout")
        elif _INFIXES.search(key):
            wrapped[_INFIXES.sub(".", key)] = tensor
        else:
            plain[key] = tensor
    for name, value in wrapped.items():  # the same module saved twice must agree
        other = plain.pop(name, None)
        if other is not None and not _same(other, value):
            raise D2ExportError(f"{path}: the adapter saves {name} twice with different values (plain and "
                                "inside its modules_to_save wrapper)")
    tensors = {**plain, **wrapped}
    if deltas or config.get("trainable_token_indices"):
        tensors.update(_token_rows(path, config, deltas, token_starts))
    elif token_starts:
        raise D2ExportError(f"{path}: trainable-token base copies without trainable_tokens_delta")
    return tensors


def base_layer_copies(rest: dict) -> frozenset[str]:
    """Base tensor names of the full tensors saved as a LoRA-wrapped layer's ``base_layer`` (an
    embedding's base, resized with the vocabulary): the very parameter of the module, which a layer
    tied to it shares in PEFT's model. (A ``modules_to_save`` copy is a new parameter: a tied layer
    keeps the original.)"""
    return frozenset(_INFIXES.sub(".", key) for key in rest
                     if ".base_layer." in key and _TOKENS not in key and _ORIGINAL not in key)


_CHUNK = 16 * 2**20


def _same(a, b) -> bool:
    """Whether two saved copies hold the same tensor. Copies left in the file (a resized embedding
    can be gigabytes) are compared as bytes in pieces, never loaded whole."""
    if tuple(a.shape) != tuple(b.shape) or a.dtype != b.dtype:
        return False
    if isinstance(a, StoredTensor) and isinstance(b, StoredTensor):
        byte = np.dtype(np.uint8)
        return all(np.array_equal(read_array(a.path, a.offset + i, byte, (min(_CHUNK, a.nbytes - i),)),
                                  read_array(b.path, b.offset + i, byte, (min(_CHUNK, a.nbytes - i),)))
                   for i in range(0, a.nbytes, _CHUNK))
    return np.array_equal(np.asarray(a), np.asarray(b))


def _token_rows(path: Path, config: dict, deltas: dict, starts: dict) -> dict[str, TokenRows]:
    where = path / "adapter_config.json"
    spec = config.get("trainable_token_indices")
    if not deltas:
        raise D2ExportError(f"{where}: trainable_token_indices is set but the adapter holds no trainable_tokens_delta")
    lists = {k: _indices(v, f"trainable_token_indices[{k!r}]", where) for k, v in spec.items()} \
        if isinstance(spec, dict) else {None: _indices(spec, "trainable_token_indices", where)}
    rows = {}
    for module, values in sorted(deltas.items()):
        indices = _indices_for(module, lists, int(values.shape[0]) if values.ndim == 2 else -1, where)
        if values.ndim != 2 or not is_float(values.dtype) or values.shape[0] != len(indices):
            raise D2ExportError(f"{path}: {module} trainable_tokens_delta has shape {tuple(values.shape)} "
                                f"({values.dtype}); expected [{len(indices)}, dim] floats, one row per token index")
        values = np.asarray(values)
        start = starts.pop(f"{module}.weight", None)
        if start is not None and (start.ndim != 2 or start.shape[1] != values.shape[1]
                                  or int(indices.max()) >= start.shape[0]):
            raise D2ExportError(f"{path}: {module}: trainable-token base copy {tuple(start.shape)} does not fit "
                                f"{len(indices)} rows of width {values.shape[1]} up to index {int(indices.max())}")
        rows[f"{module}.weight"] = TokenRows(indices, values, start)
    if starts:
        raise D2ExportError(f"{path}: trainable-token base copies without deltas: {', '.join(sorted(starts))}")
    return rows


def _indices(value, label: str, where: Path) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise D2ExportError(f"{where}: {label} must be a non-empty list of token ids, got {value!r}")
    if len(set(value)) != len(value):
        # PEFT's index_copy of a repeated row keeps an undefined one of its values
        raise D2ExportError(f"{where}: {label} repeats a token id")
    return np.asarray(value, dtype=np.int64)


def _indices_for(module: str, lists: dict, rows: int, where: Path) -> np.ndarray:
    """The token ids of ``module``'s rows: its own entry (PEFT matches the name's end), else, for a
    layer tied to the embedding (PEFT ties it to the embedding's adapter), the one list that fits."""
    if None in lists:
        return lists[None]
    own = [v for k, v in lists.items() if module == k or module.endswith(f".{k}")]
    if len(own) == 1:
        return own[0]
    fitting = {tuple(v) for v in lists.values() if len(v) == rows}
    if len(fitting) == 1:
        return np.asarray(fitting.pop(), dtype=np.int64)
    raise D2ExportError(f"{where}: cannot tell which trainable_token_indices belong to {module}")
