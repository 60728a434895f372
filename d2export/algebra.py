"""The pure arithmetic of docs/design.md §2 and §3. No I/O: tensors in, tensors out.

Canonical orientation: ``M`` is ``[out, in]`` with one row per output unit. A stored weight is
``M`` (``transposed=False``, ``nn.Linear``) or ``M.T`` (``transposed=True``: GPT-2 ``Conv1D``,
embeddings). Rows are independent (the rescaling is per row), so merging proceeds in row blocks
and the float64 working set stays bounded whatever the tensor size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .arrays import bfloat16, float16, float32, float64
from .errors import D2ExportError
from .spec import ModuleUpdate, Rescale

# Rows per block are chosen so one float64 block of V stays near this many bytes: small enough that
# a block's arrays stay in the core's cache from one pass to the next (bench/README.md).
_BLOCK_BYTES = 2**20


class MergeError(D2ExportError):
    """The merged tensor would be invalid (zero-norm rows, non-finite values)."""


@dataclass(frozen=True)
class MergeStats:
    """Per-tensor figures for the report."""

    delta_norm: float  # ||sum_t c_t B_t A_t||_F, before any rescaling
    scale_min: float | None  # range of the row rescaling g (None when the method does not rescale)
    scale_max: float | None


def stacked_factors(update: ModuleUpdate, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """``([c_1 B_1 | c_2 B_2 | ...], [A_1; A_2; ...])`` in ``dtype``: the whole low-rank update as one
    product, so a block of rows costs one matmul whatever the number of terms."""
    B = np.concatenate([term.B.astype(dtype) * dtype.type(term.coefficient) for term in update.terms], axis=1)
    A = np.concatenate([term.A.astype(dtype) for term in update.terms], axis=0)
    return B, A


def round_to_dtype(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round ``x`` to ``dtype`` once, to nearest-even, as if from the exact value.

    float64 to bfloat16/float16 through float32 rounds twice. That goes wrong only where the
    float32 value lands exactly on a halfway point of the 16-bit format: the halfway points are
    float32 numbers and rounding is monotonic, so any other float32 result lies between the same
    two halfway points as ``x`` and rounds to the same 16-bit value. So: round to float32, find the
    float32 values on a halfway point (a bit pattern; about one element in 65536), and round those
    few again from float64 *to odd* first, which is exact (float32 keeps more than two bits beyond
    either 16-bit format's precision). float16's subnormal range, whose halfway points have another
    bit pattern, takes that path too.
    """
    dtype = np.dtype(dtype)
    if x.dtype == dtype:
        return x.copy()
    # Overflow to inf is the caller's to report (merge_tensor names the row), not a warning.
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype not in _HALFWAY or x.dtype != float64:
            return x.astype(dtype)  # a single correctly rounded conversion
        return _round_via_float32(x, dtype)


