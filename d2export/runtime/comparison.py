"""Compare a candidate model's outputs with a reference's on the real (non-pad) positions."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

# Output values compared at a time: 512 KB per float64 temporary, so that each stays in the cache
# and below the size from which verify's heap maps blocks afresh (cli.process.tune_malloc), where
# every temporary of every chunk would be page-faulted anew.
COMPARE_ELEMENTS = 2**16


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
    # Whether the top-1 choices agree, per compared position in order: two candidates against the
    # same reference on the same inputs are compared position by position (the fidelity rung's
    # sign test), not only by their counts.
    top1_hits: list[torch.Tensor] = field(default_factory=list, repr=False)

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

    def add(self, reference: torch.Tensor, candidate: torch.Tensor, mask: torch.Tensor | None = None, *,
            batch: int | None = None) -> None:
        """Accumulate one batch. ``reference``/``candidate``: ``[B, T, D]`` with ``mask`` ``[B, T]``
        (1 = compare), or ``[B, D]`` (one vector per sequence, e.g. a classifier's logits); ``batch``:
        its index where batches are not added in order (default: how many came before). Worked
        through in float64 a few positions at a time: a whole batch of a 32K vocabulary in float64,
        with its differences and log-probabilities, is several hundred MB at once."""
        if reference.shape != candidate.shape:
            raise ValueError(f"output shapes differ: {tuple(reference.shape)} vs {tuple(candidate.shape)}")
        width = reference.shape[-1]
        shape = reference.shape[:-1]  # [B, T] or [B]: one vector per position
        ref_all, cand_all = reference.detach().reshape(-1, width), candidate.detach().reshape(-1, width)
        keep = mask.bool().reshape(-1) if reference.dim() == 3 and mask is not None else None
        per_position = torch.empty(ref_all.shape[0], dtype=torch.float64)  # -1 where not compared
        # One agreement tensor per batch, filled chunk by chunk: a tiny tensor kept from each chunk
        # sits between the chunks' freed temporaries, and the heap grew by about one temporary per
        # chunk instead of reusing them (docs/design.md §6, *Bounded memory*).
        agree = torch.empty(ref_all.shape[0] if keep is None else int(keep.sum()), dtype=torch.bool)
        compared = 0
        step = max(1, COMPARE_ELEMENTS // max(1, width))
        for start in range(0, ref_all.shape[0], step):
            part = slice(start, start + step)
            ref, cand = ref_all[part].double(), cand_all[part].double()
            diff = (ref - cand).abs()
            per = diff.nan_to_num(nan=float("inf")).amax(-1)
            if keep is not None:
                kept = keep[part]
                per = per.masked_fill(~kept, -1.0)
                ref, cand, diff = ref[kept], cand[kept], diff[kept]
            per_position[part] = per
            self.sum_abs += float(diff.nan_to_num(posinf=0.0).sum())
            self.values += diff.numel()
            self.scale = max(self.scale, float(ref.abs().max()) if ref.numel() else 0.0)
            self.positions += ref.shape[0]
            if self.distributions:
                hits = agree[compared:compared + ref.shape[0]]
                torch.eq(ref.argmax(-1), cand.argmax(-1), out=hits)
                self.top1_agree += int(hits.sum())
                log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
                self.sum_kl += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
            compared += ref.shape[0]
        if self.distributions:
            self.top1_hits.append(agree)
        batch_worst = float(per_position.max()) if per_position.numel() else 0.0
        if batch_worst > self.max_abs or self.worst is None:
            at = torch.unravel_index(per_position.argmax(), shape) if per_position.numel() else ()
            self.worst = [self.batches if batch is None else batch, *(int(i) for i in at)]
        self.max_abs = max(self.max_abs, batch_worst)
        self.batches += 1

    def extend(self, later: OutputComparison) -> None:
        """Add the figures of ``later``, a comparison of the batches that follow (``batch`` given
        to its :meth:`add`): a comparison assembled from batches compared in another order. Sums
        may differ from one comparison of every batch in the last bits."""
        self.positions += later.positions
        self.values += later.values
        self.sum_abs += later.sum_abs
        self.sum_kl += later.sum_kl
        self.top1_agree += later.top1_agree
        self.scale = max(self.scale, later.scale)
        if later.worst is not None and (later.max_abs > self.max_abs or self.worst is None):
            self.worst = later.worst
        self.max_abs = max(self.max_abs, later.max_abs)
        self.top1_hits += later.top1_hits
        self.batches += later.batches

    def agreement(self) -> torch.Tensor | None:
        """Top-1 agreement per compared position (None where it was not recorded)."""
        return torch.cat(self.top1_hits) if self.top1_hits else None

    def where(self) -> str:
        if self.worst is None:
            return "-"
        names = ("batch", "row", "position")
        return " ".join(f"{n} {i}" for n, i in zip(names, self.worst, strict=False))

    def to_dict(self) -> dict:
        skip = ("sum_abs", "sum_kl", "top1_agree", "values", "batches", "top1_hits")
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        data.update(mean_abs=self.mean_abs, relative=self.relative, top1=self.top1, mean_kl=self.mean_kl)
        return data
