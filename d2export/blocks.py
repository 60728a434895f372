"""One block of rows of a merge, rounded to the output dtype: float32 products where a proven
bound shows they decide the rounding, float64 for the elements (or blocks) where it does not.

The output must be the correctly rounded exact merge (docs/design.md §3). Float64 arithmetic
everywhere achieves that but costs a float64 matmul and several float64 passes per element. Most
elements, however, lie far from a rounding boundary of a 16-bit output: a float32 result whose
error is provably smaller than its distance to the nearest boundary rounds to the same 16-bit
value as the exact merge. Only the others (well under one in a hundred on ordinary weights,
bench/README.md) are recomputed in float64.

**The bound.** Let ``u = 2^-24`` (float32's unit roundoff), ``eta = 2^-149`` (half float32's
smallest subnormal, the absolute error of a rounding that underflows), ``K`` the stacked rank (the
inner dimension of ``[c_1 B_1 | c_2 B_2 | ...] @ [A_1; A_2; ...]``), ``b_i = ||(c B)_i||_2`` the row
norms of the stacked scaled ``B`` and ``a = max_j ||A_:j||_2`` the largest column norm of the
stacked ``A``. The stored ``W0`` and factors are exact in float32 (bf16, fp16 or fp32; float64
factors take the float64 path). The float32 path computes

1. ``B^ = fl32(c B)``: ``|B^ - cB| <= 2u |cB|`` (``c B`` rounded in float64, then to float32);
2. ``P = B^ @ A`` by a float32 BLAS in any summation order, fused or not:
   ``|P - B^A| <= gamma_K |B^||A|`` with ``gamma_K = K u / (1 - K u)`` (Higham, Accuracy and
   Stability of Numerical Algorithms, §3.1), plus ``K eta`` should products underflow. With step 1,
   ``|P - dW| <= kappa S``, ``S = |cB||A|``, ``kappa = (1.02 K + 3) u`` (``gamma_K (1 + 2u) + 2u``
   for ``K u <= 0.01``, where ``gamma_K <= 1.0102 K u``), and by
   Cauchy-Schwarz ``S_ij <= b_i ||A_:j|| <= b_i a``;
3. ``V^ = fl32(W0 + P)``: ``|V^ - (W0 + P)| <= u |V^| + eta`` (round to nearest: the error is at
   most half an ulp of the result, and half an ulp is at most ``u`` times the result's magnitude);
   so ``|V^ - V| <= u |V^| + kappa b_i a + (K + 1) eta``;
4. rescaling methods: ``g_i = m_i / ||V_i||`` is computed in float64 *without* the float32
   product, from ``||V_i||^2 = ||W0_i||^2 + 2 (cB)_i . (W0 A^T)_i + (cB)_i (A A^T) (cB)_i^T``
   (float64 products of float32 numbers are exact, and every sum has at most ``n + 2K`` terms),
   so its relative error ``rho_i`` is at most ``3 (n + 2K + 8) 2^-53 M_i / ||V_i||^2``, with
   ``M_i = (||W0_i|| + b_i ||A||_F)^2`` bounding every partial sum's magnitude, plus
   ``(n + 8) 2^-53`` for ``m_i`` and the square root. Rows where cancellation leaves
   ``||V_i||^2 <= 2^20`` times that slack take the float64 path. Then
   ``W^ = fl32(fl32(g_i) V^)`` and ``|W^ - g V| <= (3u + rho_i)(1 + 4u) |W^| +
   g_i (kappa b_i a) + (K + 3)(1 + g_i) eta`` (three float32 roundings: ``g``, ``V^``, the product);
   without rescaling ``|W^ - V| <= u |W^| + kappa b_i a + (K + 1) eta``.

Call that bound ``e_ij`` and test against ``2 e_ij``, which absorbs the float32 roundings of
evaluating the bound itself. **The decision.** The halfway points of bfloat16 (float16) are the
float32 numbers whose low 16 (13) bits are ``0x8000`` (``0x1000``). ``mid``, ``W^`` with its low
bits replaced by that pattern, is the halfway point inside ``W^``'s 16-bit cell; ``|W^ - mid|`` is
exact (same binade). Every other halfway point is at least half a cell of the binade below away,
which is at least ``|W^| 2^-10`` (float16: ``2^-13``). So if ``|W^ - mid| > 2 e_ij`` and
``|W^| 2^-10 > 2 e_ij``, the whole interval ``[W^ - e, W^ + e]``, which holds the exact ``W'``,
lies inside one rounding interval of the output dtype, and rounding is monotonic: the 16-bit
rounding of ``W^`` is the correctly rounded ``W'``. This holds at the overflow threshold too (it is
a halfway point of the same pattern), and float16's subnormal range, whose halfway points have
another pattern, is always recomputed. Every other element is recomputed in float64 from the
factors (``W0_ij + (cB)_i . A_:j``, times ``g_i``) and rounded once by ``round_to_dtype``, as the
float64 path does for every element. ``tests/test_merge_speed_paths.py`` checks this on halfway
cases built to sit within a few float32 ulps of a boundary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .algebra import MergeStats, all_finite, check_finite, exact_rows, round_to_dtype, row_block
from .arrays import bfloat16, float16, float32, float64
from .spec import ModuleUpdate, Rescale

U = 2.0**-24
ETA = 2.0**-149
_EPS64 = 2.0**-53
# low bits below the 16-bit format's precision, their halfway pattern, and the guard ratio (the
# nearest halfway point outside the element's own cell is at least this fraction of |W^| away)
_PATTERN = {bfloat16: (0xFFFF, 0x8000, 2.0**-10), float16: (0x1FFF, 0x1000, 2.0**-13)}
_F16_MIN_NORMAL = 2.0**-14
_EXACT_IN_FLOAT32 = frozenset({bfloat16, float16, float32})
# Whether merges take the float32 path. Off: on this project's machines (AVX2, two cores) the
# float64 path in cache-sized blocks measured faster (bench/README.md, "float32 products"); the
# float32 path's flag test costs more passes than the float64 product it saves. Tests switch it on.
FLOAT32_PRODUCTS = False


@dataclass
class Factors:
    """An update's stacked factors, prepared once per tensor for all of its row blocks."""

    B: np.ndarray  # [out, K] c_t B_t, compute dtype (float64 also serves the fast path's recomputes)
    A: np.ndarray  # [K, in]
    fast: bool  # the float32 path applies (16-bit output, float32-exact inputs, float64 semantics)
    B32: np.ndarray | None = None
    A32: np.ndarray | None = None
    b: np.ndarray | None = None  # row norms of B, [out]
    a_max: float = 0.0  # largest column norm of A
    a_fro: float = 0.0  # ||A||_F
    G: np.ndarray | None = None  # A A^T, [K, K]
    AT: np.ndarray | None = None  # A^T, contiguous: a recomputed element gathers one row of it


