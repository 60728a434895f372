"""DiffoRA module selection (docs/design.md §4.3): a Differential Adaptation Matrix (DAM) of scores per
(layer, module type); the top ``k = round(sample_rate * L * M)`` are merged, or an explicit
``selected`` grid wins. Unselected modules stay exactly the base weights."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

from ..errors import D2ExportError
from ..reading import read_json_object
from ..spec import AdapterSpec, DamSelection

DAM_NAME = "diffora_dam.json"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def module_position(module: str) -> tuple[int | None, str]:
    """(layer index, module type) of a module path: the first numeric component and the last name."""
    match = _LAYER_INDEX.search(f".{module}.")
    return (int(match.group(1)) if match else None), module.rsplit(".", 1)[-1]


def read_dam(path: Path) -> DamSelection:
    data = read_json_object(path)
    types = data.get("module_types")
    num_layers = data.get("num_layers")
    if not isinstance(types, list) or not types or not all(isinstance(t, str) for t in types):
        raise D2ExportError(f"{path}: 'module_types' must be a non-empty list of names")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
        raise D2ExportError(f"{path}: 'num_layers' must be a positive integer")
    if data.get("selected") is not None:
        grid = _grid(data["selected"], num_layers, len(types), path, "selected", bool)
        return DamSelection(tuple(types), num_layers, grid, "selected")
    scores = _grid(data.get("scores"), num_layers, len(types), path, "scores", (int, float))
    rate = data.get("sample_rate")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise D2ExportError(f"{path}: 'sample_rate' must be in (0, 1], got {rate!r}")
    grid = select_top(scores, float(rate))
    return DamSelection(tuple(types), num_layers, grid, "scores", float(rate))


def select_top(scores: tuple[tuple[float, ...], ...], sample_rate: float) -> tuple[tuple[bool, ...], ...]:
    """The ``k = round(sample_rate * L * M)`` highest scores (halves round up; ties keep the
    earlier layer, then the earlier module type, so the result never depends on sort stability)."""
    cells = [(layer, col) for layer, row in enumerate(scores) for col in range(len(row))]
    k = math.floor(sample_rate * len(cells) + 0.5)
    chosen = set(sorted(cells, key=lambda c: (-scores[c[0]][c[1]], c))[:k])
    return tuple(tuple((layer, col) in chosen for col in range(len(row))) for layer, row in enumerate(scores))


def _grid(value, rows: int, cols: int, path: Path, name: str, kinds) -> tuple[tuple, ...]:
    if not isinstance(value, list) or len(value) != rows:
        raise D2ExportError(f"{path}: {name!r} must have num_layers={rows} rows")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != cols:
            raise D2ExportError(f"{path}: {name!r} row {i} must have {cols} entries (one per module type)")
        for x in row:
            if not isinstance(x, kinds) or (kinds is not bool and (isinstance(x, bool) or not math.isfinite(x))):
                raise D2ExportError(f"{path}: {name!r} row {i} has an invalid entry {x!r}")
    return tuple(tuple(row) for row in value)


def apply_selection(spec: AdapterSpec, selection: DamSelection, path: Path) -> None:
    """Mark the modules the DAM leaves out; modules outside the DAM grid are merged as usual. A cell
    the DAM selects must have the adapter's factors: a selected module type the adapter lacks (a
    misspelt type, another model's DAM) would merge nothing where DiffoRA trained an update."""
    present = {module_position(module) for module in spec.updates}
    missing = [f"layer {layer} {kind}" for layer in range(selection.num_layers) for kind in selection.module_types
               if selection.is_selected(layer, kind) and (layer, kind) not in present]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise D2ExportError(f"{path}: the DAM selects modules the adapter has no factors for: "
                            f"{', '.join(missing[:3])}{more}")
    for module, update in list(spec.updates.items()):
        layer, module_type = module_position(module)
        if layer is None or module_type not in selection.module_types:
            continue
        if layer >= selection.num_layers:
            raise D2ExportError(
                f"{path}: module {module} is in layer {layer} but the DAM has {selection.num_layers} layers"
            )
        if not selection.is_selected(layer, module_type):
            spec.updates[module] = dataclasses.replace(update, selected=False)
    spec.selection = selection
    spec.method += "+diffora"
    spec.files.append(path)
