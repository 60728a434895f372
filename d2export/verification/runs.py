"""The ladder's model runs: each model over the calibration batches, the unmerged model's greedy
continuation from the prompts' batch and the others' teacher-forced choices along it
(:mod:`.outputs` compares what they produce)."""

from __future__ import annotations

import functools
from collections.abc import Collection
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..runtime.calibration import Batch
from ..runtime.models import model_output

GENERATION_PROMPTS, GENERATION_STEPS = 3, 8  # the greedy continuation's prompts and its length


@dataclass
class ModelRun:
    """What one model produced: its outputs on the calibration batches, and its predictions along the
    unmerged model's greedy continuation ([prompts, steps], None without generation)."""

    outputs: list[torch.Tensor]
    followed: torch.Tensor | None = None


@dataclass(frozen=True)
class Prompts:
    """The greedy continuation's prompts: rows of one calibration batch, cut to one length with
    no padding inside, so they run as one batch."""

    batch: int  # index of the calibration batch
    rows: torch.Tensor  # row indices in it
    length: int

    def tokens(self, batches: list[Batch]) -> torch.Tensor:
        return batches[self.batch].input_ids[self.rows, :self.length]


@torch.no_grad()
def run_model(model: nn.Module, batches: list[Batch], *, halt=lambda: None, prompts: Prompts | None = None,
              steps: int = 0, publish=None, follow=None, only: Collection[int] | None = None,
              outputs: list[torch.Tensor | None] | None = None, delivered=None) -> ModelRun:
    """The model's outputs on ``batches`` and, with ``prompts``, its part in the greedy check:

    * ``publish`` (the unmerged model): it generates ``steps`` greedy tokens after the prompts and
      hands them to ``publish`` as soon as they exist, before its other batches;
    * ``follow`` (every other model): a function that returns those tokens (waiting for them); the
      model's own next-token choice at each of them is recorded, teacher-forced.

    The prompts are a prefix of some rows of one calibration batch, so that batch's forward is
    their prompt forward too: its key/value cache, cut to the prompts' rows and length, carries the
    continuation (a cache that cannot be cut, e.g. sliding-window layers, means one forward of the
    prompts again). Every model runs that batch first (:func:`batch_order`); a follower keeps the
    cut cache through its other batches and follows last, by when the generator has usually
    published its tokens (it generates while the follower runs those batches, instead of the
    follower waiting for it).
    ``halt`` is called between forwards (it raises to stop the run). ``only``: the indices of the
    batches to run (the others' outputs stay None); the greedy part comes with the prompts' batch.
    ``outputs``: the list to put the outputs in (default: a new one); ``delivered``: called with a
    batch's index once its output is there (it may take the output out of ``outputs``)."""
    if outputs is None:
        outputs = [None] * len(batches)
    order = [i for i in batch_order(len(batches), prompts) if only is None or i in only]
    if prompts is not None and prompts.batch not in order:
        prompts = None
    followed = prompted = None
    for i in order:
        halt()
        if prompts is None or i != prompts.batch:
            outputs[i] = model_output(model, batches[i])
        else:
            cut = _cut_cache(model, prompts)
            given = {} if cut is None else {"past_key_values": cut}
            out = model(**batches[i].model_inputs(), use_cache=True, **given)
            outputs[i] = out.logits
            first = out.logits[prompts.rows, prompts.length - 1].argmax(-1, keepdim=True)  # [P, 1]
            cache = out.past_key_values
            prompted = first, cache if cut is not None and cache is cut else _prompt_cache(cache, prompts)
            del out, cache, cut, given
        if delivered is not None:
            delivered(i)
        if prompted is not None and publish is not None:
            publish(_greedy(model, prompts.tokens(batches), *prompted, steps, halt))
            prompted = None
    if prompted is not None:
        halt()
        followed = _followed(model, prompts.tokens(batches), *prompted, follow())
    return ModelRun(outputs, followed)


def generation_prompts(batches: list[Batch], config: dict) -> Prompts:
    """The calibration rows with the most real tokens (in the longest batch), cut to one length so
    they run as one batch, and so that the prompt and the generated tokens fit the model's position
    table (GPT-2-style learned positions end there)."""
    at = max(range(len(batches)), key=lambda i: int(batches[i].attention_mask.sum(1).max()))
    lengths = batches[at].attention_mask.sum(1)
    longest = lengths.argsort(descending=True, stable=True)[:GENERATION_PROMPTS]
    length = int(lengths[longest].min())
    limit = config.get("max_position_embeddings") or config.get("n_positions")
    if isinstance(limit, int):
        length = min(length, max(1, limit - GENERATION_STEPS))
    return Prompts(at, longest, length)


