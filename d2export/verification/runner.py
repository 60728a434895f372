"""``verify``: prove that a merged folder computes what the adapted model computed (the rule and
its limits are in :mod:`.report`)."""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from threadpoolctl import threadpool_limits

from ..arrays import is_float
from ..basesource import BaseSource
from ..errors import D2ExportError
from ..job import Job, prepare
from ..names import find_name
from ..options import MergeOptions, VerifyOptions, with_settings
from ..plan import build_plan
from ..progress import Progress, silent
from ..reading import ModelFolder, read_json_object
from ..report import REPORT_NAME
from ..runtime.calibration import Batch, model_batches, text_batches
from ..runtime.models import (
    PEFT_METHODS,
    TORCH_DTYPES,
    head_kind,
    import_model_code,
    load_model,
    merged_model,
    peft_model,
    peft_usable,
    unmerged_model,
)
from ..runtime.streaming import checked_on_load
from .outputs import (
    FLOOR_CEILING_UNITS,
    FOLDER,
    PEFT,
    ROUNDED,
    UNMERGED,
    ModelRun,
    OutputCheck,
    Prompts,
    compare_runs,
    judge_fidelity,
    judge_loading,
    judge_references,
    one_thread,
    run_model,
)
from .report import FP32_OUTPUT_RTOL, MIN_TOP1, ULP, VerifyReport, output_rtol
from .task import TaskResult, accuracy, load_task, predict, scoring
from .weights import WeightReport, check_weights

GENERATION_PROMPTS, GENERATION_STEPS = 3, 8
# Output checks run in float32 unless asked: the folder's weights load exactly, so the rounding
# floor is what the folder's dtype costs and nothing else (no compute round-off on top), and CPUs
# without bf16 units run float32 matmuls much faster than bf16 ones.
DEFAULT_RUN_DTYPES = ("float32",)
TASK_DTYPES = ("float32", "bfloat16", "float16")


def verify(merged: str | Path, adapter: str | Path | None = None, *, base: str | Path | None = None,
           job: Job | None = None, options: VerifyOptions | None = None, progress: Progress = silent,
           **settings) -> VerifyReport:
    """Check the model folder ``merged`` against ``adapter`` applied to its base.

    Args:
        merged: the folder to check (written by d2export or by another tool).
        adapter: the adapter folder; not needed when ``job`` is given.
        base: the base model folder or a model id in the local Hugging Face cache; default: the
            adapter's ``base_model_name_or_path`` at its ``revision`` (docs/design.md §5).
        job: the :class:`~d2export.job.Job` of the merge that wrote ``merged`` (``merge --verify``),
            so the adapter is not read nor the plan built again.
        options: a :class:`VerifyOptions`; ``settings`` (its field names as keywords) override it.
        progress: called with (stage, 0, 0) as the checks go.

    Returns:
        A :class:`VerifyReport`; ``report.passed`` is the verdict. A failed check does not raise.

    Raises:
        D2ExportError: bad input (a folder, adapter or file that cannot be read or does not fit).
    """
    options = with_settings(VerifyOptions, options, settings)
    merged = Path(merged)
    if job is None:
        if adapter is None:
            raise D2ExportError("verify needs the adapter (adapter) or the merge's job (job)")
        with prepare(adapter, base, MergeOptions(revision=options.revision)) as own_job:
            return _verify(merged, own_job, options, progress)
    return _verify(merged, job, options, progress)


