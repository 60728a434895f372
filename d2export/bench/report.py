"""What a benchmark found: timed rows per model and workload, and throughput ratios read off them.

Pure data (numpy only), so a report can be rendered or plotted without loading any model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Row names of the models a benchmark times.
UNMERGED = "unmerged"
UNMERGED_PEFT = "unmerged (PEFT)"
MERGED = "merged"
BASE = "base"
ONNX_PREFIX = "onnxruntime"  # "onnxruntime <precision>", one row per ONNX file
# The D2-LoRA paper: merging recovers about 1.91x evaluation throughput over the unmerged model.
PAPER_MERGED_SPEEDUP = 1.91


@dataclass(frozen=True)
class Workload:
    """One prefill shape: ``batch`` rows of ``seq`` tokens."""

    batch: int
    seq: int

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def label(self) -> str:
        return f"{self.batch}x{self.seq}"


@dataclass
class BenchRow:
    """Timed runs of one model on one workload."""

    model: str
    batch: int
    seq: int
    times_ms: list[float]

    @property
    def p50_ms(self) -> float:
        return float(np.median(self.times_ms))

    @property
    def p95_ms(self) -> float:
        return float(np.percentile(self.times_ms, 95))

    @property
    def tokens_per_s(self) -> float:
        return self.batch * self.seq / (self.p50_ms / 1e3)

    def to_dict(self) -> dict:
        return {"model": self.model, "batch": self.batch, "seq": self.seq, "p50_ms": self.p50_ms,
                "p95_ms": self.p95_ms, "tokens_per_s": self.tokens_per_s, "times_ms": self.times_ms}


@dataclass
class Ratio:
    """Throughput of ``numerator`` over ``denominator``, per workload and as a geometric mean."""

    numerator: str
    denominator: str
    per_workload: list[tuple[Workload, float]]
    expected: str | None = None  # what to read it against

    @property
    def name(self) -> str:
        return f"{self.numerator} / {self.denominator}"

    @property
    def geomean(self) -> float:
        return math.exp(sum(math.log(r) for _, r in self.per_workload) / len(self.per_workload))

    def to_dict(self) -> dict:
        return {"numerator": self.numerator, "denominator": self.denominator, "geomean": self.geomean,
                "per_workload": [{"batch": w.batch, "seq": w.seq, "ratio": r} for w, r in self.per_workload],
                "expected": self.expected}


@dataclass
class BenchReport:
    """Every model timed on every workload of one run, with the settings and machine it ran on."""

    merged: Path
    adapter: Path
    base: Path
    onnx_dir: Path | None
    method: str
    kind: str  # head_kind: causal-lm, sequence-classification, encoder
    dtype: str
    threads: int
    warmup: int
    repeats: int
    workloads: list[Workload]
    models: list[str]
    machine: dict
    versions: dict
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def row(self, model: str, workload: Workload) -> BenchRow | None:
        return next((r for r in self.rows if r.model == model and (r.batch, r.seq) == (workload.batch, workload.seq)),
                    None)

    def speedup(self, row: BenchRow, over: str = UNMERGED) -> float | None:
        """``row``'s throughput over ``over``'s on the same workload."""
        other = self.row(over, Workload(row.batch, row.seq))
        return row.tokens_per_s / other.tokens_per_s if other is not None else None

    def ratio(self, numerator: str, denominator: str, expected: str | None = None) -> Ratio | None:
        """Throughput ratio over the workloads both models ran; None when they share none."""
        pairs = []
        for w in self.workloads:
            top, bottom = self.row(numerator, w), self.row(denominator, w)
            if top is not None and bottom is not None:
                pairs.append((w, top.tokens_per_s / bottom.tokens_per_s))
        return Ratio(numerator, denominator, pairs, expected) if pairs else None

    @property
    def ratios(self) -> list[Ratio]:
        wanted = [(MERGED, UNMERGED, f"paper: about {PAPER_MERGED_SPEEDUP}x evaluation throughput recovered by "
                   "merging"),
                  (MERGED, UNMERGED_PEFT, None),
                  (MERGED, BASE, "1.0 within noise: the merged model is a plain model of the base's shape")]
        wanted += [(m, MERGED, None) for m in self.models if m.startswith(ONNX_PREFIX)]
        found = [self.ratio(*pair) for pair in wanted]
        return [r for r in found if r is not None]

    def to_dict(self) -> dict:
        return {
            "merged": str(self.merged), "adapter": str(self.adapter), "base": str(self.base),
            "onnx_dir": None if self.onnx_dir is None else str(self.onnx_dir),
            "method": self.method, "kind": self.kind, "dtype": self.dtype, "threads": self.threads,
            "warmup": self.warmup, "repeats": self.repeats,
            "workloads": [{"batch": w.batch, "seq": w.seq} for w in self.workloads],
            "models": self.models, "machine": self.machine, "versions": self.versions,
            "rows": [{**r.to_dict(), "vs_unmerged": self.speedup(r)} for r in self.rows],
            "ratios": [r.to_dict() for r in self.ratios],
            "paper_merged_speedup": PAPER_MERGED_SPEEDUP,
            "notes": self.notes,
        }
