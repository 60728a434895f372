"""What every adapter format shares: finding the files, reading config and tensors, key names."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

try:  # the parser behind re.compile, to look at a pattern's structure
    from re import _constants as sre_constants
    from re import _parser as sre_parse
except ImportError:  # Python < 3.11
    import sre_constants
    import sre_parse

import numpy as np
from safetensors import SafetensorError, safe_open

from ..arrays import from_torch, is_float
from ..errors import D2ExportError, OptionError
from ..jsonfiles import ADAPTER_CONFIG
from ..reading import read_json_object
from ..spec import AdapterSpec, ModuleUpdate
from .saved import base_layer_copies, saved_tensors
from .stored import StoredTensor, check_finite, scan_safetensors
from .trainer import choose_checkpoint, names, run_checkpoints

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."


@dataclass
class RawAdapter:
    path: Path  # the folder holding adapter_config.json
    config: dict
    tensors: dict[str, np.ndarray | StoredTensor]  # keys with the PEFT prefix removed; large ones read on use
    files: list[Path]
    hashes: dict[Path, str] = field(default_factory=dict)  # sha256 of files hashed as they were read

    @property
    def weights_file(self) -> Path:
        """The file the tensors came from (what an error about one of them names)."""
        return next((f for f in self.files if f.name != "adapter_config.json"), self.path)


def find_adapter_dir(path: str | Path, checkpoint: str | None = None) -> Path:
    """The folder with ``adapter_config.json``: ``path`` itself, the single such folder inside a
    trainer output, or the one ``checkpoint`` (``latest``, ``best`` or a step) chooses among its
    ``checkpoint-N/`` folders. Optimizer state is never opened."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise D2ExportError(f"adapter checkpoint not found: {path}")
    if checkpoint is not None:
        return choose_checkpoint(path, checkpoint, CONFIG_NAME)
    if (path / CONFIG_NAME).is_file():
        return path
    candidates = sorted(p.parent for p in path.glob(f"*/{CONFIG_NAME}"))
    checkpoints = run_checkpoints(path, CONFIG_NAME)
    if len(candidates) == 1:
        return candidates[0]
    if checkpoints and len(checkpoints) == len(candidates):
        raise OptionError("checkpoint", f"is needed: {path} holds several trainer checkpoints "
                          f"({names(checkpoints)}); choose latest, best or a step number")
    if candidates:  # several adapters, not all of them checkpoints: the checkpoints by step, then the rest
        listed = names([*checkpoints, *(p for p in candidates if p not in checkpoints)])
        choose = "; pass the folder of the one to use" + (
            ", or --checkpoint latest, best or a step number" if checkpoints else "")
        raise D2ExportError(f"{path} holds several adapters ({listed}){choose}")
    raise D2ExportError(f"{path} is not an adapter checkpoint: no {CONFIG_NAME} found")


def read_adapter(path: str | Path, checkpoint: str | None = None) -> RawAdapter:
    folder = find_adapter_dir(path, checkpoint)
    config = read_json_object(folder / CONFIG_NAME, ADAPTER_CONFIG, strict=True)
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise D2ExportError(f"{folder}: no adapter weights ({' or '.join(WEIGHTS_NAMES)})")
    loaded, digest = _load_tensors(weights)
    tensors = {key.removeprefix(PEFT_PREFIX): value for key, value in loaded.items()}
    for key, value in tensors.items():
        if isinstance(value, np.ndarray):  # stored tensors were checked by the scan
            check_finite(value, key, weights)
    hashes = {weights: digest} if digest is not None else {}
    return RawAdapter(folder, config, tensors, [folder / CONFIG_NAME, weights], hashes)


def _load_tensors(path: Path) -> tuple[dict, str | None]:
    """The weights (safetensors: large tensors as :class:`StoredTensor`, read when used) and the
    file's sha256 where the read computed it."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(path, framework="np"):  # validates the file
                pass
            return scan_safetensors(path, PEFT_PREFIX)
        return _load_bin(path), None
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


# A pattern lookup matches a short module path: far below this unless the pattern backtracks
# catastrophically, which the timeout turns into an error instead of a hang.
PATTERN_TIMEOUT_S = 1.0


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key ``K`` for which
    ``(.*\\.)?(K)$`` matches the module path wins. Matched by ``regex`` (the same syntax and answers
    as PEFT's ``re``, with a timeout) so that no pattern can hang the merge."""
    import regex  # a dependency of transformers

    for key, value in (patterns or {}).items():
        try:
            found = regex.match(rf"(.*\.)?({key})$", module, timeout=PATTERN_TIMEOUT_S)
        except TimeoutError:
            raise D2ExportError(
                f"pattern {key!r} takes too long to match {module} (catastrophic backtracking)") from None
        except regex.error as exc:
            raise D2ExportError(f"pattern {key!r} is not a valid regular expression ({exc})") from None
        if found:
            return value
    return default


