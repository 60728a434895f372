"""How verify compares with PEFT (:func:`peft_reference`), and PEFT's own reading of a PEFT
adapter, without the model's weights (:func:`read_by_peft`).

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
from dataclasses import dataclass, field

from ..arrays import is_float
from ..job import Job
from ..quiet import libraries_quiet
from ..spec import Rescale

ADAPTER_NAME = "default"  # the name PeftModel.from_pretrained gives the adapter it loads


@dataclass(frozen=True)
class PeftReference:
    """What verify compares with PEFT: its whole unmerged model (``model``), else its reading of the
    adapter (``reading``: the model does not fit the resident budget), or neither; and the report's
    note where the model was asked for and does not run."""

    model: bool
    reading: bool
    note: str | None


def peft_reference(job: Job, asked: bool, resident: int | None) -> PeftReference:
    """``asked``: the PEFT reference is on (``--no-peft`` not given); ``resident``: the bytes a model
    may hold in memory (None: any)."""
    from ..runtime.models import PEFT_METHODS, peft_usable

    if not (asked and job.spec.method in PEFT_METHODS):
        return PeftReference(False, False, None)
    if not peft_usable(job.spec):
        return PeftReference(False, False, "PEFT reference not run: peft is not installed or cannot load this adapter")
    size = 4 * sum(math.prod(info.shape) for info in job.base.tensors.values() if is_float(info.dtype))
    if resident is not None and size > resident:
        return PeftReference(False, True, (
            f"PEFT reference not run: PEFT needs the whole model in memory ({_mib(size)} in float32, more than the "
            f"resident budget of {_mib(resident)}; raise it with --resident); PEFT's reading of the adapter "
            "(rank, scale and DoRA of every module) is compared with d2export's instead"))
    return PeftReference(True, False, None)


def _mib(size: int) -> str:
    return f"{size / 2**20:.0f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


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
    with libraries_quiet(), torch.device("meta"):
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


__all__ = ["PeftReading", "PeftReference", "peft_reference", "read_by_peft"]
