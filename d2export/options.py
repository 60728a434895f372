"""What each command can be asked to do, as data: one frozen options object per command,
validated once when it is made. The Python API takes these (or their fields as keywords) and the
CLI maps its flags onto the same fields, reading each flag's help from the field's metadata.

A bad value raises :class:`~d2export.errors.OptionError` naming the field; the CLI shows the flag.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import OptionError

OUTPUT_DTYPES = ("bfloat16", "float16", "float32")
COMPUTE_DTYPES = ("float64", "float32")
RUN_DTYPES = ("float32", "bfloat16")  # what the benchmark can run PyTorch models in
OPTIMIZE_LEVELS = ("O1", "O2", "O3", "O4")
QUANTIZE_MODES = ("int8",)
SHORT_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32",
                "fp64": "float64", "double": "float64"}

_O = TypeVar("_O")


def option(text: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (the CLI's flag help)."""
    return field(metadata={"help": text}, **kwargs)


def help_of(options: type, name: str) -> str:
    """The help text of one option (the CLI's flag help)."""
    return next(f.metadata["help"] for f in dataclasses.fields(options) if f.name == name)


def default_of(options: type, name: str) -> Any:
    """The default of one option (the CLI's flag default)."""
    return next(f.default for f in dataclasses.fields(options) if f.name == name)


def with_settings(cls: type[_O], options: _O | None, settings: dict[str, Any]) -> _O:
    """``options`` (default: ``cls()``) with ``settings`` (keyword arguments of an API call) applied:
    its fields, and for verify the limits of its ``thresholds`` too, as the CLI has them as flags
    (``verify(..., atol=1e-3)``). Any other keyword is a TypeError, as in any Python call."""
    base = options if options is not None else cls()
    if not isinstance(base, cls):
        raise OptionError("options", f"must be a {cls.__name__}; got a {type(base).__name__}")
    if not settings:
        return base
    settings = dict(settings)
    fields = {f.name for f in dataclasses.fields(cls)}
    limits = {}
    if "thresholds" in fields:
        names = {f.name for f in dataclasses.fields(Thresholds)}
        limits = {k: settings.pop(k) for k in [k for k in settings if k in names]}
    unknown = sorted(set(settings) - fields)
    if unknown:  # a programming error, as any unexpected keyword argument is in Python
        raise TypeError(f"{unknown[0]!r} is not an option of {cls.__name__} (its options: {', '.join(sorted(fields))})")
    if limits:
        settings["thresholds"] = dataclasses.replace(settings.get("thresholds", base.thresholds), **limits)
    return dataclasses.replace(base, **settings)


def dtype_choice(option: str, value: str, allowed: tuple[str, ...], *, auto: bool = False) -> str:
    """A dtype name in its full form (``bf16`` -> ``bfloat16``), checked against ``allowed``."""
    name = SHORT_DTYPES.get(str(value).lower(), str(value).lower())
    if name in allowed or (auto and name == "auto"):
        return name
    choices = (["auto"] if auto else []) + list(allowed)
    short = [k for k, v in SHORT_DTYPES.items() if v in allowed]  # only the short names of allowed ones
    aliases = f" (or {', '.join(short)})" if short else ""
    raise OptionError(option, f"must be {', '.join(choices)}{aliases}; got {value!r}")


def parse_size(text: str | int, option: str = "max_shard_size") -> int:
    """'200MB', '5GB' (decimal, as transformers counts), '512MiB', '2GiB', or a byte count."""
    if isinstance(text, int) and not isinstance(text, bool):
        size = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not match:
            raise OptionError(option, f"{text!r} is not a size: use e.g. 200MB, 5GB or 2GiB")
        number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
        scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
        size = int(number * scale)
    if size <= 0:
        raise OptionError(option, f"{text!r} is not a positive size")
    return size


