"""``d2export inspect``: what an adapter is and what merging it would write."""

from __future__ import annotations

from pathlib import Path

from .formats import load_adapter
from .formats.diffora import module_position
from .job import BaseModelError, prepare
from .options import MergeOptions, with_settings
from .plan import Action
from .report import config_changes
from .spec import ModuleUpdate


def inspect(adapter: str | Path, *, base: str | Path | None = None, options: MergeOptions | None = None,
            **settings) -> dict:
    """Describe an adapter and, when its base is found, the merge it would make.

    Args:
        adapter: adapter folder (or a trainer checkpoint folder holding one).
        base: base model folder (or model id in the local Hugging Face cache); default: the
            adapter's ``base_model_name_or_path``.
        options: a :class:`MergeOptions` (dtype, shard size, the base's ``revision``); ``settings``
            override its fields.

    Returns:
        A JSON-able dict: method, modules, DiffoRA grid, and ``merge_plan`` (``available`` False
        with the reason when the base cannot be found or opened).

    Raises:
        D2ExportError: the adapter is unreadable, or it does not fit its base.
    """
    spec = load_adapter(adapter)
    modules = [_module_entry(u) for u in spec.updates.values()]
    info: dict = {
        "adapter": str(spec.path),
        "method": spec.method,
        "base_model_name_or_path": spec.base_model_name_or_path,
        "num_modules": len(modules),
        "num_selected": sum(m["selected"] for m in modules),
        "num_params": spec.num_params,
        "modules": modules,
        "full_tensors": sorted(spec.replacements),
        "diffora": spec.selection.to_dict() if spec.selection is not None else None,
        "merge_plan": None,
    }
    try:
        job = prepare(spec, base, with_settings(MergeOptions, options, settings))
    except BaseModelError as exc:
        info["merge_plan"] = {"available": False, "reason": str(exc)}
        return info
    job.close()
    plan = job.plan
    info["merge_plan"] = {
        "available": True,
        "base": str(job.base.path),
        "base_source": job.source.to_dict() if job.source is not None else None,
        "tensors": {a.value: sum(t.action is a for t in plan.tensors) for a in Action},
        "shards": [{"file": f, "tensors": len(ts), "bytes": sum(t.nbytes for t in ts)} for f, ts in plan.shards],
        "total_bytes": plan.total_bytes,
        "config_changes": config_changes(plan),
        "notes": plan.notes,
    }
    return info


def _module_entry(u: ModuleUpdate) -> dict:
    layer, module_type = module_position(u.module)
    entry = {
        "module": u.module, "kind": u.kind.value, "layer": layer, "type": module_type,
        "shape": list(u.shape), "rank": u.rank, "alpha": u.alpha,
        "coefficients": {t.name: t.coefficient for t in u.terms},
        "rescale": u.rescale.value, "selected": u.selected, "params": u.num_params,
    }
    if u.tau is not None:
        entry.update(tau=u.tau, tau_learned=u.tau_learned)
    if u.bias_delta is not None:
        entry["lora_bias"] = True
    return entry
