"""The merge's two arithmetic paths, side by side on one core: float64 products (the default) and
float32 products with the proven bound and float64 recomputation (d2export.blocks), per element of
a 4096 x 4096 bf16 weight with a D2-LoRA-shaped update (two terms of rank ``--rank``), with and without row rescaling,
for several block heights. Both give identical bytes (checked here too); the question is which is
faster on this machine. CPU time of this process (not wall time, which other work on a shared
machine inflates), alternating paths, best of ``--repeats``.

    python bench/merge_paths.py [--repeats 5] [--rank 16]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

import d2export.blocks as blocks
from d2export.arrays import bfloat16
from d2export.cli.process import tune_malloc
from d2export.spec import LayerKind, LowRankTerm, ModuleUpdate, Rescale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rows", default="16,32,64,128")
    parser.add_argument("--rank", type=int, default=16, help="rank of each of the two terms (stacked: twice that)")
    args = parser.parse_args(argv)
    tune_malloc()  # as the d2export command does
    rng = np.random.default_rng(0)
    out = inp = 4096
    weight = (rng.standard_normal((out, inp)) * 0.02).astype(bfloat16)
    r = args.rank
    terms = tuple(LowRankTerm(name, c, (rng.standard_normal((out, r)) * 0.01).astype(np.float32),
                              rng.uniform(-inp**-0.5, inp**-0.5, (r, inp)).astype(np.float32))
                  for name, c in (("pos", 2.0), ("neg", -1.0)))
    best: dict[tuple, float] = {}
    recomputed: dict[str, int] = {}
    results: dict[tuple, np.ndarray] = {}
    with threadpool_limits(limits=1, user_api="blas"):
        for _ in range(args.repeats):
            for rescale in (Rescale.NONE, Rescale.ORIGINAL_NORM):
                update = ModuleUpdate("m", LayerKind.LINEAR, terms, rescale=rescale, rank=r)
                for fast in (False, True):
                    blocks.FLOAT32_PRODUCTS = fast
                    factors = blocks.prepare_factors(update, weight.dtype, bfloat16)
                    for rows in (int(r) for r in args.rows.split(",")):
                        value, count, seconds = _run(weight, update, factors, rows)
                        key = (rescale.value, fast, rows)
                        best[key] = min(best.get(key, np.inf), seconds)
                        recomputed[rescale.value] = count if fast else recomputed.get(rescale.value, 0)
                        results.setdefault((rescale.value, fast), value)
    for rescale in ("none", "original_norm"):
        same = np.array_equal(results[(rescale, False)].view(np.uint16), results[(rescale, True)].view(np.uint16))
        print(f"\nrescale={rescale}: identical bytes: {same}; float32 path recomputed "
              f"{recomputed[rescale] / weight.size:.3%} of the elements in float64")
        print("| rows per block | float64 path ns/element | float32 path ns/element |")
        print("|---:|---:|---:|")
        for rows in (int(r) for r in args.rows.split(",")):
            print(f"| {rows} | {best[(rescale, False, rows)] / weight.size * 1e9:.2f} | "
                  f"{best[(rescale, True, rows)] / weight.size * 1e9:.2f} |")
    return 0


def _run(weight, update, factors, rows: int) -> tuple[np.ndarray, int, float]:
    parts, count = [], 0
    started = time.process_time()
    for start in range(0, weight.shape[0], rows):
        part = slice(start, min(start + rows, weight.shape[0]))
        block = blocks.merge_block(weight[part], update, factors, part, bfloat16, "m")
        parts.append(block.value)
        count += max(block.recomputed, 0)
    return np.concatenate(parts), count, time.process_time() - started


if __name__ == "__main__":
    sys.exit(main())
