"""``bench``: how much faster the merged model serves than the adapter, measured side by side.

Models, loaded one at a time (each freed before the next, so only one is ever in memory):

* ``unmerged``: the base with the adapter applied at run time by d2export's :class:`AdapterLayer`,
  rescaling norms computed in the model dtype as DoRA / D2-LoRA training and evaluation code does
  (not in float64 as the verification reference does: that would time a slower model than users run);
* ``unmerged (PEFT)``: PEFT's own ``PeftModel``, for PEFT LoRA-family adapters when peft is installed;
* ``merged``: the merged folder; ``base``: the base model (merged/base should be 1.0 within noise);
* ``onnxruntime <precision>``: ``model.onnx`` and ``model_quantized.onnx`` of an ONNX export.

Workload: one forward pass (prefill) over seeded random tokens ``[B, L]`` without padding, per
batch size x sequence length. Warm-up runs are discarded; the ``repeats`` timed runs give p50/p95
latency, and throughput is ``B*L / median``. Ratios are taken between models of the same run only.
"""

from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .checks.calibration import random_batches, special_ids
from .checks.models import head_kind, load_model, read_config
from .checks.outputs import PEFT_METHODS, peft_model
from .errors import D2ExportError
from .formats import load_adapter
from .io import open_base
from .layers import inject_adapter
from .plan import Action, build_plan
from .resolve import resolve_base
from .spec import AdapterSpec

UNMERGED = "unmerged"
UNMERGED_PEFT = "unmerged (PEFT)"
MERGED = "merged"
BASE = "base"
ONNX_PREFIX = "onnxruntime"
ONNX_FILES = ("model.onnx", "model_quantized.onnx")  # what `d2export onnx` writes (float, --quantize int8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The D2-LoRA paper: merging recovers about 1.91x evaluation throughput over the unmerged model.
PAPER_MERGED_SPEEDUP = 1.91
SEED = 0

Progress = Callable[[str, int, int], None]  # (what is running, units done, units in all)
Step = Callable[[], object]  # one timed forward pass, inputs bound


# --- report ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Workload:
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


# --- inputs ------------------------------------------------------------------------------------

def parse_sizes(text: str, what: str) -> tuple[int, ...]:
    """``"1,4"`` -> ``(1, 4)``; positive integers only, order kept, duplicates dropped."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise D2ExportError(f"{what}: {text!r} is not a comma-separated list of integers") from None
        if value <= 0:
            raise D2ExportError(f"{what}: {value} is not positive")
        values.append(value)
    return tuple(dict.fromkeys(values))


def _check_settings(batch_sizes, seq_lens, warmup: int, repeats: int, threads: int | None, dtype: str) -> None:
    for what, values in (("batch sizes", batch_sizes), ("sequence lengths", seq_lens)):
        if not values:
            raise D2ExportError(f"{what}: none given")
        if any(not isinstance(v, int) or v <= 0 for v in values):
            raise D2ExportError(f"{what} must be positive integers; got {list(values)}")
    if warmup < 0:
        raise D2ExportError(f"--warmup must be 0 or more; got {warmup}")
    if repeats <= 0:
        raise D2ExportError(f"--repeats must be positive; got {repeats}")
    if threads is not None and threads <= 0:
        raise D2ExportError(f"--threads must be positive; got {threads}")
    if dtype not in DTYPES:
        raise D2ExportError(f"--dtype must be {' or '.join(DTYPES)}; got {dtype!r}")


def workloads(config: dict, batch_sizes, seq_lens) -> tuple[list[Workload], list[str]]:
    """Every batch size x sequence length, lengths clipped to the model's positions."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    notes = []
    lengths = []
    for seq in seq_lens:
        if isinstance(limit, int) and seq > limit:
            notes.append(f"sequence length {seq} clipped to the model's {limit} positions")
            seq = limit
        lengths.append(seq)
    lengths = list(dict.fromkeys(lengths))
    return [Workload(b, s) for b in batch_sizes for s in lengths], notes


