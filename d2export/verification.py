"""``verify``: prove that a merged folder computes what the adapted model computed.

Three levels, each with figures in the report and thresholds that decide pass or fail:

1. weights (:mod:`.checks.weights`): every tensor against the exact merge, streamed;
2. outputs (:mod:`.checks.outputs`): the merged model against the unmerged one (our run-time
   adapter layers, and PEFT's own ``PeftModel`` for PEFT adapters) on padded calibration batches,
   in the merged dtype and in float32;
3. task (:mod:`.checks.task`, optional): accuracy of both on a labelled set, and the gap.

Default output thresholds are relative to the reference's largest output (the "logit scale");
figures in brackets are the largest measured over every fixture and all-MiniLM-L6-v2:

* float32 pass of a float32 merge: the two models differ only in the order of float32 operations
  (``x W'^T`` against ``g * (x W0^T + c (x A^T) B^T)``), i.e. by round-off: 1e-5 of the scale
  [2.3e-6; MiniLM, 6 layers, 8.8e-7]. A missing rescale on the 2-layer BERT fixture moves
  outputs by 1.9e-5, so the bound is kept tight; the weight check is the strict one in any case.
* float32 pass of a bf16/fp16 merge: the merged weights are rounded (relative 2^-9 / 2^-12 each),
  the reference's are not, so outputs carry that rounding: 4 ulps of the scale [bf16: 3.7e-3,
  about one ulp].
* a pass in bf16/fp16 itself: both models also compute in that dtype, in different orders:
  16 ulps of the scale [bf16: 1.9e-2, about five ulps].

Top-1 agreement must be at least 0.99 in float32 and 0.95 in a 16-bit pass [1.0 and 0.987]:
near-ties among random-token logits legitimately flip under 16-bit round-off. ``--atol`` and
``--min-top1`` override both.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .arrays import dtype_name, is_float, to_torch
from .checks.calibration import Batch, random_batches, special_ids, text_batches
from .checks.models import head_kind, load_model, read_config
from .checks.outputs import PEFT_METHODS, ModelRun, OutputCheck, compare_runs, peft_model, run_model, unmerged_model
from .checks.task import TaskResult, accuracy, load_task, predict, scoring
from .checks.weights import WeightReport, check_weights
from .errors import D2ExportError
from .formats import load_adapter
from .io import open_base
from .plan import Action, MergePlan, build_plan
from .resolve import resolve_base

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_ULP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FP32_OUTPUT_RTOL = 1e-5
MIN_TOP1 = {torch.float32: 0.99, torch.bfloat16: 0.95, torch.float16: 0.95}
DEFAULT_MAX_TASK_GAP_PP = 2.0
GENERATION_PROMPTS, GENERATION_STEPS = 3, 8


def output_rtol(run_dtype: torch.dtype, merged_dtype: torch.dtype) -> float:
    """Allowed max |d output| as a fraction of the reference's largest output (module docstring)."""
    if run_dtype in _ULP:
        return 16 * _ULP[run_dtype]
    if merged_dtype in _ULP:
        return 4 * _ULP[merged_dtype]
    return FP32_OUTPUT_RTOL


@dataclass
class Thresholds:
    max_units: float | None = None  # weights: error in stored-dtype units (default per dtype)
    atol: float | None = None  # outputs: absolute max |d output| (default: relative, per dtype)
    min_top1: float | None = None  # outputs: top-1 agreement (default per dtype)
    max_task_gap_pp: float = DEFAULT_MAX_TASK_GAP_PP

    def to_dict(self) -> dict:
        return {"max_units": self.max_units, "atol": self.atol, "min_top1": self.min_top1,
                "max_task_gap_pp": self.max_task_gap_pp,
                "output_rtol": "per dtype" if self.atol is None else None}


@dataclass
class VerifyReport:
    merged: Path
    adapter: Path
    base: Path
    method: str
    merged_by: str
    merged_dtype: str
    thresholds: Thresholds
    calibration: str = ""
    weights: WeightReport | None = None
    outputs: list[OutputCheck] = field(default_factory=list)
    task: list[TaskResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        lines = []
        if self.weights is not None:
            lines += [f"weights: {t.name}: {t.problem}" for t in self.weights.failures]
        lines += [f"outputs: {o.problem}" for o in self.outputs if o.problem]
        lines += [f"task ({r.dtype}): accuracy gap {r.gap_pp:+.2f} pp exceeds {self.thresholds.max_task_gap_pp:g} pp"
                  for r in self.task if abs(r.gap_pp) > self.thresholds.max_task_gap_pp]
        return lines

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "merged": str(self.merged), "adapter": str(self.adapter), "base": str(self.base),
            "method": self.method, "merged_by": self.merged_by, "merged_dtype": self.merged_dtype,
            "thresholds": self.thresholds.to_dict(),
            "calibration": self.calibration,
            "weights": self.weights.to_dict() if self.weights is not None else None,
            "outputs": [o.to_dict() for o in self.outputs],
            "task": [r.to_dict() for r in self.task],
            "notes": self.notes,
        }


