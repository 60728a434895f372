"""What the base's architecture says that its weight files do not: which modules are GPT-2
``Conv1D`` (weights stored ``[in, out]``) and which parameters are tied.

The model is instantiated on the ``meta`` device (no memory, no weights) from ``config.json``.
Architectures transformers does not know leave both unknown; the plan then falls back to
shapes and the adapter's ``fan_in_fan_out``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

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


def probe_architecture(config: dict) -> Architecture:
    try:
        model = _meta_model(config)
    except Exception as exc:  # any failure only means we know less; the plan says so
        return Architecture(problem=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
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
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cls is not None:
            return cls._from_config(cfg)
        return transformers.AutoModel.from_config(cfg)
