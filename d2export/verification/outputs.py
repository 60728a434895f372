"""Output-level check: the merged model against the unmerged one (base + the adapter applied at run
time), on padded calibration batches, in a given dtype.

References: d2export's run-time adapter layers (``runtime.layers.inject_adapter``, computing what training
computed) always; for PEFT LoRA-family adapters also PEFT's own unmerged ``PeftModel``, an
implementation that shares nothing with ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..runtime.calibration import Batch
from ..runtime.comparison import OutputComparison
from ..runtime.models import greedy_tokens, model_output

# How much further from the reference than the correctly rounded merge a folder may be, when the
# fixed limits fail (see OutputCheck.judge_against_floor): max |d| and mean KL within 1.5x, top-1
# agreement at most half a percentage point lower. A wrong scale, tau or a dropped branch moves
# outputs by orders of magnitude more than rounding does.
FLOOR_SLACK = 1.5
FLOOR_TOP1_SLACK = 0.005


@dataclass
class Generation:
    prompts: int = 0
    steps: int = 0
    identical: int = 0  # prompts whose greedy continuation is the same token for token
    first_divergence: list[int | None] = field(default_factory=list)  # step where it differed

    def to_dict(self) -> dict:
        return {"prompts": self.prompts, "steps": self.steps, "identical": self.identical,
                "agreement": self.identical / self.prompts if self.prompts else None,
                "first_divergence": self.first_divergence}


@dataclass
class OutputCheck:
    """One candidate model against one reference, in one dtype."""

    candidate: str  # "merged folder", "d2export merge (in memory)"
    reference: str  # "run-time adapter", "PEFT unmerged"
    dtype: str
    output: str  # "logits" or "hidden states"
    comparison: OutputComparison
    generation: Generation | None = None
    max_abs_allowed: float = 0.0
    min_top1: float | None = None
    problem: str | None = None
    # The correctly rounded merge against the same reference, measured when the fixed limits fail.
    floor: OutputComparison | None = None

    @property
    def passed(self) -> bool:
        return self.problem is None

    def judge_against_floor(self, floor: OutputComparison) -> None:
        """Pass a check that failed the fixed limits if the candidate is no further from the
        reference than the correctly rounded merge into the same dtype is: the best any merge
        into that dtype can do. Its distance is the rounding floor, which near-tied logits make
        model-dependent; the slack (:data:`FLOOR_SLACK`, :data:`FLOOR_TOP1_SLACK`) admits another
        tool's merge, whose elements may sit a unit or two off the correct rounding."""
        self.floor = floor
        c = self.comparison
        within = c.max_abs <= FLOOR_SLACK * floor.max_abs
        if c.mean_kl is not None and floor.mean_kl is not None:
            within = within and c.mean_kl <= FLOOR_SLACK * floor.mean_kl + 1e-12
        if c.top1 is not None and floor.top1 is not None:
            within = within and c.top1 >= floor.top1 - FLOOR_TOP1_SLACK
        if within:
            self.problem = None

    def judge(self, max_abs_allowed: float, min_top1: float | None) -> None:
        c = self.comparison
        self.max_abs_allowed, self.min_top1 = max_abs_allowed, min_top1
        if not c.max_abs <= max_abs_allowed:  # also catches inf/nan
            self.problem = (f"{self.candidate} vs {self.reference} ({self.dtype}): max |d{self.output}| "
                            f"{c.max_abs:.3g} > {max_abs_allowed:.3g} (scale {c.scale:.3g}), worst at {c.where()}")
        elif min_top1 is not None and c.top1 is not None and c.top1 < min_top1:
            self.problem = (f"{self.candidate} vs {self.reference} ({self.dtype}): top-1 agreement "
                            f"{c.top1:.2%} < {min_top1:.2%}")

    def to_dict(self) -> dict:
        return {"candidate": self.candidate, "reference": self.reference, "dtype": self.dtype,
                "output": self.output, **self.comparison.to_dict(),
                "generation": self.generation.to_dict() if self.generation else None,
                "max_abs_allowed": self.max_abs_allowed, "min_top1": self.min_top1, "passed": self.passed,
                "rounding_floor": self.floor.to_dict() if self.floor is not None else None}


@dataclass
class ModelRun:
    """What one model produced on the calibration batches and generation prompts. Models are run
    one at a time and compared afterwards, so only one is ever in memory."""

    outputs: list[torch.Tensor]
    greedy: list[torch.Tensor]


def run_model(model: nn.Module, batches: list[Batch], prompts: list[torch.Tensor], steps: int) -> ModelRun:
    return ModelRun([model_output(model, b) for b in batches], [greedy_tokens(model, p, steps) for p in prompts])


def compare_runs(reference: ModelRun, candidate: ModelRun, batches: list[Batch], *, distributions: bool,
                 steps: int) -> tuple[OutputComparison, Generation | None]:
    result = OutputComparison(distributions=distributions)
    for ref, cand, batch in zip(reference.outputs, candidate.outputs, batches, strict=True):
        result.add(ref, cand, batch.attention_mask if ref.dim() == 3 else None)
    if not reference.greedy:
        return result, None
    generation = Generation(prompts=len(reference.greedy), steps=steps)
    for a, b in zip(reference.greedy, candidate.greedy, strict=True):
        differ = (a != b).nonzero()
        generation.first_divergence.append(int(differ[0]) if differ.numel() else None)
        generation.identical += int(differ.numel() == 0)
    return result, generation
