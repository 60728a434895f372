"""The ``d2export`` command: a thin typer layer over the Python API.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage (one line on stderr; the traceback
only with ``--debug``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from . import __version__
from .errors import D2ExportError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold LoRA-family adapters (D2-LoRA, LoRA, rsLoRA, DoRA, DiffoRA) into plain weights.")
CHECKPOINT_HELP = "Adapter folder (or a trainer checkpoint-N/ folder)."
BASE_HELP = "Base model folder (default: the adapter's base_model_name_or_path)."
CalibrationOption = Annotated[
    Path | None, typer.Option(help="Text file, one calibration input per line (default: seeded random tokens).")
]
TaskDataOption = Annotated[
    Path | None, typer.Option(help="JSON lines {text, label, split}: report merged vs unmerged accuracy.")
]
AtolOption = Annotated[float | None, typer.Option(help="Largest absolute output difference (default: per dtype).")]
MinTop1Option = Annotated[float | None, typer.Option(help="Smallest top-1 agreement, 0-1 (default: per dtype).")]
MaxUnitsOption = Annotated[
    float | None, typer.Option(help="Largest weight error in units of the stored dtype (default 2 16-bit, 32 fp32).")
]
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)  # piped output: don't fold tables at 80
_debug = False


def _version(value: bool) -> None:
    if value:
        print(f"d2export {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    global _debug
    _debug = debug


def _fail(exc: BaseException) -> None:
    if _debug:
        raise exc
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _reported(live=None, interrupted: str = "interrupted"):
    """Bad input -> one line and exit 2 (:func:`_fail`); Ctrl-C -> one line and exit 130. ``live``:
    the progress display to stop first, so the line is not drawn over."""
    try:
        yield
    except D2ExportError as exc:
        if live is not None:
            live.stop()
        _fail(exc)
    except KeyboardInterrupt:
        if live is not None:
            live.stop()
        err.print(interrupted)
        raise typer.Exit(130) from None


@app.command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_HELP)],
    base: Annotated[Path | None, typer.Option(help=BASE_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the machine-readable description.")] = False,
) -> None:
    """Describe an adapter: method, modules, ranks, the DiffoRA grid, and what a merge would write."""
    from .inspect import inspect

    try:
        info = inspect(checkpoint, base=base)
    except D2ExportError as exc:
        _fail(exc)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    _print_inspect(info)


def _print_inspect(info: dict) -> None:
    out.print(f"[bold]{escape(info['adapter'])}[/]  method [cyan]{info['method']}[/]  "
              f"base {escape(str(info['base_model_name_or_path']))}")
    out.print(f"{info['num_modules']} adapted modules ({info['num_selected']} merged), "
              f"{info['num_params']:,} adapter parameters")
    table = Table("module", "kind", "shape", "rank", "alpha", "coefficients", "tau", "rescale", "merged",
                  box=None, header_style="bold")
    for m in info["modules"]:
        coeffs = ", ".join(f"{k} {v:+.4g}" for k, v in m["coefficients"].items())
        tau = "" if "tau" not in m else f"{m['tau']:.4g}" + (" (learned)" if m["tau_learned"] else "")
        table.add_row(m["module"], m["kind"], "x".join(map(str, m["shape"])), str(m["rank"]), f"{m['alpha']:g}",
                      coeffs, tau, m["rescale"], "yes" if m["selected"] else "[dim]no[/]")
    out.print(table)
    if info["full_tensors"]:
        out.print(f"full tensors replacing the base's: {', '.join(info['full_tensors'])}")
    dam = info["diffora"]
    if dam:
        grid = Table("layer", *dam["module_types"], title=f"DiffoRA selection ({dam['source']}, "
                     f"{dam['num_selected']}/{dam['num_layers'] * len(dam['module_types'])} selected)")
        for i, row in enumerate(dam["grid"]):
            grid.add_row(str(i), *["[green]x[/]" if x else "[dim].[/]" for x in row])
        out.print(grid)
    plan = info["merge_plan"]
    if plan and plan["available"]:
        t = plan["tensors"]
        out.print(f"merge would write {plan['total_bytes'] / 1e6:,.1f} MB in {len(plan['shards'])} shard(s): "
                  f"{t['merge']} merged, {t['bias']} biases, {t['replace']} replaced, "
                  f"{t['copy'] + t['unselected']} copied")
        for note in plan["notes"]:
            out.print(f"note: {note}", markup=False)
    elif plan:
        out.print(f"[yellow]merge plan unavailable:[/] {escape(plan['reason'])}")


@app.command("merge")
def merge_cmd(
    checkpoint: Annotated[Path, typer.Argument(help=CHECKPOINT_HELP)],
    base: Annotated[Path | None, typer.Option(help=BASE_HELP)] = None,
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <checkpoint>-merged).")] = None,
    dtype: Annotated[str, typer.Option(help="Output dtype: auto (the base's), bfloat16, float16, float32.")] = "auto",
    compute_dtype: Annotated[
        str, typer.Option(help="Merge arithmetic: float64 (exact rounding) or float32 (faster).")
    ] = "float64",
    max_shard_size: Annotated[str | None, typer.Option(help="e.g. 5GB; default: the base's shard layout.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    no_hash: Annotated[
        bool, typer.Option("--no-hash", help="Skip input sha256s in the report (faster on big models).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report on stdout.")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="Verify the merged folder (exit 1 if it fails).")] = False,
    calibration: CalibrationOption = None,
    task_data: TaskDataOption = None,
    atol: AtolOption = None,
    min_top1: MinTop1Option = None,
    max_units: MaxUnitsOption = None,
    onnx: Annotated[
        bool, typer.Option("--onnx", help="Then export ONNX to <out>-onnx and validate it (see `d2export onnx`).")
    ] = False,
) -> None:
    """Merge an adapter into its base model and write a Hugging Face model folder."""
    from .merge import merge

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("merging", total=None)

        def progress(name: str, nbytes: int, total: int) -> None:
            bar.update(task, total=total, advance=nbytes, description=name[-48:])

        with _reported(bar, "interrupted: no output was written"):
            result = merge(checkpoint, base=base, out=out_dir, dtype=dtype, compute_dtype=compute_dtype,
                           max_shard_size=max_shard_size, force=force, hash_inputs=not no_hash,
                           progress=progress)
    report = result.report
    verification = None
    if verify:
        verification = _run_verify(result.out, checkpoint, result.plan.base.path, calibration=calibration,
                                   task_data=task_data, thresholds=_thresholds(atol, min_top1, max_units))
        from .verification import record_verification

        report = record_verification(result.out, verification)
    if as_json:
        print(json.dumps(report, indent=2))
    t = report["tensors"]
    err.print(f"merged {report['method']} into {escape(str(result.out))}: {t['merge']} tensors merged, "
              f"{t['unselected']} left as base (DiffoRA), {t['replace']} replaced, {t['bias']} biases, "
              f"{report['output']['total_bytes'] / 1e6:,.1f} MB in {len(report['output']['shards'])} shard(s)",
              highlight=False)
    for note in report["notes"]:
        err.print(f"note: {note}", highlight=False, markup=False)
    failed = False
    if verification is not None:
        _print_verify(verification, console=err)
        failed = not verification.passed
    if onnx and not failed:
        target = result.out.parent / f"{result.out.name}-onnx"
        failed = not _run_onnx(result.out, target, force=force).passed
    if failed:
        raise typer.Exit(1)


@app.command("onnx")
def onnx_cmd(
    merged: Annotated[Path, typer.Argument(help="Model folder to export (e.g. a merged one).")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Output folder (default: <merged>-onnx).")] = None,
    task: Annotated[str | None, typer.Option(help="optimum task (default: from config.json's architecture).")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: optimum's for the model).")] = None,
    no_past: Annotated[bool, typer.Option("--no-past", help="Causal LMs: export without past key/values.")] = False,
    optimize: Annotated[str | None, typer.Option(help="ONNX Runtime graph optimisation: O1, O2 or O3.")] = None,
    quantize: Annotated[
        str | None, typer.Option(help="int8: also write model_quantized.onnx (dynamic quantisation).")
    ] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Export float16 instead of float32.")] = False,
    external_data: Annotated[
        bool, typer.Option("--external-data", help="Always write model.onnx_data (default: when weights pass 2 GB).")
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the ONNX Runtime check.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print onnx_report.json on stdout.")] = False,
) -> None:
    """Export a model folder to ONNX through optimum and check it with ONNX Runtime against PyTorch.
    Exit 1 if the check fails (the files are written, and the report says so)."""
    result = _run_onnx(merged, out_dir, task=task, opset=opset, past=not no_past, optimize=optimize,
                       quantize=quantize, fp16=fp16, external_data=True if external_data else None, force=force,
                       validate=not no_validate)
    if as_json:
        print(json.dumps(result.report, indent=2))
    if not result.passed:
        raise typer.Exit(1)


def _run_onnx(model_dir: Path, out_dir: Path | None, **options):
    from .onnx import export_onnx

    with err.status("exporting ONNX", spinner="dots") if err.is_terminal else contextlib.nullcontext() as status:
        def progress(stage: str) -> None:
            if status is not None:
                status.update(f"ONNX: {escape(stage)}")

        with _reported(status, "interrupted: no output was written"):
            result = export_onnx(model_dir, out_dir, progress=progress, **options)
    _print_onnx(result.report, result.out)
    return result


def _print_onnx(report: dict, out_dir: Path) -> None:
    files = ", ".join(f"{name} ({size / 1e6:,.1f} MB)" for name, size in report["files"].items()
                      if name.endswith((".onnx", ".onnx_data")))
    err.print(f"exported {report['task']} ({report['dtype']}, opset {report['opset']}"
              f"{', external data' if report['external_data'] else ''}) to {escape(str(out_dir))}: {files}",
              highlight=False)
    validation = report.get("validation")
    if validation:
        table = Table("file", "precision", "output", "max |d|", "rel", "mean |d|", "top-1", "decode step", "generate",
                      "", box=None, header_style="bold")
        for file, graph in validation["graphs"].items():
            decode = graph.get("decode_step")
            generate = graph.get("generate")
            for name, c in graph["outputs"].items():
                table.add_row(file, graph["precision"], name, f"{c['max_abs']:.2e}", f"{c['relative']:.1e}",
                              f"{c['mean_abs']:.1e}", "-" if c["top1"] is None else f"{c['top1']:.2%}",
                              "-" if decode is None else f"{decode['relative']:.1e}",
                              "-" if generate is None else f"{generate['matching']}/{generate['prompts']}",
                              "[green]ok[/]" if graph["passed"] else "[red]FAIL[/]")
        err.print(table)
        for graph in validation["graphs"].values():
            for failure in graph["failures"]:
                err.print(f"[red]FAIL[/] {escape(failure)}", highlight=False)
    for note in report["notes"]:
        err.print(f"note: {note}", markup=False, highlight=False)
    err.print("[bold green]ONNX export validated[/]" if report["passed"] and validation else
              "[bold red]ONNX validation FAILED[/]" if validation else "ONNX export not validated")


@app.command("verify")
def verify_cmd(
    merged: Annotated[Path, typer.Argument(help="Merged model folder (by d2export or another tool).")],
    adapter: Annotated[Path, typer.Option(help=CHECKPOINT_HELP)],
    base: Annotated[Path | None, typer.Option(help=BASE_HELP)] = None,
    calibration: CalibrationOption = None,
    task_data: TaskDataOption = None,
    atol: AtolOption = None,
    min_top1: MinTop1Option = None,
    max_units: MaxUnitsOption = None,
    max_task_gap: Annotated[
        float | None, typer.Option(help="Largest task accuracy gap, percentage points (default 2).")
    ] = None,
    weights_only: Annotated[bool, typer.Option("--weights-only", help="Skip the output and task checks.")] = False,
    no_peft: Annotated[bool, typer.Option("--no-peft", help="Skip PEFT's unmerged model as a reference.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random calibration tokens.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report on stdout.")] = False,
) -> None:
    """Check a merged folder against the adapter: weights, outputs (and a task, with --task-data).
    Exit 1 if a check fails."""
    thresholds = _thresholds(atol, min_top1, max_units, max_task_gap)
    report = _run_verify(merged, adapter, base, calibration=calibration, task_data=task_data,
                         thresholds=thresholds, outputs=not weights_only, peft_reference=not no_peft, seed=seed)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    _print_verify(report, console=err if as_json else out)
    if not report.passed:
        raise typer.Exit(1)


def _thresholds(atol, min_top1, max_units, max_task_gap=None):
    from .verification import Thresholds

    thresholds = Thresholds(atol=atol, min_top1=min_top1, max_units=max_units)
    if max_task_gap is not None:
        thresholds.max_task_gap_pp = max_task_gap
    return thresholds


def _run_verify(merged: Path, adapter: Path, base: Path | None, **options):
    from .verification import verify

    with err.status("verifying", spinner="dots") if err.is_terminal else contextlib.nullcontext() as status:
        def progress(stage: str) -> None:
            if status is not None:
                status.update(f"verifying: {escape(stage[-60:])}")

        with _reported(status):
            return verify(merged, adapter, base=base, progress=progress, **options)


def _print_verify(report, console: Console) -> None:
    console.print(f"[bold]verify[/] {escape(str(report.merged))} ({report.merged_dtype}, written by "
                  f"{escape(report.merged_by)}) against the {report.method} adapter {escape(str(report.adapter))}",
                  highlight=False)
    w = report.weights
    if w is not None:
        s = w.summary()
        console.print(f"weights: {s['adapted_tensors']} adapted tensors, max error {s['max_units']:.2f} units "
                      f"(max abs {s['max_abs']:.2e}), {s['exact_fraction']:.2%} of elements correctly rounded; "
                      f"{s['copies_identical']}/{s['copied_tensors']} other tensors identical to the base",
                      highlight=False)
    if report.outputs:
        console.print(f"outputs on {escape(report.calibration)}:", highlight=False)
        table = Table("candidate", "reference", "run in", "max |d|", "scale", "rel", "mean |d|", "top-1", "mean KL",
                      "greedy", "", box=None, header_style="bold")
        for o in report.outputs:
            c, g = o.comparison, o.generation
            table.add_row(o.candidate, o.reference, o.dtype, f"{c.max_abs:.2e}", f"{c.scale:.3g}", f"{c.relative:.1e}",
                          f"{c.mean_abs:.1e}", "-" if c.top1 is None else f"{c.top1:.2%}",
                          "-" if c.mean_kl is None else f"{c.mean_kl:.1e}",
                          "-" if g is None else f"{g.identical}/{g.prompts}",
                          "[green]ok[/]" if o.passed else "[red]FAIL[/]")
        console.print(table)
    if report.task:
        table = Table("task run in", "scoring", "examples", "unmerged acc", "merged acc", "gap (pp)", "differ",
                      box=None, header_style="bold")
        for r in report.task:
            table.add_row(r.dtype, r.scoring, str(r.examples), f"{r.unmerged_accuracy:.2%}",
                          f"{r.merged_accuracy:.2%}", f"{r.gap_pp:+.2f}", str(r.disagreements))
        console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    for line in report.failures[:20]:
        console.print(f"[red]FAIL[/] {escape(line)}", highlight=False)
    if len(report.failures) > 20:
        console.print(f"... and {len(report.failures) - 20} more (see --json)")
    console.print("[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]")


@app.command("bench")
def bench_cmd(
    merged: Annotated[Path, typer.Argument(help="Merged model folder.")],
    adapter: Annotated[Path, typer.Option(help=CHECKPOINT_HELP)],
    base: Annotated[Path | None, typer.Option(help=BASE_HELP)] = None,
    onnx_dir: Annotated[
        Path | None, typer.Option("--onnx", help="ONNX export to time too (default: <merged>-onnx when it exists).")
    ] = None,
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,4",
    seq_lens: Annotated[
        str, typer.Option(help="Comma-separated sequence lengths (clipped to the model's).")
    ] = "32,128",
    warmup: Annotated[int, typer.Option(help="Untimed runs per model and shape.")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed runs per model and shape (p50/p95 over these).")] = 10,
    threads: Annotated[int | None, typer.Option(help="PyTorch and ONNX Runtime threads (default: torch's).")] = None,
    dtype: Annotated[str, typer.Option(help="PyTorch models run in: float32 or bfloat16.")] = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of throughput per model and shape.")] = None,
) -> None:
    """Throughput and latency of the unmerged (run-time adapter), merged and base models, and an ONNX
    export, on the same random-token prefill at each batch size x sequence length."""
    from .bench import parse_sizes, plot_report, require_matplotlib, run_bench

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("benchmark", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=escape(what[-48:]), completed=done, total=total)

        with _reported(bar):
            if plot is not None:
                require_matplotlib()  # fail before minutes of timing, not after
            report = run_bench(merged, adapter, base=base, onnx_dir=onnx_dir,
                               batch_sizes=parse_sizes(batch_sizes, "--batch-sizes"),
                               seq_lens=parse_sizes(seq_lens, "--seq-lens"), warmup=warmup, repeats=repeats,
                               threads=threads, dtype=dtype, progress=progress)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    _print_bench(report, console=err if as_json else out)
    if plot is not None:
        with _reported():
            err.print(f"plot written to {escape(str(plot_report(report, plot)))}", highlight=False)


def _print_bench(report, console: Console) -> None:
    from .bench import UNMERGED

    versions = ", ".join(f"{name} {v}" for name, v in report.versions.items() if v and name != "d2export")
    m = report.machine
    console.print(f"[bold]bench[/] {escape(str(report.merged))} ({report.method} adapter, {report.kind}, "
                  f"PyTorch in {report.dtype}): {report.threads} thread{'s' if report.threads != 1 else ''} on "
                  f"{m['cpus_available']} of "
                  f"{m['cpu_count']} CPUs ({escape(m['cpu'])}); {versions}", highlight=False)
    console.print(f"prefill of random tokens, no padding; {report.warmup} warm-up + {report.repeats} timed runs "
                  "each; tokens/s = B*L / median", highlight=False)
    table = Table("model", "batch", "seq", "p50 ms", "p95 ms", "tokens/s", f"x vs {UNMERGED}",
                  box=None, header_style="bold")
    for w in report.workloads:
        for r in [r for model in report.models if (r := report.row(model, w)) is not None]:
            speedup = report.speedup(r)
            table.add_row(r.model, str(r.batch), str(r.seq), f"{r.p50_ms:.3f}", f"{r.p95_ms:.3f}",
                          f"{r.tokens_per_s:,.0f}", "-" if speedup is None else f"{speedup:.2f}x")
    console.print(table)
    console.print("[bold]throughput ratios[/] (geometric mean over shapes; per shape B x L):")
    for ratio in report.ratios:
        shapes = ", ".join(f"{w.label} {r:.2f}x" for w, r in ratio.per_workload)
        expected = f"; {ratio.expected}" if ratio.expected else ""
        console.print(f"  {escape(ratio.name)}: [bold]{ratio.geomean:.2f}x[/] ({shapes}){escape(expected)}",
                      highlight=False)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, highlight=False)


def _tune_malloc() -> None:
    """Keep freed memory for reuse instead of handing it back to the kernel at once.

    glibc maps most large blocks afresh and unmaps them on free, and its adaptive threshold still
    trims the heap often, while a merge allocates the same few sizes (a tensor read, its merged
    copy) for every tensor: merging a 320M model took 310k page faults and 2.1-2.2 s. Fixed limits
    (blocks up to 32 MiB from the heap, trim past 256 MiB free) cut that to 35k faults and
    1.7-2.0 s, for 5-13 MB more peak RSS. Process-wide, so only the command does it, not the library.
    """
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 256 * 2**20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def run() -> None:
    _tune_malloc()
    try:
        app()
    except D2ExportError as exc:  # raised outside a command body, or re-raised for --debug
        if _debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