def prepare_factors(update: ModuleUpdate, base_dtype: np.dtype, out_dtype: np.dtype,
                    compute_dtype: np.dtype = float64) -> Factors:
    compute_dtype = np.dtype(compute_dtype)
    B = np.concatenate([t.B.astype(compute_dtype) * compute_dtype.type(t.coefficient) for t in update.terms], axis=1)
    A = np.concatenate([np.asarray(t.A).astype(compute_dtype) for t in update.terms], axis=0)
    K = A.shape[0]
    inputs_exact = np.dtype(base_dtype) in _EXACT_IN_FLOAT32 and all(
        np.dtype(t.A.dtype) in _EXACT_IN_FLOAT32 and np.dtype(t.B.dtype) in _EXACT_IN_FLOAT32 for t in update.terms)
    fast = (FLOAT32_PRODUCTS and compute_dtype == float64 and np.dtype(out_dtype) in _PATTERN and inputs_exact
            and K * U <= 0.01)
    if not fast:
        return Factors(B, A, False)
    columns = np.sqrt(np.einsum("kj,kj->j", A, A))
    return Factors(B, A, True, B.astype(float32), A.astype(float32), np.sqrt(np.einsum("ik,ik->i", B, B)),
                   float(columns.max(initial=0.0)), float(np.sqrt(np.square(columns).sum())), A @ A.T,
                   np.ascontiguousarray(A.T))


