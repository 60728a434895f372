"""Execute a :class:`~d2export.plan.MergePlan`: stream every tensor from the base, fold the adapter
in, and write the output folder atomically."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .algebra import MergeStats, merge_bias, merge_tensor, round_to_dtype
from .formats import load_adapter
from .io import (
    SAFE_INDEX,
    WEIGHT_SUFFIXES,
    ShardWriter,
    atomic_output,
    check_output_location,
    open_base,
)
from .plan import Action, MergePlan, TensorPlan, build_plan
from .report import InputHashes, build_report, input_files, model_card
from .resolve import resolve_base

Progress = Callable[[str, int, int], None]  # (tensor just written, its bytes, total bytes of the output)


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    stats: dict[str, MergeStats]
    report: dict
    shard_hashes: dict[str, str] = field(default_factory=dict)


def merge(
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    out: str | Path | None = None,
    dtype: str = "auto",
    compute_dtype: str = "float64",
    max_shard_size: str | int | None = None,
    force: bool = False,
    hash_inputs: bool = True,
    progress: Progress | None = None,
) -> MergeResult:
    """Merge an adapter checkpoint into its base and write a Hugging Face model folder.

    Everything is checked (keys, shapes, layouts, ties) before the first byte is written, the
    output appears only when complete, and the inputs are only ever read.
    """
    spec = load_adapter(adapter)
    base_path = resolve_base(spec, base)
    model = open_base(base_path)
    out = Path(out) if out is not None else spec.path.parent / f"{spec.path.name}-merged"
    check_output_location(out, [spec.path, base_path], force)
    plan = build_plan(spec, model, dtype=dtype, compute_dtype=compute_dtype, max_shard_size=max_shard_size)
    hashing = InputHashes(input_files(plan)) if hash_inputs else None
    try:
        with atomic_output(out) as tmp:
            stats, hashes = write_weights(plan, tmp, progress)
            write_config(plan, tmp)
            copy_side_files(model.path, tmp)
            report = build_report(plan, stats, hashes, out,
                                  input_hashes=hashing.result() if hashing else None)
            (tmp / "d2export_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (tmp / "README.md").write_text(model_card(report))
    finally:
        if hashing:
            hashing.cancel()
        model.close()
    return MergeResult(out, plan, stats, report, hashes)


def write_weights(plan: MergePlan, folder: Path, progress: Progress | None = None) -> tuple[dict, dict]:
    # Writing and hashing run on threads of their own (io.ShardWriter, report.InputHashes), and the
    # matmuls are thin rank-r products: BLAS worker threads would only spin between them, taking
    # cores from those threads (a 320M merge on 2 cores: 2.2-2.3 s with one BLAS thread, 2.3-2.5 s
    # with two on an idle machine; a prototype of this loop took 5.8 s against 2.2 s on a busy one).
    with threadpool_limits(limits=1, user_api="blas"):
        return _write_weights(plan, folder, progress)


def _write_weights(plan: MergePlan, folder: Path, progress: Progress | None) -> tuple[dict, dict]:
    stats: dict[str, MergeStats] = {}
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    for file, tensors in plan.shards:
        writer = ShardWriter(folder / file, [(t.name, t.out_dtype, t.shape) for t in tensors])
        try:
            for t in tensors:
                if _unchanged_bytes(plan, t):
                    writer.write_raw(t.name, t.out_dtype, t.shape, plan.base.read_bytes(t.source))
                else:
                    value, tensor_stats = produce(plan, t)
                    if tensor_stats is not None:
                        stats[t.name] = tensor_stats
                    writer.write(t.name, value)
                    del value
                weight_map[t.name] = file
                if progress:
                    progress(t.name, t.nbytes, plan.total_bytes)
            hashes[file] = writer.close()
        except BaseException:
            writer.abort()
            raise
    if len(plan.shards) > 1 or plan.shards[0][0] != "model.safetensors":  # loaders find other names via the index
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return stats, hashes


def _unchanged_bytes(plan: MergePlan, t: TensorPlan) -> bool:
    """The output is the base tensor's stored bytes, which can be copied without loading them."""
    source = plan.base.tensors[t.source]
    return (t.action in (Action.COPY, Action.UNSELECTED) and source.dtype == t.out_dtype
            and source.offset is not None)


def produce(plan: MergePlan, t: TensorPlan) -> tuple[np.ndarray, MergeStats | None]:
    """The output value of one planned tensor."""
    if t.action is Action.COPY or t.action is Action.UNSELECTED:
        value = plan.base.read(t.source)
        return (value if value.dtype == t.out_dtype else round_to_dtype(value, t.out_dtype)), None
    start = t.replacement if t.replacement is not None else plan.base.read(t.source)
    if t.action is Action.REPLACE:
        return round_to_dtype(start, t.out_dtype), None
    assert t.update is not None
    if t.action is Action.BIAS:
        return merge_bias(start, t.update, out_dtype=t.out_dtype, compute_dtype=plan.compute_dtype), None
    return merge_tensor(
        start, t.update, transposed=t.transposed, out_dtype=t.out_dtype,
        compute_dtype=plan.compute_dtype, name=t.name,
    )


def write_config(plan: MergePlan, folder: Path) -> None:
    config = dict(plan.base.config)
    updates = dict(plan.config_updates)
    dtype = updates.pop("dtype", None)
    config.update(updates)
    if dtype is not None:  # transformers >= 4.56 writes "dtype", older ones "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Path, folder: Path) -> None:
    """Tokenizer, generation config and other small files travel with the model; weights, indexes
    and the old config do not (they are rewritten)."""
    skip = {"config.json", SAFE_INDEX, "pytorch_model.bin.index.json", "README.md", "d2export_report.json"}
    for item in base.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, folder / item.name)
        elif item.is_dir() and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in item.rglob("*")):
            shutil.copytree(item, folder / item.name)
