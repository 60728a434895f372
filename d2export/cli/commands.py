"""The ``d2export`` commands: each maps its flags onto an options object, calls the Python API and
renders the result. Validation lives in the options objects, the work in the library."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .. import __version__
from ..errors import D2ExportError
from ..options import BenchOptions, MergeOptions, OnnxOptions, Thresholds, VerifyOptions, default_of, help_of
from . import render
from .process import err, message, out, reported, settings
from .progress import progress_display

if TYPE_CHECKING:
    from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold LoRA-family adapters (D2-LoRA, LoRA, rsLoRA, DoRA, DiffoRA) into plain weights.")

CheckpointArg = Annotated[Path, typer.Argument(help="Adapter folder (or a trainer checkpoint-N/ folder).")]
AdapterOption = Annotated[Path, typer.Option(help="Adapter folder (or a trainer checkpoint-N/ folder).")]
BaseOption = Annotated[Path | None, typer.Option(help="Base model folder, or a model id in the local Hugging Face "
                                                       "cache (default: the adapter's base_model_name_or_path).")]
RevisionOption = Annotated[str | None, typer.Option(help=help_of(MergeOptions, "revision"))]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the machine-readable report on stdout.")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
CalibrationOption = Annotated[Path | None, typer.Option(help=help_of(VerifyOptions, "calibration"))]
TaskDataOption = Annotated[Path | None, typer.Option(help=help_of(VerifyOptions, "task_data"))]
AtolOption = Annotated[float | None, typer.Option(help=help_of(Thresholds, "atol"))]
MinTop1Option = Annotated[float | None, typer.Option(help=help_of(Thresholds, "min_top1"))]
MaxUnitsOption = Annotated[float | None, typer.Option(help=help_of(Thresholds, "max_units"))]
DtypesOption = Annotated[str | None, typer.Option(help=help_of(VerifyOptions, "dtypes"))]
ResidentOption = Annotated[str, typer.Option(help=help_of(VerifyOptions, "resident"))]
ForceOption = Annotated[bool, typer.Option(help=help_of(MergeOptions, "force"))]
TrainerCheckpointOption = Annotated[str | None, typer.Option(
    "--checkpoint", help="In a trainer run folder: latest, best (trainer_state.json) or a step number.")]


# The output-check flags merge --verify and verify share, declared once: each command's signature
# gets them from ``shared_verify_flags``, and its body receives them as one dict.
VERIFY_FLAGS = {"calibration": (CalibrationOption, None), "task_data": (TaskDataOption, None),
                "atol": (AtolOption, None), "min_top1": (MinTop1Option, None), "max_units": (MaxUnitsOption, None),
                "dtypes": (DtypesOption, None), "resident": (ResidentOption, default_of(VerifyOptions, "resident"))}


def shared_verify_flags(command):
    """``command`` with :data:`VERIFY_FLAGS` added to its signature (typer reads ``__signature__``);
    it is called with them gathered in its ``verify_flags`` parameter."""
    signature = inspect.signature(command, eval_str=True)  # typer evaluates none of a __signature__
    own = [p for p in signature.parameters.values() if p.name != "verify_flags"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, (annotation, default) in VERIFY_FLAGS.items()]

    @functools.wraps(command)
    def with_flags(**kwargs):
        flags = {name: kwargs.pop(name) for name in VERIFY_FLAGS}
        return command(**kwargs, verify_flags=flags)

    with_flags.__signature__ = signature.replace(parameters=own + added)
    with_flags.__annotations__ = {p.name: p.annotation for p in own + added}
    del with_flags.__wrapped__  # else inspect.signature follows it back to the command's own
    return with_flags


def _verify_options(flags: dict, gap: dict | None = None, **settings) -> VerifyOptions:
    """VerifyOptions from :data:`VERIFY_FLAGS` (the thresholds among them gathered, with ``gap``)
    and other settings."""
    flags = dict(flags)
    thresholds = Thresholds(**{k: flags.pop(k) for k in ("atol", "min_top1", "max_units")}, **(gap or {}))
    return VerifyOptions(**flags, **settings, thresholds=thresholds)


def _adapter_folder(path: Path, checkpoint: str | None) -> Path:
    """The adapter folder ``--checkpoint`` picks in a trainer run folder (``path`` itself without it)."""
    if checkpoint is None:
        return path
    from ..formats.common import find_adapter_dir

    with reported():
        return find_adapter_dir(path, checkpoint)


def _version(value: bool) -> None:
    if value:
        print(f"d2export {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (and what --verbose shows).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the libraries' warnings and "
                                          "transformers' log (silenced by default).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    settings["debug"] = debug
    settings["verbose"] = verbose or debug
    # a path that is not UTF-8 (bytes decoded as surrogates) is printed escaped, as Python's
    # stderr already does, instead of ending the report with a UnicodeEncodeError
    with contextlib.suppress(AttributeError, ValueError):
        sys.stdout.reconfigure(errors="backslashreplace")
    # read when transformers is first imported, which the commands do later (and only if needed)
    if settings["verbose"]:
        os.environ["TRANSFORMERS_VERBOSITY"] = "info"
    else:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        # accelerate logs through the standard library, with no handler of its own: Python's last
        # resort prints its warnings (a streamed model's "parameters on the meta device") to stderr
        logging.getLogger("accelerate").setLevel(logging.ERROR)


@app.command("inspect")
def inspect_cmd(checkpoint: CheckpointArg, base: BaseOption = None, revision: RevisionOption = None,
                trainer_checkpoint: TrainerCheckpointOption = None, as_json: JsonOption = False) -> None:
    """Describe an adapter: method, modules, ranks, the DiffoRA grid, and what a merge would write."""
    from ..inspection import inspect

    checkpoint = _adapter_folder(checkpoint, trainer_checkpoint)
    with reported():
        info = inspect(checkpoint, base=base, revision=revision)
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        render.print_inspect(info)


@app.command("merge")
@shared_verify_flags
def merge_cmd(
    checkpoint: CheckpointArg,
    base: BaseOption = None,
    revision: RevisionOption = None,
    trainer_checkpoint: TrainerCheckpointOption = None,
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <checkpoint>-merged).")
                       ] = None,
    dtype: Annotated[str, typer.Option(help=help_of(MergeOptions, "dtype"))] = "auto",
    compute_dtype: Annotated[str, typer.Option(help=help_of(MergeOptions, "compute_dtype"))] = "float64",
    max_shard_size: Annotated[str | None, typer.Option(help=help_of(MergeOptions, "max_shard_size"))] = None,
    force: ForceOption = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the inputs' sha256 (faster on big models).")
                       ] = False,
    as_json: JsonOption = False,
    verify: Annotated[bool, typer.Option("--verify", help="Verify the merged folder (exit 1 if it fails).")] = False,
    onnx: Annotated[bool, typer.Option("--onnx", help="Then export ONNX to <out>-onnx and validate it.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Read, match and check everything; write nothing.")
                       ] = False,
    quiet: QuietOption = False,
    verify_flags: dict | None = None,
) -> None:
    """Merge an adapter into its base model and write a Hugging Face model folder."""
    from ..merging import merge

    checkpoint = _adapter_folder(checkpoint, trainer_checkpoint)
    console = _report_console(as_json)
    with reported():  # every option is checked before anything is read or written
        options = MergeOptions(dtype=dtype, compute_dtype=compute_dtype, max_shard_size=max_shard_size, force=force,
                               hash_inputs=not no_hash, revision=revision)
        verify_options = _verify_options(verify_flags) if verify else None
        if dry_run:
            _dry_run(checkpoint, base, out_dir, options, console)
            return
    with progress_display("merging", quiet=quiet) as (progress, display), \
            reported(display, "interrupted: no output was written"):
        result = merge(checkpoint, base=base, out=out_dir, options=options, progress=progress)
    verification = None if verify_options is None else _verify_written(result, verify_options, quiet)
    if as_json:
        print(json.dumps(result.report, indent=2))
    render.print_merge(result.report, result.out, console)
    if verification is not None:
        render.print_verify(verification, console=console)
    failed = verification is not None and not verification.passed
    if onnx and not failed:
        failed = not _onnx(result.out, result.out.parent / f"{result.out.name}-onnx", OnnxOptions(force=force),
                           quiet, console, written=f"the merged folder {result.out} was written"
                           + (" and verified" if verification is not None else "") + "; ").passed
    if failed:
        raise typer.Exit(1)


def _report_console(as_json: bool) -> Console:
    """Where a command's human-readable report goes: stdout, or stderr where ``--json`` keeps
    stdout for the JSON alone (progress and errors always go to stderr)."""
    return err if as_json else out


def _check_plot_location(plot: Path) -> None:
    from ..errors import OptionError
    from ..writing import unwritable

    folder = plot.absolute().parent
    if not folder.is_dir():
        raise OptionError("plot", f"{plot}: the folder {folder} does not exist")
    why = unwritable(folder)
    if why is not None:
        raise OptionError("plot", f"{plot}: cannot write in {folder} ({why})")


def _verify_written(result, options: VerifyOptions, quiet: bool):
    """merge --verify: check the folder just written, reusing the merge's job, and record the
    verdict in its report."""
    from ..report import write_report

    verification = _verify(result.out, None, None, options, quiet, job=result.job,
                           written=f"the merged folder {result.out} was written; ")
    result.report["verification"] = verification.to_dict()
    with reported():
        write_report(result.out, result.report)
    return verification


def _dry_run(checkpoint: Path, base: Path | None, out_dir: Path | None, options: MergeOptions,
             console: Console) -> None:
    """What ``merge`` would do, every check included, with nothing written."""
    from ..job import prepare
    from ..writing import check_output_location

    with prepare(checkpoint, base, options) as job:
        target = out_dir if out_dir is not None else job.default_out
        check_output_location(target, [job.spec.path, job.base.path], options.force)
        render.print_plan(job, target, console)


def _verify(merged: Path, adapter: Path | None, base: Path | None, options: VerifyOptions, quiet: bool, *,
            job=None, written: str = ""):
    from ..verification import verify
    from .process import lean_transformers, tune_malloc

    tune_malloc(streaming=True)
    stopped = f"interrupted: {written}it was not verified" if written else "interrupted"
    with progress_display("verifying", quiet=quiet) as (progress, display), reported(display, stopped):
        try:
            return verify(merged, adapter, base=base, job=job, options=options, progress=progress,
                          before_imports=lean_transformers)
        except D2ExportError as exc:
            if not written:
                raise
            # say plainly that the folder exists and only the check could not run
            raise D2ExportError(f"{written}verification could not run: {message(exc)}") from exc
        finally:
            # merge --verify --onnx: the export allocates whole tensors over and over, and with
            # every block from 1 MiB mapped afresh each one is page-faulted again
            tune_malloc()


@app.command("verify")
@shared_verify_flags
def verify_cmd(
    merged: Annotated[Path, typer.Argument(help="Merged model folder (by d2export or another tool).")],
    adapter: AdapterOption,
    base: BaseOption = None,
    revision: RevisionOption = None,
    trainer_checkpoint: TrainerCheckpointOption = None,
    max_task_gap: Annotated[float | None, typer.Option(help=help_of(Thresholds, "max_task_gap_pp"))] = None,
    weights_only: Annotated[bool, typer.Option("--weights-only", help="Skip the output and task checks.")] = False,
    no_peft: Annotated[bool, typer.Option("--no-peft", help="Skip PEFT's unmerged model as a reference.")] = False,
    seed: Annotated[int, typer.Option(help=help_of(VerifyOptions, "seed"))] = 0,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
    verify_flags: dict | None = None,
) -> None:
    """Check a merged folder against the adapter: weights, outputs (and a task, with --task-data).
    Exit 1 if a check fails."""
    adapter = _adapter_folder(adapter, trainer_checkpoint)
    with reported():
        gap = {} if max_task_gap is None else {"max_task_gap_pp": max_task_gap}
        options = _verify_options(verify_flags, outputs=not weights_only, peft_reference=not no_peft, seed=seed,
                                  revision=revision, gap=gap)
    report = _verify(merged, adapter, base, options, quiet)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    render.print_verify(report, console=_report_console(as_json))
    if not report.passed:
        raise typer.Exit(1)


@app.command("onnx")
def onnx_cmd(
    merged: Annotated[Path, typer.Argument(help="Model folder to export (e.g. a merged one).")],
    out_dir: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: <merged>-onnx).")
                       ] = None,
    task: Annotated[str | None, typer.Option(help=help_of(OnnxOptions, "task"))] = None,
    opset: Annotated[int | None, typer.Option(help=help_of(OnnxOptions, "opset"))] = None,
    no_past: Annotated[bool, typer.Option("--no-past", help="Causal LMs: export without past key/values.")] = False,
    optimize: Annotated[str | None, typer.Option(help=help_of(OnnxOptions, "optimize"))] = None,
    quantize: Annotated[str | None, typer.Option(help=help_of(OnnxOptions, "quantize"))] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help=help_of(OnnxOptions, "fp16"))] = False,
    external_data: Annotated[bool, typer.Option(
        "--external-data", help="Always write model.onnx_data (default: when the weights pass 2 GB).")] = False,
    force: ForceOption = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the ONNX Runtime check.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print onnx_report.json on stdout.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Export a model folder to ONNX through optimum and check it with ONNX Runtime against PyTorch.
    Exit 1 if the check fails (the files are written, and the report says so)."""
    with reported():
        options = OnnxOptions(task=task, opset=opset, past=not no_past, optimize=optimize, quantize=quantize,
                              fp16=fp16, external_data=True if external_data else None, force=force,
                              validate=not no_validate)
    result = _onnx(merged, out_dir, options, quiet, _report_console(as_json))
    if as_json:
        print(json.dumps(result.report, indent=2))
    if not result.passed:
        raise typer.Exit(1)


