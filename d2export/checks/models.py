"""Loading a model folder the way a serving stack would, and running it on a calibration batch."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import D2ExportError
from .calibration import Batch


def head_kind(config: dict) -> str:
    """``causal-lm``, ``sequence-classification`` or ``encoder`` (hidden states, no head)."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal-lm"
    if arch.endswith("ForSequenceClassification"):
        return "sequence-classification"
    return "encoder"


def read_config(folder: Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise D2ExportError(f"{folder}: no config.json, not a Hugging Face model folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise D2ExportError(f"{path}: invalid JSON ({exc.msg})") from None


def load_model(folder: Path, dtype: torch.dtype = torch.float32, **config_overrides) -> nn.Module:
    """``from_pretrained`` with the Auto class the config's architecture calls for, in eval mode."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # d2export shows its own progress; one bar per shard is noise
    kind = head_kind(read_config(folder))
    cls = {"causal-lm": AutoModelForCausalLM, "sequence-classification": AutoModelForSequenceClassification}.get(
        kind, AutoModel
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = cls.from_pretrained(folder, dtype=dtype, **config_overrides)
        except (OSError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise D2ExportError(f"{folder}: transformers cannot load it ({msg})") from None
    return model.eval()


@torch.no_grad()
def model_output(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits (``[B, T, V]`` for LMs, ``[B, labels]`` for classifiers) or the last hidden state."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens after ``prompt`` ([T], no padding), by full forwards (no cache), so
    the run-time adapter model and any merged model take exactly the same path."""
    ids = prompt.unsqueeze(0)
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel():]