@dataclass
class Block:
    value: np.ndarray  # the rows, rounded to the output dtype
    delta_sq: float
    scale: np.ndarray | None
    recomputed: int = 0  # elements the float32 path left to float64 (-1: the whole block went float64)


class StatsSum:
    """Per-tensor figures summed over blocks."""

    def __init__(self) -> None:
        self.delta_sq, self.low, self.high, self.recomputed = 0.0, math.inf, -math.inf, 0

    def add(self, block: Block) -> None:
        self.delta_sq += block.delta_sq
        self.recomputed += max(block.recomputed, 0)
        if block.scale is not None and block.scale.size:
            self.low = min(self.low, float(block.scale.min()))
            self.high = max(self.high, float(block.scale.max()))

    def combine(self, other: StatsSum) -> None:
        self.delta_sq += other.delta_sq
        self.recomputed += other.recomputed
        self.low, self.high = min(self.low, other.low), max(self.high, other.high)

    def stats(self, rescaled: bool) -> MergeStats:
        return MergeStats(math.sqrt(self.delta_sq), self.low if rescaled else None, self.high if rescaled else None)


def merge_rows(w0: np.ndarray, update: ModuleUpdate, factors: Factors, first: int, out_dtype: np.dtype,
               name: str) -> tuple[np.ndarray, StatsSum]:
    """Rows ``first ..`` of the merge, given ``w0`` (those rows of ``W0``, canonical orientation,
    stored dtype), in cache-sized blocks: the merged rows in ``out_dtype`` and their stats."""
    out = np.empty(w0.shape, out_dtype)
    totals = StatsSum()
    # BLAS packs the whole [K, in] factor A on every product: blocks of at least K rows pack at most
    # one element per merged element (at high rank, short blocks spent more on packing than cache-
    # sized blocks gain; bench/README.md, merge_paths.py --rank 64)
    step = max(row_block(w0.shape[1], 8), factors.A.shape[0])
    for start in range(0, w0.shape[0], step):
        part = slice(start, min(start + step, w0.shape[0]))
        block = merge_block(w0[part], update, factors, slice(first + part.start, first + part.stop), out_dtype, name)
        out[part] = block.value
        totals.add(block)
    return out, totals


def merge_block(w0: np.ndarray, update: ModuleUpdate, factors: Factors, rows: slice, out_dtype: np.dtype,
                name: str) -> Block:
    """Rows ``rows`` of the merge, given ``w0 = W0[rows]`` (canonical orientation, stored dtype)."""
    out_dtype = np.dtype(out_dtype)
    if factors.fast:
        block = _fast_block(w0, update, factors, rows, out_dtype)
        # A non-finite block is redone in float64, which says whether it overflowed or was NaN.
        if block is not None and all_finite(block.value):
            return block
    w0c = np.asarray(w0, dtype=factors.A.dtype)
    merged = exact_rows(w0c, np.empty_like(w0c), factors.B, factors.A, update, rows, name)
    rounded = round_to_dtype(merged.value, out_dtype)
    check_finite(rounded, merged.value, rows.start, out_dtype, name)
    return Block(rounded, merged.delta_sq, merged.scale, -1)


