"""The ``d2export`` command: a thin typer layer over the Python API.

Exit codes: 0 ok, 1 verification failed, 2 bad input or usage (one line on stderr; the traceback
only with ``--debug``).
"""

from __future__ import annotations

import json
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
err = Console(stderr=True)
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
) -> None:
    """Merge an adapter into its base model and write a Hugging Face model folder."""
    from .merge import merge

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("merging", total=None)

        def progress(name: str, nbytes: int, total: int) -> None:
            bar.update(task, total=total, advance=nbytes, description=name[-48:])

        try:
            result = merge(checkpoint, base=base, out=out_dir, dtype=dtype, compute_dtype=compute_dtype,
                           max_shard_size=max_shard_size, force=force, hash_inputs=not no_hash,
                           progress=progress)
        except D2ExportError as exc:
            bar.stop()
            _fail(exc)
        except KeyboardInterrupt:
            bar.stop()
            err.print("interrupted: no output was written")
            raise typer.Exit(130) from None
    report = result.report
    if as_json:
        print(json.dumps(report, indent=2))
    t = report["tensors"]
    err.print(f"merged {report['method']} into {escape(str(result.out))}: {t['merge']} tensors merged, "
              f"{t['unselected']} left as base (DiffoRA), {t['replace']} replaced, {t['bias']} biases, "
              f"{report['output']['total_bytes'] / 1e6:,.1f} MB in {len(report['output']['shards'])} shard(s)",
              highlight=False)
    for note in report["notes"]:
        err.print(f"note: {note}", highlight=False, markup=False)


def run() -> None:
    try:
        app()
    except D2ExportError as exc:  # raised outside a command body, or re-raised for --debug
        if _debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
