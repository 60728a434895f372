"""The rungs' output comparisons, made batch by batch as the ladder's models produce their outputs
(docs/design.md §6, *Bounded memory*)."""

from __future__ import annotations

import threading

import torch

from ..runtime.comparison import OutputComparison
from .outputs import FOLDER, ROUNDED, UNMERGED, add_batch

# each rung's models: (candidate, reference)
COMPARED = {"fidelity": (FOLDER, UNMERGED), "loading": (FOLDER, ROUNDED), "rounding cost": (ROUNDED, UNMERGED)}


class Folds:
    """The rungs' figures, folded batch by batch as the models produce their outputs, each output
    then dropped once no rung to come needs it: every model's logits, kept to the end, were the
    largest part of verify's peak above the process itself (docs/design.md §6, *Bounded memory*).

    The fidelity rung (the folder against the unmerged model) folds as *U* and *F* run side by
    side. Until the weight check says whether the folder is exact, everything is kept. When it is,
    only the folder's first batch stays (the loading rung's probe), and the unmerged model's
    outputs where PEFT's model is compared with them (``keep_unmerged``); when it is not, the
    correctly rounded merge runs in full, and the loading and rounding-cost rungs fold as its
    batches come, each output dropped once every rung that compares it has it."""

    def __init__(self, ladder, keep_unmerged: bool):
        count = len(ladder.batches)
        self.batches, self.keep_unmerged = ladder.batches, keep_unmerged
        self.outputs: dict[str, list[torch.Tensor | None]] = {name: [None] * count
                                                             for name in (UNMERGED, FOLDER, ROUNDED)}
        self.order, self.distributions = ladder.order, ladder.distributions
        # each rung's figures by batch, as its two models have produced it (the correctly rounded
        # merge's two parts run their batches in no common order), assembled in the models' order
        self.compared: dict[str, dict[int, OutputComparison]] = {rung: {} for rung in COMPARED}
        self.exact: bool | None = None  # None until the weight check is done
        self.lock = threading.Lock()

    def delivered(self, i: int) -> None:
        """Called by a model's run with batch ``i``'s output (on its thread): compares it where the
        other model of a rung has it."""
        with self.lock:
            for rung, (candidate, reference) in COMPARED.items():
                ours, theirs = self.outputs[candidate][i], self.outputs[reference][i]
                if ours is not None and theirs is not None and i not in self.compared[rung]:
                    figures = self.compared[rung][i] = OutputComparison(distributions=self.distributions)
                    add_batch(figures, theirs, ours, self.batches[i], i)
            self._drop()

    def settle(self, exact: bool) -> None:
        """The weight check's answer: whether every tensor of the folder is the correctly rounded one."""
        with self.lock:
            self.exact = exact
            self._drop()

    def _drop(self) -> None:
        if self.exact is None:
            return
        rungs = ["fidelity"] if self.exact else list(COMPARED)
        for name, outputs in self.outputs.items():
            if name == UNMERGED and self.keep_unmerged:
                continue
            compared_in = [self.compared[rung] for rung in rungs if name in COMPARED[rung]]
            for i, output in enumerate(outputs):
                if output is not None and compared_in and all(i in compared for compared in compared_in) and (
                        not (self.exact and name == FOLDER and i == 0)):  # the loading rung's probe
                    outputs[i] = None

    def folded(self, rung: str) -> OutputComparison:
        """The rung's figures over every batch, taken in the models' order."""
        missing = [i for i in self.order if i not in self.compared[rung]]
        if missing:
            raise RuntimeError(f"{rung}: batches {missing} were not compared")
        result = OutputComparison(distributions=self.distributions)
        for i in self.order:
            result.extend(self.compared[rung][i])
        return result
