"""What a merge says of the adapter itself, whatever the base: things merged as written that a
user may not have meant (the plan's notes, docs/design.md §4)."""

from __future__ import annotations

from pathlib import Path

from .spec import AdapterSpec


def adapter_notes(spec: AdapterSpec) -> list[str]:
    return _negative_tau(spec) + _other_adapters(spec.path)


def _other_adapters(path: Path) -> list[str]:
    """A note where the adapter's folder holds further adapters in subfolders, as PEFT saves a model
    with several (the first at the top, each other in a folder named after it): this merges the
    top one only."""
    others = sorted(d.name for d in path.iterdir() if (d / "adapter_config.json").is_file()) if path.is_dir() else []
    if not others:
        return []
    return [f"the adapter's folder also holds the adapter(s) {', '.join(others)} in subfolders: this merges the one "
            "at its top; give a subfolder's path to merge another"]


def _negative_tau(spec: AdapterSpec) -> list[str]:
    """A note where D2-LoRA's tau is below zero: merged as written (a learned tau may cross zero,
    and the method forbids nothing), but the negative branch then adds to the update instead of
    subtracting from it, which a config typo (``-0.5`` for ``0.5``) also gives."""
    negative = {m: u.tau for m, u in spec.updates.items() if u.tau is not None and u.tau < 0}
    if not negative:
        return []
    first = min(negative)
    return [f"tau is negative in {len(negative)} module(s) ({first}: {negative[first]:g}): their negative "
            "branch adds to the update instead of subtracting"]
