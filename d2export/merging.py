"""Execute a merge plan: stream every tensor from the base, fold the adapter in, and write the
output folder atomically."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .algebra import MergeStats, merge_bias, merge_tensor, round_to_dtype
from .arrays import finfo, is_float
from .errors import D2ExportError
from .job import Job, prepare
from .options import MergeOptions, with_settings
from .plan import Action, MergePlan, TensorPlan
from .progress import Progress, silent
from .reading import CONFIG_NAME, SAFE_INDEX, WEIGHT_SUFFIXES
from .report import REPORT_NAME, build_report, input_files, write_report
from .writing import InputHashes, ShardWriter, atomic_output, check_output_location, write_text


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
        if value.dtype == t.out_dtype:
            return value, None
        return checked_cast(round_to_dtype(value, t.out_dtype), value, t.name), None
    start = t.replacement if t.replacement is not None else plan.base.read(t.source)
    if t.action is Action.REPLACE:
        return checked_cast(round_to_dtype(start, t.out_dtype), start, t.name), None
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
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


_SIDE_SKIP = {CONFIG_NAME, SAFE_INDEX, "pytorch_model.bin.index.json", "README.md", REPORT_NAME}
_MAX_SIDE_DEPTH = 16  # model folders nest one or two levels (1_Pooling/, tokenizer/)


def copy_side_files(base: Path, folder: Path) -> None:
    """Tokenizer, generation config and other small files travel with the model; weights, indexes
    and the old config do not (they are rewritten), nor does a subfolder holding weights.

    A symlink is copied as the file it points to only if that lies inside the base folder (or, for a
    base in the Hugging Face cache, inside the cache's blobs of that model): a link elsewhere
    would leak an unrelated file into an output that may be published, so it is refused, as is a
    folder link that loops back on itself.
    """
    roots = _link_roots(base)
    for source, relative in _side_files(base, roots, (base.resolve(),), top=True)[0]:
        target = folder / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        except OSError as exc:
            raise D2ExportError(f"cannot copy {base / relative} into the output ({exc.strerror or exc})") from None


def _link_roots(base: Path) -> tuple[Path, ...]:
    roots = [base.resolve()]
    for path in (base.absolute(), *base.absolute().parents, base.resolve(), *base.resolve().parents):
        if path.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/
            roots.append((path.parent.parent / "blobs").resolve())
            break
    return tuple(roots)


def _side_files(directory: Path, roots: tuple[Path, ...], ancestors: tuple[Path, ...], top: bool = False
                ) -> tuple[list[tuple[Path, Path]], bool]:
    """(source file, path relative to ``directory``) of each file to copy, and whether the folder
    holds weights (then none of it is copied)."""
    if len(ancestors) > _MAX_SIDE_DEPTH:
        raise D2ExportError(f"{directory}: side folders nested more than {_MAX_SIDE_DEPTH} deep")
    files: list[tuple[Path, Path]] = []
    for item in sorted(directory.iterdir()):
        if item.name.startswith(".") or (top and item.name in _SIDE_SKIP):
            continue
        real = item.resolve()
        if item.is_symlink() and not any(real == root or root in real.parents for root in roots):
            raise D2ExportError(f"{item} is a symlink to {real}, outside the base folder; it is not copied "
                                "into the output (copy the file itself into the base if it belongs there)")
        if real.is_dir():
            if real in ancestors:
                raise D2ExportError(f"{item} is a symlink back to {real}: a loop in the base folder")
            inner, weights = _side_files(item, roots, (*ancestors, real))
            if weights and not top:
                return [], True
            files += [(source, Path(item.name) / relative) for source, relative in inner]
        elif item.name.endswith(WEIGHT_SUFFIXES):
            if not top:
                return [], True
        elif real.is_file():  # not a FIFO, socket or device: those are no model files
            files.append((real, Path(item.name)))
    return files, False


def checked_cast(value: np.ndarray, source: np.ndarray, name: str) -> np.ndarray:
    """``value`` (``source`` rounded to a narrower dtype), refused where a finite source value
    became inf: a copied or replaced tensor is checked for overflow like a merged one."""
    if not (is_float(value.dtype) and is_float(source.dtype)) or finfo(value.dtype).max >= finfo(source.dtype).max:
        return value
    # a finite sum means every element is finite, and is far cheaper than isfinite on 16-bit types
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(value.sum(dtype=np.float32))):
            return value
    overflow = ~np.isfinite(value) & np.isfinite(source)
    if overflow.any():
        largest = float(np.abs(source[overflow].astype(np.float64)).max())
        raise D2ExportError(f"{name}: a value of magnitude {largest:g} overflows {value.dtype}; "
                            "write this model in a wider dtype")
    return value
