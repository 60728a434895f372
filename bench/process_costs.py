"""What a verify process pays before and after its work: importing torch, transformers and a
model's code with garbage collection running or paused (``verification.ladder.frozen_imports``),
with transformers kept from importing scikit-learn and SciPy or not
(``cli.process.lean_transformers``), and ending the process with the interpreter torn down or not
(``cli._exit``). Fresh processes
measured whole by GNU time, the variants alternating, medians of ``--repeats``.

    python bench/process_costs.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from synthetic import measure, print_table, write_results

# what verify imports before its first model runs: its own code, then a causal LM's
IMPORTS = """
import gc
if {paused}:
    gc.disable()
if {lean}:
    from d2export.cli.process import lean_transformers
    lean_transformers()
import d2export.verification.runner
from transformers.models.llama import modeling_llama
import accelerate
gc.enable()
if {quick}:
    from d2export.cli import _exit
    _exit(0)
"""
VARIANTS = {
    "imports, collection running; interpreter torn down": (False, False, False),
    "imports, collection paused; interpreter torn down": (True, False, False),
    "imports, collection paused; quick exit": (True, True, False),
    "the same, sklearn and SciPy kept out (verify now)": (True, True, True),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    runs: dict[str, list] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, (paused, quick, lean) in VARIANTS.items():
            measured = measure([sys.executable, "-c", IMPORTS.format(paused=paused, quick=quick, lean=lean)])
            if measured.returncode != 0:
                raise SystemExit(f"{name}: exit {measured.returncode}\n{measured.stderr_tail}")
            runs[name].append(measured)
    rows, record = [], {}
    first = statistics.median(m.wall_s for m in runs[next(iter(VARIANTS))])
    for name, measured in runs.items():
        wall = statistics.median(m.wall_s for m in measured)
        cpu = statistics.median(m.cpu_s for m in measured)
        rss = statistics.median(m.peak_rss for m in measured)
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", f"{first - wall:+.2f}", f"{rss / 2**20:,.0f}"])
        record[name] = {"wall_s": [m.wall_s for m in measured], "cpu_s": [m.cpu_s for m in measured],
                        "peak_rss": [m.peak_rss for m in measured]}
    print(f"median of {args.repeats}, alternating:")
    print_table(["process", "wall s", "CPU s", "saved s", "peak RSS MB"], rows)
    write_results("process_costs", {"repeats": args.repeats, "runs": record})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