def _verify(merged: Path, job: Job, options: VerifyOptions, progress: Progress) -> VerifyReport:
    def say(stage: str) -> None:
        progress(stage, 0, 0)

    # The weight check runs beside the output checks (whose models run side by side, each on one
    # thread): it takes a core instead of waiting its turn. numpy's BLAS is held to one thread
    # throughout (the weight check, the in-memory merge): idle BLAS threads spin on the cores the
    # other work needs.
    with threadpool_limits(limits=1, user_api="blas"), ModelFolder.open(merged, "merged model") as folder, \
            ThreadPoolExecutor(1, "weights") as beside:
        merged_dtype = folder.main_float_dtype()
        if merged_dtype not in TORCH_DTYPES:
            raise D2ExportError(f"{merged}: weights are {merged_dtype}; outputs can be checked for "
                                f"{', '.join(TORCH_DTYPES)}")
        report = VerifyReport(merged, job.spec.path, job.base.path, job.spec.method, _written_by(merged),
                              merged_dtype, options.thresholds, base_source=job.source)
        report.notes += _base_mismatch(merged, job.source)
        pending: Future | None = None
        stop = threading.Event()  # set when the output checks end in an error: the check beside stops too

        def halt(name: str) -> None:
            if stop.is_set():
                raise _Stopped

        if options.weights and options.outputs:
            say("weights, beside the outputs")
            pending = beside.submit(check_weights, job.plan, folder, max_units=options.thresholds.max_units,
                                    progress=halt, workers=1)
        elif options.weights:
            _set_weights(report, check_weights(job.plan, folder, max_units=options.thresholds.max_units,
                                               progress=lambda name: say(f"weights {name}")))

        def weights(timeout: float | None = None) -> WeightReport | None:
            """The weight report, once the check is done (waited for where a rung needs it; at most
            ``timeout`` seconds, then TimeoutError)."""
            if pending is not None and report.weights is None:
                _set_weights(report, pending.result(timeout))
            return report.weights

        config = folder.config
        try:
            if options.outputs or options.task_data is not None:
                tokenizer = _tokenizer(merged, job.base.path) if (options.calibration or options.task_data) else None
                if options.outputs:
                    _check_outputs(report, job, config, tokenizer, options, say, weights, stop)
                if options.task_data is not None:
                    data = load_task(options.task_data)
                    for dtype in TASK_DTYPES:
                        say(f"task accuracy in {dtype}")
                        report.task.append(_task(merged, job, config, tokenizer, data, dtype))
        except BaseException:  # bad input or Ctrl-C: leaving waits for the check beside, so stop it first
            stop.set()
            raise
        weights()
    report.rounding_note()
    return report


class _Stopped(Exception):
    """Raised inside the weight check beside the outputs once they have failed."""


def _set_weights(report: VerifyReport, weights: WeightReport) -> None:
    report.weights = weights
    if weights.extra:
        report.notes.append(f"tensors in the folder that the merge does not produce: {', '.join(weights.extra)}")


def _base_mismatch(merged: Path, source: BaseSource | None) -> list[str]:
    """A note when the folder's own report says it was merged into another snapshot of the base
    than the one checked against (then the weights cannot match, and this says why)."""
    try:
        recorded = read_json_object(merged / REPORT_NAME)["base"]
        repo_id, snapshot = recorded.get("repo_id"), recorded.get("snapshot")
    except (D2ExportError, KeyError, TypeError, AttributeError):
        return []
    if source is None or source.snapshot is None or snapshot is None or (repo_id, snapshot) == (
            source.repo_id, source.snapshot):
        return []
    return [f"the folder's report says it was merged into {repo_id}@{snapshot}; this check used "
            f"{source.describe()}"]


def _written_by(folder: Path) -> str:
    try:
        return str(read_json_object(folder / REPORT_NAME)["tool"]["name"])
    except (D2ExportError, KeyError, TypeError):
        return "unknown"


def _tokenizer(merged: Path, base: Path):
    from transformers import AutoTokenizer

    for folder in (merged, base):
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception:  # transformers raises many kinds here; none is for the user to see
            continue
    raise D2ExportError(f"no tokenizer in {merged} or {base}: text calibration and task data need one")


def _check_outputs(report: VerifyReport, job: Job, config: dict, tokenizer, options: VerifyOptions, say,
                   weights: Callable[..., WeightReport | None], stop: threading.Event) -> None:
    if options.calibration is not None:
        batches = text_batches(options.calibration, tokenizer)
        report.calibration = f"{options.calibration} ({len(batches)} batches)"
    else:
        batches = model_batches(config, seed=options.seed)
        if batches[0].pixel_values is not None:
            report.calibration = (f"random images, seed {options.seed}, {len(batches)} batches of "
                                  f"{batches[0].describe()}")
        else:
            report.calibration = (f"random tokens, seed {options.seed}, lengths "
                                  f"{[b.input_ids.shape[1] for b in batches]}, batch {batches[0].input_ids.shape[0]}, "
                                  "right-padded")
    ladder = _Ladder(job, report, config, batches, options, weights, stop)
    with one_thread(), _frozen_imports(report.merged):
        for dtype in options.dtypes or DEFAULT_RUN_DTYPES:
            say(f"outputs in {dtype}")
            report.outputs += ladder.checks(dtype, say)
        if job.spec.method in PEFT_METHODS and options.peft_reference:
            say("PEFT reference in float32")
            report.outputs += ladder.peft_checks()


