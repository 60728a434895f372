"""Serving throughput, unmerged against merged: ``d2export bench`` on the 320M Llama of
merge_vs_peft.py with a rank-16 D2-LoRA adapter on every linear layer.

Merges the adapter with the CLI (reusing an earlier merge), exports it to ONNX with an int8 copy
(``--no-onnx`` skips that), then runs ``d2export bench`` on the merged folder: the unmerged model
(base + run-time D2-LoRA layers, norms recomputed every forward as in training), the merged model,
the base, and ONNX Runtime, on the same random-token prefill, in float32. Prints the table and
the ratios (the paper: merging recovers about 1.91x evaluation throughput), and writes
``bench/results/throughput.json`` and ``throughput.png``.

    python bench/throughput.py              # about 10 minutes on 2 cores, 5 GB of disk
    python bench/throughput.py --no-onnx --batch-sizes 1 --seq-lens 128 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from synthetic import PRESETS, build, d2export_command, measure, write_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench"))
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--seq-lens", default="128,512")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-onnx", action="store_true", help="time the PyTorch models only")
    args = parser.parse_args(argv)
    shape = PRESETS["320m"]
    base, adapters = build(args.workdir, shape, ("d2lora",))
    merged = args.workdir / shape.key / "out-d2export-d2lora"
    if not (merged / "config.json").is_file():
        ran = measure(d2export_command(base, adapters["d2lora"], merged))
        if ran.returncode != 0:
            raise SystemExit(f"merge failed:\n{ran.stderr_tail}")
    onnx = merged.parent / f"{merged.name}-onnx"
    if not args.no_onnx and not (onnx / "onnx_report.json").is_file():
        print("exporting to ONNX (float32 + int8) ...", flush=True)
        subprocess.run(["d2export", "onnx", str(merged), "--out", str(onnx), "--force", "--quantize", "int8"],
                       check=True)
    results = Path(__file__).with_name("results")
    results.mkdir(exist_ok=True)
    command = ["d2export", "bench", str(merged), "--adapter", str(adapters["d2lora"]), "--base", str(base),
               "--batch-sizes", args.batch_sizes, "--seq-lens", args.seq_lens, "--repeats", str(args.repeats),
               "--json", "--plot", str(results / "throughput.png")]
    if not args.no_onnx:
        command += ["--onnx", str(onnx)]
    ran = subprocess.run(command, stdout=subprocess.PIPE, text=True)  # the table is printed on stderr
    if ran.returncode != 0:
        raise SystemExit(f"d2export bench failed (exit {ran.returncode})")
    write_results("throughput", {"model": {"shape": shape.__dict__, "params": shape.params, "rank": 16},
                                 "command": command, "bench": json.loads(ran.stdout)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
