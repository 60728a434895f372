"""Execute a merge plan: stream every tensor from the base, fold the adapter in, and write the
output folder atomically."""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
import queue
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from .algebra import MergeStats, merge_bias, merge_tensor, round_to_dtype
from .arrays import finfo, is_float, read_array
from .blocks import StatsSum, merge_rows, prepare_factors
from .errors import D2ExportError
from .job import Job, prepare
from .options import MergeOptions, with_settings
from .plan import Action, MergePlan, TensorPlan
from .progress import Progress, silent
from .reading import CONFIG_NAME, SAFE_INDEX
from .report import build_report, input_files, write_report
from .sidefiles import copy_side_files
from .spec import Rescale
from .st_modules import plan_modules, write_modules
from .tokenizer_files import TrainedFiles
from .writing import ReadHashes, ShardWriter, atomic_output, check_output_location, write_text

# The merge's threads: this one reads, WORKERS merge row blocks, one per shard writes. Each BLAS
# call is held to one thread, so the workers (not BLAS) use the cores.
WORKERS = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
TASK_BYTES = 2 * 2**20  # stored bytes of base rows per worker task (merged in cache-sized blocks)
COPY_CHUNK = 4 * 2**20  # unchanged tensors move in pieces of this size
QUEUE_ITEMS = 8  # pieces or tasks in flight per tensor: with the writer's queue, what bounds memory


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
        base: base model folder or a model id in the local Hugging Face cache; default: the adapter's
            ``base_model_name_or_path`` at its ``revision`` (docs/design.md §5).
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
        return write_merge(job, Path(out) if out is not None else job.default_out, progress)
    finally:
        job.close()


def write_merge(job: Job, out: Path, progress: Progress = silent) -> MergeResult:
    """Write the merge ``job`` plans into the folder ``out`` (atomically)."""
    check_output_location(out, [job.spec.path, job.base.path], job.options.force)
    st = plan_modules(job.base.path, job.spec.path)  # read and checked before anything is written
    hashing = ReadHashes(input_files(job.plan), job.spec.file_hashes) if job.options.hash_inputs else None
    try:
        # the tokenizer, chat template... trained with the adapter, loaded before anything is written
        with TrainedFiles.load(job.spec.path, job.base.path) as trained, \
                atomic_output(out, replace=job.options.force) as tmp:
            stats, hashes = write_weights(job.plan, tmp, progress, hashing)
            write_config(job.plan, tmp)
            copy_side_files(job.base.path, tmp, skip=trained.replaced)
            trained.write(tmp)
            report = build_report(job.plan, stats, hashes, out, input_hashes=hashing.result() if hashing else None,
                                  source=job.source)
            if st is not None:  # sentence-transformers modules (2_Dense/...) and settings
                write_modules(st, tmp)
                report["sentence_transformers"] = st.summary()
            write_report(tmp, report)
    finally:
        if hashing is not None:
            hashing.close()  # stops its thread on an error
    return MergeResult(out, job, stats, report, hashes)


def write_weights(plan: MergePlan, folder: Path, progress: Progress = silent,
                  hashing: ReadHashes | None = None) -> tuple[dict, dict]:
    """Every shard of ``plan`` into ``folder``: this thread reads (and hashes what it reads), the
    workers merge row blocks, each shard's writer thread writes, with bounded queues between."""
    # One BLAS thread per worker: the workers already use every core, and rank-r products are thin.
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(WORKERS, "merge") as pool, \
            _Reader(plan.base.path, hashing) as reader:
        return _write_weights(plan, folder, progress, pool, reader)


def _write_weights(plan: MergePlan, folder: Path, progress: Progress, pool: Executor,
                   reader: _Reader) -> tuple[dict, dict]:
    stats: dict[str, MergeStats] = {}
    hashes: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    written = 0
    for file, tensors in plan.shards:
        writer = ShardWriter(folder / file, [(t.name, t.out_dtype, t.shape) for t in tensors])
        streams = []
        try:
            for t in tensors:
                stream = _Stream(writer)
                streams.append((t, stream))
                writer.write_raw(t.name, t.out_dtype, t.shape, stream.chunks())
                _feed(plan, t, stream, pool, reader)
                weight_map[t.name] = file
                written += t.nbytes
                progress(t.name, written, plan.total_bytes)
            hashes[file] = writer.close()
        except BaseException:
            for _, stream in streams:
                stream.cancelled = True  # a writer waiting for more of a tensor stops waiting
            writer.abort()
            raise
        for t, stream in streams:
            if stream.stats is not None:
                stats[t.name] = stream.stats
            elif stream.blocks and t.update is not None:
                stats[t.name] = stream.totals.stats(t.update.rescale is not Rescale.NONE)
    if len(plan.shards) > 1 or plan.shards[0][0] != "model.safetensors":  # loaders find other names via the index
        index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return stats, hashes