@contextmanager
def _frozen_imports(folder: Path):
    """Every object alive once the model code is imported (torch's, transformers') left out of
    garbage collection for the duration: each model dropped between runs needs a full collection
    (its modules and hooks form cycles), which otherwise walks those few hundred thousand objects
    too, 0.2 s with both model threads stopped."""
    try:
        import_model_code(folder)
        frozen = True
    except Exception:  # loading the model says what is wrong, in its own words
        frozen = False
    if frozen:
        gc.freeze()
    try:
        yield
    finally:
        if frozen:
            gc.unfreeze()


class _Ladder:
    """The models of the reference ladder (:mod:`.outputs`), each run once per dtype and compared.

    The unmerged model and the folder run side by side, each on its own thread with torch on one
    thread (:func:`.outputs.one_thread`): a streamed forward is a chain of small operations that two
    threads of one model spend waiting on each other, while two models keep both cores busy. The
    folder follows the unmerged model's greedy continuation as soon as it is generated; the
    correctly rounded merge runs once the weight check says how to build it. Models are loaded one
    at a time (transformers' loading sets process-wide state, such as the default dtype)."""

    def __init__(self, job: Job, report: VerifyReport, config: dict, batches: list[Batch], options: VerifyOptions,
                 weights: Callable[..., WeightReport | None], stop: threading.Event):
        self.job, self.report, self.batches, self.options, self.weights = job, report, batches, options, weights
        kind = head_kind(config)
        # question answering's start/end logits are distributions over positions, not over their last axis
        self.distributions = kind not in ("encoder", "question-answering")
        self.prompts = _generation_prompts(batches, config) if kind == "causal-lm" else None
        self.resident = options.resident
        self.output = "hidden states" if kind == "encoder" else "logits"
        self.runs: dict[tuple[str, str, bool], ModelRun] = {}
        self.continuation: dict[str, torch.Tensor | None] = {}
        self.stop, self.loading = stop, threading.Lock()

    def halt(self) -> None:
        """Called between forwards: ends a run once another part of verify has failed."""
        if self.stop.is_set():
            raise _Stopped

    def run(self, name: str, dtype: str, probe: bool = False) -> ModelRun:
        """One model's run, kept for other comparisons; the model itself is dropped at once.
        ``probe``: on the first calibration batch only, without the continuation."""
        if probe and (name, dtype, False) in self.runs:  # the full run's first batch is that probe
            return ModelRun(self.runs[name, dtype, False].outputs[:1])
        if (name, dtype, probe) not in self.runs:
            if name != UNMERGED and not probe and dtype not in self.continuation:
                self.run(UNMERGED, dtype)  # the continuation it follows
            self._run(name, dtype, probe, lambda: self.continuation.get(dtype))
        return self.runs[name, dtype, probe]

    def side_by_side(self, dtype: str) -> None:
        """The unmerged model and the folder on two threads, then the correctly rounded merge (its
        probe when the weight check finds every tensor exact) on the first thread free."""
        generated: Future = Future()
        with ThreadPoolExecutor(2, "models") as pool:
            try:
                running = [pool.submit(self._run, UNMERGED, dtype, False, generated.result, generated),
                           pool.submit(self._run, FOLDER, dtype, False, generated.result)]
                weights = self._weights_unless_failed(running)
                running.append(pool.submit(self._run, ROUNDED, dtype, weights is not None and weights.all_exact,
                                           generated.result))
                for future in as_completed(running):
                    future.result()  # the first error, as it happened (the others then stop)
            except BaseException:
                self.stop.set()
                if not generated.done():
                    generated.set_exception(_Stopped())
                raise

    def _weights_unless_failed(self, running: list[Future]) -> WeightReport | None:
        """The weight report once the check is done, or the error of a model run that ends first
        (at 7B the weight check takes minutes; a folder transformers cannot load fails at once)."""
        while True:
            for future in running:
                if future.done() and future.exception() is not None:
                    future.result()
            try:
                return self.weights(0.2)
            except TimeoutError:
                continue

    def _run(self, name: str, dtype: str, probe: bool, continuation: Callable[[], torch.Tensor | None],
             generated: Future | None = None) -> None:
        """Load ``name``, run it on the batches and, for a full run, along the unmerged model's
        greedy ``continuation`` (a function: it waits until the unmerged model has generated it).
        The unmerged model generates it first and hands it to ``generated``."""
        torch_dtype, job = TORCH_DTYPES[dtype], self.job

        def publish(tokens: torch.Tensor | None) -> None:
            self.continuation[dtype] = tokens
            if generated is not None:
                generated.set_result(tokens)

        try:
            with self.loading:
                self.halt()
                if name == UNMERGED:
                    model = unmerged_model(job.base.path, job.spec, torch_dtype, resident_bytes=self.resident)
                elif name == ROUNDED:
                    model = self._rounded(torch_dtype)
                elif name == FOLDER:
                    model = load_model(self.report.merged, torch_dtype, resident_bytes=self.resident)
                else:
                    model = peft_model(job.base.path, job.spec, torch_dtype)
            if name == UNMERGED and self.prompts is None:
                publish(None)
            with checked_on_load(self.halt):  # a 7B forward takes many seconds: stop between blocks
                run = run_model(model, self.batches[:1] if probe else self.batches, halt=self.halt,
                                prompts=None if probe else self.prompts, steps=GENERATION_STEPS,
                                publish=publish if name == UNMERGED else None, follow=continuation)
        except BaseException as exc:
            if generated is not None and not generated.done():
                generated.set_exception(exc)  # what the models waiting for the continuation raise too
            raise
        self.runs[name, dtype, probe] = run
        del model
        gc.collect()

    def _rounded(self, dtype: torch.dtype):
        """The correctly rounded merge. When the weight check found every tensor of the folder equal
        to its correctly rounded value, those tensors *are* that merge's: the model is assembled
        from the base with the folder's tensors read in (d2export's own assembly, not transformers'
        loading of the folder), instead of computing every merged tensor a second time."""
        weights = self.weights()
        plan = _rounded_plan(self.job, self.report.merged_dtype)
        if weights is None or not weights.all_exact:
            return merged_model(plan, dtype, resident_bytes=self.resident)
        folder = ModelFolder.open(self.report.merged, "merged model")
        prefix = plan.arch.base_model_prefix
        return merged_model(plan, dtype, resident_bytes=self.resident,
                            values=lambda t: folder.read(find_name(t.name, folder.tensors, prefix)))

    def compare(self, rung: str, candidate: str, reference: str, dtype: str, probe: bool = False) -> OutputCheck:
        ref, cand = self.run(reference, dtype, probe), self.run(candidate, dtype, probe)
        if probe:
            ref = ModelRun(ref.outputs[:1])
        comparison, generation = compare_runs(ref, cand, self.batches[:1] if probe else self.batches,
                                              distributions=self.distributions,
                                              continuation=None if probe else self.continuation.get(dtype))
        return OutputCheck(rung, candidate, reference, dtype, self.output, comparison,
                           generation if reference == UNMERGED else None)

    def checks(self, dtype: str, say) -> list[OutputCheck]:
        report, thresholds = self.report, self.options.thresholds
        self.side_by_side(dtype)
        fidelity = self.compare("fidelity", FOLDER, UNMERGED, dtype)
        weights = self.weights()
        exact = weights is not None and weights.all_exact
        # When every tensor of the folder is the correctly rounded value, the folder *is* the
        # correctly rounded merge, provided it loads as that model: one batch shows that (a re-tied
        # head, an ignored tensor or a wrong dtype changes every output), and the folder's own
        # figures are then the floor, so the merge is not run over every input a second time.
        loading = self.compare("loading", FOLDER, ROUNDED, dtype, probe=exact)
        judge_loading(loading, exact)
        if exact and loading.passed:
            cost = replace(fidelity, rung="rounding cost", candidate=ROUNDED)
        else:
            cost = self.compare("rounding cost", ROUNDED, UNMERGED, dtype)
        cost.rule = "figures only: what writing the folder's dtype costs"
        explicit = thresholds.atol is not None or thresholds.min_top1 is not None
        scale = fidelity.comparison.scale
        fixed_abs = thresholds.atol if thresholds.atol is not None else output_rtol(dtype, report.merged_dtype) * scale
        min_top1 = thresholds.min_top1 if thresholds.min_top1 is not None else MIN_TOP1[dtype]
        unit = ULP.get(report.merged_dtype)
        judge_fidelity(fidelity, cost, fixed_abs=fixed_abs, min_top1=min_top1, explicit=explicit,
                       ceiling=None if unit is None else FLOOR_CEILING_UNITS * unit * scale)
        c = fidelity.comparison
        if fidelity.passed and (c.max_abs > fixed_abs or (c.top1 is not None and c.top1 < min_top1)):
            report.notes.append(
                f"outputs ({dtype}): beyond the fixed limits, but no further from the unmerged model than the "
                f"correctly rounded {report.merged_dtype} merge (max |d| {cost.comparison.max_abs:.3g}, top-1 "
                f"{_share(cost.comparison.top1)}): the difference is the rounding of the output dtype, not the merge")
        for key in [k for k in self.runs if k[1] == dtype and k[0] != UNMERGED]:
            del self.runs[key]  # the unmerged run stays for the PEFT comparison in float32
        return [fidelity, loading, cost]

    def peft_checks(self) -> list[OutputCheck]:
        """PEFT's unmerged model against ours in float32, where the model fits in memory whole."""
        size = _float32_bytes(self.job.base)
        if not peft_usable(self.job.spec):
            self.report.notes.append("PEFT reference not run: peft is not installed or cannot load this adapter")
            return []
        if self.resident is not None and size > self.resident:
            self.report.notes.append(
                f"PEFT reference not run: PEFT needs the whole model in memory ({size / 2**20:.0f} MiB in float32, "
                f"more than the resident budget of {self.resident / 2**20:.0f} MiB; raise it with --resident)")
            return []
        check = self.compare("references", PEFT, UNMERGED, "float32")
        check.generation = None
        judge_references(check, FP32_OUTPUT_RTOL * check.comparison.scale)
        return [check]


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _float32_bytes(folder: ModelFolder) -> int:
    return 4 * sum(math.prod(info.shape) for info in folder.tensors.values() if is_float(info.dtype))


