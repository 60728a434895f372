"""What every adapter format shares: finding the files, reading config and tensors, key names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from ..arrays import from_torch, is_float, load_safetensors
from ..errors import D2ExportError
from ..reading import read_json_object
from ..spec import AdapterSpec, ModuleUpdate

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


@dataclass
class RawAdapter:
    path: Path  # the folder holding adapter_config.json
    config: dict
    tensors: dict[str, np.ndarray]  # keys with the PEFT prefix removed
    files: list[Path]


def find_adapter_dir(path: str | Path) -> Path:
    """The folder with ``adapter_config.json``: ``path`` itself, or the single such folder inside a
    trainer output. Trainer ``checkpoint-N/`` folders are just such folders; their optimizer
    state is never opened."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise D2ExportError(f"adapter checkpoint not found: {path}")
    if (path / CONFIG_NAME).is_file():
        return path
    candidates = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}"))
    checkpoints = [p for p in candidates if re.fullmatch(r"checkpoint-\d+", p.name)]
    if len(candidates) == 1:
        return candidates[0]
    if checkpoints and len(checkpoints) == len(candidates):
        raise D2ExportError(
            f"{path} holds several trainer checkpoints ({', '.join(p.name for p in checkpoints)}); "
            "pass the one to merge"
        )
    raise D2ExportError(f"{path} is not an adapter checkpoint: no {CONFIG_NAME} found")


def read_adapter(path: str | Path) -> RawAdapter:
    folder = find_adapter_dir(path)
    config = read_json_object(folder / CONFIG_NAME)
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise D2ExportError(f"{folder}: no adapter weights ({' or '.join(WEIGHTS_NAMES)})")
    tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in _load_tensors(weights).items()}
    for key, value in tensors.items():
        if is_float(value.dtype) and not np.isfinite(value).all():
            raise D2ExportError(f"{weights}: adapter tensor {key} contains NaN or Inf")
    return RawAdapter(folder, config, tensors, [folder / CONFIG_NAME, weights])


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="np"):  # validates the file
                pass
            return load_safetensors(path)
        return _load_bin(path)
    except (SafetensorError, OSError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2ExportError(f"{path}: cannot read adapter weights ({first})") from None
    except Exception as exc:  # torch.load raises UnpicklingError for code-carrying pickles
        if type(exc).__name__ == "UnpicklingError":
            raise D2ExportError(
                f"{path}: refused, the pickle holds more than tensors (weights_only=True)"
            ) from None
        raise


def _load_bin(path: Path) -> dict[str, np.ndarray]:
    import torch  # only .bin adapters need it

    # weights_only: a pickle can run code; we accept tensors and plain containers only.
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    tensors = {}
    for key, value in loaded.items():
        if not isinstance(value, torch.Tensor):
            raise D2ExportError(f"{path}: entry {key!r} is not a tensor")
        tensors[key] = from_torch(value)
    return tensors


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``K`` for which
    ``(.*\\.)?(K)$`` matches the module path wins."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def require_number(config: dict, key: str, where: Path, *, positive: bool = True) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise D2ExportError(f"{where}: {key!r} must be a number, got {value!r}")
    if positive and value <= 0:
        raise D2ExportError(f"{where}: {key!r} must be positive, got {value}")
    return float(value)


def base_key(adapter_key: str) -> str:
    """Base tensor name of a full tensor saved by the adapter (modules_to_save, embedding copies,
    trained biases): the PEFT wrapper parts dropped."""
    return adapter_key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def check_factor(name: str, tensor: np.ndarray, ndim: int, where: Path) -> np.ndarray:
    if tensor.ndim != ndim:
        raise D2ExportError(
            f"{where}: {name} has shape {tuple(tensor.shape)}; a {ndim}-d tensor was expected "
            "(convolution adapters are not supported)"
        )
    if not is_float(tensor.dtype):
        raise D2ExportError(f"{where}: {name} has dtype {tensor.dtype}, not a float type")
    return tensor


def group_factors(raw: RawAdapter, suffixes: dict) -> tuple[dict[str, dict], dict[str, object]]:
    """Split adapter tensors into per-module factor dicts and the remaining full tensors."""
    modules: dict[str, dict] = {}
    rest: dict[str, object] = {}
    for key, tensor in raw.tensors.items():
        for suffix, (role, kind) in suffixes.items():
            if key.endswith(suffix):
                entry = modules.setdefault(key[: -len(suffix)], {})
                entry[role] = tensor
                if kind is not None:
                    entry.setdefault("kinds", set()).add(kind)
                break
        else:
            rest[key] = tensor
    return modules, rest


def full_tensors(raw: RawAdapter, rest: dict) -> dict:
    """modules_to_save copies, ``base_layer`` copies of adapted embeddings and trained biases:
    full tensors that replace the base's."""
    replacements = {}
    for key, tensor in rest.items():
        if "lora_" in key or "d2_" in key:
            raise D2ExportError(
                f"{raw.path}: adapter tensor {key} is not part of a known adapter layout"
            )
        replacements[base_key(key)] = tensor
    return replacements


def finish_spec(raw: RawAdapter, method: str, updates: dict[str, ModuleUpdate], rest: dict) -> AdapterSpec:
    """The reader's result: its module updates plus the adapter's full tensors."""
    if not updates:
        raise D2ExportError(f"{raw.path}: the adapter holds no {method} factors")
    return AdapterSpec(
        method=method,
        path=raw.path,
        files=raw.files,
        config=raw.config,
        updates=updates,
        replacements=full_tensors(raw, rest),
        base_model_name_or_path=raw.config.get("base_model_name_or_path"),
    )