def _feed(plan: MergePlan, t: TensorPlan, stream: _Stream, pool: Executor, reader: _Reader) -> None:
    """Queue ``t``'s bytes on ``stream``: stored bytes as read, merged row blocks as futures."""
    source = plan.base.tensors.get(t.source)  # None: a tensor only the adapter has (a task head)
    if source is None:
        stream.put(pool.submit(produce, plan, t))
    elif _unchanged_bytes(plan, t):
        for offset, size in _pieces(source.offset, source.nbytes, COPY_CHUNK):
            stream.put(reader.read(source.file, offset, size))
    elif _streamable(plan, t, source):
        assert t.update is not None and source.offset is not None
        factors = prepare_factors(t.update, source.dtype, t.out_dtype, plan.compute_dtype)
        row_bytes = source.nbytes // source.shape[0]
        rows_per_task = max(1, TASK_BYTES // row_bytes)
        for start in range(0, source.shape[0], rows_per_task):
            rows = slice(start, min(start + rows_per_task, source.shape[0]))
            data = reader.read(source.file, source.offset + start * row_bytes, (rows.stop - start) * row_bytes)
            w0 = data.view(source.dtype).reshape(rows.stop - start, source.shape[1])
            stream.put(pool.submit(merge_rows, w0, t.update, factors, start, t.out_dtype, t.name))
            stream.blocks += 1
    else:
        start = reader.read(source.file, source.offset, source.nbytes).view(source.dtype).reshape(source.shape) \
            if source.offset is not None and t.replacement is None else None
        stream.put(pool.submit(produce, plan, t, start))
    stream.put(None)


def _streamable(plan: MergePlan, t: TensorPlan, source) -> bool:
    """A merge that can go by row blocks straight from the file: stored ``[out, in]`` rows."""
    return (t.action is Action.MERGE and t.replacement is None and not t.transposed
            and source.offset is not None and len(source.shape) == 2 and source.shape[0] > 0)


def _pieces(offset: int | None, nbytes: int, chunk: int):
    assert offset is not None
    for start in range(0, nbytes, chunk):
        yield offset + start, min(chunk, nbytes - start)


class _Stream:
    """One tensor's bytes on their way to the writer thread: a bounded queue of byte buffers and
    futures (merged blocks), taken in order. ``put`` waits while it is full, and raises the
    writer's error rather than wait forever on a writer that has stopped."""

    def __init__(self, writer: ShardWriter):
        self._queue: queue.Queue = queue.Queue(QUEUE_ITEMS)
        self._writer = writer
        self.totals = StatsSum()
        self.stats: MergeStats | None = None
        self.blocks = 0
        self.cancelled = False

    def put(self, item) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                self._writer.check()

    def chunks(self):
        """Runs on the writer thread."""
        while (item := self._get()) is not None:
            if isinstance(item, Future):
                item, part = item.result()
                if isinstance(part, StatsSum):
                    self.totals.combine(part)
                elif part is not None:
                    self.stats = part
                item = np.ascontiguousarray(item).reshape(-1).view(np.uint8)
            yield memoryview(item)

    def _get(self):
        while True:
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                if self.cancelled:
                    raise RuntimeError("merge cancelled") from None


class _Reader:
    """Hands out byte ranges of the base's files as views of a read-only mapping, and each piece to
    the input hashes on the way.

    Mapped, not read: a read copies every byte from the page cache into the process, at several
    times the CPU cost of mapping it (bench/README.md, design choices: ``io_paths.py``). Pages
    well behind the piece handed out are dropped from the process (``MADV_DONTNEED``: they stay in
    the page cache, and a view still in use reads them back), so the mapped bytes count towards
    RSS only for a window, not for the whole file. Nothing is asked for ahead: the kernel's own
    readahead on sequential faults keeps up, and ``MADV_WILLNEED`` windows measured slower on a
    cold cache (more kernel time, no less waiting). A base file truncated while the merge reads it
    ends the process with SIGBUS rather than an error message: inputs are only ever read, and
    changing them under a running merge is the one thing this does not report.
    """

    BEHIND = 32 * 2**20  # bytes kept mapped behind the piece handed out: more than the queues hold in flight

    def __init__(self, folder: Path, hashing: ReadHashes | None):
        self._folder, self._hashing = folder, hashing
        self._maps: dict[str, _Mapped] = {}

    def read(self, file: str, offset: int, size: int) -> np.ndarray:
        mapped = self._maps.get(file)
        if mapped is None:
            for other in self._maps.values():  # plans go file by file: the last one is done with
                other.drop()
            mapped = self._maps[file] = _Mapped(self._folder / file)
        if offset + size > len(mapped.map):
            raise D2ExportError(f"{self._folder / file}: file ends inside a tensor")
        mapped.release_behind(offset, self.BEHIND)
        data = np.frombuffer(mapped.map, np.uint8, size, offset)
        if self._hashing is not None:
            self._hashing.update(self._folder / file, offset, data)
        return data

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc_info) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


