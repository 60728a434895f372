"""The verdict of ``verify`` and the limits it is judged by.

Three levels, each with figures in the report and thresholds that decide pass or fail:

1. weights (:mod:`.weights`): every tensor against the exact merge, streamed;
2. outputs (:mod:`.outputs`): the merged model against the unmerged one (our run-time
   adapter layers, and PEFT's own ``PeftModel`` for PEFT adapters) on padded calibration batches,
   in the merged dtype and in float32;
3. task (:mod:`.task`, optional): accuracy of both on a labelled set, and the gap.

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
near-ties among random-token logits legitimately flip under 16-bit round-off. The ``atol`` and
``min_top1`` thresholds override both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..options import Thresholds
from .outputs import OutputCheck
from .task import TaskResult
from .weights import WeightReport

_ULP = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
FP32_OUTPUT_RTOL = 1e-5
MIN_TOP1 = {"float32": 0.99, "bfloat16": 0.95, "float16": 0.95}


def output_rtol(run_dtype: str, merged_dtype: str) -> float:
    """Allowed max |d output| as a fraction of the reference's largest output (module docstring)."""
    if run_dtype in _ULP:
        return 16 * _ULP[run_dtype]
    if merged_dtype in _ULP:
        return 4 * _ULP[merged_dtype]
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