def _round_via_float32(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    nearest = x.astype(float32, order="C")
    bits = nearest.reshape(-1).view(np.uint32)
    low_bits, halfway = _HALFWAY[dtype]
    suspect = (bits & low_bits) == halfway
    if dtype == float16:
        suspect |= (bits & 0x7FFFFFFF) < _F16_MIN_NORMAL_BITS
    result = nearest.astype(dtype)
    where = np.flatnonzero(suspect)  # flat indices: 15x faster than np.nonzero's per-axis ones
    if where.size:
        result.reshape(-1)[where] = round_to_odd_float32(x.reshape(-1)[where]).astype(dtype)
    return result


# float32 bit patterns on a halfway point of the 16-bit format: (mask of the bits float32 has
# beyond the format's precision, the pattern of exactly one half unit)
_HALFWAY = {bfloat16: (0xFFFF, 0x8000), float16: (0x1FFF, 0x1000)}
_F16_MIN_NORMAL_BITS = 0x38800000  # 2**-14 as float32 bits; below it float16 is subnormal


def round_to_odd_float32(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding to odd: truncate toward zero, set the last bit if inexact."""
    nearest = x.astype(float32)
    back = nearest.astype(float64)
    inexact = back != x
    bits = nearest.view(np.int32)
    # Sign-magnitude: stepping the integer view down by one moves one ulp toward zero.
    away = inexact & (np.abs(back) > np.abs(x))
    bits = np.where(away, bits - 1, bits)
    bits = np.where(inexact, bits | 1, bits)
    return bits.view(float32)


def row_block(n_cols: int, itemsize: int) -> int:
    """Rows per block so that one block of ``n_cols`` columns stays near :data:`_BLOCK_BYTES`."""
    return max(1, _BLOCK_BYTES // max(1, n_cols * itemsize))


@dataclass(frozen=True)
class MergedRows:
    """One block of rows of the exact merge, in the compute dtype, canonical orientation."""

    rows: slice
    base: np.ndarray  # W0[rows]
    value: np.ndarray  # W'[rows] = g * (W0 + dW)[rows], not yet rounded
    scale: np.ndarray | None  # g[rows], or None when the method does not rescale
    delta_sq: float  # ||dW[rows]||_F^2


def merged_rows(
    weight: np.ndarray, update: ModuleUpdate, *, transposed: bool,
    compute_dtype: np.dtype = float64, name: str = "",
) -> Iterator[MergedRows]:
    """The exact merge of ``update`` into the stored base ``weight``, in blocks of rows.

    ``V = W0 + sum_t c_t B_t A_t``; ``W' = diag(g) V`` with ``g = m / ||V_row||`` where the method
    rescales (``m`` learned for DoRA, ``||W0_row||`` for D2-LoRA). Rows are independent, so the
    working set is one block whatever the tensor size. A block's arrays are overwritten by the
    next block: use (or copy) them before asking for it.
    """
    name = name or update.weight_key
    compute_dtype = np.dtype(compute_dtype)
    weight = np.asarray(weight)  # an adapter's full tensor may still be on disk (formats.stored)
    base = weight.T if transposed else weight  # canonical [out, in] view, no copy
    n_out, n_in = base.shape
    if (n_out, n_in) != update.shape:
        raise MergeError(
            f"{name}: base shape {tuple(weight.shape)} does not match the adapter's "
            f"[out={update.shape[0]}, in={update.shape[1]}]"
        )
    B, A = stacked_factors(update, compute_dtype)
    # at least as many rows as the stacked rank: BLAS repacks the [K, in] factor on every product
    step = max(row_block(n_in, compute_dtype.itemsize), A.shape[0])
    # Two block buffers reused for every block: fresh ones are mapped and zeroed by the kernel each
    # time (glibc hands large blocks back on free), a page fault per page per block.
    w0_buffer = np.empty((min(step, n_out), n_in), compute_dtype)
    v_buffer = np.empty_like(w0_buffer)
    for start in range(0, n_out, step):
        rows = slice(start, min(start + step, n_out))
        w0, v = w0_buffer[: rows.stop - start], v_buffer[: rows.stop - start]
        w0[...] = base[rows]
        yield exact_rows(w0, v, B, A, update, rows, name)


def exact_rows(w0: np.ndarray, v: np.ndarray, B: np.ndarray, A: np.ndarray, update: ModuleUpdate,
               rows: slice, name: str) -> MergedRows:
    """One block of :func:`merged_rows`: ``w0`` holds ``W0[rows]`` in the compute dtype, ``v`` (same
    shape) receives ``W'[rows]``; ``B, A`` are :func:`stacked_factors`."""
    np.matmul(B[rows], A, out=v)
    flat = v.reshape(-1)
    delta_sq = float(np.dot(flat, flat))
    v += w0  # V = W0 + delta, in place of delta
    g = None
    if update.rescale is not Rescale.NONE:
        target = _target_norms(update, w0, rows, v.dtype)
        norms = np.sqrt(np.einsum("ij,ij->i", v, v))
        zero = np.flatnonzero(norms == 0)
        if zero.size:
            raise MergeError(
                f"{name}: row {rows.start + int(zero[0])} of W0 + dW has zero norm, so the "
                f"{update.rescale.value} rescaling is undefined"
            )
        g = target / norms
        v *= g[:, None]
    # Non-finite values are not checked here (a pass over float64): they survive rounding, and
    # the merge checks the (smaller) rounded block.
    return MergedRows(rows, w0, v, g, delta_sq)


def merge_tensor(
    weight: np.ndarray,
    update: ModuleUpdate,
    *,
    transposed: bool,
    out_dtype: np.dtype,
    compute_dtype: np.dtype = float64,
    name: str = "",
) -> tuple[np.ndarray, MergeStats]:
    """Fold ``update`` into the stored base ``weight``; return it in ``out_dtype``, rounded once,
    and its stats. Row blocks go through :func:`merge_block` (the float32 path of
    :mod:`d2export.blocks` where it applies, else :func:`merged_rows`' float64 arithmetic)."""
    from .blocks import merge_rows, prepare_factors  # blocks builds on this module

    name = name or update.weight_key
    out_dtype = np.dtype(out_dtype)
    base = weight.T if transposed else weight
    if base.shape != update.shape:
        raise MergeError(
            f"{name}: base shape {tuple(weight.shape)} does not match the adapter's "
            f"[out={update.shape[0]}, in={update.shape[1]}]"
        )
    factors = prepare_factors(update, base.dtype, out_dtype, compute_dtype)
    merged, totals = merge_rows(base, update, factors, 0, out_dtype, name)
    stats = totals.stats(update.rescale is not Rescale.NONE)
    return (np.ascontiguousarray(merged.T) if transposed else merged), stats


# 16-bit floats: the exponent field, all ones for inf and NaN
_EXPONENT_BITS = {bfloat16: 0x7F80, float16: 0x7C00}


def all_finite(x: np.ndarray) -> bool:
    """Whether every element is finite. A 16-bit array is tested on its bits (isfinite, or a float32
    sum, converts every element); others by a sum, finite exactly when every element is."""
    exponent = _EXPONENT_BITS.get(x.dtype)
    if exponent is not None:
        bits = np.bitwise_and(x.view(np.uint16), np.uint16(0x7FFF))
        return bool(bits.size == 0 or bits.max() < exponent)
    with np.errstate(over="ignore", invalid="ignore"):
        return math.isfinite(float(x.sum(dtype=float64))) or bool(np.isfinite(x).all())


def check_finite(rounded: np.ndarray, value: np.ndarray, start: int, out_dtype: np.dtype, name: str) -> None:
    """Raise naming the first row of a block whose rounded value is not finite."""
    if all_finite(rounded):
        return
    bad = start + int(np.flatnonzero(~np.isfinite(rounded).all(axis=1))[0])
    if np.isfinite(value).all():
        raise MergeError(f"{name}: merged row {bad} overflows {out_dtype} (write it as float32: dtype float32)")
    raise MergeError(f"{name}: merged row {bad} is not finite (overflow or NaN)")


def _target_norms(update: ModuleUpdate, w0: np.ndarray, rows: slice, dtype: np.dtype) -> np.ndarray:
    if update.rescale is Rescale.MAGNITUDE:
        assert update.magnitude is not None
        return update.magnitude[rows].astype(dtype)
    return np.sqrt(np.einsum("ij,ij->i", w0, w0))  # D2-LoRA keeps each row's original norm


def merge_bias(
    bias: np.ndarray, update: ModuleUpdate, *, out_dtype: np.dtype, compute_dtype: np.dtype = float64,
) -> np.ndarray:
    """PEFT ``lora_bias``: the trained ``lora_B.bias`` enters the output scaled like the low-rank path."""
    return round_to_dtype(merged_bias_exact(bias, update, compute_dtype), out_dtype)


def merged_bias_exact(bias: np.ndarray, update: ModuleUpdate, compute_dtype: np.dtype = float64) -> np.ndarray:
    assert update.bias_delta is not None
    dtype = np.dtype(compute_dtype)
    return bias.astype(dtype) + dtype.type(update.terms[0].coefficient) * update.bias_delta.astype(dtype)
