"""Peak memory of ``d2export merge`` as the model grows: it should stay flat.

The merge streams tensor by tensor (one tensor read at a time, a streaming shard writer out), so
the merging process should need about the adapter plus one tensor's float64 working set, whatever
the model size. This script checks that on synthetic bf16 Llama-shaped models:

1. for each size, write a base model to disk shard by shard (never the whole model in memory)
   and a rank-16 D2-LoRA adapter on all seven linear layers of every decoder layer;
2. merge it in a fresh Python process that watches its own memory (``/proc/self/status``:
   ``VmHWM`` for the exact peak, and a sampling thread for the anonymous and file-backed parts);
3. print a table and write ``bench/results/merge_memory.json``.

A process that only imports d2export (numpy, safetensors; the merge path never imports torch) is
measured the same way, as the baseline.

    python bench/merge_memory.py                      # layers 4, 8, 16, 32 (about 1 minute on 2 cores)
    python bench/merge_memory.py --sizes 4,16,32 --keep --workdir /tmp/mm

Why not ``ru_maxrss``: on Linux a process's ``RUSAGE_SELF`` high-water mark survives ``execve``
and starts from the mm it replaced, which for ``subprocess`` (vfork) is the *parent's*: a child
started by a parent that once held 1 GB reports ``ru_maxrss`` of 1 GB even though its own peak is
14 MB. The parent here writes 200 MB shards. ``VmHWM`` belongs to the child's own address space
and is what the table reports; ``ru_maxrss`` is kept in the JSON for comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic import MB, Shape, machine, write_adapter, write_base

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "merge_memory.json"

# ---------------------------------------------------------------------------------------------
# The measuring child. Run as ``python -c CHILD MODE JSON_ARGS``; prints one JSON line at the end.
# ---------------------------------------------------------------------------------------------
CHILD = r"""
import json, os, resource, sys, threading, time

KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in KEYS:
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    # Peak anonymous / file-backed RSS, overall and per bucket (the output shard being written).
    def __init__(self, interval=0.005):
        super().__init__(daemon=True)
        self.interval, self.bucket, self.running = interval, "setup", True
        self.peaks, self.buckets = {}, {}

    def take(self):
        s = status()
        for key in ("VmRSS", "RssAnon", "RssFile"):
            self.peaks[key] = max(self.peaks.get(key, 0), s[key])
        b = self.buckets.setdefault(self.bucket, {"RssAnon": 0, "RssFile": 0, "VmRSS": 0})
        for key in b:
            b[key] = max(b[key], s[key])

    def run(self):
        while self.running:
            self.take()
            time.sleep(self.interval)

    def stop(self):
        self.running = False
        self.join()
        self.take()


mode, args = sys.argv[1], json.loads(sys.argv[2])
start_status = status()
sampler = Sampler()
sampler.start()
t0 = time.perf_counter()
import d2export  # noqa: E402
from d2export import merge  # noqa: E402

