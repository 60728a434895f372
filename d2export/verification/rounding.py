"""The rounding of a checked tensor's elements (:mod:`.weights`): the dtype's spacing that units
are counted in, and what the elements off their correctly rounded value say, gathered block by
block: which they are (kept as corrections while few), which way they lean (a directed rounding
such as truncation), and what rounding costs the adapter's update."""

from __future__ import annotations

import math

import numpy as np

from ..algebra import round_to_dtype
from ..arrays import bfloat16, finfo, float16, float64
from ..plan import Action, TensorPlan
from .chance import lean

# Elements a tensor may differ from its correctly rounded value in and still have them kept as
# corrections: MAX_CORRECTIONS, or one per CORRECTION_SHARE elements if more. Another tool's merge
# is off in a few; the share bounds what is kept to a small fraction of the model's own bytes.
MAX_CORRECTIONS, CORRECTION_SHARE = 4096, 1024
# A merge rounded in one direction (truncated toward zero, or floored) instead of to nearest stays
# within a unit of the correct rounding, inside :data:`.weights.DEFAULT_MAX_UNITS`, yet its outputs are further from
# the unmerged model than rounding needs (bench/README.md, verify_limit.py). Its off elements lean
# one way. Another tool's round-to-nearest merge is off the correct rounding only where the exact
# value is near a tie (double rounding through float32, another tie-break, less exact products), in
# both directions. So elements further than TIE_DOUBT past half a unit of their own spacing from the
# exact value are counted by direction (toward or away from zero; below or above the correct
# rounding), each row casting one vote (a row factor such as DoRA's, computed by another tool, moves
# a whole row one way), and a lean of the votes beyond chance (two-sided sign test, p below
# DIRECTION_ALPHA per axis and tensor) fails the tensor.
TIE_DOUBT = 0.125
DIRECTION_ALPHA = 1e-6


def nudged(values: np.ndarray, seed: int) -> np.ndarray:
    """A copy of ``values`` (a float array) with each nonzero element moved to the next value of its
    dtype up or down, or left, at random (a third each): changes of the size rounding makes, to
    measure how far a model's outputs move with them (:data:`.outputs.FLOOR_CEILING_UNITS`). A step
    that would leave the finite range, or cross zero, is not taken."""
    bits = {2: np.int16, 4: np.int32, 8: np.int64}[values.dtype.itemsize]
    raw = np.array(values).view(bits)  # sign and magnitude: +1 is a unit away from zero, -1 toward it
    step = np.random.default_rng(seed).integers(-1, 2, size=raw.shape, dtype=bits)
    moved = (raw + step).view(values.dtype)
    keep = (values == 0) | ~np.isfinite(moved.astype(float64)) | (np.signbit(moved) != np.signbit(values))
    return np.where(keep, values, moved)


