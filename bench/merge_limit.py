"""Merge time against the machine's limit: `cp -r` of the same base folder (the same bytes read and
written, nothing computed), at the 320M and the 7B shape, with PEFT's merge beside, in one run.

Each command is a fresh process measured whole by GNU time (wall time and peak RSS), so the CLI's
start-up counts. The tools alternate and repeat, and medians are reported: other work on the
machine moves absolute times, so read the ratios. Targets (issue 15): d2export's merge at most 3x
the copy at 320M and 1.2x at 7B, at least 2x faster than PEFT at 7B, and a peak RSS under 0.5 GB at
7B whatever the rank.

    python bench/merge_limit.py                       # both shapes; about 20 minutes, 45 GB of disk
    python bench/merge_limit.py --shapes 320m --repeats 5
    python bench/merge_limit.py --shapes 7b --ranks 16,64 --repeats 1 --keep
    python bench/merge_limit.py --shapes 7b --cold     # as root: page cache emptied before each command
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

from synthetic import (
    MB,
    PRESETS,
    build,
    d2export_command,
    measure,
    peft_command,
    print_table,
    write_adapter,
    write_results,
)

COPY_TARGET = {"320m": 3.0, "7b": 1.2}  # d2export wall time / cp -r wall time
PEFT_TARGET = 2.0  # PEFT's wall time / d2export's, at 7B
RSS_TARGET = 0.5e9  # bytes, at 7B


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench"))
    parser.add_argument("--shapes", default="320m,7b")
    parser.add_argument("--repeats", type=int, default=3, help="rounds at 320M (7B: --repeats-7b)")
    parser.add_argument("--repeats-7b", type=int, default=1)
    parser.add_argument("--ranks", default="16,64", help="D2-LoRA ranks merged (the first one also as LoRA)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the models (default: delete the 7B one)")
    parser.add_argument("--cold", action="store_true",
                        help="empty the page cache before every command (root): each one reads its input from disk")
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",") if r]
    record: dict = {"startup": startup(args.repeats), "page_cache": "cold" if args.cold else "warm"}
    print(f"d2export --help: {record['startup']['wall_s']:.2f} s (median of {args.repeats})", flush=True)
    for key in (k for k in args.shapes.split(",") if k):
        repeats = args.repeats if key == "320m" else args.repeats_7b
        record[key] = run_shape(args, key, ranks, repeats)
    summarise(record)
    write_results("merge_limit_cold" if args.cold else "merge_limit", record)
    return 0


def startup(repeats: int) -> dict:
    runs = [measure(["d2export", "--help"]) for _ in range(repeats)]
    return {"wall_s": statistics.median(r.wall_s for r in runs),
            "peak_rss": statistics.median(r.peak_rss for r in runs)}


def run_shape(args, key: str, ranks: list[int], repeats: int) -> dict:
    shape = PRESETS[key]
    base, adapters = build(args.workdir, shape, ("d2lora", "lora"), r=ranks[0])
    folder = args.workdir / shape.key
    for r in ranks[1:]:
        extra = folder / f"adapter-d2lora-r{r}"
        if not (extra / "adapter_config.json").is_file():
            write_adapter(extra, base, shape, "d2lora", r=r)
        adapters[f"d2lora-r{r}"] = extra
    adapters[f"d2lora-r{ranks[0]}"] = adapters.pop("d2lora")
    adapters[f"lora-r{ranks[0]}"] = adapters.pop("lora")
    out = folder / "out"
    commands = {"cp -r": ["cp", "-r", str(base), str(out)]}
    for name, adapter in adapters.items():
        commands[f"d2export {name}"] = d2export_command(base, adapter, out)
    if not args.skip_peft:
        commands[f"PEFT lora-r{ranks[0]}"] = peft_command(base, adapters[f"lora-r{ranks[0]}"], out)
    runs: dict[str, list] = {}
    try:
        for rep in range(repeats):
            order = list(commands) if rep % 2 == 0 else list(commands)[::-1]  # alternate who runs first
            for name in order:
                shutil.rmtree(out, ignore_errors=True)
                result = measure(commands[name], cold=args.cold)
                shutil.rmtree(out, ignore_errors=True)
                if result.returncode != 0:
                    raise SystemExit(f"{name} failed (exit {result.returncode}):\n{result.stderr_tail}")
                runs.setdefault(name, []).append(result)
                print(f"{key:5} {name:22} run {rep + 1}: {result.wall_s:7.1f} s, CPU {result.cpu_s:7.1f} s, "
                      f"peak RSS {result.peak_rss / MB:8,.0f} MB", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        if key == "7b" and not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return {"model_bytes": 2 * shape.params, "params": shape.params, "repeats": repeats,
            "runs": {name: [r.to_dict() for r in rs] for name, rs in runs.items()},
            "median": {name: {"wall_s": statistics.median(r.wall_s for r in rs),
                              "cpu_s": statistics.median(r.cpu_s for r in rs),
                              "peak_rss": statistics.median(r.peak_rss for r in rs)} for name, rs in runs.items()}}


def summarise(record: dict) -> None:
    for key in ("320m", "7b"):
        if key not in record:
            continue
        med = record[key]["median"]
        copy = med["cp -r"]["wall_s"]
        peft = next((v for k, v in med.items() if k.startswith("PEFT")), None)
        rows = []
        for name, m in med.items():
            rows.append([name, f"{m['wall_s']:.1f}", f"{m['cpu_s']:.1f}", f"{m['wall_s'] / copy:.2f}",
                         f"{peft['wall_s'] / m['wall_s']:.2f}" if peft and name.startswith("d2export") else "-",
                         f"{m['peak_rss'] / MB:,.0f}"])
        print(f"\n{key}: {record[key]['model_bytes'] / MB:,.0f} MB bf16 base, {record['page_cache']} page cache, "
              f"median of {record[key]['repeats']}:")
        print_table(["command", "wall s", "CPU s", "x cp -r", "PEFT / this", "peak RSS MB"], rows)
        ours = {k: v for k, v in med.items() if k.startswith("d2export")}
        worst = max(v["wall_s"] for v in ours.values()) / copy
        verdict = [f"merge / copy <= {COPY_TARGET[key]}: {'met' if worst <= COPY_TARGET[key] else 'MISSED'} "
                   f"(worst {worst:.2f})"]
        if key == "7b":
            if peft:
                lead = peft["wall_s"] / max(v["wall_s"] for v in ours.values())
                verdict.append(f"PEFT / merge >= {PEFT_TARGET}: {'met' if lead >= PEFT_TARGET else 'MISSED'} "
                               f"(worst {lead:.2f})")
            rss = max(v["peak_rss"] for v in ours.values())
            verdict.append(f"peak RSS < {RSS_TARGET / 1e9:.1f} GB at every rank: "
                           f"{'met' if rss < RSS_TARGET else 'MISSED'} (worst {rss / MB:,.0f} MB)")
        print("targets: " + "; ".join(verdict))


if __name__ == "__main__":
    sys.exit(main())