def _onnx(model_dir: Path, out_dir: Path | None, options: OnnxOptions, quiet: bool, console: Console,
          written: str = ""):
    """``written``: what ``merge --onnx`` wrote before (said when the export is stopped)."""
    from ..onnx import export_onnx

    stopped = f"interrupted: {written}no ONNX export was written" if written else "interrupted: no output was written"
    with progress_display("ONNX", quiet=quiet) as (progress, display), reported(display, stopped):
        result = export_onnx(model_dir, out_dir, options=options, progress=progress)
    render.print_onnx(result.report, result.out, console)
    return result


@app.command("bench")
def bench_cmd(
    merged: Annotated[Path, typer.Argument(help="Merged model folder.")],
    adapter: AdapterOption,
    base: BaseOption = None,
    revision: RevisionOption = None,
    onnx_dir: Annotated[Path | None, typer.Option(
        "--onnx", help="ONNX export to time too (default: <merged>-onnx when it exists).")] = None,
    trainer_checkpoint: TrainerCheckpointOption = None,
    batch_sizes: Annotated[str, typer.Option(help=help_of(BenchOptions, "batch_sizes"))] = "1,4",
    seq_lens: Annotated[str, typer.Option(help=help_of(BenchOptions, "seq_lens"))] = "32,128",
    warmup: Annotated[int, typer.Option(help=help_of(BenchOptions, "warmup"))] = 2,
    repeats: Annotated[int, typer.Option(help=help_of(BenchOptions, "repeats"))] = 10,
    threads: Annotated[int | None, typer.Option(help=help_of(BenchOptions, "threads"))] = None,
    dtype: Annotated[str, typer.Option(help=help_of(BenchOptions, "dtype"))] = "float32",
    as_json: JsonOption = False,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of throughput per model and shape.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Throughput and latency of the unmerged (run-time adapter), merged and base models, and an ONNX
    export, on the same random-token prefill at each batch size x sequence length."""
    from ..bench import plot_report, require_matplotlib, run_bench

    adapter = _adapter_folder(adapter, trainer_checkpoint)
    with reported():
        options = BenchOptions(batch_sizes=batch_sizes, seq_lens=seq_lens, warmup=warmup, repeats=repeats,
                               threads=threads, dtype=dtype, revision=revision)
        if plot is not None:
            require_matplotlib()  # fail before minutes of timing, not after, as a place it cannot write
            _check_plot_location(plot)
    with progress_display("benchmark", quiet=quiet) as (progress, display), reported(display):
        report = run_bench(merged, adapter, base=base, onnx_dir=onnx_dir, options=options, progress=progress)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    render.print_bench(report, console=_report_console(as_json))
    if plot is not None:
        with reported():
            err.print(f"plot written to {plot_report(report, plot)}", highlight=False, markup=False)
