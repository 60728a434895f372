"""Reading and writing a big file the ways a merge can: what each costs in wall time and in CPU
time (user + kernel, the process's own), side by side in one run.

Writes: Python's buffered ``write`` of 8 MiB pieces (what ``ShardWriter`` did) against
``directio.OutputFile`` (O_DIRECT through a page-aligned buffer, what it does now). Reads, each
followed by one pass over the bytes as the merge makes (it hashes and converts them): ``preadv``
into owned 2 MiB arrays (what the merge's reader did) against views of a read-only mapping whose
pages behind are dropped (``merging._Reader``, now). With ``--cold`` (root) the page cache is emptied
before every step, as for a 7B base on a machine that cannot keep it cached.

    python bench/io_paths.py [--size-gb 4] [--cold] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from synthetic import MB, drop_page_cache, print_table, write_results

from d2export.directio import OutputFile
from d2export.merging import _Reader

PIECE = 8 * 2**20
READ_PIECE = 2 * 2**20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench/io"))
    parser.add_argument("--size-gb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cold", action="store_true", help="empty the page cache before every step (root)")
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    size = int(args.size_gb * 2**30) // PIECE * PIECE
    data = np.random.default_rng(0).integers(0, 256, PIECE, dtype=np.uint8)
    steps = {"write, buffered": lambda p: _write_buffered(p, data, size),
             "write, O_DIRECT (directio)": lambda p: _write_direct(p, data, size),
             "read, preadv copies": _read_copies, "read, mapped views": _read_mapped}
    runs: dict[str, list[tuple[float, float]]] = {}
    source = args.workdir / "source.bin"
    _write_direct(source, data, size)
    try:
        for rep in range(args.repeats):
            for name in steps if rep % 2 == 0 else list(steps)[::-1]:
                target = args.workdir / "written.bin"
                if args.cold:
                    drop_page_cache()
                else:
                    os.sync()
                    if name.startswith("read"):
                        _read_copies(source)  # warm: the file is in the page cache for both readers
                started, cpu = time.perf_counter(), _cpu()
                steps[name](target if name.startswith("write") else source)
                runs.setdefault(name, []).append((time.perf_counter() - started, _cpu() - cpu))
                target.unlink(missing_ok=True)
                wall, cpu = runs[name][-1]
                print(f"{name:28} run {rep + 1}: {wall:6.2f} s, CPU {cpu:6.2f} s", flush=True)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    rows, record = [], {"bytes": size, "page_cache": "cold" if args.cold else "warm", "runs": runs}
    for name, values in runs.items():
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        rows.append([name, f"{wall:.2f}", f"{cpu:.2f}", f"{size / MB / wall:,.0f}"])
    print(f"\n{size / 2**30:.1f} GiB, {record['page_cache']} page cache, median of {args.repeats}:")
    print_table(["step", "wall s", "CPU s", "MB/s"], rows)
    write_results("io_paths_cold" if args.cold else "io_paths", record)
    return 0


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _write_buffered(path: Path, data: np.ndarray, size: int) -> None:
    with open(path, "wb") as handle:
        for _ in range(size // PIECE):
            handle.write(data)


def _write_direct(path: Path, data: np.ndarray, size: int) -> None:
    out = OutputFile(path)
    for _ in range(size // PIECE):
        out.write(data)
    out.close()


def _read_copies(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, os.fstat(fd).st_size, READ_PIECE):
            piece = np.empty(READ_PIECE, np.uint8)
            got = os.preadv(fd, [memoryview(piece)], offset)
            piece[:got].view(np.uint64).sum()
    finally:
        os.close(fd)


def _read_mapped(path: Path) -> None:
    """The merge's own reader (``merging._Reader``), piece by piece."""
    size = path.stat().st_size
    with _Reader(path.parent, None) as reader:
        for offset in range(0, size, READ_PIECE):
            reader.read(path.name, offset, min(READ_PIECE, size - offset)).view(np.uint64).sum()


if __name__ == "__main__":
    sys.exit(main())
