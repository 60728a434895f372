"""Merge at 7B scale: a Llama-7B-shaped bf16 model (hidden 4096, intermediate 11008, 32 layers,
vocab 32000: 6.7B parameters, 13.5 GB) built on disk from random weights, with a rank-16 D2-LoRA
adapter on every linear layer. d2export's CLI merges it (target: peak RSS under 3 GB, wall time
reported); then PEFT's path is attempted on a LoRA adapter of the same shape under a memory cap
(the process is killed when its RSS passes the cap, as the OOM killer would on a smaller machine)
and its outcome reported.

Opt-in, it needs about 41 GB of free disk (base, two outputs) and about 4 minutes on 2 cores:

    python bench/merge_scale.py --run [--peft-cap-gb 16] [--workdir /tmp/d2export-bench] [--keep]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from synthetic import MB, PRESETS, build, d2export_command, measure, peft_command, write_results

RSS_TARGET = 3 * 10**9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="store_true", help="really build the 13.5 GB model and merge it")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench"))
    parser.add_argument("--peft-cap-gb", type=float, default=16.0, help="memory cap for PEFT's attempt (GB)")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the model and outputs")
    args = parser.parse_args(argv)
    shape = PRESETS["7b"]
    model_bytes = 2 * shape.params
    need = 3 * model_bytes
    if not args.run:
        print(f"{__doc__}\nThis builds {model_bytes / 1e9:.1f} GB; pass --run to do it (needs ~{need / 1e9:.0f} GB).")
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < need:
        raise SystemExit(f"{args.workdir}: {free / 1e9:.0f} GB free, need about {need / 1e9:.0f} GB")
    base, adapters = build(args.workdir, shape, ("d2lora", "lora"))
    folder = args.workdir / shape.key
    record: dict = {"model": {"shape": shape.__dict__, "params": shape.params, "bytes": model_bytes, "rank": 16}}
    try:
        out = folder / "out-d2export-d2lora"
        ours = measure(d2export_command(base, adapters["d2lora"], out))
        if ours.returncode != 0:
            raise SystemExit(f"d2export failed:\n{ours.stderr_tail}")
        shutil.rmtree(out, ignore_errors=True)
        record["d2export"] = ours.to_dict()
        print(f"d2export merge (D2-LoRA r16): {ours.wall_s:,.0f} s, peak RSS {ours.peak_rss / MB:,.0f} MB "
              f"({ours.peak_rss / model_bytes:.3f} of the model); target < {RSS_TARGET / 1e9:.0f} GB: "
              f"{'met' if ours.peak_rss < RSS_TARGET else 'MISSED'}", flush=True)
        if not args.skip_peft:
            cap = int(args.peft_cap_gb * 1e9)
            out = folder / "out-peft-lora"
            theirs = measure(peft_command(base, adapters["lora"], out), cap_bytes=cap)
            shutil.rmtree(out, ignore_errors=True)
            outcome = ("killed at the cap" if theirs.killed_at_cap else
                       "finished" if theirs.returncode == 0 else f"failed (exit {theirs.returncode})")
            record["peft"] = {**theirs.to_dict(), "cap_bytes": cap, "outcome": outcome}
            print(f"PEFT merge_and_unload (LoRA r16) under a {args.peft_cap_gb:g} GB cap: {outcome} after "
                  f"{theirs.wall_s:,.0f} s, peak RSS {theirs.peak_rss / MB:,.0f} MB", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    write_results("merge_scale", record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
