"""The one typed reader of every JSON file d2export opens (config.json, adapter_config.json, shard
indexes, the sentence-transformers and tokenizer configs handed on to transformers).

A file is parsed with bounds (size, nesting, no NaN/Infinity, no duplicate keys) and then checked
against a schema of the keys the code relies on: a key that is present must have the right type,
so no reader ever meets a list where it expects a string. Keys the schema does not name pass
through untouched (configs carry many keys nobody here reads). Every problem is one
:class:`D2ExportError` naming the file and the key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import D2ExportError

MAX_JSON_BYTES = 64 * 2**20  # configs are kilobytes; an index of 100k tensors is a few MB
MAX_DEPTH = 64  # real configs nest 3-4 deep


@dataclass(frozen=True)
class Field:
    """What one key may hold: ``kinds`` among ``str int float bool list dict none``; ``items`` the
    kind of a list's elements or a dict's values; ``check`` a further test returning an error or None."""

    kinds: tuple[str, ...]
    items: str | None = None
    check: Callable[[object], str | None] | None = None
    required: bool = False


_KIND_TEST = {
    "str": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, list),
    "dict": lambda v: isinstance(v, dict),
    "none": lambda v: v is None,
}
_ITEMS_NAME = {"str": "strings", "int": "integers", "float": "numbers", "bool": "true or false",
               "list": "lists", "dict": "objects", "none": "nulls"}
_KIND_NAME = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false",
              "list": "a list", "dict": "an object", "none": "null"}


def _non_negative(value) -> str | None:
    return "must not be negative" if isinstance(value, (int, float)) and value < 0 else None


def _positive(value) -> str | None:
    return "must be positive" if isinstance(value, (int, float)) and value <= 0 else None


def field(*kinds: str, items: str | None = None, check=None, required: bool = False) -> Field:
    return Field(kinds, items, check, required)


SIZE = field("int", "none", check=_non_negative)
TOKEN_ID = field("int", "list", "none", items="int")
NAMES = field("list", "none", items="str")

MODEL_CONFIG = {
    "model_type": field("str"), "architectures": NAMES, "vocab_size": field("int", "none", check=_positive),
    "hidden_size": SIZE, "num_hidden_layers": SIZE, "num_attention_heads": SIZE, "intermediate_size": SIZE,
    "max_position_embeddings": SIZE, "n_positions": SIZE, "n_embd": SIZE, "n_layer": SIZE, "n_head": SIZE,
    "tie_word_embeddings": field("bool"), "is_encoder_decoder": field("bool"),
    "torch_dtype": field("str", "none"), "dtype": field("str", "none"),
    "pad_token_id": TOKEN_ID, "bos_token_id": TOKEN_ID, "eos_token_id": TOKEN_ID,
    "text_config": field("dict", "none"), "num_labels": SIZE, "id2label": field("dict"), "label2id": field("dict"),
    "problem_type": field("str", "none"),
}
ADAPTER_CONFIG = {
    "peft_type": field("str"), "r": field("float"), "lora_alpha": field("float"),
    "target_modules": field("str", "list", "none", items="str"), "modules_to_save": NAMES,
    "rank_pattern": field("dict", "none"), "alpha_pattern": field("dict", "none"),
    "use_rslora": field("bool"), "use_dora": field("bool"), "fan_in_fan_out": field("bool"),
    "base_model_name_or_path": field("str", "none"), "bias": field("str"), "lora_bias": field("bool"),
    "init_lora_weights": field("bool", "str"), "tau": field("float", "none"),
    "norm_projection": field("bool"), "task_type": field("str", "none"), "revision": field("str", "none"),
}
TRAINER_STATE = {"best_model_checkpoint": field("str", "none"), "global_step": SIZE}
SHARD_INDEX = {"weight_map": field("dict", items="str", required=True), "metadata": field("dict", "none")}
# Files transformers or sentence-transformers open from a model folder during verify/onnx.
SIDE_FILES: dict[str, dict | None] = {
    "generation_config.json": {}, "tokenizer_config.json": {}, "special_tokens_map.json": {},
    "preprocessor_config.json": {}, "config_sentence_transformers.json": {},
    "sentence_bert_config.json": {"max_seq_length": SIZE, "do_lower_case": field("bool")},
    "modules.json": None,  # a list of module entries, checked by check_modules
}
MODULE_ENTRY = {"idx": field("int"), "name": field("str"), "path": field("str"), "type": field("str", required=True)}


def parse_json(path: Path, *, strict: bool = True):
    """The JSON value in ``path``, parsed with bounds; any problem is one error naming the file.
    ``strict``: no NaN, Infinity or out-of-range number (``1e400``)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise D2ExportError(f"{path}: {size} bytes is too large for a JSON config")
        raw = path.read_bytes()
    except OSError as exc:
        raise D2ExportError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise D2ExportError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant if strict else None)
    except json.JSONDecodeError as exc:
        raise D2ExportError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise D2ExportError(f"{path}: JSON nested too deeply") from None
    except ValueError as exc:  # a duplicate key, NaN, an integer of more than 4300 digits
        raise D2ExportError(f"{path}: invalid JSON ({exc})") from None
    _check_value(data, path, strict)
    return data


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears twice")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_value(data, path: Path, strict: bool) -> None:
    """Nesting depth and finite numbers (``1e400`` parses as inf), walked without recursion."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise D2ExportError(f"{path}: JSON nested more than {MAX_DEPTH} levels deep")
        if strict and isinstance(value, float) and not math.isfinite(value):
            raise D2ExportError(f"{path}: a number is out of range ({value})")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def read_json_object(path: str | Path, schema: dict[str, Field] | None = None, *, strict: bool = False) -> dict:
    """A JSON file that must hold an object, its keys checked against ``schema``. ``strict``: no
    NaN or Infinity anywhere (Python's json, and so transformers, writes and reads them in a
    model's config; an adapter config or a shard index has no use for them)."""
    path = Path(path)
    data = parse_json(path, strict=strict)
    if not isinstance(data, dict):
        raise D2ExportError(f"{path}: expected a JSON object, found {_kind_of(data)}")
    check_fields(data, schema or {}, path)
    return data


def check_fields(data: dict, schema: dict[str, Field], where: Path | str, context: str = "") -> None:
    for key, spec in schema.items():
        label = f"{context}{key!r}"
        if key not in data:
            if spec.required:
                raise D2ExportError(f"{where}: {label} is missing")
            continue
        value = data[key]
        if not any(_KIND_TEST[k](value) for k in spec.kinds):
            wanted = " or ".join(_KIND_NAME[k] for k in spec.kinds)
            raise D2ExportError(f"{where}: {label} must be {wanted}, found {_kind_of(value)}")
        if spec.items is not None and isinstance(value, (list, dict)):
            elements = value.values() if isinstance(value, dict) else value
            bad = next((e for e in elements if not _KIND_TEST[spec.items](e)), _OK)
            if bad is not _OK:
                raise D2ExportError(
                    f"{where}: {label} must hold only {_ITEMS_NAME[spec.items]}, found {_kind_of(bad)}")
        problem = spec.check(value) if spec.check is not None else None
        if problem:
            raise D2ExportError(f"{where}: {label} {problem}, got {value!r}")


_OK = object()


def _kind_of(value) -> str:
    for kind in ("bool", "int", "float", "str", "list", "dict", "none"):
        if _KIND_TEST[kind](value):
            return _KIND_NAME[kind] if kind != "float" else "a number"
    return type(value).__name__


def check_side_file(path: Path) -> None:
    """A JSON file transformers will open later from a model folder: it must parse and have the
    right shape now, not fail in the middle of a verification or an export."""
    schema = SIDE_FILES[path.name]
    if schema is not None:
        read_json_object(path, schema)
        return
    data = parse_json(path, strict=False)
    if not isinstance(data, list):
        raise D2ExportError(f"{path}: expected a JSON list of modules, found {_kind_of(data)}")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise D2ExportError(f"{path}: module {i} must be an object, found {_kind_of(entry)}")
        check_fields(entry, MODULE_ENTRY, path, f"module {i} ")
