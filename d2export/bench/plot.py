"""The benchmark as a picture: throughput per model per workload, grouped bars in a PNG."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import D2ExportError
from .report import MERGED, PAPER_MERGED_SPEEDUP, UNMERGED, BenchReport


def require_matplotlib() -> None:
    """Raise unless matplotlib is installed; call it before timing, not after."""
    if importlib.util.find_spec("matplotlib") is None:
        raise D2ExportError("plotting needs matplotlib: pip install 'd2export[plot]'")


def plot_report(report: BenchReport, path: str | Path) -> Path:
    """Throughput per model per workload as grouped bars, written as a PNG to ``path``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise D2ExportError(f"cannot write the plot {path}: folder {path.parent} does not exist")
    fig = Figure(figsize=(max(6.0, 1.6 * len(report.workloads) + 3), 4.5), dpi=120)
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend
    ax = fig.add_subplot()
    width = 0.8 / len(report.models)
    for i, model in enumerate(report.models):
        xs, ys = [], []
        for j, w in enumerate(report.workloads):
            row = report.row(model, w)
            if row is not None:
                xs.append(j + (i - (len(report.models) - 1) / 2) * width)
                ys.append(row.tokens_per_s)
        ax.bar(xs, ys, width, label=model)
    ax.set_xticks(range(len(report.workloads)), [f"B={w.batch}, L={w.seq}" for w in report.workloads])
    ax.set_yscale("log")  # workloads differ by orders of magnitude; ratios read as equal heights
    ax.set_ylabel("tokens/s (median)")
    ratio = report.ratio(MERGED, UNMERGED)
    subtitle = f", merged/unmerged {ratio.geomean:.2f}x (paper ~{PAPER_MERGED_SPEEDUP}x)" if ratio else ""
    ax.set_title(f"{report.merged.name}: {report.method}, {report.dtype}, {report.threads} threads{subtitle}",
                 fontsize=9)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
