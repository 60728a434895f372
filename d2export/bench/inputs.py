"""The workloads a benchmark times and their inputs: seeded random tokens, no padding."""

from __future__ import annotations

import torch

from ..errors import D2ExportError, OptionError
from ..runtime.calibration import config_batches
from .report import Workload

SEED = 0


def workloads(config: dict, batch_sizes: tuple[int, ...], seq_lens: tuple[int, ...]
              ) -> tuple[list[Workload], list[str]]:
    """Every batch size x sequence length, lengths clipped to the model's positions; and notes
    saying which were clipped."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    notes = []
    lengths = []
    for seq in seq_lens:
        if isinstance(limit, int) and seq > limit:
            notes.append(f"sequence length {seq} clipped to the model's {limit} positions")
            seq = limit
        lengths.append(seq)
    lengths = list(dict.fromkeys(lengths))
    return [Workload(b, s) for b in batch_sizes for s in lengths], notes


def bench_inputs(config: dict, workload: Workload, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random token ids ``[B, L]`` avoiding special ids, and an all-ones mask (no padding)."""
    try:
        # The calibration builder right-pads every row of a batch but the first, so B one-row
        # batches are B unpadded rows: a prefill benchmark times real tokens only.
        rows = config_batches(config, seed=seed, lengths=(workload.seq,) * workload.batch, batch_size=1)
    except OptionError as exc:
        if exc.option != "calibration":
            raise
        # The benchmark takes no calibration text, so the builder's "calibration is needed" misleads.
        raise D2ExportError("config.json has no vocab_size; cannot build benchmark inputs") from None
    ids = torch.cat([b.input_ids for b in rows])
    return ids, torch.ones_like(ids)