class _Mapped:
    """One base file mapped read-only, and how far its pages were dropped from the process."""

    def __init__(self, path: Path):
        try:
            with open(path, "rb") as handle:
                self.map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:  # a filesystem that cannot map files
            reason = getattr(exc, "strerror", None) or exc
            raise D2ExportError(f"{path}: cannot map it for reading ({reason})") from None
        self.dropped = 0

    def release_behind(self, offset: int, behind: int) -> None:
        """Drop the pages more than ``behind`` bytes before ``offset``, in steps of ``behind``."""
        if offset - behind >= self.dropped + behind:
            self._drop_to((offset - behind) // mmap.PAGESIZE * mmap.PAGESIZE)

    def drop(self) -> None:
        self._drop_to(len(self.map))

    def _drop_to(self, end: int) -> None:
        if hasattr(self.map, "madvise") and self.dropped < end:
            self.map.madvise(mmap.MADV_DONTNEED, self.dropped, end - self.dropped)
            self.dropped = end

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a view still exists (an error stopped the merge): it goes with them
            self.map.close()


def _unchanged_bytes(plan: MergePlan, t: TensorPlan) -> bool:
    """The output is the base tensor's stored bytes, which can be copied without loading them."""
    source = plan.base.tensors.get(t.source)
    return (t.action in (Action.COPY, Action.UNSELECTED) and source is not None and source.dtype == t.out_dtype
            and source.offset is not None)


def produce(plan: MergePlan, t: TensorPlan, stored: np.ndarray | None = None) -> tuple[np.ndarray, MergeStats | None]:
    """The output value of one planned tensor (``stored``: its base tensor, if already read)."""
    if t.action is Action.COPY or t.action is Action.UNSELECTED:
        value = stored if stored is not None else plan.base.read(t.source)
        if value.dtype == t.out_dtype:
            return value, None
        return checked_cast(round_to_dtype(value, t.out_dtype), value, t.name), None
    if t.replacement is not None:
        start = np.asarray(t.replacement)
    else:
        start = stored if stored is not None else plan.base.read(t.source)
    if t.action is Action.REPLACE:
        return checked_cast(round_to_dtype(start, t.out_dtype), start, t.name), None
    assert t.update is not None
    if t.action is Action.BIAS:
        return merge_bias(start, t.update, out_dtype=t.out_dtype, compute_dtype=plan.compute_dtype), None
    return merge_tensor(
        start, t.update, transposed=t.transposed, out_dtype=t.out_dtype,
        compute_dtype=plan.compute_dtype, name=t.name,
    )


def merged_rows(plan: MergePlan, t: TensorPlan) -> Callable[[int, int], np.ndarray] | None:
    """A function giving rows ``start:stop`` of a merged tensor, computed from those rows of the
    base alone, the same values :func:`produce` gives them (every merged element depends on its
    own row: the update's rows and, for DoRA and D2-LoRA, that row's norm; and each is correctly
    rounded). None where the tensor is not merged row by row from a safetensors base (copied,
    replaced, a bias, stored transposed)."""
    source = plan.base.tensors.get(t.source)
    if (t.action is not Action.MERGE or t.update is None or t.transposed or t.replacement is not None
            or source is None or source.offset is None or source.shape != t.update.shape):
        return None
    height, width = source.shape
    # the factors are made at a pass's first rows and dropped after its last, as a whole merge
    # makes them: kept, every streamed tensor's would stay for the model's whole life
    kept: list = []

    def rows(start: int, stop: int) -> np.ndarray:
        if not kept or start == 0:
            kept[:] = [prepare_factors(t.update, source.dtype, t.out_dtype, plan.compute_dtype)]
        w0 = read_array(plan.base.path / source.file, source.offset + start * width * source.dtype.itemsize,
                        source.dtype, (stop - start, width))
        merged = merge_rows(w0, t.update, kept[0], start, t.out_dtype, t.name)[0]
        if stop == height:
            kept.clear()
        return merged

    return rows


def write_config(plan: MergePlan, folder: Path) -> None:
    config = {**plan.base.config, **plan.config_updates}
    if plan.out_dtype is not None:  # transformers >= 4.56 writes "dtype", older ones "torch_dtype"
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = plan.out_dtype
    write_text(folder / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")


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
