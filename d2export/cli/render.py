"""How each command's result reads on a terminal: tables and one-line summaries (the JSON output
is the result's own ``to_dict``/report, printed as is)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .process import out

MAX_FAILURE_LINES = 20


def print_inspect(info: dict) -> None:
    plan = info["merge_plan"]
    base = plan["base"] if plan and plan["available"] else None  # the base the plan was made against
    named = info["base_model_name_or_path"]
    out.print(f"[bold]{escape(info['adapter'])}[/]  method [cyan]{info['method']}[/]  "
              f"base {escape(str(base if base is not None else named))}"
              + ("" if base is None or str(named) in (base, "None") else f" (the adapter names {escape(str(named))})"))
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
    if plan and plan["available"]:
        t = plan["tensors"]
        out.print(f"merge would write {plan['total_bytes'] / 1e6:,.1f} MB in {len(plan['shards'])} shard(s): "
                  f"{t['merge']} merged, {t['bias']} biases, {t['replace']} replaced, "
                  f"{t['copy'] + t['unselected']} copied")
        for note in plan["notes"]:
            out.print(f"note: {note}", markup=False)
    elif plan:
        out.print(f"[yellow]merge plan unavailable:[/] {escape(plan['reason'])}")


def print_plan(job, out_dir: Path, console: Console) -> None:
    """``merge --dry-run``: what would be written where."""
    from ..plan import Action

    plan = job.plan
    counts = {a: sum(t.action is a for t in plan.tensors) for a in Action}
    console.print(f"dry run: would merge {job.spec.method} from {escape(str(job.spec.path))} into the base "
              f"{escape(base_phrase(job.source, job.base.path))} and write {escape(str(out_dir))}: "
              f"{counts[Action.MERGE]} tensors merged, "
              f"{counts[Action.UNSELECTED]} left as base (DiffoRA), {counts[Action.REPLACE]} replaced, "
              f"{counts[Action.BIAS]} biases, {plan.total_bytes / 1e6:,.1f} MB in {len(plan.shards)} shard(s); "
              "nothing written", highlight=False)
    for note in plan.notes:
        console.print(f"note: {note}", highlight=False, markup=False)


def base_phrase(source, path: Path) -> str:
    """The base a command used, as one phrase: ``org/name@<snapshot> at <path>`` or the path."""
    return source.describe() if source is not None else str(path)


def print_merge(report: dict, out_dir: Path, console: Console) -> None:
    t = report["tensors"]
    base = report["base"]
    where = f"{base['repo_id']}@{base['snapshot']}" if base.get("snapshot") else base["path"]
    console.print(f"merged {report['method']} into {escape(str(out_dir))} (base {escape(where)}): "
              f"{t['merge']} tensors merged, "
              f"{t['unselected']} left as base (DiffoRA), {t['replace']} replaced, {t['bias']} biases, "
              f"{report['output']['total_bytes'] / 1e6:,.1f} MB in {len(report['output']['shards'])} shard(s)",
              highlight=False)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False, markup=False)


def print_onnx(report: dict, out_dir: Path, console: Console) -> None:
    files = ", ".join(f"{name} ({size / 1e6:,.1f} MB)" for name, size in report["files"].items()
                      if name.endswith((".onnx", ".onnx_data")))
    console.print(f"exported {report['task']} ({report['dtype']}, opset {report['opset']}"
              f"{', external data' if report['external_data'] else ''}) to {escape(str(out_dir))}: {files}",
              highlight=False)
    validation = report.get("validation")
    if validation:
        table = Table("file", "precision", "output", "max |d|", "rel", "mean |d|", "top-1", "decode step", "generate",
                      "", box=None, header_style="bold")
        # a sentence-transformers folder: also through SentenceTransformer(backend="onnx")
        st_check = validation.get("sentence_transformers") or {}
        graphs = [*validation["graphs"].items(), *((f"{f} (ST)", g) for f, g in st_check.get("graphs", {}).items())]
        for file, graph in graphs:
            decode = graph.get("decode_step")
            generate = graph.get("generate")
            for name, c in graph["outputs"].items():
                table.add_row(file, graph["precision"], name, f"{c['max_abs']:.2e}", f"{c['relative']:.1e}",
                              f"{c['mean_abs']:.1e}", "-" if c["top1"] is None else f"{c['top1']:.2%}",
                              "-" if decode is None else f"{decode['relative']:.1e}",
                              "-" if generate is None else f"{generate['matching']}/{generate['prompts']}",
                              "[green]ok[/]" if graph["passed"] else "[red]FAIL[/]")
        console.print(table)
        for _, graph in graphs:
            for failure in graph["failures"]:
                console.print(f"[red]FAIL[/] {escape(failure)}", highlight=False)
        if st_check.get("error"):
            console.print(f"[red]FAIL[/] {escape(st_check['error'])}", highlight=False)
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print("[bold green]ONNX export validated[/]" if report["passed"] and validation else
              "[bold red]ONNX validation FAILED[/]" if validation else "ONNX export not validated")


def share(fraction: float) -> str:
    """A fraction as a percentage that reads 100.00% only when it is 1: one element off in a million
    is not every element."""
    text = f"{fraction:.2%}"
    return "> 99.99%" if fraction < 1 and text == "100.00%" else text


def print_verify(report, console: Console) -> None:
    console.print(f"[bold]verify[/] {escape(str(report.merged))} ({report.merged_dtype}, written by "
                  f"{escape(report.merged_by)}) against the {report.method} adapter {escape(str(report.adapter))} "
                  f"on the base {escape(base_phrase(report.base_source, report.base))}",
                  highlight=False)
    w = report.weights
    if w is not None:
        s = w.summary()
        console.print(f"weights: {s['adapted_tensors']} adapted tensors, max error {s['max_units']:.2f} units "
                      f"(max abs {s['max_abs']:.2e}), {share(s['exact_fraction'])} of elements correctly rounded; "
                      f"{s['copies_identical']}/{s['copied_tensors']} other tensors identical to the base's "
                      f"(in the folder's dtype)" + (f"; {s['failed']} failed (below)" if s["failed"] else ""),
                      highlight=False)
    if report.outputs:
        console.print(f"outputs on {escape(report.calibration)}:", highlight=False)
        table = Table("rung", "model", "against", "run in", "max |d|", "scale", "rel", "mean |d|", "top-1", "mean KL",
                      "greedy", "", box=None, header_style="bold")
        for o in report.outputs:
            c, g = o.comparison, o.generation
            verdict = "" if not o.judged else "[green]ok[/]" if o.passed else "[red]FAIL[/]"
            table.add_row(o.rung, o.candidate, o.reference, o.dtype, f"{c.max_abs:.2e}", f"{c.scale:.3g}",
                          f"{c.relative:.1e}", f"{c.mean_abs:.1e}", "-" if c.top1 is None else f"{c.top1:.2%}",
                          "-" if c.mean_kl is None else f"{c.mean_kl:.1e}",
                          "-" if g is None else f"{g.identical}/{g.prompts}", verdict)
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
    for line in report.failures[:MAX_FAILURE_LINES]:
        console.print(f"[red]FAIL[/] {escape(line)}", highlight=False)
    if len(report.failures) > MAX_FAILURE_LINES:
        console.print(f"... and {len(report.failures) - MAX_FAILURE_LINES} more (see --json)")
    console.print("[bold green]PASSED[/]" if report.passed else "[bold red]FAILED[/]")


def print_bench(report, console: Console) -> None:
    from ..bench import UNMERGED

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