def parse_sizes(value: str | tuple[int, ...] | list[int], option: str) -> tuple[int, ...]:
    """``"1,4"`` or ``(1, 4)`` -> ``(1, 4)``: positive integers, order kept, duplicates dropped."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    values = []
    for part in parts:
        try:
            number = int(part.strip()) if isinstance(part, str) else part
        except ValueError:
            raise OptionError(option, f"{value!r} is not a comma-separated list of integers") from None
        if isinstance(number, bool) or not isinstance(number, int) or number <= 0:
            raise OptionError(option, f"{number!r} is not positive" if isinstance(number, int)
                              else f"must be positive integers; got {number!r}")
        values.append(number)
    if not values:
        raise OptionError(option, "has no values")
    return tuple(dict.fromkeys(values))


REVISION_HELP = ("Base model revision (branch, tag or commit hash) to take from the local Hugging Face cache; "
                 "default: the adapter's revision, else main.")


def _revision(options: object) -> None:
    value = options.revision  # type: ignore[attr-defined]
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise OptionError("revision", f"must be a branch, tag or commit hash; got {value!r}")
    if value is not None:
        _set(options, "revision", value.strip())


def _set(options: object, name: str, value: Any) -> None:
    object.__setattr__(options, name, value)  # normalising a frozen dataclass in __post_init__


def _positive(option: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(option, f"must be a number; got {value!r}")
    if not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        raise OptionError(option, f"must be {'0 or more' if allow_zero else 'positive'}; got {value!r}")


@dataclass(frozen=True)
class MergeOptions:
    dtype: str = option("Output dtype: auto (the base's), bfloat16, float16, float32 (or bf16, fp16, fp32).",
                       default="auto")
    compute_dtype: str = option("Merge arithmetic: float64 (exact rounding) or float32 (faster).", default="float64")
    max_shard_size: int | str | None = option("Largest output shard, e.g. 5GB; default: the base's shard layout.",
                                             default=None)
    force: bool = option("Replace an existing output folder.", default=False)
    hash_inputs: bool = option("Record the inputs' sha256 in the report.", default=True)
    revision: str | None = option(REVISION_HELP, default=None)

    def __post_init__(self) -> None:
        _revision(self)
        _set(self, "dtype", dtype_choice("dtype", self.dtype, OUTPUT_DTYPES, auto=True))
        _set(self, "compute_dtype", dtype_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES))
        if self.max_shard_size is not None:
            _set(self, "max_shard_size", parse_size(self.max_shard_size))

    @property
    def out_dtype(self) -> str | None:
        """The dtype every floating tensor is written in; None keeps each tensor's own."""
        return None if self.dtype == "auto" else self.dtype


@dataclass(frozen=True)
class Thresholds:
    """Verification limits; None takes the per-dtype default (see :mod:`d2export.verification`)."""

    max_units: float | None = option(
        "Largest weight error in units of the stored dtype (default 2 for 16-bit, 32 for float32).", default=None)
    atol: float | None = option("Largest absolute output difference (default: relative, per dtype).", default=None)
    min_top1: float | None = option("Smallest top-1 agreement, 0-1 (default: per dtype).", default=None)
    max_task_gap_pp: float = option("Largest task accuracy gap, percentage points.", default=2.0)

    def __post_init__(self) -> None:
        _positive("max_units", self.max_units)
        _positive("atol", self.atol, allow_zero=True)
        _positive("max_task_gap_pp", self.max_task_gap_pp, allow_zero=True)
        top1 = self.min_top1
        if top1 is not None and (isinstance(top1, bool) or not isinstance(top1, int | float)):
            raise OptionError("min_top1", f"must be a number; got {top1!r}")
        if top1 is not None and not 0 <= top1 <= 1:
            raise OptionError("min_top1", f"must be between 0 and 1; got {top1!r}")

    def to_dict(self) -> dict:
        return {"max_units": self.max_units, "atol": self.atol, "min_top1": self.min_top1,
                "max_task_gap_pp": self.max_task_gap_pp,
                "output_rtol": "per dtype" if self.atol is None else None}