def verify(
    merged: str | Path,
    adapter: str | Path,
    *,
    base: str | Path | None = None,
    weights: bool = True,
    outputs: bool = True,
    calibration: str | Path | None = None,
    task_data: str | Path | None = None,
    thresholds: Thresholds | None = None,
    peft_reference: bool = True,
    compare_ours: bool | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Check the model folder ``merged`` against ``adapter`` applied to its base.

    ``compare_ours`` (default: when the folder was not written by d2export) also runs d2export's
    own merge of the same adapter, in memory, through the output checks, so the folder's figures
    stand next to ours. Bad input raises :class:`D2ExportError`; a failed check does not raise, it
    is in the report (``report.passed``).
    """
    thresholds = thresholds or Thresholds()
    say = progress or (lambda _: None)
    merged = Path(merged)
    for what, path in (("calibration file", calibration), ("task data", task_data)):
        if path is not None and not Path(path).is_file():
            raise D2ExportError(f"{what} not found: {path}")
    spec = load_adapter(adapter)
    base_path = resolve_base(spec, base)
    base_model, merged_model = open_base(base_path), _open_merged(merged)
    plan = build_plan(spec, base_model)
    merged_dtype = _main_dtype(merged_model)
    merged_by = _merged_by(merged)
    report = VerifyReport(merged, spec.path, base_path, spec.method, merged_by, DTYPE_NAMES[merged_dtype], thresholds)
    try:
        if weights:
            report.weights = check_weights(plan, merged_model, max_units=thresholds.max_units,
                                           progress=lambda name: say(f"weights {name}"))
            if report.weights.extra:
                extra = ", ".join(report.weights.extra)
                report.notes.append(f"tensors in the folder that the merge does not produce: {extra}")
    finally:
        base_model.close()
        merged_model.close()
    config = read_config(merged)
    if outputs or task_data is not None:
        tokenizer = _tokenizer(merged, base_path) if (calibration or task_data) else None
        if compare_ours is None:
            compare_ours = merged_by != "d2export"
        run_dtypes = list(dict.fromkeys([merged_dtype, torch.float32]))
        if outputs:
            batches = _calibration(config, calibration, tokenizer, seed)
            report.calibration = (f"{calibration} ({len(batches)} batches)" if calibration else
                                  f"random tokens, seed {seed}, lengths {[b.input_ids.shape[1] for b in batches]}, "
                                  f"batch {batches[0].input_ids.shape[0]}, right-padded")
            for dtype in run_dtypes:
                say(f"outputs in {DTYPE_NAMES[dtype]}")
                report.outputs += _output_checks(plan, merged, base_path, spec, config, dtype, merged_dtype, batches,
                                                 thresholds, peft_reference, compare_ours, seed)
        if task_data is not None:
            data = load_task(task_data)
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                say(f"task accuracy in {DTYPE_NAMES[dtype]}")
                report.task.append(_task(merged, base_path, spec, config, tokenizer, data, dtype))
    if outputs and spec.method in PEFT_METHODS and not any(o.reference == "PEFT unmerged" for o in report.outputs):
        report.notes.append("PEFT reference not run (peft not installed, or disabled)")
    return report


def _open_merged(path: Path):
    if not path.is_dir():
        raise D2ExportError(f"merged model folder not found: {path}")
    return open_base(path)


def _main_dtype(model) -> torch.dtype:
    """The dtype holding most of the weights' bytes, as the torch dtype the models run in."""
    counts: dict[str, int] = {}
    for info in model.tensors.values():
        if is_float(info.dtype):
            counts[dtype_name(info.dtype)] = counts.get(dtype_name(info.dtype), 0) + info.nbytes
    name = max(counts, key=counts.get) if counts else "float32"
    if name not in DTYPE_NAMES.values():
        raise D2ExportError(f"{model.path}: weights are {name}; outputs can be checked for float32, bf16, fp16")
    return getattr(torch, name)


def _merged_by(folder: Path) -> str:
    try:
        return json.loads((folder / "d2export_report.json").read_text())["tool"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


def _tokenizer(merged: Path, base: Path):
    from transformers import AutoTokenizer

    for folder in (merged, base):
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception:  # transformers raises many kinds here; none is for the user to see
            continue
    raise D2ExportError(f"no tokenizer in {merged} or {base}: text calibration and task data need one")


def _calibration(config: dict, calibration, tokenizer, seed: int) -> list[Batch]:
    if calibration is not None:
        return text_batches(Path(calibration), tokenizer)
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        raise D2ExportError("config.json has no vocab_size; pass --calibration FILE (text)")
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    return random_batches(vocab, seed=seed, pad_id=config.get("pad_token_id") or 0, max_length=limit,
                          avoid=special_ids(config))


def _output_checks(plan, merged, base, spec, config, dtype, merged_dtype, batches, thresholds, peft_reference,
                   compare_ours, seed) -> list[OutputCheck]:
    kind = head_kind(config)
    distributions = kind != "encoder"
    # Greedy-generation prompts: the first row of the first batches, without its padding.
    prompts = [b.input_ids[0, : int(b.attention_mask[0].sum())] for b in batches[:GENERATION_PROMPTS]]
    prompts = prompts if kind == "causal-lm" else []

    def run(model) -> ModelRun:  # one model in memory at a time
        result = run_model(model, batches, prompts, GENERATION_STEPS)
        del model
        gc.collect()
        return result

    references = {"run-time adapter": run(unmerged_model(base, spec, dtype))}
    peft = peft_model(base, spec, dtype) if peft_reference else None
    if peft is not None:
        references["PEFT unmerged"] = run(peft)
        del peft
    candidates = {"merged folder": run(load_model(merged, dtype))}
    if compare_ours:
        candidates["d2export merge (in memory)"] = run(in_memory_merge(plan, base, dtype))
    rtol = output_rtol(dtype, merged_dtype)
    min_top1 = thresholds.min_top1 if thresholds.min_top1 is not None else MIN_TOP1[dtype]
    checks = []
    for ref_name, reference in references.items():
        for cand_name, candidate in candidates.items():
            comparison, generation = compare_runs(reference, candidate, batches, distributions=distributions,
                                                  steps=GENERATION_STEPS)
            check = OutputCheck(cand_name, ref_name, DTYPE_NAMES[dtype], "logits" if distributions else "hidden states",
                                comparison, generation)
            check.judge(thresholds.atol if thresholds.atol is not None else rtol * comparison.scale, min_top1)
            checks.append(check)
    return checks


def in_memory_merge(plan: MergePlan, base: Path, dtype: torch.dtype) -> torch.nn.Module:
    """d2export's merge of ``plan`` loaded into the base model in memory (for side-by-side figures)."""
    from .merge import produce

    overrides = {k: v for k, v in plan.config_updates.items() if k != "dtype"}
    model = load_model(base, dtype, **overrides)
    state = {t.name: produce(plan, t)[0] for t in plan.tensors if t.action is not Action.COPY}
    prefix = getattr(model, "base_model_prefix", "")
    keys = set(model.state_dict())
    renamed = {}
    for name, value in state.items():
        key = name if name in keys else next(
            (k for k in (f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if k in keys), None)
        if key is None:
            raise D2ExportError(f"in-memory merge: {name} is not a parameter of the loaded base model")
        renamed[key] = to_torch(value).to(dtype)
    model.load_state_dict(renamed, strict=False)
    return model.eval()


def _task(merged, base, spec, config, tokenizer, data, dtype) -> TaskResult:
    unmerged = unmerged_model(base, spec, dtype)
    candidate = load_model(merged, dtype)
    a, b = predict(unmerged, tokenizer, config, data), predict(candidate, tokenizer, config, data)
    return TaskResult(DTYPE_NAMES[dtype], scoring(config), len(data.test), accuracy(a, data), accuracy(b, data),
                      sum(x != y for x, y in zip(a, b, strict=True)))


def record_verification(folder: Path, report: VerifyReport) -> dict:
    """Add the verification figures to ``folder``'s ``d2export_report.json`` (replaced atomically)
    and a line to its model card; return the updated merge report."""
    path = folder / "d2export_report.json"
    merge_report = json.loads(path.read_text())
    merge_report["verification"] = report.to_dict()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(merge_report, indent=2) + "\n")
    os.replace(tmp, path)
    card = folder / "README.md"
    if card.is_file():
        verdict = "passed" if report.passed else f"FAILED ({len(report.failures)} checks)"
        summary = report.weights.summary() if report.weights is not None else None
        line = f"- verification {verdict}"
        if summary:
            line += (f": weights within {summary['max_units']:.2f} units, "
                     f"{summary['exact_fraction']:.2%} correctly rounded")
        text = card.read_text().replace("\nPer-module figures", f"{line}\n\nPer-module figures", 1)
        card.write_text(text)
    return merge_report