def _fast_block(w0: np.ndarray, update: ModuleUpdate, f: Factors, rows: slice, out_dtype: np.dtype) -> Block | None:
    """The float32 path (module docstring); None when cancellation in a row norm needs float64."""
    n, K = w0.shape[1], f.A.shape[0]
    Bi = f.B[rows]
    delta_rows = np.einsum("ik,ik->i", Bi @ f.G, Bi)  # ||dW_i||^2
    kappa = (1.02 * K + 3) * U
    product = kappa * f.b[rows] * f.a_max  # the float32 product's error, per row
    g = rho = None
    if update.rescale is not Rescale.NONE:
        g, rho = _scales(w0, update, f, rows, delta_rows)
        if g is None:
            return None
    v = np.matmul(f.B32[rows], f.A32)
    v += np.asarray(w0, dtype=float32)  # exact: W0 is bfloat16, float16 or float32
    if g is None:
        relative, absolute = np.full(v.shape[0], U), product + (K + 1) * ETA
    else:
        v *= g.astype(float32)[:, None]
        relative, absolute = (3 * U + rho) * (1 + 4 * U), g * product + (K + 3) * (1 + g) * ETA
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: merge_block redoes the block in float64
        rounded = v.astype(out_dtype)
    where = _undecided(v, 2 * relative, 2 * absolute, out_dtype)
    if where.size:
        r, c = np.divmod(where, n)
        exact = np.asarray(w0[r, c], dtype=float64) + np.einsum("ik,ik->i", Bi[r], f.AT[c])
        if g is not None:
            exact *= g[r]
        rounded.reshape(-1)[where] = round_to_dtype(exact, out_dtype)
    return Block(rounded, float(delta_rows.sum()), g, int(where.size))


def _scales(w0: np.ndarray, update: ModuleUpdate, f: Factors, rows: slice, delta_rows: np.ndarray
            ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """``g`` and its relative error bound ``rho`` per row, in float64 (module docstring, step 4)."""
    n, K = w0.shape[1], f.A.shape[0]
    w64 = np.asarray(w0, dtype=float64)
    base_sq = np.einsum("ij,ij->i", w64, w64)
    cross = np.einsum("ik,ik->i", w64 @ f.A.T, f.B[rows])
    norm_sq = base_sq + 2 * cross + delta_rows
    slack = 3 * (n + 2 * K + 8) * _EPS64 * np.square(np.sqrt(base_sq) + f.b[rows] * f.a_fro)
    if not (norm_sq > 2.0**20 * slack).all():
        return None, None  # cancellation (or a zero row, which the float64 path reports)
    if update.rescale is Rescale.MAGNITUDE:
        assert update.magnitude is not None
        target = np.asarray(update.magnitude[rows], dtype=float64)
    else:
        target = np.sqrt(base_sq)
    g = target / np.sqrt(norm_sq)
    return g, slack / norm_sq + (n + 8) * _EPS64


def _undecided(v: np.ndarray, relative: np.ndarray, absolute: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Flat indices of the elements of the float32 block ``v`` that the bound does not keep off
    every rounding boundary of ``out_dtype`` (module docstring). The bound is taken per row at its
    largest, ``relative max|v_i| + absolute``: one scalar per row keeps this to a few passes."""
    low_bits, half, guard = _PATTERN[out_dtype]
    largest = np.maximum(v.max(axis=1, initial=0.0), -v.min(axis=1, initial=0.0)).astype(float64)
    bound = (relative * largest + absolute).astype(float32)[:, None]
    # The other halfway points are |v| * guard away or more: elements closer to zero than
    # bound / guard (and float16's subnormal range, with another pattern) are recomputed outright.
    floor = bound[:, 0].astype(float64) / guard
    if out_dtype == float16:
        floor = np.maximum(floor, _F16_MIN_NORMAL)
    bits = v.view(np.uint32)
    mid = np.bitwise_and(bits, np.uint32(~low_bits & 0xFFFFFFFF))
    np.bitwise_or(mid, np.uint32(half), out=mid)
    distance = mid.view(float32)
    np.subtract(v, distance, out=distance)
    np.abs(distance, out=distance)
    close = distance <= bound
    np.bitwise_and(bits, np.uint32(0x7FFFFFFF), out=mid)
    close |= mid <= np.minimum(floor, 3.0e38).astype(float32).view(np.uint32)[:, None]
    return flat_true(close)


def flat_true(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` for a sparse boolean array: eight flags at a time, as one 64-bit word."""
    flat = mask.reshape(-1)
    whole = flat.size - flat.size % 8
    words = np.flatnonzero(flat[:whole].view(np.uint64))
    hits = (words[:, None] * 8 + np.arange(8))[flat[:whole].reshape(-1, 8)[words]]
    return np.concatenate([hits, whole + np.flatnonzero(flat[whole:])])
