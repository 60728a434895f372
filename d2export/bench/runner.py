"""Running a benchmark: check the inputs, time every model in turn, describe the machine."""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import time
from pathlib import Path

import torch

from .. import __version__
from ..job import prepare
from ..options import BenchOptions, MergeOptions, with_settings
from ..progress import Progress, silent
from ..reading import ModelFolder
from ..runtime.models import PEFT_METHODS, TORCH_DTYPES, head_kind
from ..spec import AdapterSpec
from .candidates import Candidate, Step, candidates, check_models, onnx_files
from .inputs import bench_inputs, workloads
from .report import UNMERGED_PEFT, BenchReport, BenchRow


def run_bench(
    merged: str | Path,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    options: BenchOptions | None = None,
    progress: Progress = silent,
    **settings,
) -> BenchReport:
    """Time the unmerged, merged and base models (and an ONNX export) on the same inputs.

    Models are loaded one at a time and each is freed before the next, so only one is ever in
    memory. PyTorch's intra-op thread count is set for the run and restored afterwards.

    Args:
        merged: the merged model folder.
        adapter: the adapter folder it was merged from.
        base: the base model folder or a model id in the local Hugging Face cache; default: the
            adapter's ``base_model_name_or_path`` at its ``revision`` (docs/design.md §5).
        onnx_dir: an ONNX export of ``merged`` to time too; default: ``<merged>-onnx`` when it exists.
        options: a :class:`~d2export.options.BenchOptions`; ``settings`` (its field names as
            keywords: ``batch_sizes``, ``seq_lens``, ``warmup``, ``repeats``, ``threads``, ``dtype``)
            override it.
        progress: called with (what is running, timed workloads done, workloads in all).

    Returns:
        A :class:`BenchReport` with one row per model and workload, and the ratios between them.

    Raises:
        OptionError: a bad setting (named by its field).
        D2ExportError: bad input: a folder, adapter or ONNX export that cannot be read, or a merged
            folder that is not a merge of this adapter into this base.
    """
    options = with_settings(BenchOptions, options, settings)
    merged = Path(merged)
    spec, base_path, config = _checked_inputs(merged, adapter, base, options.revision)
    loads, notes = workloads(config, options.batch_sizes, options.seq_lens)
    onnx_path, onnx_models, onnx_notes = onnx_files(merged, None if onnx_dir is None else Path(onnx_dir))
    threads = options.threads or torch.get_num_threads()
    models = candidates(merged, base_path, spec, TORCH_DTYPES[options.dtype], onnx_models, threads)
    names = [c.name for c in models]
    report = BenchReport(
        merged=merged, adapter=spec.path, base=base_path, onnx_dir=onnx_path, method=spec.method,
        kind=head_kind(config), dtype=options.dtype, threads=threads, warmup=options.warmup,
        repeats=options.repeats, workloads=loads, models=names, machine=machine(threads),
        versions=versions(with_onnx=bool(onnx_models), with_peft=UNMERGED_PEFT in names),
        notes=notes + onnx_notes)
    if spec.method in PEFT_METHODS and UNMERGED_PEFT not in names:
        report.notes.append("PEFT's own unmerged model not measured (peft not installed)")
    if onnx_models and options.dtype != "float32":
        report.notes.append(f"PyTorch models run in {options.dtype}; the ONNX graphs in their own precision")
    _time_all(report, models, config, progress)
    return report


def _checked_inputs(merged: Path, adapter: str | Path, base: str | Path | None, revision: str | None = None
                    ) -> tuple[AdapterSpec, Path, dict]:
    """(adapter spec, base folder, merged config) once the adapter fits the base and the merged
    folder fits the plan. The merged folder is opened first: a wrong path is the likeliest mistake."""
    with ModelFolder.open(merged, "merged model") as merged_folder, \
            prepare(adapter, base, MergeOptions(revision=revision)) as job:
        check_models(merged_folder, job)
        # Only the spec and the base's path are needed from here: the plan is dropped with the job.
        return job.spec, job.base.path, merged_folder.config


def _time_all(report: BenchReport, models: list[Candidate], config: dict, progress: Progress) -> None:
    """Time every model on every workload, appending rows to ``report``."""
    inputs = {w: bench_inputs(config, w) for w in report.workloads}
    total, done = len(models) * len(report.workloads), 0
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(report.threads)
    try:
        with torch.inference_mode():
            for candidate in models:
                progress(f"loading {candidate.name}", done, total)
                bind = candidate.load()
                for w in report.workloads:
                    progress(f"{candidate.name} {w.label}", done, total)
                    times = time_runs(bind(*inputs[w]), report.warmup, report.repeats)
                    report.rows.append(BenchRow(candidate.name, w.batch, w.seq, times))
                    done += 1
                # Free this model before the next is loaded: only one is ever in memory.
                del bind
                gc.collect()
        progress("done", done, total)
    finally:
        torch.set_num_threads(previous_threads)


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


def machine(threads: int) -> dict:
    """The CPU the figures were taken on and how many of its cores the process could use."""
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


def versions(*, with_onnx: bool, with_peft: bool) -> dict:
    """Versions of what ran the models (None for a package that is not installed)."""
    names = ["torch", "transformers"] + (["onnxruntime"] if with_onnx else []) + (["peft"] if with_peft else [])
    found = {"d2export": __version__, "python": platform.python_version()}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found
