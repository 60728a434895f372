"""``verify``: prove that a merged folder computes what the adapted model computed (the rule and
its limits are in :mod:`.report`)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from threadpoolctl import threadpool_limits

from ..basesource import BaseSource
from ..errors import D2ExportError
from ..job import Job, prepare
from ..options import OUTPUT_DTYPES, MergeOptions, VerifyOptions, with_settings
from ..progress import Progress, silent, stop_check
from ..reading import ModelFolder, read_json_object
from ..report import REPORT_NAME
from ..runtime.imports import uncollected
from .declared import dtype_problems
from .report import VerifyReport
from .weights import WeightReport, check_weights

# torch, transformers and the model runs (``.ladder``, ``.task``, ``.files``, ``..runtime``) are imported only once
# the weight check has started beside them: that import is a second or more of one core, which the
# check uses meanwhile (docs/design.md §6, *Cost*).

# Output checks run in float32 unless asked: the folder's weights load exactly, so the rounding
# floor is what the folder's dtype costs and nothing else (no compute round-off on top), and CPUs
# without bf16 units run float32 matmuls much faster than bf16 ones.
DEFAULT_RUN_DTYPES = ("float32",)
TASK_DTYPES = ("float32", "bfloat16", "float16")


def verify(merged: str | Path, adapter: str | Path | None = None, *, base: str | Path | None = None,
           job: Job | None = None, options: VerifyOptions | None = None, progress: Progress = silent,
           before_imports: Callable[[], None] | None = None, **settings) -> VerifyReport:
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
        before_imports: called once before the output checks import torch and transformers (the
            command keeps libraries verify never uses out of the process there).

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
            return _verify(merged, own_job, options, progress, before_imports)
    return _verify(merged, job, options, progress, before_imports)


def _verify(merged: Path, job: Job, options: VerifyOptions, progress: Progress,
            before_imports: Callable[[], None] | None) -> VerifyReport:
    def say(stage: str) -> None:
        progress(stage, 0, 0)

    # The weight check runs beside the output checks (whose models run side by side, each on one
    # thread): it takes a core instead of waiting its turn. numpy's BLAS is held to one thread
    # throughout (the weight check, the in-memory merge): idle BLAS threads spin on the cores the
    # other work needs.
    with threadpool_limits(limits=1, user_api="blas"), ModelFolder.open(merged, "merged model") as folder, \
            ThreadPoolExecutor(1, "weights") as beside:
        report = _new_report(merged, job, options, folder)
        pending: Future | None = None
        stop = threading.Event()  # set when the output checks end in an error: the check beside stops too

        if options.weights and options.outputs:
            say("weights, beside the outputs")
            pending = beside.submit(check_weights, job.plan, folder, max_units=options.thresholds.max_units,
                                    progress=stop_check(stop), workers=1)
        elif options.weights:
            _set_weights(report, check_weights(job.plan, folder, max_units=options.thresholds.max_units,
                                               progress=lambda name: say(f"weights {name}")))

        def weights(timeout: float | None = None) -> WeightReport | None:
            """The weight report, once the check is done (waited for where a rung needs it; at most
            ``timeout`` seconds, then TimeoutError)."""
            if pending is not None and report.weights is None:
                _set_weights(report, pending.result(timeout))
            return report.weights

        try:
            if options.outputs or options.task_data is not None:
                _run_models(report, job, folder, options, say, weights, stop, before_imports)
        except BaseException:  # bad input or Ctrl-C: leaving waits for the check beside, so stop it first
            stop.set()
            raise
        weights()
    report.rounding_note()
    return report


def _new_report(merged: Path, job: Job, options: VerifyOptions, folder: ModelFolder) -> VerifyReport:
    """The report, with what the folder's files say before any check runs: its architecture and
    dtype (refused where they are not the base's, or no output check can run it), the base its own
    report names, config.json's declared dtype."""
    folder_type, base_type = folder.config.get("model_type"), job.base.config.get("model_type")
    if folder_type and base_type and folder_type != base_type:
        # nothing of it can be checked against this base (every tensor "missing"): wrong arguments,
        # not a failed merge
        raise D2ExportError(f"{merged}: a {folder_type} model, and the base {job.base.path} a {base_type} "
                            "model: the folder is not a merge of this base (another adapter, or --base?)")
    merged_dtype = folder.main_float_dtype()
    if merged_dtype not in OUTPUT_DTYPES:
        raise D2ExportError(f"{merged}: weights are {merged_dtype}; outputs can be checked for "
                            f"{', '.join(OUTPUT_DTYPES)}")
    report = VerifyReport(merged, job.spec.path, job.base.path, job.spec.method, _written_by(merged),
                          merged_dtype, options.thresholds, base_source=job.source)
    report.notes += _base_mismatch(merged, job.source)
    report.config_failures, notes = dtype_problems(folder.config, merged_dtype)
    report.notes += notes
    return report


def _run_models(report: VerifyReport, job: Job, folder: ModelFolder, options: VerifyOptions, say,
                weights: Callable[..., WeightReport | None], stop: threading.Event,
                before_imports: Callable[[], None] | None) -> None:
    """The output checks and the task gap: torch and transformers imported first, collection paused
    (after the weight check has started beside)."""
    with uncollected():
        if before_imports is not None:
            before_imports()
        from . import files, ladder, task  # noqa: F401  (they import torch and transformers)
    from ..runtime.models import inputs_problem
    from .task import check_scorable, load_task

    problem = inputs_problem(folder.config)
    if problem is not None:
        raise D2ExportError(f"{report.merged}: {problem}; the output checks feed token ids or images only "
                            "(the weight check alone runs with --weights-only)")
    merged = report.merged
    data = None
    if options.task_data is not None:  # read and checked before any model runs
        data = load_task(options.task_data)
        check_scorable(data, folder.config)
    tokenizer = _tokenizer(merged, job.base.path) if (options.calibration or data is not None) else None
    if options.outputs:
        from .files import check_files

        say("config, tokenizer and modules")
        report.file_failures, notes = check_files(merged, folder.config, job.plan, job.spec.path)
        report.notes += notes
        try:
            _check_outputs(report, job, folder, tokenizer, options, say, weights, stop)
        except D2ExportError as exc:
            if not report.file_failures:
                raise
            # a config.json that no longer fits the weights: a broken folder (the failures say
            # why), not bad input
            report.notes.append(f"outputs not checked: {exc}")
            return
    if data is not None:
        for dtype in TASK_DTYPES:
            say(f"task accuracy in {dtype}")
            report.task.append(_task(merged, job, folder.config, tokenizer, data, dtype))


def _set_weights(report: VerifyReport, weights: WeightReport) -> None:
    report.weights = weights
    if weights.extra:
        report.notes.append(f"tensors in the folder that the merge does not produce: {', '.join(weights.extra)}")
    rebuilt = [t.name for t in weights.tensors if t.rebuilt]
    if rebuilt:
        report.notes.append(f"not in the folder, but buffers transformers builds when loading, with the base's values: "
                            f"{', '.join(rebuilt)}")


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


def _check_outputs(report: VerifyReport, job: Job, folder: ModelFolder, tokenizer, options: VerifyOptions, say,
                   weights: Callable[..., WeightReport | None], stop: threading.Event) -> None:
    from ..runtime.calibration import TEXT_MAX_TOKENS, model_batches, text_batches
    from ..runtime.imports import frozen_imports
    from .ladder import Ladder
    from .runs import one_thread

    config = folder.config
    if options.calibration is not None:
        batches = text_batches(options.calibration, tokenizer)
        report.calibration = (f"{options.calibration} ({len(batches)} batch{'es' if len(batches) != 1 else ''}, "
                              f"each line cut to {TEXT_MAX_TOKENS} tokens)")
    else:
        batches = model_batches(config, seed=options.seed)
        if batches[0].pixel_values is not None:
            report.calibration = (f"random images, seed {options.seed}, {len(batches)} batches of "
                                  f"{batches[0].describe()}")
        else:
            report.calibration = (f"random tokens, seed {options.seed}, lengths "
                                  f"{[b.input_ids.shape[1] for b in batches]}, batch {batches[0].input_ids.shape[0]}, "
                                  "right-padded")
    ladder = Ladder(job, report, folder, batches, options, weights, stop)
    with one_thread(), frozen_imports(report.merged):
        for dtype in options.dtypes or DEFAULT_RUN_DTYPES:
            say(f"outputs in {dtype}")
            report.outputs += ladder.checks(dtype, say)
        report.outputs += ladder.peft_checks(say)


def _task(merged: Path, job: Job, config: dict, tokenizer, data, dtype_name: str):
    from ..runtime.models import TORCH_DTYPES, load_model, unmerged_model
    from .task import TaskResult, accuracy, predict, scoring

    dtype = TORCH_DTYPES[dtype_name]
    a = predict(unmerged_model(job.base.path, job.spec, dtype), tokenizer, config, data)
    b = predict(load_model(merged, dtype), tokenizer, config, data)
    return TaskResult(dtype_name, scoring(config), len(data.test), accuracy(a, data), accuracy(b, data),
                      sum(x != y for x, y in zip(a, b, strict=True)))