def check_patterns(config: dict, where: Path) -> None:
    """``rank_pattern`` and ``alpha_pattern``, checked where they are read: an object whose keys
    are regular expressions PEFT can use and whose values are a positive integer rank or a finite
    positive alpha."""
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise D2ExportError(f"{where}: {name!r} must be an object of pattern: value, found {patterns!r}")
        for key, value in patterns.items():
            _check_pattern_key(key, name, where)
            _check_value(value, f"{name}[{key!r}]", where, integer=integer)


def _check_pattern_key(key: str, name: str, where: Path) -> None:
    try:
        tree = sre_parse.parse(rf"(.*\.)?({key})$")
    except re.error as exc:
        raise D2ExportError(f"{where}: {name} key {key!r} is not a valid regular expression ({exc})") from None
    if _nested_repeat(tree, False):
        raise D2ExportError(
            f"{where}: {name} key {key!r} nests one repetition inside another, which can take exponential "
            "time to match (catastrophic backtracking); write it without the nesting")


_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT} | (
    {sre_constants.POSSESSIVE_REPEAT} if hasattr(sre_constants, "POSSESSIVE_REPEAT") else set())


def _nested_repeat(tree, inside: bool) -> bool:
    """Whether an unbounded repetition sits inside another (star height above one)."""
    for op, arg in tree:
        if op in _REPEATS:
            unbounded = arg[1] == sre_constants.MAXREPEAT or arg[1] > 1
            if (unbounded and inside) or _nested_repeat(arg[2], inside or unbounded):
                return True
            continue
        children = {sre_constants.SUBPATTERN: lambda a: [a[-1]], sre_constants.BRANCH: lambda a: a[1],
                    sre_constants.ASSERT: lambda a: [a[1]], sre_constants.ASSERT_NOT: lambda a: [a[1]]}.get(op)
        if children is not None and any(_nested_repeat(sub, inside) for sub in children(arg)):
            return True
    return False


def _check_value(value, label: str, where: Path, *, integer: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise D2ExportError(f"{where}: {label} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise D2ExportError(f"{where}: {label} must be finite, got {value!r}")
    if value <= 0:
        raise D2ExportError(f"{where}: {label} must be positive, got {value}")
    if integer and (value != int(value) or value > MAX_RANK):
        raise D2ExportError(f"{where}: {label} must be a whole number of at most {MAX_RANK}, got {value}")
    return float(value)


MAX_RANK = 2**20  # far beyond any adapter; a larger r is a corrupted config


def require_number(config: dict, key: str, where: Path, *, positive: bool = True) -> float:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise D2ExportError(f"{where}: {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise D2ExportError(f"{where}: {key!r} must be finite, got {value!r}")
    if positive and value <= 0:
        raise D2ExportError(f"{where}: {key!r} must be positive, got {value}")
    return float(value)


def require_rank(config: dict, key: str, where: Path) -> int:
    """A rank: a positive whole number (``8`` or ``8.0``), not ``8.5``, ``true`` or ``"8"``."""
    if config.get(key) is None:
        raise D2ExportError(f"{where}: {key!r} must be a number, got None")
    return int(_check_value(config.get(key), repr(key), where, integer=True))



@dataclass(frozen=True)
class Scaling:
    """A LoRA-family config's rank and alpha, per module through PEFT's patterns, and the scale
    ``alpha/r`` (rsLoRA: ``alpha/sqrt(r)``) they give each low-rank term."""

    config: dict
    r: int
    alpha: float
    rslora: bool

    @classmethod
    def read(cls, config: dict, where: Path) -> Scaling:
        r, alpha = require_rank(config, "r", where), require_number(config, "lora_alpha", where)
        check_patterns(config, where)
        return cls(config, r, alpha, bool(config.get("use_rslora", False)))

    def of(self, module: str) -> tuple[float, float, float]:
        """(rank, alpha, scale) of ``module``."""
        r = float(pattern_value(self.config.get("rank_pattern"), module, self.r))
        alpha = float(pattern_value(self.config.get("alpha_pattern"), module, self.alpha))
        return r, alpha, alpha / math.sqrt(r) if self.rslora else alpha / r

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
        replacements=saved_tensors(raw.path, raw.config, rest),
        base_layer_copies=base_layer_copies(rest),
        base_model_name_or_path=raw.config.get("base_model_name_or_path"),
        file_hashes=dict(raw.hashes),
    )
