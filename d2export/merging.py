"""Execute a merge plan: stream every tensor from the base, fold the adapter in, and write the
output folder atomically."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .algebra import MergeStats, merge_bias, merge_tensor, round_to_dtype
from .job import Job, prepare
from .options import MergeOptions, with_settings
from .plan import Action, MergePlan, TensorPlan
from .progress import Progress, silent
from .reading import CONFIG_NAME, SAFE_INDEX, WEIGHT_SUFFIXES
from .report import REPORT_NAME, build_report, input_files, write_report
from .writing import InputHashes, ShardWriter, atomic_output, check_output_location


@dataclass
class MergeResult:
    out: Path
    job: Job  # what was merged (spec, base, plan): ``verify`` takes it on
    stats: dict[str, MergeStats]
    report: dict
    shard_hashes: dict[str, str] = field(default_factory=dict)

    @property
    def plan(self) -> MergePlan:
        return self.job.plan


def merge(adapter: str | Path, *, base: str | Path | None = None, out: str | Path | None = None,
          options: MergeOptions | None = None, progress: Progress = silent, **settings) -> MergeResult:
    """Merge an adapter checkpoint into its base and write a Hugging Face model folder.

    Everything is checked (keys, shapes, layouts, ties) before the first byte is written, the
    output appears only when complete, and the inputs are only ever read.

    Args:
        adapter: adapter folder (or a trainer ``checkpoint-N`` folder holding one).
        base: base model folder; default: the adapter's ``base_model_name_or_path``.
        out: output folder; default ``<adapter>-merged`` beside the adapter.
        options: a :class:`MergeOptions`; ``settings`` (its field names as keywords) override it.
        progress: called with (tensor name, bytes written, bytes in all).

    Returns:
        A :class:`MergeResult` (output folder, the job, per-tensor figures, the report).

    Raises:
        D2ExportError: bad input; nothing is written.
    """
    job = prepare(adapter, base, with_settings(MergeOptions, options, settings))
    try:
        default = job.spec.path.parent / f"{job.spec.path.name}-merged"
        return write_merge(job, Path(out) if out is not None else default, progress)
    finally:
        job.close()


def write_merge(job: Job, out: Path, progress: Progress = silent) -> MergeResult:
    """Write the merge ``job`` plans into the folder ``out`` (atomically)."""
    check_output_location(out, [job.spec.path, job.base.path], job.options.force)
    hashing = InputHashes(input_files(job.plan)) if job.options.hash_inputs else None
    try:
        with atomic_output(out) as tmp:
            stats, hashes = write_weights(job.plan, tmp, progress)
            write_config(job.plan, tmp)
            copy_side_files(job.base.path, tmp)
            report = build_report(job.plan, stats, hashes, out, input_hashes=hashing.result() if hashing else None)
            write_report(tmp, report)
    finally:
        if hashing:
            hashing.cancel()
    return MergeResult(out, job, stats, report, hashes)


def write_weights(plan: MergePlan, folder: Path, progress: Progress = silent) -> tuple[dict, dict]:
    # Writing and hashing run on threads of their own (ShardWriter, InputHashes), and the matmuls
    # are thin rank-r products: BLAS worker threads would only spin between them, taking cores from
    # those threads (bench/README.md has the measurement).
    with threadpool_limits(limits=1, user_api="blas"):
        return _write_weights(plan, folder, progress)


def _write_weights(plan: MergePlan, folder: Path, progress: Progress) -> tuple[dict, dict]:
    stats: dict[str, MergeStats] = {}
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    written = 0
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
                written += t.nbytes
                progress(t.name, written, plan.total_bytes)
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
    config = {**plan.base.config, **plan.config_updates}
    if plan.out_dtype is not None:  # transformers >= 4.56 writes "dtype", older ones "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = plan.out_dtype
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(base: Path, folder: Path) -> None:
    """Tokenizer, generation config and other small files travel with the model; weights, indexes
    and the old config do not (they are rewritten)."""
    skip = {CONFIG_NAME, SAFE_INDEX, "pytorch_model.bin.index.json", "README.md", REPORT_NAME}
    for item in base.iterdir():
        if item.name in skip or item.name.startswith("."):
            continue
        if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, folder / item.name)
        elif item.is_dir() and not any(p.name.endswith(WEIGHT_SUFFIXES) for p in item.rglob("*")):
            shutil.copytree(item, folder / item.name)
