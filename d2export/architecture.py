"""What the base's architecture says that its weight files do not: which modules are GPT-2
``Conv1D`` (weights stored ``[in, out]``) and which parameters are tied.

The model is instantiated on the ``meta`` device (no memory, no weights) from ``config.json``.
Architectures transformers does not know leave both unknown; the plan then falls back to
shapes and the adapter's ``fan_in_fan_out``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .quiet import libraries_quiet

if TYPE_CHECKING:
    import torch


@dataclass
class Architecture:
    conv1d: set[str] = field(default_factory=set)  # module paths stored [in, out]
    embeddings: set[str] = field(default_factory=set)
    tied: list[frozenset[str]] = field(default_factory=list)  # groups of parameter names sharing storage
    base_model_prefix: str = ""
    known: bool = False
    problem: str = ""

    def tied_group(self, name: str) -> frozenset[str] | None:
        return next((g for g in self.tied if name in g), None)


# Decoder-only causal LMs whose layout is known without building the model: Linear layers only,
# one input embedding ``model.embed_tokens``, and an ``lm_head`` tied to it when the config says
# so (the value here is the config class's default, used when config.json leaves the key out, as
# save_pretrained does for defaults). Building even a meta-device model imports torch and
# transformers' modeling code, which costs more time and memory than a whole merge of a
# mid-sized model (bench/README.md).
# tests/test_architecture.py checks every entry against the meta-device probe.
KNOWN_CAUSAL_LMS = {  # model_type -> tie_word_embeddings default
    "llama": False, "mistral": False, "qwen2": False, "qwen3": False, "gemma": True, "gemma2": True,
    "phi": False, "phi3": False, "mixtral": False, "starcoder2": True, "olmo": False, "olmo2": False,
    "granite": False, "cohere": True, "stablelm": False,
}

# Model types whose forward depends on tie_word_embeddings beyond the tie itself: T5 and its kin
# scale the decoder output by d_model**-0.5 only while the head is tied, so the untied folder a
# merge into the head needs would compute another model (tests/test_architectures.py).
RESCALED_WHEN_TIED = {"t5", "mt5", "umt5", "longt5", "switch_transformers", "pop2piano"}


def probe_architecture(config: dict) -> Architecture:
    known = _known_causal_lm(config)
    return known if known is not None else probe_meta(config)


def probe_meta(config: dict) -> Architecture:
    """Build the model on the meta device and look (any architecture transformers knows)."""
    try:
        model = _meta_model(config)
    except Exception as exc:  # any failure only means we know less; the plan says so
        return Architecture(problem=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    import torch
    from transformers.pytorch_utils import Conv1D

    arch = Architecture(known=True, base_model_prefix=getattr(model, "base_model_prefix", "") or "")
    for name, module in model.named_modules():
        if isinstance(module, Conv1D):
            arch.conv1d.add(name)
        elif isinstance(module, torch.nn.Embedding):
            arch.embeddings.add(name)
    groups: dict[int, set[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), set()).add(name)
    arch.tied = [frozenset(g) for g in groups.values() if len(g) > 1]
    return arch


def _meta_model(config: dict) -> torch.nn.Module:
    import torch  # imported here: a merge of a known causal LM never needs it
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"), libraries_quiet():
        if cls is not None:
            return cls._from_config(cfg)
        return transformers.AutoModel.from_config(cfg)


def _known_causal_lm(config: dict) -> Architecture | None:
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    if model_type not in KNOWN_CAUSAL_LMS or len(names) != 1 or not names[0].endswith("ForCausalLM"):
        return None
    tie = config.get("tie_word_embeddings", KNOWN_CAUSAL_LMS[model_type])
    return Architecture(
        embeddings={"model.embed_tokens"},
        tied=[frozenset({"lm_head.weight", "model.embed_tokens.weight"})] if tie else [],
        base_model_prefix="model", known=True,
    )
