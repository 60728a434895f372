"""The pure arithmetic of DESIGN.md section 2. No I/O: tensors in, tensors out.

Canonical orientation: ``M`` is ``[out, in]`` with one row per output unit. A stored weight is
``M`` (``transposed=False``, ``nn.Linear``) or ``M.T`` (``transposed=True``: GPT-2 ``Conv1D``,
embeddings). Rows are independent (the rescaling is per row), so merging proceeds in row blocks
and the float64 working set stays bounded whatever the tensor size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .errors import D2ExportError
from .spec import ModuleUpdate, Rescale

# Rows per block are chosen so one float64 block of V stays near this many bytes.
_BLOCK_BYTES = 8 * 2**20


class MergeError(D2ExportError):
    """The merged tensor would be invalid (zero-norm rows, non-finite values)."""


@dataclass(frozen=True)
class MergeStats:
    """Per-tensor figures for the report."""

    delta_norm: float  # ||sum_t c_t B_t A_t||_F, before any rescaling
    scale_min: float | None  # range of the row rescaling g (None when the method does not rescale)
    scale_max: float | None


def stacked_factors(update: ModuleUpdate, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``([c_1 B_1 | c_2 B_2 | ...], [A_1; A_2; ...])`` in ``dtype``: the whole low-rank update as one
    product, so a block of rows costs one matmul whatever the number of terms."""
    B = torch.cat([term.B.to(dtype) * term.coefficient for term in update.terms], dim=1)
    A = torch.cat([term.A.to(dtype) for term in update.terms], dim=0)
    return B, A


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round ``x`` to ``dtype`` once, to nearest-even, as if from the exact value.

    torch converts float64 to bfloat16/float16 through float32, which rounds twice. That goes
    wrong only where the float32 value lands exactly on a halfway point of the 16-bit format: the
    halfway points are float32 numbers and rounding is monotonic, so any other float32 result lies
    between the same two halfway points as ``x`` and rounds to the same 16-bit value. So: round to
    float32, find the float32 values on a halfway point (a bit pattern; about one element in 65536),
    and round those few again from float64 *to odd* first, which is exact (float32 keeps more than
    two bits beyond either 16-bit format's precision). float16's subnormal range, whose halfway
    points have another bit pattern, takes that path too.
    """
    if x.dtype == dtype:
        return x.clone()
    if dtype not in _HALFWAY or x.dtype != torch.float64:
        return x.to(dtype)  # a single correctly rounded conversion
    if x.dim() == 0:
        return round_to_dtype(x.reshape(1), dtype).reshape(())
    nearest = x.to(torch.float32)
    bits = nearest.view(torch.int32)
    low_bits, halfway = _HALFWAY[dtype]
    suspect = (bits & low_bits) == halfway
    if dtype == torch.float16:
        suspect |= (bits & 0x7FFFFFFF) < _F16_MIN_NORMAL_BITS
    result = nearest.to(dtype)
    where = suspect.nonzero(as_tuple=True)
    if where[0].numel():
        result[where] = round_to_odd_float32(x[where]).to(dtype)
    return result


# float32 bit patterns on a halfway point of the 16-bit format: (mask of the bits float32 has
# beyond the format's precision, the pattern of exactly one half unit)
_HALFWAY = {torch.bfloat16: (0xFFFF, 0x8000), torch.float16: (0x1FFF, 0x1000)}
_F16_MIN_NORMAL_BITS = 0x38800000  # 2**-14 as float32 bits; below it float16 is subnormal


def round_to_odd_float32(x: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding to odd: truncate toward zero, set the last bit if inexact."""
    nearest = x.to(torch.float32)
    back = nearest.to(torch.float64)
    inexact = back != x
    bits = nearest.view(torch.int32)
    # Sign-magnitude: stepping the integer view down by one moves one ulp toward zero.
    away = inexact & (back.abs() > x.abs())
    bits = torch.where(away, bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def _row_block(n_cols: int, itemsize: int) -> int:
    return max(1, _BLOCK_BYTES // max(1, n_cols * itemsize))


@dataclass(frozen=True)
class MergedRows:
    """One block of rows of the exact merge, in the compute dtype, canonical orientation."""

    rows: slice
    base: torch.Tensor  # W0[rows]
    value: torch.Tensor  # W'[rows] = g * (W0 + dW)[rows], not yet rounded
    scale: torch.Tensor | None  # g[rows], or None when the method does not rescale
    delta_sq: float  # ||dW[rows]||_F^2


def merged_rows(
    weight: torch.Tensor, update: ModuleUpdate, *, transposed: bool,
    compute_dtype: torch.dtype = torch.float64, name: str = "",
) -> Iterator[MergedRows]:
    """The exact merge of ``update`` into the stored base ``weight``, in blocks of rows.

    ``V = W0 + sum_t c_t B_t A_t``; ``W' = diag(g) V`` with ``g = m / ||V_row||`` where the method
    rescales (``m`` learned for DoRA, ``||W0_row||`` for D2-LoRA). Rows are independent, so the
    working set is one block whatever the tensor size.
    """
    name = name or update.weight_key
    base = weight.T if transposed else weight  # canonical [out, in] view, no copy
    n_out, n_in = base.shape
    if (n_out, n_in) != update.shape:
        raise MergeError(
            f"{name}: base shape {tuple(weight.shape)} does not match the adapter's "
            f"[out={update.shape[0]}, in={update.shape[1]}]"
        )
    B, A = stacked_factors(update, compute_dtype)
    step = _row_block(n_in, torch.finfo(compute_dtype).bits // 8)
    for start in range(0, n_out, step):
        rows = slice(start, min(start + step, n_out))
        w0 = base[rows].to(compute_dtype)
        v = B[rows] @ A
        delta_sq = float(torch.linalg.vector_norm(v)) ** 2
        v.add_(w0)  # V = W0 + delta, in place of delta
        g = None
        if update.rescale is not Rescale.NONE:
            target = _target_norms(update, w0, rows, compute_dtype)
            norms = torch.linalg.vector_norm(v, dim=1)
            zero = (norms == 0).nonzero()
            if zero.numel():
                raise MergeError(
                    f"{name}: row {start + int(zero[0])} of W0 + dW has zero norm, so the "
                    f"{update.rescale.value} rescaling is undefined"
                )
            g = target / norms
            v.mul_(g.unsqueeze(1))
        # Non-finite values are not checked here (a pass over float64): they survive rounding, and
        # merge_tensor checks the (smaller) rounded block.
        yield MergedRows(rows, w0, v, g, delta_sq)


def merge_tensor(
    weight: torch.Tensor,
    update: ModuleUpdate,
    *,
    transposed: bool,
    out_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float64,
    name: str = "",
) -> tuple[torch.Tensor, MergeStats]:
    """Fold ``update`` into the stored base ``weight`` (see :func:`merged_rows`); return it in
    ``out_dtype``, rounded once with :func:`round_to_dtype`, and its stats."""
    name = name or update.weight_key
    merged = torch.empty(update.shape, dtype=out_dtype)
    delta_sq = 0.0
    scale_min, scale_max = math.inf, -math.inf
    for block in merged_rows(weight, update, transposed=transposed, compute_dtype=compute_dtype, name=name):
        delta_sq += block.delta_sq
        if block.scale is not None:
            scale_min = min(scale_min, float(block.scale.min()))
            scale_max = max(scale_max, float(block.scale.max()))
        rounded = round_to_dtype(block.value, out_dtype)
        # A sum is finite when every element is (a fast reduction, where isfinite is a slow pass);
        # only when it is not (or overflows) is the block searched.
        if not math.isfinite(float(rounded.sum())) and not torch.isfinite(rounded).all():
            bad = block.rows.start + int((~torch.isfinite(rounded)).any(dim=1).nonzero()[0])
            if torch.isfinite(block.value).all():
                raise MergeError(f"{name}: merged row {bad} overflows {out_dtype} (try --dtype float32)")
            raise MergeError(f"{name}: merged row {bad} is not finite (overflow or NaN)")
        merged[block.rows] = rounded
    rescaled = update.rescale is not Rescale.NONE
    stats = MergeStats(
        delta_norm=math.sqrt(delta_sq),
        scale_min=scale_min if rescaled else None,
        scale_max=scale_max if rescaled else None,
    )
    return (merged.T.contiguous() if transposed else merged), stats


def _target_norms(
    update: ModuleUpdate, w0: torch.Tensor, rows: slice, dtype: torch.dtype
) -> torch.Tensor:
    if update.rescale is Rescale.MAGNITUDE:
        assert update.magnitude is not None
        return update.magnitude[rows].to(dtype)
    return torch.linalg.vector_norm(w0, dim=1)  # D2-LoRA keeps each row's original norm


def merge_bias(
    bias: torch.Tensor, update: ModuleUpdate, *, out_dtype: torch.dtype,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """PEFT ``lora_bias``: the trained ``lora_B.bias`` enters the output scaled like the low-rank path."""
    return round_to_dtype(merged_bias_exact(bias, update, compute_dtype), out_dtype)


def merged_bias_exact(bias: torch.Tensor, update: ModuleUpdate, compute_dtype: torch.dtype = torch.float64):
    assert update.bias_delta is not None
    return bias.to(compute_dtype) + update.terms[0].coefficient * update.bias_delta.to(compute_dtype)