def bench_inputs(config: dict, workload: Workload, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids ``[B, L]`` avoiding special ids, and an all-ones mask (no padding)."""
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int):
        raise D2ExportError("config.json has no vocab_size; cannot build benchmark inputs")
    pad = config.get("pad_token_id")
    # random_batches right-pads every row but the first, so B one-row batches are B unpadded rows.
    rows = random_batches(vocab, lengths=(workload.seq,) * workload.batch, batch_size=1, seed=seed,
                          pad_id=pad if isinstance(pad, int) else 0, avoid=special_ids(config))
    ids = torch.cat([b.input_ids for b in rows])
    return ids, torch.ones_like(ids)


# --- models ------------------------------------------------------------------------------------

def unmerged_model(base: Path, spec: AdapterSpec, dtype: torch.dtype) -> nn.Module:
    """The base with the adapter applied at run time, norms in the model dtype (what users run)."""
    try:
        return inject_adapter(load_model(base, dtype), spec, reference_norms=False).eval()
    except KeyError as exc:  # a module the plan check did not catch; say it as bad input
        raise D2ExportError(f"{spec.path}: {exc.args[0]}") from None


def _peft_available(spec: AdapterSpec) -> bool:
    return (spec.method in PEFT_METHODS and spec.config.get("peft_type", "LORA") == "LORA"
            and importlib.util.find_spec("peft") is not None)


def _torch_runner(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], Step]:
    def prepare(ids: torch.Tensor, mask: torch.Tensor) -> Step:
        return lambda: model(input_ids=ids, attention_mask=mask)

    return prepare


def _onnx_runner(path: Path, threads: int) -> Callable[[torch.Tensor, torch.Tensor], Step]:
    import onnxruntime as ort

    from .onnx.validate import OnnxGraph

    graph = OnnxGraph(path)  # knows how to feed the graph (token types, positions, empty past)
    # Its session has ONNX Runtime's default pool size and no spinning (right while validating,
    # where PyTorch runs in between). Timed alone, the graph gets the same thread count as PyTorch
    # and ONNX Runtime's serving default of spinning workers. The first session is dropped before
    # the second is made, so only one copy is ever in memory.
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    graph.session = None
    graph.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def prepare(ids: torch.Tensor, mask: torch.Tensor) -> Step:
        feeds = graph.feeds(ids, mask)
        return lambda: graph.run(feeds)

    return prepare


@dataclass(frozen=True)
class Candidate:
    name: str
    load: Callable[[], Callable[[torch.Tensor, torch.Tensor], Step]]


def _candidates(merged: Path, base: Path, spec: AdapterSpec, dtype: torch.dtype, onnx_files: list[tuple[str, Path]],
                threads: int) -> list[Candidate]:
    models = [Candidate(UNMERGED, lambda: _torch_runner(unmerged_model(base, spec, dtype)))]
    if _peft_available(spec):
        models.append(Candidate(UNMERGED_PEFT, lambda: _torch_runner(peft_model(base, spec, dtype))))
    models.append(Candidate(MERGED, lambda: _torch_runner(load_model(merged, dtype))))
    models.append(Candidate(BASE, lambda: _torch_runner(load_model(base, dtype))))
    for name, path in onnx_files:
        models.append(Candidate(name, lambda path=path: _onnx_runner(path, threads)))
    return models


def _onnx_files(merged: Path, onnx_dir: Path | None) -> tuple[Path | None, list[tuple[str, Path]], list[str]]:
    """(folder, [(row name, file)], notes): ``onnx_dir`` must hold an export; ``<merged>-onnx``
    is used when it exists."""
    from .onnx.files import graph_precision

    notes = []
    if onnx_dir is None:
        default = merged.parent / f"{merged.name}-onnx"
        if not default.is_dir():
            return None, [], [f"no ONNX export at {default} (pass --onnx DIR to include ONNX Runtime)"]
        onnx_dir = default
    if not onnx_dir.is_dir():
        raise D2ExportError(f"ONNX folder not found: {onnx_dir}")
    files = [onnx_dir / name for name in ONNX_FILES if (onnx_dir / name).is_file()]
    if not files:
        raise D2ExportError(f"{onnx_dir}: no {' or '.join(ONNX_FILES)} (export with `d2export onnx`)")
    if importlib.util.find_spec("onnxruntime") is None:
        raise D2ExportError("onnxruntime is not installed: pip install 'd2export[onnx]' (or leave out --onnx)")
    named = []
    for path in files:
        name = f"{ONNX_PREFIX} {graph_precision(path)}"
        named.append((f"{name} ({path.name})" if any(n == name for n, _ in named) else name, path))
    notes += _onnx_source_notes(merged, onnx_dir)
    return onnx_dir, named, notes


def _onnx_source_notes(merged: Path, onnx_dir: Path) -> list[str]:
    try:
        report = json.loads((onnx_dir / "onnx_report.json").read_text())
    except (OSError, ValueError):
        return [f"{onnx_dir}: no onnx_report.json; cannot tell which model it was exported from"]
    notes = []
    source = report.get("source")
    if source and Path(source) != merged.resolve():
        notes.append(f"the ONNX export was made from {source}, not from {merged}")
    if report.get("passed") is False:
        notes.append(f"the ONNX export in {onnx_dir} failed its validation; its timings are of a wrong model")
    return notes


# --- input checks ------------------------------------------------------------------------------

def _check_models(merged: Path, spec: AdapterSpec, base: Path) -> None:
    """The adapter must fit the base, and the merged folder must be a model of the same
    architecture holding every tensor the merge rewrites, in the same shape."""
    if not merged.is_dir():
        raise D2ExportError(f"merged model folder not found: {merged}")
    merged_config, base_model = read_config(merged), open_base(base)
    try:
        plan = build_plan(spec, base_model)
    finally:
        base_model.close()
    merged_model = open_base(merged)
    merged_model.close()
    arch = (merged_config.get("architectures") or [None])[0]
    base_arch = (base_model.config.get("architectures") or [None])[0]
    if arch != base_arch:
        raise D2ExportError(f"{merged} is a {arch} but the adapter's base {base} is a {base_arch}")
    for tensor in plan.tensors:
        if tensor.action is not Action.MERGE or tensor.name != tensor.source:
            continue
        info = merged_model.tensors.get(tensor.name)
        if info is None or tuple(info.shape) != tuple(tensor.shape):
            have = "missing" if info is None else f"shape {list(info.shape)}"
            raise D2ExportError(f"{merged}: tensor {tensor.name} is {have}, the merge of {spec.path} writes "
                                f"{list(tensor.shape)}; is it a merge of this adapter?")


# --- running -----------------------------------------------------------------------------------

def time_runs(step: Step, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` runs after ``warmup`` discarded ones. The collector is
    off while timing so a collection pause lands in no run."""
    for _ in range(warmup):
        step()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
    finally:
        if was_enabled:
            gc.enable()
    return times


def _machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "cpus_available": available, "threads": threads,
            "platform": platform.platform()}