def batch_order(count: int, prompts: Prompts | None) -> list[int]:
    """The order every model runs the batches in, and every comparison takes them in: the prompts'
    batch first, then the others. A follower running that batch last, instead of keeping its cache,
    held the generator's outputs of it until then: the two models' largest outputs are compared, and
    dropped, first (:class:`.folds.Folds`)."""
    order = list(range(count))
    if prompts is not None and prompts.batch in order:
        order.remove(prompts.batch)
        order.insert(0, prompts.batch)
    return order


def _cut_cache(model: nn.Module, prompts: Prompts):
    """A key/value cache for the prompts' batch forward that keeps, of each layer's keys and values,
    only the prompts' rows and length as the forward makes them; None where the model's own cache is
    not made of plain dynamic layers (then :func:`_prompt_cache` cuts what the model returns). Kept
    whole, the batch's cache is as large as its logits or larger, and both models hold theirs at
    once with their logits (docs/design.md §6, *Bounded memory*)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        cache = DynamicCache(config=model.config)
    except (AttributeError, TypeError, ValueError):  # a config without a decoder's layer count
        return None
    if not getattr(cache, "layers", None) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cut_layer = _cut_layer_class()
    cache.layers = [cut_layer(prompts) for _ in cache.layers]
    return cache


@functools.cache
def _cut_layer_class():
    """Made on first use: it derives from transformers' class, imported only when a model runs."""
    from transformers.cache_utils import DynamicLayer

    class CutLayer(DynamicLayer):
        """A dynamic layer whose first update (the prompts' batch) keeps only the prompts' rows and
        length, and hands the attention the whole batch's keys and values; later updates (greedy
        steps, the teacher-forced continuation) append as any dynamic layer does."""

        def __init__(self, prompts: Prompts):
            super().__init__()
            self.prompts: Prompts | None = prompts

        def update(self, key_states, value_states, cache_kwargs=None):
            if self.prompts is None:
                return super().update(key_states, value_states, cache_kwargs)
            rows, length = self.prompts.rows, self.prompts.length
            self.prompts = None
            super().update(key_states[..., :length, :][rows], value_states[..., :length, :][rows], cache_kwargs)
            return key_states, value_states

    return CutLayer


def _prompt_cache(cache, prompts: Prompts):
    """The batch's key/value cache cut to the prompts' rows and length; None where it cannot be."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.crop(prompts.length)
    cache.batch_select_indices(prompts.rows)
    return cache


def _greedy(model: nn.Module, prompts: torch.Tensor, first: torch.Tensor, cache, steps: int, halt) -> torch.Tensor:
    """``[P, steps]``: greedy tokens after the prompts, ``first`` being the first of them. With the
    key/value cache each step computes one token per prompt (a streamed model still reads every
    weight once per step)."""
    tokens = [first]
    if cache is None:
        cache = model(input_ids=prompts, use_cache=True).past_key_values
    for _ in range(steps - 1):
        halt()
        out = model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)


def _followed(model: nn.Module, prompts: torch.Tensor, first: torch.Tensor, cache,
              continuation: torch.Tensor | None) -> torch.Tensor | None:
    """``[P, steps]``: the model's own choice before each token of ``continuation``, teacher-forced
    in one forward: ``first`` (from the prompts' own forward), then the choices after each of the
    continuation's tokens but the last."""
    if continuation is None:
        return None
    if cache is None:
        logits = model(input_ids=torch.cat([prompts, continuation[:, :-1]], dim=1)).logits[:, prompts.shape[1]:]
    else:
        logits = model(input_ids=continuation[:, :-1], past_key_values=cache, use_cache=True).logits
    return torch.cat([first, logits.argmax(-1)], dim=1)


@contextmanager
def one_thread():
    """torch on one thread for the duration. A streamed forward is a long chain of small
    operations (each weight read and converted, thin low-rank products, one token per prompt in a
    greedy step); split over threads, every one of them waits for the slowest thread, and when
    other processes share the cores that wait is a scheduler time slice (docs/design.md §6, *Cost*:
    a little faster on idle cores, many times slower on busy ones). The ladder uses the cores by
    running models side by side instead, each on its own thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