@dataclass(frozen=True)
class VerifyOptions:
    weights: bool = option("Check every tensor against the exact merge.", default=True)
    outputs: bool = option("Run the merged and the unmerged model and compare their outputs.", default=True)
    calibration: Path | None = option("Text file, one calibration input per line (default: seeded random tokens).",
                                     default=None)
    task_data: Path | None = option("JSON lines {text, label, split}: report merged vs unmerged accuracy.",
                                   default=None)
    thresholds: Thresholds = field(default_factory=Thresholds)
    peft_reference: bool = option("Also compare against PEFT's own unmerged model (PEFT adapters).", default=True)
    seed: int = option("Seed of the random calibration tokens.", default=0)
    dtypes: tuple[str, ...] | str | None = option(
        "Dtypes to run the output checks in, e.g. bf16,fp32 (default: float32, which also shows a 16-bit "
        "folder's rounding).", default=None)
    resident: int | str | None = option(
        "Weights each model of the output checks keeps in memory, e.g. 256MiB; the rest is read from the files "
        "layer by layer. 'all': load whole.", default="64MiB")
    revision: str | None = option(REVISION_HELP, default=None)

    def __post_init__(self) -> None:
        _revision(self)
        for name in ("calibration", "task_data"):
            path = getattr(self, name)
            if path is not None:
                _set(self, name, Path(path))
                if Path(path).is_dir():
                    raise OptionError(name, f"{path} is a folder; give a file")
                if not Path(path).is_file():
                    raise OptionError(name, f"file not found: {path}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise OptionError("seed", f"must be an integer; got {self.seed!r}")
        if self.dtypes is not None:
            names = self.dtypes.split(",") if isinstance(self.dtypes, str) else list(self.dtypes)
            _set(self, "dtypes", tuple(dict.fromkeys(dtype_choice("dtypes", n.strip(), OUTPUT_DTYPES) for n in names)))
        if self.resident is not None:
            whole = str(self.resident).lower() == "all"
            try:
                _set(self, "resident", None if whole else parse_size(self.resident, "resident"))
            except OptionError as exc:
                raise OptionError("resident", f"{exc.message}, or 'all' to load whole") from None


@dataclass(frozen=True)
class OnnxOptions:
    task: str | None = option("optimum task (default: from config.json's architecture).", default=None)
    opset: int | None = option("ONNX opset (default: optimum's for the model).", default=None)
    past: bool = option("Causal LMs: export with past key/values (the decoder's cache).", default=True)
    optimize: str | None = option("ONNX Runtime graph optimisation: O1, O2 or O3.", default=None)
    quantize: str | None = option("int8: also write model_quantized.onnx (dynamic quantisation).", default=None)
    fp16: bool = option("Export float16 instead of float32.", default=False)
    external_data: bool | None = option(
        "Weights in model.onnx_data: True always, False never, None when they pass 2 GB.", default=None)
    force: bool = option("Replace an existing output folder.", default=False)
    validate: bool = option("Check the export with ONNX Runtime against PyTorch.", default=True)

    def __post_init__(self) -> None:
        if self.optimize is not None:
            level = str(self.optimize).upper()
            if level not in OPTIMIZE_LEVELS:
                raise OptionError("optimize", f"must be O1, O2 or O3; got {self.optimize!r}")
            if level == "O4":
                # optimum's O4 is O3 plus fp16 mixed precision, which it only builds for (and on) a CUDA GPU.
                raise OptionError("optimize", "O4 (fp16 mixed precision) needs a CUDA GPU; use O1, O2 or O3 on CPU")
            _set(self, "optimize", level)
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise OptionError("quantize", f"must be {' or '.join(QUANTIZE_MODES)}; got {self.quantize!r}")
        if self.quantize is not None and self.fp16:
            # Dynamic quantisation rewrites float32 MatMuls (MatMulInteger takes float32 activations).
            raise OptionError("quantize", "int8 quantises the float32 graph; it cannot be combined with fp16")
        if self.opset is not None and (isinstance(self.opset, bool) or not isinstance(self.opset, int)):
            raise OptionError("opset", f"must be an integer; got {self.opset!r}")


@dataclass(frozen=True)
class BenchOptions:
    batch_sizes: tuple[int, ...] | str = option("Batch sizes, comma-separated.", default=(1, 4))
    seq_lens: tuple[int, ...] | str = option("Sequence lengths, comma-separated (clipped to the model's).",
                                            default=(32, 128))
    warmup: int = option("Untimed runs per model and shape.", default=2)
    repeats: int = option("Timed runs per model and shape (p50/p95 over these).", default=10)
    threads: int | None = option("PyTorch and ONNX Runtime threads (default: torch's).", default=None)
    dtype: str = option("PyTorch models run in: float32 or bfloat16.", default="float32")
    revision: str | None = option(REVISION_HELP, default=None)

    def __post_init__(self) -> None:
        _revision(self)
        _set(self, "batch_sizes", parse_sizes(self.batch_sizes, "batch_sizes"))
        _set(self, "seq_lens", parse_sizes(self.seq_lens, "seq_lens"))
        _positive("warmup", self.warmup, allow_zero=True)
        _positive("repeats", self.repeats)
        _positive("threads", self.threads)
        for name in ("warmup", "repeats", "threads"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, int):
                raise OptionError(name, f"must be an integer; got {value!r}")
        _set(self, "dtype", dtype_choice("dtype", self.dtype, RUN_DTYPES))