def _versions(with_onnx: bool, with_peft: bool) -> dict:
    names = ["torch", "transformers"] + (["onnxruntime"] if with_onnx else []) + (["peft"] if with_peft else [])
    versions = {"d2export": __version__, "python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_bench(
    merged: str | Path,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 4),
    seq_lens: tuple[int, ...] = (32, 128),
    warmup: int = 2,
    repeats: int = 10,
    threads: int | None = None,
    dtype: str = "float32",
    progress: Progress | None = None,
) -> BenchReport:
    """Time the unmerged, merged and base models (and an ONNX export) on the same inputs.

    ``threads``: PyTorch's and ONNX Runtime's intra-op threads (default: torch's current setting);
    torch's setting is restored afterwards. Bad input raises :class:`D2ExportError`.
    """
    _check_settings(batch_sizes, seq_lens, warmup, repeats, threads, dtype)
    merged = Path(merged)
    spec = load_adapter(adapter)
    base_path = resolve_base(spec, base)
    _check_models(merged, spec, base_path)
    config = read_config(merged)
    loads, notes = workloads(config, batch_sizes, seq_lens)
    onnx_path, onnx_files, onnx_notes = _onnx_files(merged, Path(onnx_dir) if onnx_dir is not None else None)
    inputs = {w: bench_inputs(config, w) for w in loads}
    threads = threads or torch.get_num_threads()
    candidates = _candidates(merged, base_path, spec, DTYPES[dtype], onnx_files, threads)
    report = BenchReport(
        merged=merged, adapter=spec.path, base=base_path, onnx_dir=onnx_path, method=spec.method,
        kind=head_kind(config), dtype=dtype, threads=threads, warmup=warmup, repeats=repeats, workloads=loads,
        models=[c.name for c in candidates], machine=_machine(threads),
        versions=_versions(bool(onnx_files), any(c.name == UNMERGED_PEFT for c in candidates)),
        notes=notes + onnx_notes)
    if spec.method in PEFT_METHODS and UNMERGED_PEFT not in report.models:
        report.notes.append("PEFT's own unmerged model not measured (peft not installed)")
    if onnx_files and dtype != "float32":
        report.notes.append(f"PyTorch models run in {dtype}; the ONNX graphs in their own precision")
    say = progress or (lambda what, done, total: None)
    total, done = len(candidates) * len(loads), 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for candidate in candidates:
                say(f"loading {candidate.name}", done, total)
                prepare = candidate.load()
                for w in loads:
                    say(f"{candidate.name} {w.label}", done, total)
                    times = time_runs(prepare(*inputs[w]), warmup, repeats)
                    report.rows.append(BenchRow(candidate.name, w.batch, w.seq, times))
                    done += 1
                # Free this model before the next is loaded: only one is ever in memory.
                del prepare
                gc.collect()
        say("done", done, total)
    finally:
        torch.set_num_threads(previous_threads)
    return report


# --- plot --------------------------------------------------------------------------------------

def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise D2ExportError("--plot needs matplotlib: pip install 'd2export[plot]'")


def plot_report(report: BenchReport, path: str | Path) -> Path:
    """Throughput per model per workload as grouped bars, written as a PNG."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise D2ExportError(f"--plot: folder {path.parent} does not exist")
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


__all__ = ["BenchReport", "BenchRow", "Ratio", "Workload", "parse_sizes", "plot_report", "require_matplotlib",
           "run_bench", "unmerged_model"]