def _rounded_plan(job: Job, dtype: str):
    """The plan of the correctly rounded merge into ``dtype`` (the folder's): the job's own when it
    writes that dtype already."""
    floats = {str(t.out_dtype) for t in job.plan.tensors if t.update is not None or t.replacement is not None}
    if floats <= {dtype}:
        return job.plan
    return build_plan(job.spec, job.base, MergeOptions(dtype=dtype, compute_dtype="float64"))


def _generation_prompts(batches: list[Batch], config: dict) -> Prompts:
    """The calibration rows with the most real tokens (in the longest batch), cut to one length so
    they run as one batch, and so that the prompt and the generated tokens fit the model's position
    table (GPT-2-style learned positions end there)."""
    at = max(range(len(batches)), key=lambda i: int(batches[i].attention_mask.sum(1).max()))
    lengths = batches[at].attention_mask.sum(1)
    longest = lengths.argsort(descending=True, stable=True)[:GENERATION_PROMPTS]
    length = int(lengths[longest].min())
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int):
        length = min(length, max(1, limit - GENERATION_STEPS))
    return Prompts(at, longest, length)


def _task(merged: Path, job: Job, config: dict, tokenizer, data, dtype_name: str) -> TaskResult:
    dtype = TORCH_DTYPES[dtype_name]
    a = predict(unmerged_model(job.base.path, job.spec, dtype), tokenizer, config, data)
    b = predict(load_model(merged, dtype), tokenizer, config, data)
    return TaskResult(dtype_name, scoring(config), len(data.test), accuracy(a, data), accuracy(b, data),
                      sum(x != y for x, y in zip(a, b, strict=True)))
