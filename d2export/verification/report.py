"""The verdict of ``verify`` and the limits it is judged by (docs/design.md §6).

Rungs, each with figures in the report and a rule that decides pass or fail:

1. weights (:mod:`.weights`): every tensor within its unit bound of the correctly rounded exact
   merge, streamed; copies byte-identical to the base;
2. outputs (:mod:`.outputs`), in the folder's dtype (or those asked for), every model streamed:
   * loading: the folder as transformers loads it gives the same outputs as the correctly rounded
     merge run through the same code (judged when the weights are all exact);
   * fidelity: the folder is no further from the unmerged model than the correctly rounded merge
     is, up to a stated slack, and never held to less than the fixed limits below;
   * references: PEFT's own unmerged model agrees with d2export's run-time adapter in float32;
   * rounding cost (figures, and a note when material): the correctly rounded merge against the
     unmerged model, and per module how much of the update rounding erases;
3. task (:mod:`.task`, optional): accuracy of both on a labelled set, and the gap.

Fixed output limits, relative to the reference's largest output (the "logit scale"); figures in
brackets are the largest measured over every fixture and all-MiniLM-L6-v2:

* float32 run of a float32 merge: the two models differ only in the order of float32 operations
  (``x W'^T`` against ``g * (x W0^T + c (x A^T) B^T)``), i.e. by round-off: 1e-5 of the scale
  [2.3e-6; MiniLM, 6 layers, 8.8e-7]. This is also the references rule (PEFT against ours).
* float32 run of a bf16/fp16 merge: the merged weights are rounded (relative 2^-9 / 2^-12 each),
  the reference's are not, so outputs carry that rounding: 4 ulps of the scale [bf16: 3.7e-3].
* a run in bf16/fp16 itself: both models also compute in that dtype, in different orders:
  16 ulps of the scale [bf16: 1.9e-2, about five ulps].

Top-1 agreement at least 0.99 in float32 and 0.95 in a 16-bit run [1.0 and 0.987]. These fixed
limits are what a correct merge of the fixtures shows; a model with near-tied logits (a
random-weight 320M Llama: 97.4% top-1 in float32 for a correct bf16 merge) shows more, which is
why the fidelity rule measures the floor of each model instead. ``atol`` and ``min_top1`` replace
both the fixed limits and the floor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..basesource import BaseSource
from ..options import Thresholds
from .weights import WeightReport

if TYPE_CHECKING:  # torch's: verify imports it only for the output checks, after the weight check starts
    from .outputs import OutputCheck
    from .peft_reading import PeftReading
    from .task import TaskResult

ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
FP32_OUTPUT_RTOL = 1e-5
MIN_TOP1 = {"float32": 0.99, "bfloat16": 0.95, "float16": 0.95}
# A rounding cost worth a line: rounding erases a tenth of the adapter's update (by norm).
MATERIAL_UPDATE_LOST = 0.10


def output_rtol(run_dtype: str, merged_dtype: str) -> float:
    """Allowed max |d output| as a fraction of the reference's largest output (module docstring)."""
    if run_dtype in ULP:
        return 16 * ULP[run_dtype]
    if merged_dtype in ULP:
        return 4 * ULP[merged_dtype]
    return FP32_OUTPUT_RTOL


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
    base_source: BaseSource | None = None  # how the base checked against was found
    config_failures: list[str] = field(default_factory=list)  # config.json against the tensors (.declared)
    file_failures: list[str] = field(default_factory=list)  # config, tokenizer, ST modules against the merge's (.files)
    peft_reading: PeftReading | None = None  # PEFT's reading of the adapter, where its model was too large

    @property
    def failures(self) -> list[str]:
        lines = [f"config: {problem}" for problem in self.config_failures]
        lines += [f"files: {problem}" for problem in self.file_failures]
        if self.weights is not None:
            lines += [f"weights: {t.name}: {t.problem}" for t in self.weights.failures]
        lines += [f"outputs: {o.problem}" for o in self.outputs if o.problem]
        if self.peft_reading is not None:
            lines += [f"references: PEFT's reading of the adapter: {p}" for p in self.peft_reading.problems]
        lines += [f"task ({r.dtype}): accuracy gap {r.gap_pp:+.2f} pp exceeds {self.thresholds.max_task_gap_pp:g} pp"
                  for r in self.task if abs(r.gap_pp) > self.thresholds.max_task_gap_pp]
        return lines

    @property
    def passed(self) -> bool:
        return not self.failures

    def rounding_cost(self) -> dict:
        cost = self.weights.rounding_cost() if self.weights is not None else {}
        outputs = {o.dtype: o.comparison.to_dict() for o in self.outputs if o.rung == "rounding cost"}
        return {**cost, "outputs": outputs} if cost or outputs else {}

    def rounding_note(self) -> None:
        """One line when writing the folder's dtype costs the adapter materially."""
        cost = self.weights.rounding_cost() if self.weights is not None else {}
        if not cost or cost["update_lost"] < MATERIAL_UPDATE_LOST:
            return
        worst = ", ".join(f"{w['name']} ({w['update_lost']:.0%})" for w in cost["worst"])
        top1 = [o.comparison.top1 for o in self.outputs
                if o.rung == "rounding cost" and o.comparison.top1 is not None]
        effect = f"; the correctly rounded merge's top-1 agreement with the unmerged model: {min(top1):.2%}" \
            if top1 else ""
        self.notes.append(
            f"rounding to {self.merged_dtype} erases {cost['update_lost']:.0%} of the adapter's update (norm; "
            f"{cost['update_vanished']:.0%} of changed elements round back to the base value){effect}; most in "
            f"{worst}: write float32 (--dtype float32) or keep those modules in higher precision")

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "failures": self.failures,
            "merged": str(self.merged), "adapter": str(self.adapter), "base": str(self.base),
            "base_source": self.base_source.to_dict() if self.base_source is not None else None,
            "method": self.method, "merged_by": self.merged_by, "merged_dtype": self.merged_dtype,
            "thresholds": self.thresholds.to_dict(),
            "calibration": self.calibration,
            "weights": self.weights.to_dict() if self.weights is not None else None,
            "rounding_cost": self.rounding_cost(),
            "outputs": [o.to_dict() for o in self.outputs],
            "peft_reading": self.peft_reading.to_dict() if self.peft_reading is not None else None,
            "task": [r.to_dict() for r in self.task],
            "notes": self.notes,
        }
