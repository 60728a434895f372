"""The pure algebra: rounding and the merge formula on hand-checkable cases."""

import math

import numpy as np
import pytest
import torch
from reference import correctly_rounded

from d2export.algebra import MergeError, merge_tensor, round_to_dtype
from d2export.arrays import float16, float32, float64, numpy_dtype, to_torch
from d2export.spec import LayerKind, LowRankTerm, ModuleUpdate, Rescale


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``round_to_dtype`` (numpy) on a torch tensor: the reference checker works in torch."""
    return to_torch(round_to_dtype(x.numpy(), numpy_dtype(dtype)))


def _halfway_cases(dtype: torch.dtype, n: int = 20000) -> torch.Tensor:
    """float64 values just beside halfway points of ``dtype``: where rounding via float32 goes wrong."""
    g = torch.Generator().manual_seed(0)
    low = (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    high = torch.nextafter(low, torch.full_like(low, math.inf))
    mid = (low.double() + high.double()) / 2
    side = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return mid + side * mid.abs() * 2.0**-35  # below float32's resolution at that scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_dtype_is_correctly_rounded_where_torch_is_not(dtype):
    x = _halfway_cases(dtype)
    ours = rounded(x, dtype)
    assert correctly_rounded(x, ours).all()
    # The plain conversion rounds twice (via float32): the cases above must expose that, or this
    # test would not be testing anything.
    assert not correctly_rounded(x, x.to(dtype)).all()


def test_round_to_dtype_random_values_and_specials():
    g = torch.Generator().manual_seed(1)
    magnitudes = 10.0 ** torch.randint(-6, 4, (100000,), generator=g)
    x = torch.cat([torch.randn(100000, generator=g, dtype=torch.float64) * magnitudes,
                   torch.tensor([0.0, -0.0, 1e-300, -1e-300, 2.0**-133, 3.0e38], dtype=torch.float64)])
    for dtype in (torch.bfloat16, torch.float16):
        finite = x.abs() < torch.finfo(dtype).max
        assert correctly_rounded(x[finite], rounded(x[finite], dtype)).all()
    assert torch.equal(rounded(x, torch.float32), x.to(torch.float32))


def _update(out: int, inp: int, rescale=Rescale.NONE, *, magnitude=None, seed=0) -> ModuleUpdate:
    g = np.random.default_rng(seed)
    terms = (LowRankTerm("pos", 2.0, g.standard_normal((out, 2), np.float32), g.standard_normal((2, inp), np.float32)),
             LowRankTerm("neg", -1.0, g.standard_normal((out, 2), np.float32), g.standard_normal((2, inp), np.float32)))
    return ModuleUpdate("m", LayerKind.LINEAR, terms, rescale=rescale, magnitude=magnitude, rank=2)


def _weight(*shape: int, seed: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape)


def test_original_norm_rescaling_keeps_row_norms():
    w0 = _weight(6, 5)
    merged, stats = merge_tensor(w0, _update(6, 5, Rescale.ORIGINAL_NORM), transposed=False, out_dtype=float64)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=1), np.linalg.norm(w0, axis=1), rtol=1e-14)
    assert not np.allclose(merged, w0)
    assert stats.scale_min is not None and stats.scale_min <= stats.scale_max


def test_transposed_layout_normalises_output_units():
    w0 = _weight(5, 6)  # stored [in=5, out=6], as GPT-2 Conv1D
    merged, _ = merge_tensor(w0, _update(6, 5, Rescale.ORIGINAL_NORM), transposed=True, out_dtype=float64)
    assert merged.shape == (5, 6)
    np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.linalg.norm(w0, axis=0), rtol=1e-14)


def test_block_processing_matches_whole_tensor(monkeypatch):
    import d2export.algebra as algebra

    w0 = _weight(37, 11)
    update = _update(37, 11, Rescale.MAGNITUDE, magnitude=np.random.default_rng(2).random(37) + 0.5)
    whole, s1 = merge_tensor(w0, update, transposed=False, out_dtype=float64)
    monkeypatch.setattr(algebra, "_BLOCK_BYTES", 5 * 11 * 8)  # blocks of 5 rows
    blocked, s2 = merge_tensor(w0, update, transposed=False, out_dtype=float64)
    assert np.array_equal(whole, blocked)
    assert s1.delta_norm == pytest.approx(s2.delta_norm, rel=1e-12)


def test_zero_norm_row_is_an_error_naming_the_row():
    w0 = _weight(4, 3)
    update = _update(4, 3, Rescale.ORIGINAL_NORM)
    w0[2] = 0
    for t in update.terms:
        t.B[2] = 0
    with pytest.raises(MergeError, match="row 2"):
        merge_tensor(w0, update, transposed=False, out_dtype=float32, name="layer.weight")


def test_overflow_is_an_error():
    update = _update(4, 3)
    with pytest.raises(MergeError, match=r"overflow|not finite"):
        merge_tensor(np.full((4, 3), 1.0e5, np.float32), update, transposed=False, out_dtype=float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_dtype_halfway_cases_at_every_scale(dtype):
    """Halfway cases from the subnormal range to the largest finite values, and exact halfway
    points (which round to even): the float32 values on a halfway point are the ones re-rounded."""
    info = torch.finfo(dtype)
    g = torch.Generator().manual_seed(3)
    exponents = torch.randint(int(math.log2(info.smallest_normal)) - 12, int(math.log2(info.max)),
                              (50000,), generator=g).double()
    low = (torch.rand(50000, generator=g, dtype=torch.float64).add_(1) * torch.pow(2.0, exponents)).to(dtype)
    low = low[torch.isfinite(low) & (low != 0)]
    high = torch.nextafter(low, torch.full_like(low, math.inf))
    mid = (low.double() + high.double()) / 2
    x = torch.cat([mid, -mid, mid * (1 + 2.0**-40), mid * (1 - 2.0**-40), torch.tensor([0.0, -0.0])])
    x = x[x.abs() <= info.max]
    ours = rounded(x, dtype)
    assert correctly_rounded(x, ours).all()
    assert (x.abs() < info.smallest_normal).sum() > 1000  # the subnormal range was covered
    assert not correctly_rounded(x, x.to(dtype)).all()
