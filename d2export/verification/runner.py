"""``verify``: prove that a merged folder computes what the adapted model computed (the rule and
its limits are in :mod:`.report`)."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ..errors import D2ExportError
from ..job import Job, prepare
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
    load_model,
    merged_in_memory,
    peft_model,
    torch_dtype_name,
    unmerged_model,
)
from .outputs import ModelRun, OutputCheck, compare_runs, run_model
from .report import MIN_TOP1, VerifyReport, output_rtol
from .task import TaskResult, accuracy, load_task, predict, scoring
from .weights import check_weights

GENERATION_PROMPTS, GENERATION_STEPS = 3, 8
TASK_DTYPES = ("float32", "bfloat16", "float16")


def verify(merged: str | Path, adapter: str | Path | None = None, *, base: str | Path | None = None,
           job: Job | None = None, options: VerifyOptions | None = None, progress: Progress = silent,
           **settings) -> VerifyReport:
    """Check the model folder ``merged`` against ``adapter`` applied to its base.

    Args:
        merged: the folder to check (written by d2export or by another tool).
        adapter: the adapter folder; not needed when ``job`` is given.
        base: the base model folder; default: the adapter's ``base_model_name_or_path``.
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
        with prepare(adapter, base) as own_job:
            return _verify(merged, own_job, options, progress)
    return _verify(merged, job, options, progress)


def _verify(merged: Path, job: Job, options: VerifyOptions, progress: Progress) -> VerifyReport:
    def say(stage: str) -> None:
        progress(stage, 0, 0)

    with ModelFolder.open(merged, "merged model") as folder:
        merged_dtype = folder.main_float_dtype()
        if merged_dtype not in TORCH_DTYPES:
            raise D2ExportError(f"{merged}: weights are {merged_dtype}; outputs can be checked for "
                                f"{', '.join(TORCH_DTYPES)}")
        report = VerifyReport(merged, job.spec.path, job.base.path, job.spec.method, _written_by(merged),
                              merged_dtype, options.thresholds)
        if options.weights:
            report.weights = check_weights(job.plan, folder, max_units=options.thresholds.max_units,
                                           progress=lambda name: say(f"weights {name}"))
            if report.weights.extra:
                extra = ", ".join(report.weights.extra)
                report.notes.append(f"tensors in the folder that the merge does not produce: {extra}")
        config = folder.config
    if options.outputs or options.task_data is not None:
        tokenizer = _tokenizer(merged, job.base.path) if (options.calibration or options.task_data) else None
        if options.outputs:
            _check_outputs(report, job, config, tokenizer, options, say)
        if options.task_data is not None:
            data = load_task(options.task_data)
            for dtype in TASK_DTYPES:
                say(f"task accuracy in {dtype}")
                report.task.append(_task(merged, job, config, tokenizer, data, dtype))
    if options.outputs and job.spec.method in PEFT_METHODS and not any(
            o.reference == "PEFT unmerged" for o in report.outputs):
        report.notes.append("PEFT reference not run (peft not installed, or disabled)")
    return report


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


def _check_outputs(report: VerifyReport, job: Job, config: dict, tokenizer, options: VerifyOptions, say) -> None:
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
    compare_ours = options.compare_ours if options.compare_ours is not None else report.merged_by != "d2export"
    for dtype in dict.fromkeys([report.merged_dtype, "float32"]):
        say(f"outputs in {dtype}")
        report.outputs += _output_checks(job, report, config, TORCH_DTYPES[dtype], batches, options, compare_ours)


def _output_checks(job: Job, report: VerifyReport, config: dict, dtype: torch.dtype, batches: list[Batch],
                   options: VerifyOptions, compare_ours: bool) -> list[OutputCheck]:
    kind = head_kind(config)
    distributions = kind != "encoder"
    prompts = _generation_prompts(batches, config) if kind == "causal-lm" else []

    def run(model) -> ModelRun:  # one model in memory at a time
        result = run_model(model, batches, prompts, GENERATION_STEPS)
        del model
        gc.collect()
        return result

    base = job.base.path
    references = {"run-time adapter": run(unmerged_model(base, job.spec, dtype))}
    peft = peft_model(base, job.spec, dtype) if options.peft_reference else None
    if peft is not None:
        references["PEFT unmerged"] = run(peft)
        del peft
    candidates = {"merged folder": run(load_model(report.merged, dtype))}
    if compare_ours:
        candidates["d2export merge (in memory)"] = run(merged_in_memory(job.plan, dtype))
    name = torch_dtype_name(dtype)
    thresholds = options.thresholds
    rtol = output_rtol(name, report.merged_dtype)
    min_top1 = thresholds.min_top1 if thresholds.min_top1 is not None else MIN_TOP1[name]
    checks = []
    for ref_name, reference in references.items():
        for cand_name, candidate in candidates.items():
            comparison, generation = compare_runs(reference, candidate, batches, distributions=distributions,
                                                  steps=GENERATION_STEPS)
            check = OutputCheck(cand_name, ref_name, name, "logits" if distributions else "hidden states",
                                comparison, generation)
            check.judge(thresholds.atol if thresholds.atol is not None else rtol * comparison.scale, min_top1)
            checks.append(check)
    failing = [c for c in checks if not c.passed and c.candidate == "merged folder"]
    if failing and thresholds.atol is None and thresholds.min_top1 is None:  # explicit limits are final
        plan = _rounded_plan(job, report.merged_dtype)
        ours = candidates.get("d2export merge (in memory)")  # already run when it is that same merge
        floor_run = ours if ours is not None and plan is job.plan else run(merged_in_memory(plan, dtype))
        for check in failing:
            floor, _ = compare_runs(references[check.reference], floor_run, batches, distributions=distributions,
                                    steps=GENERATION_STEPS)
            check.judge_against_floor(floor)
            if check.passed:
                report.notes.append(
                    f"outputs ({name}) vs {check.reference}: beyond the fixed limits, but no further than the "
                    f"correctly rounded {report.merged_dtype} merge itself (max |d| {floor.max_abs:.3g}, top-1 "
                    f"{_share(floor.top1)}): the difference is the rounding of the output dtype, not the merge")
    return checks


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.2%}"


def _rounded_plan(job: Job, dtype: str):
    """The plan of the correctly rounded merge into ``dtype`` (the folder's): the job's own when it
    writes that dtype already."""
    floats = {str(t.out_dtype) for t in job.plan.tensors if t.update is not None or t.replacement is not None}
    if floats <= {dtype}:
        return job.plan
    return build_plan(job.spec, job.base, MergeOptions(dtype=dtype, compute_dtype="float64"))


def _generation_prompts(batches: list[Batch], config: dict) -> list[torch.Tensor]:
    """The first row of the first batches without its padding, cut so that the prompt and the
    generated tokens fit the model's position table (GPT-2-style learned positions end there)."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    keep = max(1, limit - GENERATION_STEPS) if isinstance(limit, int) else None
    return [b.input_ids[0, : int(b.attention_mask[0].sum())][:keep] for b in batches[:GENERATION_PROMPTS]]


def _task(merged: Path, job: Job, config: dict, tokenizer, data, dtype_name: str) -> TaskResult:
    dtype = TORCH_DTYPES[dtype_name]
    a = predict(unmerged_model(job.base.path, job.spec, dtype), tokenizer, config, data)
    b = predict(load_model(merged, dtype), tokenizer, config, data)
    return TaskResult(dtype_name, scoring(config), len(data.test), accuracy(a, data), accuracy(b, data),
                      sum(x != y for x, y in zip(a, b, strict=True)))