def spacing(magnitude: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The gap between adjacent ``dtype`` values at ``|magnitude|`` (float64), subnormals included."""
    magnitude = np.asarray(magnitude, dtype=float64)
    floor = np.abs(magnitude).reshape(-1)  # 1-d: a 0-d result is a scalar
    return spacing_of_magnitude(floor, dtype).reshape(magnitude.shape)


def spacing_of_magnitude(magnitude: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """:func:`spacing` of a float64 array of magnitudes (``>= 0``), in place."""
    info = finfo(dtype)
    # eps times the power of two at or below |x| (its float64 bits with the mantissa cleared): the
    # same power of two as frexp and ldexp give, in two passes instead of their many
    np.maximum(magnitude, float(info.smallest_normal), out=magnitude)
    np.bitwise_and(magnitude.view(np.uint64), np.uint64(0x7FF0000000000000), out=magnitude.view(np.uint64))
    magnitude *= float(info.eps)
    return magnitude


class Corrections:
    """A tensor's elements that are not the correctly rounded value: how many (``count``), and
    which with their correct values while there are at most ``limit`` (:attr:`TensorCheck.corrections`)."""

    def __init__(self, t: TensorPlan, stored: np.ndarray, *, limit: int):
        self.transposed = t.transposed and t.action is Action.MERGE  # only merged rows are canonical
        self.canonical_shape = stored.T.shape if self.transposed else stored.shape
        self.limit, self.count = limit, 0
        self.where: list[np.ndarray] = []
        self.values: list[np.ndarray] = []

    def add(self, differ: np.ndarray, rows: slice, rounded: np.ndarray) -> None:
        """``differ``: flat indices into ``rounded``, the correctly rounded values of the canonical
        ``rows`` (a 1-d or 0-d tensor's rows are its elements)."""
        self.count += differ.size
        if not differ.size or self.count > self.limit:
            return  # beyond the limit, result() gives None: the correctly rounded merge is computed
        flat = differ + rows.start * int(np.prod(rounded.shape[1:], dtype=np.int64))
        if self.transposed:
            row, column = np.divmod(flat, self.canonical_shape[1])
            flat = column * self.canonical_shape[0] + row  # stored[column, row] is canonical[row, column]
        self.where.append(flat)
        self.values.append(rounded.reshape(-1)[differ])

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        if not self.where or self.count > self.limit:
            return None
        return np.concatenate(self.where), np.concatenate(self.values)


class Leaning:
    """The direction of the elements clearly off the correct rounding, voted per row (:data:`TIE_DOUBT`)."""

    AXES = (("toward zero", "away from zero"), ("down", "up"))

    def __init__(self, dtype: np.dtype):
        # 16-bit outputs only: another tool's float32 merge is off the correct rounding in most
        # elements by its own arithmetic (:data:`.weights.DEFAULT_MAX_UNITS`), so counting them would cost the check
        # half as much again, for a truncation to float32 that conversions do not make.
        self.dtype, self.active = dtype, dtype in (bfloat16, float16)
        self.counts = np.zeros(4, np.int64)  # rows leaning toward zero, away, below, above
        self.any = False

    def add(self, differ: np.ndarray, stored: np.ndarray, exact: np.ndarray, rounded: np.ndarray) -> None:
        """``differ``: flat indices of a block's elements not equal to their correct rounding."""
        if not differ.size or not self.active:
            return
        value, target, nearest = (a.reshape(-1)[differ] for a in (stored, exact, rounded))
        clear = np.abs(value - target) > (0.5 + TIE_DOUBT) * spacing(target, self.dtype)
        if not clear.any():
            return
        self.any = True
        row = differ[clear] // (int(np.prod(exact.shape[1:], dtype=np.int64)) if exact.ndim > 1 else 1)
        value, nearest = value[clear], nearest[clear]
        for axis, one_way in enumerate((np.abs(value) < np.abs(nearest), value < nearest)):
            net = np.bincount(row, weights=np.where(one_way, 1.0, -1.0))
            self.counts[2 * axis] += int((net > 0).sum())
            self.counts[2 * axis + 1] += int((net < 0).sum())

    def votes(self) -> list[int] | None:
        return [int(n) for n in self.counts] if self.any else None

    def problem(self) -> str | None:
        for axis, names in enumerate(self.AXES):
            counts = self.counts[2 * axis], self.counts[2 * axis + 1]
            p = lean(*counts)
            if p < DIRECTION_ALPHA:
                way = int(counts[1] > counts[0])
                return (f"rounded {names[way]}, not to nearest: of the rows with elements off the correct rounding "
                        f"by more than a near-tie explains, {counts[way]} lean {names[way]} and {counts[1 - way]} the "
                        f"other way (sign test p {'< 1e-12' if p < 1e-12 else f'= {p:.2g}'}); a directed rounding "
                        "such as truncation, or a scale slightly off the adapter's (it moves every element the same "
                        "way), whose outputs are further from the unmerged model than rounding needs")
        return None


class RoundingCost:
    """What rounding to ``dtype`` costs a merged tensor's update, even done right
    (:attr:`.weights.TensorCheck.update_vanished` and ``update_lost``)."""

    def __init__(self, dtype: np.dtype, *, base_in_dtype: bool):
        self.dtype, self.base_in_dtype = dtype, base_in_dtype  # a base in the output dtype is its own rounding
        self.changed = self.vanished = 0
        self.lost_sq = self.update_sq = 0.0

    def add(self, exact: np.ndarray, rounded: np.ndarray, base: np.ndarray, work: np.ndarray) -> None:
        """``rounded``: ``exact`` correctly rounded, in float64; ``base``: the base's values in
        float64; ``work``: scratch of their shape."""
        flat = work.reshape(-1)
        np.subtract(exact, base, out=work)  # the update
        self.update_sq += float(np.dot(flat, flat))
        moved = work != 0
        self.changed += int(np.count_nonzero(moved))
        base_rounded = base if self.base_in_dtype else round_to_dtype(base, self.dtype).astype(float64)
        self.vanished += int(np.count_nonzero(moved & (rounded == base_rounded)))
        np.subtract(rounded, exact, out=work)
        self.lost_sq += float(np.dot(flat, flat))

    def result(self) -> tuple[float, float]:
        return (self.vanished / self.changed if self.changed else 0.0,
                math.sqrt(self.lost_sq / self.update_sq) if self.update_sq else 0.0)
