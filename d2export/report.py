"""``d2export_report.json`` (the machine-readable record of a merge) and the model card."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

from . import __version__
from .algebra import MergeStats
from .arrays import dtype_name
from .io import sha256_file
from .plan import Action, MergePlan

REPORT_VERSION = 1


def input_files(plan: MergePlan) -> list[Path]:
    """The files a merge reads: the adapter's and the base's weights (hashed for the report)."""
    return [*plan.spec.files, *(plan.base.path / f for f in plan.base.files)]


class InputHashes:
    """sha256 of the input files, computed on a thread of its own while the merge runs (hashlib and
    file reads release the GIL); :meth:`cancel` stops it within one chunk when the merge fails."""

    def __init__(self, paths: list[Path]):
        self._hashes: dict[Path, str] = {}
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(paths,), name="hash inputs", daemon=True)
        self._thread.start()

    def _run(self, paths: list[Path]) -> None:
        try:
            for path in paths:
                digest = sha256_file(path, stop=self._stop)
                if digest is None:
                    return
                self._hashes[path] = digest
        except BaseException as exc:  # raised by result()
            self._error = exc

    def result(self) -> dict[Path, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hashes

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()


def build_report(
    plan: MergePlan, stats: dict[str, MergeStats], shard_hashes: dict[str, str], out: Path,
    *, input_hashes: dict[Path, str] | None = None,
) -> dict:
    """``input_hashes``: sha256 of the :func:`input_files` (None: not computed, recorded as null)."""
    spec, base = plan.spec, plan.base
    hashes = input_hashes or {}

    def files(paths):
        return [{"file": str(p), "sha256": hashes.get(p)} for p in paths]

    modules = []
    for t in plan.tensors:
        if t.update is None or t.action not in (Action.MERGE, Action.UNSELECTED):
            continue
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
        s = stats.get(t.name)
        if s is not None:
            entry["delta_fro_norm"] = s.delta_norm
            if s.scale_min is not None:
                entry["rescale_range"] = [s.scale_min, s.scale_max]
        modules.append(entry)
    counts = {a.value: sum(t.action is a for t in plan.tensors) for a in Action}
    selection = None
    if spec.selection is not None:
        sel = spec.selection
        selection = {
            "source": sel.source, "sample_rate": sel.sample_rate, "module_types": list(sel.module_types),
            "num_layers": sel.num_layers, "num_selected": sel.num_selected, "grid": [list(r) for r in sel.grid],
        }
    return {
        "report_version": REPORT_VERSION,
        "tool": {"name": "d2export", "version": __version__},
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "method": spec.method,
        "adapter": {"path": str(spec.path), "files": files(spec.files), "config": _config_summary(spec.config)},
        "base": {"path": str(base.path), "files": files([base.path / f for f in base.files])},
        "output": {
            "path": str(out),
            "compute_dtype": dtype_name(plan.compute_dtype),
            "dtypes": sorted({dtype_name(t.out_dtype) for t in plan.tensors}),
            "shards": [{"file": f, "sha256": h} for f, h in shard_hashes.items()],
            "total_bytes": plan.total_bytes,
            "config_changes": plan.config_updates,
        },
        "tensors": counts,
        "modules": modules,
        "replaced": [t.name for t in plan.tensors if t.action is Action.REPLACE],
        "diffora_selection": selection,
        "notes": plan.notes,
    }


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
        f"at `{report['adapter']['path']}` folded into the base model at `{report['base']['path']}`. "
        "It is a plain model: no adapter code runs at inference.",
        "",
        f"- modules merged: {len(merged)}"
        + (f"; left as base by the DiffoRA selection: {len(skipped)}" if skipped else ""),
        f"- full tensors taken from the adapter: {len(report['replaced'])}",
        f"- computed in {report['output']['compute_dtype']}, written as {', '.join(report['output']['dtypes'])}",
    ]
    lines += [f"- note: {n}" for n in report["notes"]]
    lines += ["", "Per-module figures and input hashes are in `d2export_report.json`.", ""]
    return "\n".join(lines)
