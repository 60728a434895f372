"""``d2export_report.json`` (the machine-readable record of a merge) and the model card."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from . import __version__
from .algebra import MergeStats
from .arrays import dtype_name
from .basesource import BaseSource
from .card import with_base_card
from .plan import Action, MergePlan, TensorPlan
from .reading import CONFIG_NAME
from .writing import write_json, write_text

REPORT_NAME = "d2export_report.json"
CARD_NAME = "README.md"
REPORT_VERSION = 1


def input_files(plan: MergePlan) -> list[Path]:
    """The files a merge reads: the adapter's, the base's weights and its config (hashed for the
    report: they say which base this was, whatever its path)."""
    return [*plan.spec.files, *(plan.base.path / f for f in plan.base.files), plan.base.path / CONFIG_NAME]


def build_report(
    plan: MergePlan, stats: dict[str, MergeStats], shard_hashes: dict[str, str], out: Path,
    *, input_hashes: dict[Path, str] | None = None, source: BaseSource | None = None,
) -> dict:
    """``input_hashes``: sha256 of the :func:`input_files` (None: not computed, recorded as null);
    ``source``: how the base was found (its cache snapshot and revision)."""
    spec, base = plan.spec, plan.base
    hashes = input_hashes or {}

    def files(paths):  # absolute, as the base's: a report read elsewhere names the files it hashed
        return [{"file": str(p.absolute()), "sha256": hashes.get(p)} for p in paths]

    modules = [_module_entry(t, stats.get(t.name)) for t in plan.tensors
               if t.update is not None and t.action in (Action.MERGE, Action.UNSELECTED)]
    counts = {a.value: sum(t.action is a for t in plan.tensors) for a in Action}
    selection = spec.selection.to_dict() if spec.selection is not None else None
    return {
        "report_version": REPORT_VERSION,
        "tool": {"name": "d2export", "version": __version__},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "method": spec.method,
        "adapter": {"path": str(spec.path.absolute()), "files": files(spec.files),
                    "config": _config_summary(spec.config)},
        "base": {**(source.to_dict() if source is not None else {"path": str(base.path.absolute())}),
                 "files": files([base.path / f for f in base.files]),
                 "config_sha256": hashes.get(base.path / CONFIG_NAME)},
        "output": {
            "path": str(Path(out).absolute()),
            "compute_dtype": dtype_name(plan.compute_dtype),
            "dtypes": sorted({dtype_name(t.out_dtype) for t in plan.tensors}),
            "shards": [{"file": f, "sha256": h} for f, h in shard_hashes.items()],
            "total_bytes": plan.total_bytes,
            "config_changes": config_changes(plan),
        },
        "tensors": counts,
        "modules": modules,
        "replaced": [t.name for t in plan.tensors if t.action is Action.REPLACE],
        "diffora_selection": selection,
        "notes": plan.notes,
    }


def _module_entry(t: TensorPlan, stats: MergeStats | None) -> dict:
    u = t.update
    entry = {
        "tensor": t.name,
        "module": u.module,
        "action": t.action.value,
        "rank": u.rank,
        "alpha": u.alpha,
        "coefficients": {term.name: term.coefficient for term in u.terms},
        "rescale": u.rescale.value,
        "layout": "[in, out]" if t.transposed else "[out, in]",
    }
    if u.tau is not None:
        entry["tau"] = u.tau
        entry["tau_learned"] = u.tau_learned
    if u.swapped_factors:
        entry["factors_stored_swapped"] = True
    if stats is not None:
        entry["delta_fro_norm"] = stats.delta_norm
        if stats.scale_min is not None:
            entry["rescale_range"] = [stats.scale_min, stats.scale_max]
    return entry


def config_changes(plan: MergePlan) -> dict:
    """What the output's config.json says differently from the base's."""
    return {**plan.config_updates, **({"dtype": plan.out_dtype} if plan.out_dtype else {})}


def write_report(folder: Path, report: dict) -> None:
    """``d2export_report.json`` and the model card, both from ``report`` (each replaced atomically)."""
    write_json(folder / REPORT_NAME, report)
    write_text(folder / CARD_NAME, with_base_card(model_card(report), report))


def _config_summary(config: dict) -> dict:
    keys = ("peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "tau", "norm_projection",
            "target_modules", "rank_pattern", "alpha_pattern", "modules_to_save", "bias", "lora_bias",
            "fan_in_fan_out", "base_model_name_or_path")
    return {k: config[k] for k in keys if k in config}


def model_card(report: dict) -> str:
    merged = [m for m in report["modules"] if m["action"] == "merge"]
    skipped = [m for m in report["modules"] if m["action"] == "unselected"]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [d2export, merged-adapter]",
        "---",
        "",
        "# Merged model",
        "",
        f"This folder was written by d2export {report['tool']['version']}: the `{report['method']}` adapter "
        f"at `{report['adapter']['path']}` folded into the base model {_base_phrase(report['base'])}. "
        "It is a plain model: no adapter code runs at inference.",
        "",
        f"- modules merged: {len(merged)}"
        + (f"; left as base by the DiffoRA selection: {len(skipped)}" if skipped else ""),
        f"- full tensors taken from the adapter: {len(report['replaced'])}",
        f"- computed in {report['output']['compute_dtype']}, written as {', '.join(report['output']['dtypes'])}",
    ]
    lines += [f"- note: {n}" for n in report["notes"]]
    verification = report.get("verification")
    if verification is not None:
        lines.append(_verification_line(verification))
    lines += ["", "Per-module figures and input hashes are in `d2export_report.json`.", ""]
    return "\n".join(lines)


def _base_phrase(base: dict) -> str:
    if base.get("repo_id") and base.get("snapshot"):
        return f"`{base['repo_id']}` (snapshot `{base['snapshot']}`)"
    return f"at `{base['path']}`"


def _verification_line(verification: dict) -> str:
    verdict = "passed" if verification["passed"] else f"FAILED ({len(verification['failures'])} checks)"
    line = f"- verification {verdict}"
    weights = verification.get("weights")
    if weights:
        summary = weights["summary"]
        line += (f": weights within {summary['max_units']:.2f} units, "
                 f"{summary['exact_fraction']:.2%} correctly rounded")
    return line
