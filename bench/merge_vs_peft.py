"""Merge speed and memory, d2export against PEFT, side by side in one run.

A bf16 Llama of about 320M parameters (hidden 1024, intermediate 2816, 20 layers, vocab 32000,
200 MB shards) with a rank-16 adapter on every linear layer, for LoRA, DoRA and D2-LoRA:

* PEFT's path: ``from_pretrained`` + ``PeftModel.from_pretrained`` + ``merge_and_unload`` +
  ``save_pretrained`` (bench/peft_merge.py); PEFT has no D2-LoRA, so that row is d2export only;
* d2export's path: the CLI, ``d2export merge ADAPTER --base BASE --out OUT`` with its defaults
  (float64 arithmetic, single rounding, input sha256s in the report).

Each is a fresh process, measured whole by GNU time: wall time and peak RSS. Runs alternate
between the tools and the median of ``--repeats`` is reported. Targets (issue 5): d2export at most
a third of PEFT's wall time, and a peak RSS under 0.4x the model's bytes.

    python bench/merge_vs_peft.py                    # 1-2 minutes on 2 cores, 3 GB of disk
    python bench/merge_vs_peft.py --repeats 3 --methods lora,d2lora --workdir /tmp/bench
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from synthetic import MB, PRESETS, build, d2export_command, measure, peft_command, print_table, write_results

WALL_TARGET = 1 / 3  # d2export's wall time / PEFT's
RSS_TARGET = 0.4  # d2export's peak RSS / the model's bytes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench"))
    parser.add_argument("--methods", default="lora,dora,d2lora")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    shape = PRESETS["320m"]
    methods = tuple(m for m in args.methods.split(",") if m)
    base, adapters = build(args.workdir, shape, methods, r=args.rank)
    model_bytes = 2 * shape.params
    runs: dict[tuple[str, str], list] = {}
    for rep in range(args.repeats):
        for method in methods:
            tools = ["d2export"] if method == "d2lora" else ["peft", "d2export"]
            for tool in tools if rep % 2 == 0 else tools[::-1]:  # alternate who runs first
                out = args.workdir / shape.key / f"out-{tool}-{method}"
                shutil.rmtree(out, ignore_errors=True)
                command = (peft_command if tool == "peft" else d2export_command)(base, adapters[method], out)
                result = measure(command)
                if result.returncode != 0:
                    print(result.stderr_tail, file=sys.stderr)
                    raise SystemExit(f"{tool} {method} failed (exit {result.returncode})")
                runs.setdefault((method, tool), []).append(result)
                print(f"{method:7} {tool:8} run {rep + 1}: {result.wall_s:6.1f} s, peak RSS "
                      f"{result.peak_rss / MB:7,.0f} MB", flush=True)

    # What the d2export process spends before merging anything: its imports (torch among them).
    startup = [measure([sys.executable, "-c", "import d2export.cli, d2export.merging"]) for _ in range(args.repeats)]
    startup_wall = statistics.median(r.wall_s for r in startup)
    startup_rss = statistics.median(r.peak_rss for r in startup)

    rows, summary = [], []
    for method in methods:
        medians = {}
        for tool in ("peft", "d2export"):
            if (method, tool) not in runs:
                continue
            results = runs[(method, tool)]
            medians[tool] = (statistics.median(r.wall_s for r in results),
                             statistics.median(r.peak_rss for r in results))
        wall, rss = medians["d2export"]
        entry = {"method": method, "d2export_wall_s": wall, "d2export_peak_rss": rss,
                 "d2export_rss_over_model": rss / model_bytes}
        peft = medians.get("peft")
        if peft:
            entry.update(peft_wall_s=peft[0], peft_peak_rss=peft[1], wall_ratio=wall / peft[0],
                         rss_ratio=rss / peft[1])
        summary.append(entry)
        rows.append([method,
                     f"{peft[0]:.1f}" if peft else "n/a (no D2-LoRA in PEFT)", f"{wall:.1f}",
                     f"{wall / peft[0]:.2f}" if peft else "-",
                     f"{peft[1] / MB:,.0f}" if peft else "-", f"{rss / MB:,.0f}",
                     f"{rss / peft[1]:.2f}" if peft else "-", f"{rss / model_bytes:.2f}"])
    print(f"\n{shape.params / 1e6:,.0f}M-parameter bf16 Llama ({model_bytes / MB:,.0f} MB), rank {args.rank} on all "
          f"linear layers, median of {args.repeats}:")
    print_table(["method", "PEFT s", "d2export s", "time ratio", "PEFT peak MB", "d2export peak MB", "RSS ratio",
                 "d2export RSS / model"], rows)
    ratios = [e["wall_ratio"] for e in summary if "wall_ratio" in e]
    worst_rss = max(e["d2export_rss_over_model"] for e in summary)
    print(f"target time ratio <= {WALL_TARGET:.2f}: {'met' if ratios and max(ratios) <= WALL_TARGET else 'MISSED'} "
          f"(worst {max(ratios):.2f})" if ratios else "")
    print(f"target d2export RSS / model < {RSS_TARGET}: {'met' if worst_rss < RSS_TARGET else 'MISSED'} "
          f"(worst {worst_rss:.2f})")
    print(f"of each d2export run, importing d2export alone takes {startup_wall:.1f} s and "
          f"{startup_rss / MB:,.0f} MB ({startup_rss / model_bytes:.2f} of the model)")
    write_results("merge_vs_peft", {
        "model": {"shape": shape.__dict__, "params": shape.params, "bytes": model_bytes, "rank": args.rank},
        "repeats": args.repeats, "summary": summary,
        "runs": {f"{m}/{t}": [r.to_dict() for r in rs] for (m, t), rs in runs.items()},
        "targets": {"wall_ratio": WALL_TARGET, "rss_over_model": RSS_TARGET},
        "d2export_startup": {"wall_s": startup_wall, "peak_rss": startup_rss, "runs": [r.to_dict() for r in startup]},
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
