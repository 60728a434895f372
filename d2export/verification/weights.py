"""Weight-level check, streamed like the merge: every tensor of a merged folder against what the
adapter and the base say it must be.

* Merged (and lora_bias) tensors: the exact float64 merge is recomputed block by block and the
  stored values are measured against it: the max absolute error, the max error in *units* (the
  output dtype's spacing at the scale of the operands, ``max(|W'|, g|W0|, g|dW|, g sum|c||B||A|)``,
  so that a sum that cancels near zero is not read as thousands of ulps of its tiny result), the
  fraction of elements equal to the correctly rounded value, and (16-bit) whether the elements off
  it lean one way, as a directed rounding's do (:mod:`.rounding`).
* Replaced tensors (modules_to_save): equal to the adapter's tensor, rounded once.
* Every other tensor, including modules a DiffoRA selection left out: the base's exact bytes (or
  the base's value correctly rounded when the merge changed the dtype).

One tensor (and one block of its reference) is in memory at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import platform
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
from threadpoolctl import threadpool_limits

from ..algebra import merged_bias_exact, merged_rows, round_to_dtype, stacked_factors
from ..arrays import bfloat16, dtype_name, float16, float32, float64, is_float
from ..formats.stored import forget_recent
from ..merging import WORKERS
from ..names import find_name
from ..plan import Action, MergePlan, TensorPlan
from ..reading import ModelFolder
from .rounding import (
    CORRECTION_SHARE,
    MAX_CORRECTIONS,
    Corrections,
    Leaning,
    RoundingCost,
    spacing,
    spacing_of_magnitude,
)

# Max error in units of the stored dtype at the operands' scale, per dtype. A correct single
# rounding is at most 0.5 unit.
# * 16-bit: another tool computes in float32 and rounds to 16 bits once or twice (PEFT: dW, then
#   W0 + dW, and for DoRA the magnitude factor too): measured at most 1.3 units on every PEFT
#   fixture. 2 passes those and fails any element moved by 3 units or more.
# * float32: a float32 merge carries float32 arithmetic error at the output's own precision: the
#   r products of B @ A, the row norm of DoRA over in_features elements, the division and the
#   product each round. PEFT's float32 merges measured up to 8.6 units (DoRA, 256-wide rows); 32
#   (relative 4e-6) leaves room for 4096-wide and wider rows, while an algebraic defect (a wrong
#   scale or tau, a dropped branch, a missing rescale) moves elements by 10^4 units and more.
DEFAULT_MAX_UNITS = {bfloat16: 2.0, float16: 2.0, float32: 32.0, float64: 32.0}


@dataclass
class TensorCheck:
    name: str
    action: str  # the plan's action: merge, bias, replace, copy, unselected
    dtype: str
    elements: int = 0
    max_abs: float = 0.0  # max |stored - exact|
    max_units: float = 0.0  # the same, in output-dtype spacings at the operands' scale
    exact_fraction: float = 1.0  # elements equal to the correctly rounded exact value
    worst: list[int] | None = None  # index (stored layout) of the largest error in units
    identical: bool | None = None  # copies: the base's bytes (or its correct rounding)
    max_units_allowed: float | None = None
    problem: str | None = None  # missing, wrong shape, not finite, changed copy, over threshold
    # What rounding the merge to ``dtype`` costs the adapter's update (merged weights only), even
    # when done right: the share of changed elements that round back to the base value, and the
    # norm of the rounding error relative to the norm of the update.
    update_vanished: float | None = None
    update_lost: float | None = None
    # The elements that are not the correctly rounded value, when few (:data:`.rounding.MAX_CORRECTIONS`):
    # flat indices in the stored layout and the correctly rounded values (float64). With them the
    # correctly rounded merge is the folder's tensor corrected, not a merge computed again.
    corrections: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)
    # Rows whose elements clearly off the correct rounding lean toward zero, away from it, below
    # and above it (:data:`.rounding.TIE_DOUBT`); None where no element is clearly off.
    leaning: list[int] | None = None
    # missing from the folder, but a buffer transformers builds with the base's values (:func:`rebuilt_by_loader`)
    rebuilt: bool = False

    @property
    def passed(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "corrections"}


@dataclass
class WeightReport:
    tensors: list[TensorCheck] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # in the folder but not in the plan

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.tensors)

    @property
    def failures(self) -> list[TensorCheck]:
        return [t for t in self.tensors if not t.passed]

    @property
    def all_exact(self) -> bool:
        """Every tensor is the correctly rounded value (or the base's bytes), none is extra."""
        return self.passed and not self.extra and all(
            t.identical if t.action in ("copy", "unselected") else t.exact_fraction == 1.0 for t in self.tensors)

    @property
    def correctable(self) -> bool:
        """Every tensor is the correctly rounded value (or the base's bytes) once its
        :attr:`TensorCheck.corrections` are applied, none is extra."""
        return self.passed and not self.extra and all(
            t.identical if t.action in ("copy", "unselected") else t.exact_fraction == 1.0 or t.corrections is not None
            for t in self.tensors)

    def rounding_cost(self, worst: int = 3) -> dict:
        """The update lost to rounding: overall (norm-weighted) and the modules that lose most."""
        merged = [t for t in self.tensors if t.update_lost is not None]
        if not merged:
            return {}
        total = sum(t.elements for t in merged)
        ranked = sorted(merged, key=lambda t: t.update_lost, reverse=True)[:worst]
        return {"update_lost": math.sqrt(sum(t.update_lost**2 * t.elements for t in merged) / total),
                "update_vanished": sum(t.update_vanished * t.elements for t in merged) / total,
                "worst": [{"name": t.name, "update_lost": t.update_lost, "update_vanished": t.update_vanished}
                          for t in ranked]}

    def summary(self) -> dict:
        adapted = [t for t in self.tensors if t.action in ("merge", "bias", "replace")]
        copies = [t for t in self.tensors if t.action in ("copy", "unselected")]
        total = sum(t.elements for t in adapted)
        return {
            "adapted_tensors": len(adapted),
            "max_abs": max((t.max_abs for t in adapted), default=0.0),
            "max_units": max((t.max_units for t in adapted), default=0.0),
            "exact_fraction": sum(t.exact_fraction * t.elements for t in adapted) / total if total else 1.0,
            "min_exact_fraction": min((t.exact_fraction for t in adapted), default=1.0),
            "copied_tensors": len(copies),
            "copies_identical": sum(bool(t.identical) for t in copies),
            "failed": len(self.failures),
        }

    def to_dict(self) -> dict:
        return {"summary": self.summary(), "extra_tensors": self.extra,
                "tensors": [{**t.to_dict(), "passed": t.passed} for t in self.tensors]}


def check_weights(
    plan: MergePlan, merged: ModelFolder, *, max_units: float | None = None,
    progress: Callable[[str], None] | None = None, workers: int | None = None,
) -> WeightReport:
    """Check every tensor of ``merged`` against ``plan`` (built for the same adapter and base).
    ``max_units`` overrides the per-dtype :data:`DEFAULT_MAX_UNITS`; ``workers``: tensors checked at
    once (default: one per core)."""
    report = WeightReport()
    found: set[str] = set()
    # Tensors are checked on every core, one tensor per worker, as the merge spreads its row blocks:
    # each BLAS call held to one thread, since idle BLAS threads spin and slow the workers. A .bin
    # folder keeps one file mapped at a time, so it is read by one worker.
    workers = (workers or WORKERS) if merged.is_safetensors and plan.base.is_safetensors else 1
    with threadpool_limits(limits=1, user_api="blas"):
        pool = ThreadPoolExecutor(workers, "weights")
        try:
            checks = pool.map(functools.partial(_check_tensor, plan, merged, max_units), plan.tensors)
            for t, (check, name) in zip(plan.tensors, checks, strict=True):
                if progress:
                    progress(t.name)
                report.tensors.append(check)
                if name is not None:
                    found.add(name)
        finally:  # an error (or a progress callback that stops it) leaves the tensors not yet begun
            pool.shutdown(wait=True, cancel_futures=True)
            forget_recent()
            _hand_back_free_heap()
    report.extra = sorted(set(merged.tensors) - found)
    return report


def _hand_back_free_heap() -> None:
    """Return the free pages of the process's heaps to the system. The check's blocks are freed
    when it ends, but glibc keeps up to its trim threshold of free memory in each thread's heap for
    reuse, and verify's output checks are at their largest then, beside it (bench/README.md,
    verify_limit.py). Changes no allocator setting: it only hands back what is free."""
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _check_tensor(plan: MergePlan, merged: ModelFolder, max_units: float | None,
                  t: TensorPlan) -> tuple[TensorCheck, str | None]:
    """One planned tensor against the folder; the folder's name for it (None when missing)."""
    # the folder may be saved with or without the base-model prefix (BertModel vs BertFor...)
    name = find_name(t.name, merged.tensors, plan.arch.base_model_prefix)
    if name is None and rebuilt_by_loader(plan, t):
        return TensorCheck(t.name, t.action.value, "-", identical=True, rebuilt=True), None
    if name is None:
        problem = "missing from the merged folder"
        untied = plan.config_updates.get("tie_word_embeddings") is False
        if untied and merged.config.get("tie_word_embeddings") is True:
            # a tool that saved the adapted model with its tie kept writes the head as the embedding
            problem += ("; the adapter unties it from the embedding, but the folder's config.json keeps "
                        "tie_word_embeddings true, so it loads as the merged embedding")
        return TensorCheck(t.name, t.action.value, "-", problem=problem), None
    info = merged.tensors[name]
    check = TensorCheck(t.name, t.action.value, dtype_name(info.dtype), elements=math.prod(info.shape))
    if info.shape != t.shape:
        check.problem = f"shape {info.shape}, expected {t.shape}"
        return check, name
    if t.action in (Action.COPY, Action.UNSELECTED) and _same_bytes(plan.base, t.source, merged, name):
        check.identical = True  # compared as bytes, in chunks: neither tensor is loaded
        return check, name
    stored = merged.read(name)
    if is_float(stored.dtype) and not np.isfinite(stored).all():
        check.problem = "holds non-finite values"
    elif t.action in (Action.COPY, Action.UNSELECTED):
        _check_copy(plan, t, stored, check)
    else:
        check.max_units_allowed = max_units if max_units is not None else DEFAULT_MAX_UNITS.get(stored.dtype, 2.0)
        _check_adapted(plan, t, stored, check)
    return check, name


def rebuilt_by_loader(plan: MergePlan, t: TensorPlan) -> bool:
    """Whether ``t``, missing from a folder, is a buffer transformers builds itself when loading,
    with the values the base holds: BERT-family ``position_ids`` (0, 1, 2, ... on every row) and
    ``token_type_ids`` (zeros). Older checkpoints (all-MiniLM-L6-v2) store them; transformers'
    ``save_pretrained`` no longer writes them, so no folder PEFT's merge saves has them."""
    leaf = t.name.rsplit(".", 1)[-1]
    if t.action is not Action.COPY or leaf not in ("position_ids", "token_type_ids"):
        return False
    values = np.asarray(plan.base.read(t.source))
    if values.dtype.kind not in "iu" or values.ndim == 0:
        return False
    expected = np.arange(values.shape[-1]) if leaf == "position_ids" else 0
    return bool(np.all(values == expected))


def _same_bytes(a: ModelFolder, a_name: str, b: ModelFolder, b_name: str) -> bool:
    x, y = a.tensors[a_name], b.tensors[b_name]
    if x.offset is None or y.offset is None or x.dtype != y.dtype or x.nbytes != y.nbytes:
        return False
    return all(p == q for p, q in zip(a.read_bytes(a_name), b.read_bytes(b_name), strict=True))


def _argmax_index(x: np.ndarray) -> list[int]:
    return [int(i) for i in np.unravel_index(np.argmax(x), x.shape)]


def _check_copy(plan: MergePlan, t: TensorPlan, stored: np.ndarray, check: TensorCheck) -> None:
    base = plan.base.read(t.source)
    expected = base if base.dtype == stored.dtype else round_to_dtype(base, stored.dtype)
    check.identical = expected.dtype == stored.dtype and np.array_equal(
        np.ascontiguousarray(expected).view(np.uint8), np.ascontiguousarray(stored).view(np.uint8)
    )
    if check.identical:
        return
    dtype = stored.dtype
    expected, stored = (a.astype(float64) if is_float(dtype) else a for a in (expected, stored))
    check.exact_fraction = float(np.mean(expected == stored))
    if is_float(dtype):
        err = np.abs(stored - expected)
        check.max_abs = float(err.max())
        check.max_units = float((err / spacing(expected, dtype)).max())
        check.worst = _argmax_index(err)
    what = "left out by the DiffoRA selection" if t.action is Action.UNSELECTED else "not adapted"
    check.problem = f"{what} but differs from the base ({1 - check.exact_fraction:.2%} of elements)"


def _check_adapted(plan: MergePlan, t: TensorPlan, stored: np.ndarray, check: TensorCheck) -> None:
    """Merged, lora_bias and replaced tensors against their exact value, in blocks of rows.

    Every block's arithmetic runs in four float64 scratch arrays made once per tensor: the fresh
    temporaries of plain numpy expressions are a page fault per page each (blocks of 1 MiB and
    more are mapped apart while verify runs, ``cli.process.tune_malloc``), and the weight check
    shares the cores with the output checks' models."""
    dtype = stored.dtype
    worst_units, worst_at = -1.0, None
    cost = None
    if t.action is Action.MERGE:
        cost = RoundingCost(dtype, base_in_dtype=plan.base.tensors[t.source].dtype == dtype)
    corrections = Corrections(t, stored, limit=max(MAX_CORRECTIONS, check.elements // CORRECTION_SHARE))
    leaning = Leaning(dtype)
    scratch: list[np.ndarray] = []
    for rows, exact, start, scale, candidate, base, products in _blocks(plan, t, stored):
        if not scratch or scratch[0].size < exact.size:
            scratch = [np.empty(exact.size, float64) for _ in range(4)]
        err, rounded, work, start_g = (s[:exact.size].reshape(exact.shape) for s in scratch)
        if scale is not None:  # the base rows rescaled by g
            start = np.multiply(start, scale, out=start_g)
        np.copyto(rounded, round_to_dtype(exact, dtype))  # the correctly rounded value, in float64
        np.copyto(err, candidate)
        differ = np.flatnonzero(err != rounded)
        corrections.add(differ, rows, rounded)
        leaning.add(differ, err, exact, rounded)
        if cost is not None:
            cost.add(exact, rounded, base, work)
        np.subtract(err, exact, out=err)
        np.abs(err, out=err)
        units, block_worst = _block_units(err, exact, start, products, dtype, out=rounded, work=work)
        check.max_abs = max(check.max_abs, float(err.max()))
        if block_worst > worst_units:
            worst_units = block_worst
            at = _argmax_index(units)
            at[0] += rows.start
            worst_at = at[::-1] if t.transposed else at  # report the index in the stored layout
    check.max_units = max(worst_units, 0.0)
    check.worst = worst_at
    if cost is not None:
        check.update_vanished, check.update_lost = cost.result()
    check.exact_fraction = (check.elements - corrections.count) / check.elements if check.elements else 1.0
    check.corrections = corrections.result()
    check.leaning = leaning.votes()
    if not check.max_units <= check.max_units_allowed:
        exact = "the adapter's tensor" if t.action is Action.REPLACE else "the exact merge"
        check.problem = (f"element {check.worst} is {check.max_units:.1f} units of {check.dtype} off {exact} "
                         f"(limit {check.max_units_allowed:g}); max abs error {check.max_abs:.3g}")
    else:
        check.problem = leaning.problem()


def _block_units(err: np.ndarray, exact: np.ndarray, start: np.ndarray | None, products, dtype: np.dtype, *,
                 out: np.ndarray, work: np.ndarray) -> tuple[np.ndarray, float]:
    """``err`` in units of ``dtype`` at the operands' scale (:func:`_magnitude`), into ``out``, and
    the largest; where that is over half a unit, at the scale of the update's products
    (``products``, a function filling its ``out``, or None) if larger."""
    spacing_of_magnitude(_magnitude(exact, start, out=out, work=work), dtype)
    units = np.divide(err, out, out=out)
    worst = float(units.max())
    if products is not None and worst > 0.5:
        # not correctly rounded at the result's own scale: the products' scale may excuse it
        # (computed only then: it costs as much as the merge's product itself, in float64). Most
        # blocks of another tool's merge get here: no fresh temporaries (see _check_adapted)
        _magnitude(exact, start, out=out, work=work)
        np.maximum(out, products(out=work), out=out)
        units = np.divide(err, spacing_of_magnitude(out, dtype), out=out)
        worst = float(units.max())
    return units, worst


def _magnitude(exact: np.ndarray, start: np.ndarray | None, *, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """The magnitude a merge works at, into ``out``: the result, the (rescaled) base and the update
    itself (``start`` None: the result alone)."""
    np.abs(exact, out=out)
    if start is not None:
        np.abs(start, out=work)
        np.maximum(out, work, out=out)
        np.subtract(exact, start, out=work)
        np.abs(work, out=work)
        np.maximum(out, work, out=out)
    return out


def _blocks(plan: MergePlan, t: TensorPlan, stored: np.ndarray):
    """(rows, exact float64 value, the values it was computed from or None, their row scale or None,
    stored values, base values in float64, the magnitude of the update's products or None) in
    canonical row blocks; the products' magnitude is a function, called only where it can change
    the verdict."""
    start = t.replacement if t.replacement is not None else plan.base.read(t.source)
    if t.action is Action.REPLACE:
        exact = start.astype(float64)
        yield slice(0, exact.shape[0] if exact.ndim else 1), exact, None, None, stored, None, None
        return
    assert t.update is not None
    if t.action is Action.BIAS:
        exact = merged_bias_exact(start, t.update)
        yield slice(0, exact.shape[0]), exact, start.astype(float64), None, stored, None, None
        return
    canonical = stored.T if t.transposed else stored
    factors: list[np.ndarray] = []
    for block in merged_rows(start, t.update, transposed=t.transposed, compute_dtype=float64, name=t.name):
        g = block.scale[:, None] if block.scale is not None else None
        products = functools.partial(_term_magnitude, factors, t.update, block.rows, g)
        yield block.rows, block.value, block.base, g, canonical[block.rows], block.base, products


def _term_magnitude(factors: list, update, rows: slice, g: np.ndarray | None, *, out: np.ndarray) -> np.ndarray:
    """``sum_t |c_t| |B_t| |A_t|`` (times ``g``), into ``out``: the size of the products inside the
    low-rank update. Another tool's float32 ``B @ A`` is accurate to this scale, not to the
    (possibly cancelled) result. One product of the stacked factors' magnitudes, made into
    ``factors`` at the tensor's first call."""
    if not factors:
        B, A = stacked_factors(update, np.dtype(float64))
        factors += [np.abs(B), np.abs(A)]
    np.matmul(factors[0][rows], factors[1], out=out)
    if g is not None:
        out *= g
    return out
