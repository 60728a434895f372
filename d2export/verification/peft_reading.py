"""PEFT's own reading of a PEFT adapter, without the model's weights.

Where PEFT's whole unmerged model cannot run (larger than ``--resident``), d2export's merge, its
unmerged reference and its weight check all take the adapter as d2export reads it, and a misreading
(a scale, a rank or alpha pattern, rsLoRA, DoRA, a target module) would pass them all. So PEFT builds
its LoRA layers on an empty base (every tensor on the meta device: no weights read, next to no
memory) with ``PeftModel.from_pretrained``, and each adapted module's rank, scale and DoRA flag as
PEFT holds them must equal d2export's, and the two must adapt the same modules. It compares how the
adapter is read, not the factors' values (the full comparison, on outputs, does that where it runs).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from ..job import Job
from ..spec import Rescale

ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter it loads


@dataclass
class PeftReading:
    modules: int = 0  # modules PEFT adapts
    problems: list[str] = field(default_factory=list)  # where d2export reads the adapter otherwise
    error: str | None = None  # PEFT could not build its layers on an empty model: nothing compared

    def to_dict(self) -> dict:
        return {"modules": self.modules, "problems": self.problems, "error": self.error}


def read_by_peft(job: Job) -> PeftReading:
    """PEFT's rank, scale and DoRA flag of every module it adapts, against d2export's (``job.spec``)."""
    reading = PeftReading()
    try:
        held = _peft_layers(job)
    except Exception as exc:  # PEFT's own limits on an empty model: say so, compare nothing
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reading.error = f"{type(exc).__name__}: {text}"[:300]
        return reading
    reading.modules = len(held)
    ours = {}
    for update in job.spec.updates.values():
        path = _canonical(held, update.module)
        ours[path] = (update.rank, update.terms[0].coefficient, update.rescale is Rescale.MAGNITUDE)
    for path in sorted(set(held) - set(ours)):
        reading.problems.append(f"PEFT adapts {path}, d2export does not")
    for path in sorted(set(ours) - set(held)):
        reading.problems.append(f"d2export adapts {path}, PEFT does not")
    for path in sorted(set(ours) & set(held)):
        (rank, scale, dora), (peft_rank, peft_scale, peft_dora) = ours[path], held[path]
        if rank != peft_rank or not math.isclose(scale, peft_scale, rel_tol=1e-12) or dora != peft_dora:
            reading.problems.append(f"{path}: PEFT reads rank {peft_rank}, scale {peft_scale:g}"
                                    f"{', DoRA' if peft_dora else ''}; d2export rank {rank}, scale {scale:g}"
                                    f"{', DoRA' if dora else ''}")
    return reading


def _peft_layers(job: Job) -> dict[str, tuple[int, float, bool]]:
    """PEFT's LoRA layers of ``job``'s adapter on an empty base shaped as the merge's output: module
    path -> (rank, scale, DoRA)."""
    import torch
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from ..runtime.models import AUTO_CLASSES, head_kind

    changes = dict(job.plan.config_updates)
    if "id2label" in changes:  # JSON keys are strings; transformers' configs take ints
        changes["id2label"] = {int(k): v for k, v in changes["id2label"].items()}
    config = transformers.AutoConfig.from_pretrained(job.base.path, **changes)
    cls = getattr(transformers, AUTO_CLASSES.get(head_kind({**job.base.config, **changes}), "AutoModel"))
    # torch's device context is this thread's alone (accelerate's init_empty_weights patches every
    # thread's modules, and verify reads this while its models load and run); the dtype given keeps
    # transformers from setting another process-wide default dtype meanwhile
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        skeleton = cls.from_config(config, dtype=torch.float32)
        model = PeftModel.from_pretrained(skeleton, job.spec.path, adapter_name=ADAPTER_NAME)
    return {path: (int(m.r[ADAPTER_NAME]), float(m.scaling[ADAPTER_NAME]), bool(m.use_dora.get(ADAPTER_NAME)))
            for path, m in model.base_model.model.named_modules()
            if isinstance(m, LoraLayer) and ADAPTER_NAME in m.r}


def _canonical(held: dict, module: str) -> str:
    """``module`` as PEFT's paths name it (with or without the base model's prefix)."""
    if module in held:
        return module
    return next((path for path in held if path.endswith(f".{module}") or module.endswith(f".{path}")), module)


__all__ = ["PeftReading", "read_by_peft"]