result = {"mode": mode, "import_s": time.perf_counter() - t0, "after_import": status()}
if mode == "merge":
    from safetensors import safe_open

    # The merge writes the base's tensors in the base's order (files, then each file's keys): label
    # each sample with the output shard of the tensor being produced.
    index = os.path.join(args["base"], "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    order = []
    for file in files:
        with safe_open(os.path.join(args["base"], file), framework="np") as f:
            order += [file] * len(list(f.keys()))
    done = [0, 0]

    def progress(name, written, total):  # (tensor just written, bytes written so far, bytes in all)
        done[0] = written
        done[1] += 1
        sampler.bucket = order[done[1]] if done[1] < len(order) else "finish"

    sampler.bucket = "plan"  # reading the adapter, planning; until the first tensor is done
    t1 = time.perf_counter()
    merge(args["adapter"], base=args["base"], out=args["out"], force=True, hash_inputs=False, progress=progress)
    result["merge_s"] = time.perf_counter() - t1
    result["torch_imported"] = "torch" in sys.modules  # the merge path should not need it
    result["bytes_written"] = done[0]
sampler.stop()
end = status()
result.update(
    vm_hwm=end["VmHWM"], peak_vm_rss_sampled=sampler.peaks["VmRSS"], peak_anon=sampler.peaks["RssAnon"],
    peak_file=sampler.peaks["RssFile"], end=end, start=start_status,
    ru_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, buckets=sampler.buckets,
)
print("RESULT " + json.dumps(result))
"""


def run_child(mode: str, args: dict) -> dict:
    # Flush what the parent just wrote (the base shards) first: otherwise the kernel's periodic
    # writeback of those dirty pages lands in the middle of the timed merge and makes it 2-7x slower
    # at random on a small VM disk (5 s -> 11-37 s seen). The merge's own output is not synced (not part of its time).
    os.sync()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, json.dumps(args)], capture_output=True, text=True,
                          env=env, check=False)
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the {mode} child failed (exit {proc.returncode}); output above")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["process_s"] = wall
    return result


# ---------------------------------------------------------------------------------------------
# Synthetic models: synthetic.py writes them shard by shard; here, what each one came to on disk.
# ---------------------------------------------------------------------------------------------
def build_model(folder: Path, shape: Shape, shard_bytes: int, seed: int, rank: int) -> tuple[Path, Path, dict]:
    """A bf16 Llama base and a rank-``rank`` D2-LoRA adapter on every linear layer; their sizes."""
    base, adapter = folder / "base", folder / "adapter"
    model_bytes = write_base(base, shape, shard_bytes=shard_bytes, seed=seed)
    write_adapter(adapter, base, shape, "d2lora", r=rank, seed=seed + 1000)
    shard_sizes = [f.stat().st_size for f in base.glob("*.safetensors")]
    info = {"model_bytes": model_bytes, "files_bytes": sum(shard_sizes), "shards": len(shard_sizes),
            "largest_shard_bytes": max(shard_sizes),
            "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size}
    return base, adapter, info


def check_output(base: Path, out: Path) -> dict:
    """Cheap sanity check of the merge: same tensors as the base, q_proj of layer 0 changed, its row
    norms kept (D2-LoRA's norm projection), an unadapted tensor copied bit for bit."""
    import torch
    from safetensors import safe_open

    def weights(folder: Path) -> tuple[dict, bool]:
        """tensor -> file, and whether transformers would find the weights (an index or model.safetensors)."""
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            return json.loads(index.read_text())["weight_map"], True
        weight_map = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
        return weight_map, (folder / "model.safetensors").is_file()

    base_map, _ = weights(base)
    out_map, loadable = weights(out)

    def read(folder: Path, weight_map: dict, name: str) -> torch.Tensor:
        with safe_open(folder / weight_map[name], framework="pt") as f:
            return f.get_tensor(name)

    q = "model.layers.0.self_attn.q_proj.weight"
    w0, w1 = read(base, base_map, q).double(), read(out, out_map, q).double()
    n0, n1 = torch.linalg.vector_norm(w0, dim=1), torch.linalg.vector_norm(w1, dim=1)
    e0, e1 = read(base, base_map, "model.norm.weight"), read(out, out_map, "model.norm.weight")
    checks = {
        "loadable_layout": loadable,
        "same_tensor_names": set(base_map) == set(out_map),
        "q_proj_changed_max_abs": float((w1 - w0).abs().max()),
        "q_proj_row_norm_max_rel_err": float(((n1 - n0).abs() / n0).max()),
        "norm_copied_exactly": bool(torch.equal(e0, e1)),
    }
    ok = (checks["loadable_layout"] and checks["same_tensor_names"] and checks["q_proj_changed_max_abs"] > 0
          and checks["q_proj_row_norm_max_rel_err"] < 1e-2 and checks["norm_copied_exactly"])
    checks["ok"] = ok
    return checks


def fmt_mb(n: float) -> str:
    return f"{n / MB:,.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="4,8,16,32", help="comma-separated decoder layer counts (default 4,8,16,32)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--shard-mb", type=float, default=200, help="base shard size in MB (default 200)")
    parser.add_argument("--workdir", type=Path, help="where models are built (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built models and merged outputs")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"JSON output (default {RESULTS})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="d2export-bench-", dir=args.workdir))
    # The largest base plus its merged copy (more with --keep, which keeps every size).
    per_layer = 2 * (4 * args.hidden**2 + 3 * args.hidden * args.intermediate)
    need = [2 * (2 * args.vocab * args.hidden + n * per_layer) for n in sizes]
    need_bytes = sum(need) if args.keep else max(need)
    free = shutil.disk_usage(work).free
    print(f"workdir {work}: {free / 1e9:,.1f} GB free, this run needs about {need_bytes / 1e9:,.1f} GB")
    if free < need_bytes * 1.2:
        shutil.rmtree(work, ignore_errors=True)
        raise SystemExit("not enough free disk space; pass --workdir elsewhere or fewer --sizes")

    info = machine()
    print(f"machine: {info['cpu_count']} CPUs, "
          f"RAM {info.get('ram_bytes', 0) / 2**30:,.1f} GiB, {info['platform']}")
    runs = []
    try:
        print("baseline: a process that imports d2export ...", flush=True)
        baseline = run_child("baseline", {})
        print(f"  peak RSS {fmt_mb(baseline['vm_hwm'])} MB")
        for layers in sizes:
            folder = work / f"llama-{layers}L"
            shape = Shape(layers=layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab)
            t0 = time.perf_counter()
            base, adapter, sizes_info = build_model(folder, shape, int(args.shard_mb * MB), args.seed + layers,
                                                    args.rank)
            out = folder / "merged"
            build_s = time.perf_counter() - t0
            print(f"{layers} layers: built {fmt_mb(sizes_info['model_bytes'])} MB in {sizes_info['shards']} shards "
                  f"+ {fmt_mb(sizes_info['adapter_bytes'])} MB adapter ({build_s:.1f} s); merging ...", flush=True)
            child = run_child("merge", {"adapter": str(adapter), "base": str(base), "out": str(out)})
            checks = check_output(base, out)
            largest_merged = max(args.intermediate * args.hidden, args.hidden**2)
            run = {
                "layers": layers, "hidden": args.hidden, "intermediate": args.intermediate, "vocab": args.vocab,
                "rank": args.rank, **sizes_info, "build_s": build_s,
                "largest_tensor_bytes": 2 * args.vocab * args.hidden,
                "largest_merged_tensor_f64_bytes": 8 * largest_merged,
                "peak_rss": child["vm_hwm"], "peak_rss_over_baseline": child["vm_hwm"] - baseline["vm_hwm"],
                "peak_anon": child["peak_anon"], "peak_file": child["peak_file"],
                "peak_anon_over_baseline": child["peak_anon"] - baseline["peak_anon"],
                "rss_over_model": child["vm_hwm"] / sizes_info["model_bytes"],
                "merge_s": child["merge_s"], "process_s": child["process_s"], "output_check": checks,
                "child": child,
            }
            runs.append(run)
            print(f"  peak RSS {fmt_mb(run['peak_rss'])} MB (anon {fmt_mb(run['peak_anon'])}, "
                  f"file-backed {fmt_mb(run['peak_file'])}), merge {run['merge_s']:.1f} s, "
                  f"output check {'ok' if checks['ok'] else 'FAILED ' + json.dumps(checks)}", flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    header = ("layers", "model MB", "shards", "largest shard MB", "adapter MB", "peak RSS MB", "RSS - baseline",
              "peak anon MB", "anon - baseline", "peak file MB", "RSS/model", "merge s")
    rows = [(str(r["layers"]), fmt_mb(r["model_bytes"]), str(r["shards"]), fmt_mb(r["largest_shard_bytes"]),
             fmt_mb(r["adapter_bytes"]), fmt_mb(r["peak_rss"]), fmt_mb(r["peak_rss_over_baseline"]),
             fmt_mb(r["peak_anon"]), fmt_mb(r["peak_anon_over_baseline"]), fmt_mb(r["peak_file"]),
             f"{r['rss_over_model']:.2f}", f"{r['merge_s']:.1f}")
            for r in runs]
    rows.insert(0, ("baseline", "-", "-", "-", "-", fmt_mb(baseline["vm_hwm"]), "0.0", fmt_mb(baseline["peak_anon"]),
                    "0.0", fmt_mb(baseline["peak_file"]), "-", "-"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print()
    print("| " + " | ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")

    first, last = runs[0], runs[-1]
    print(f"\nfrom {first['layers']} to {last['layers']} layers the model grew "
          f"{fmt_mb(last['model_bytes'] - first['model_bytes'])} MB and the adapter "
          f"{fmt_mb(last['adapter_bytes'] - first['adapter_bytes'])} MB; peak RSS grew "
          f"{fmt_mb(last['peak_rss'] - first['peak_rss'])} MB "
          f"(anonymous {fmt_mb(last['peak_anon'] - first['peak_anon'])} MB, "
          f"file-backed {fmt_mb(last['peak_file'] - first['peak_file'])} MB)")
    print("peak RSS = VmHWM of the merging process; anon = peak RssAnon (heap: merge working set); file = peak "
          "RssFile (mapped shared libraries; input tensors are read, not mapped)")

    args.results.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "merge_memory", "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": info, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "baseline": baseline, "runs": runs,
    }
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.results}")
    return 0 if all(r["output_check"]["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
