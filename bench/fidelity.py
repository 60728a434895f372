"""Merge fidelity, d2export against PEFT: on the 320M bf16 Llama of merge_vs_peft.py (LoRA and
DoRA, rank 16 on every linear layer), each tool's merged tensors are checked against the exact
float64 merge with d2export's weight-level verification: the fraction of elements that are the
correctly rounded value, the largest error in bf16 units at the operands' scale, the largest
absolute error, and whether every untouched tensor is the base's exact bytes.

    python bench/fidelity.py                 # about 1 minute on 2 cores (reuses merge_vs_peft's models)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from synthetic import PRESETS, build, d2export_command, measure, peft_command, print_table, write_results

from d2export import verify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/d2export-bench"))
    parser.add_argument("--methods", default="lora,dora")
    args = parser.parse_args(argv)
    shape = PRESETS["320m"]
    methods = tuple(m for m in args.methods.split(",") if m)
    base, adapters = build(args.workdir, shape, methods)
    rows, results = [], []
    for method in methods:
        for tool in ("peft", "d2export"):
            out = args.workdir / shape.key / f"out-{tool}-{method}"
            if not (out / "config.json").is_file():
                ran = measure((peft_command if tool == "peft" else d2export_command)(base, adapters[method], out))
                if ran.returncode != 0:
                    raise SystemExit(f"{tool} {method} failed:\n{ran.stderr_tail}")
            report = verify(out, adapters[method], base=base, outputs=False)
            s = report.weights.summary()
            results.append({"method": method, "tool": tool, "passed": report.passed, **s,
                            "failures": report.failures[:5]})
            rows.append([method, tool, f"{s['exact_fraction']:.4%}", f"{s['min_exact_fraction']:.4%}",
                         f"{s['max_units']:.2f}", f"{s['max_abs']:.2e}",
                         f"{s['copies_identical']}/{s['copied_tensors']}", "pass" if report.passed else "FAIL"])
            print(f"{method} {tool}: done", flush=True)
    print(f"\n{shape.params / 1e6:,.0f}M-parameter bf16 Llama, rank 16 on all linear layers; every merged tensor "
          "against the exact float64 merge:")
    print_table(["method", "tool", "correctly rounded", "worst tensor", "max error (bf16 units)", "max abs error",
                 "untouched identical", "verify"], rows)
    write_results("fidelity", {"model": {"shape": shape.__dict__, "params": shape.params}, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
