"""Compare a candidate model's outputs with a reference's on the real (non-pad) positions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class OutputComparison:
    """Figures over every compared position (all batches accumulated)."""

    positions: int = 0
    max_abs: float = 0.0
    sum_abs: float = 0.0
    values: int = 0
    scale: float = 0.0  # max |reference| over the compared positions: what "relative" is relative to
    top1_agree: int = 0
    sum_kl: float = 0.0
    distributions: bool = True  # False for hidden states: top-1 and KL mean nothing there
    batches: int = 0
    worst: list[int] | None = None  # [batch, row, position] (or [batch, row]) of the largest difference

    @property
    def mean_abs(self) -> float:
        return self.sum_abs / self.values if self.values else 0.0

    @property
    def relative(self) -> float:
        return self.max_abs / self.scale if self.scale else 0.0

    @property
    def top1(self) -> float | None:
        return self.top1_agree / self.positions if self.distributions and self.positions else None

    @property
    def mean_kl(self) -> float | None:
        return self.sum_kl / self.positions if self.distributions and self.positions else None

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Accumulate one batch. ``reference``/``candidate``: ``[B, T, D]`` with ``mask`` ``[B, T]``
        (1 = compare), or ``[B, D]`` (one vector per sequence, e.g. a classifier's logits)."""
        ref, cand = reference.detach().double(), candidate.detach().double()
        if ref.shape != cand.shape:
            raise ValueError(f"output shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
        per_position = (ref - cand).abs().nan_to_num(nan=float("inf")).amax(-1)  # [B, T] or [B]
        if ref.dim() == 3 and mask is not None:
            keep = mask.bool()
            per_position = per_position.masked_fill(~keep, -1.0)
            ref, cand = ref[keep], cand[keep]  # [N, D]
        else:
            ref, cand = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        diff = (ref - cand).abs()
        batch_worst = float(per_position.max()) if per_position.numel() else 0.0
        if batch_worst > self.max_abs or self.worst is None:
            at = torch.unravel_index(per_position.argmax(), per_position.shape)
            self.worst = [self.batches, *(int(i) for i in at)]
        self.max_abs = max(self.max_abs, batch_worst)
        self.batches += 1
        self.sum_abs += float(diff.nan_to_num(posinf=0.0).sum())
        self.values += diff.numel()
        self.scale = max(self.scale, float(ref.abs().max()) if ref.numel() else 0.0)
        self.positions += ref.shape[0]
        if self.distributions:
            self.top1_agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
            log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
            self.sum_kl += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())

    def where(self) -> str:
        if self.worst is None:
            return "-"
        names = ("batch", "row", "position")
        return " ".join(f"{n} {i}" for n, i in zip(names, self.worst, strict=False))

    def to_dict(self) -> dict:
        skip = ("sum_abs", "sum_kl", "top1_agree", "values", "batches")
        data = {k: v for k, v in asdict(self).items() if k not in skip}
        data.update(mean_abs=self.mean_abs, relative=self.relative, top1=self.top1, mean_kl=self.mean_kl)
        return data
