"""The whole model beyond its weights: config.json, the tokenizer and the sentence-transformers
modules of a folder, against what the merge writes (docs/design.md §6, *The rest of the model*;
the files themselves: §5).

A folder can hold every weight right and still serve another model: a config whose position table,
label names or attention settings changed (the output checks load the folder with its own config,
and transformers' default attention ignores some of those keys), a tokenizer that no longer
lowercases or has two ids swapped, a pooling module switched from mean to CLS. The output checks
feed every model the same token ids, so none of these moves a figure; they are compared here, each
against the file the merge would write (the adapter side's where it brings one, else the base's).

Keys and files that change nothing a model computes (``use_cache``, a tool's version stamp) are
notes; a folder without a tokenizer or sentence-transformers files (another tool's
``save_pretrained``) is a note too: it is not wrong, it is less.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from ..jsonfiles import read_json_object
from ..plan import MergePlan
from ..sidefiles import side_files
from ..st_modules import MODULES_NAME, plan_modules
from ..tokenizer_files import TOKENIZER_FILES, TrainedFiles
from ..writing import sha256_file
from .declared import DTYPE_KEYS

# Written by whichever tool and version saved the folder, checked elsewhere (the dtype: .declared)
# or not at all: they name, they do not compute.
STAMP_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset", *DTYPE_KEYS}
# Settings of how a model is run, not of what it computes: differing, a note.
RUN_KEYS = {"use_cache", "output_attentions", "output_hidden_states", "return_dict", "attn_implementation",
            "_attn_implementation"}
# Texts the two tokenizers must encode alike: case, accents, digits, whitespace, scripts, markup.
PROBES = ("The Movie was GREAT!", "naïve café, 123,456.78 € (ok?)", "Hello world\nnew line\ttab",
          "日本語のテキストと한국어", "  two  spaces ", "e-mail: a.b@example.org <b>bold</b> #tag")
MAX_LISTED = 3
# Tokenizer settings a training script often changes on purpose (padding side, a longer limit than
# the base's config states) and a caller or server may set per request: differing, a note. How a
# text is split (vocabulary, normalisation, special tokens, chat template) fails.
TOKENIZER_SETTINGS = ("model_max_length", "padding_side")


def check_files(merged: Path, folder_config: dict, plan: MergePlan, adapter: Path) -> tuple[list[str], list[str]]:
    """(failures, notes) of ``merged``'s config.json, tokenizer and sentence-transformers files
    against what the merge of ``plan`` (adapter folder ``adapter``) writes."""
    failures, notes = _config(folder_config, {**plan.base.config, **plan.config_updates})
    for check in (_tokenizer(merged, adapter, plan.base.path), _sentence_transformers(merged, adapter, plan.base.path)):
        failures += check[0]
        notes += check[1]
    return failures, notes


def _normalised(config: dict) -> tuple[dict, set[str]]:
    """``config`` as transformers' config class reads it, every default filled in (one tool writes
    only what differs from the defaults, another every key), and the keys that class knows."""
    values = {k: v for k, v in config.items() if k not in STAMP_KEYS}
    model_type = values.pop("model_type", None)
    try:
        known = set(AutoConfig.for_model(model_type).to_dict())
        read = AutoConfig.for_model(model_type, **values).to_dict()
    except Exception:
        return {k: v for k, v in config.items() if k not in STAMP_KEYS}, set(config)
    return {k: v for k, v in read.items() if k not in STAMP_KEYS}, known


def _config(folder: dict, expected: dict) -> tuple[list[str], list[str]]:
    ours, known = _normalised(folder)
    theirs, _ = _normalised(expected)
    failures, notes = [], []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if a == b:
            continue
        line = f"config.json: {key} is {json.dumps(a)}; the merge writes {json.dumps(b)}"
        if key in RUN_KEYS or key not in known:  # a key transformers' class does not read computes nothing
            notes.append(line + (" (a setting of how the model runs, not of what it computes)" if key in RUN_KEYS
                                 else " (a key transformers does not read for this model)"))
        else:
            failures.append(line)
    return failures, notes


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def _expected_tokenizer(adapter: Path, base: Path):
    """The tokenizer the merge writes: the adapter side's (with its chat template) or the base's;
    None where neither has one. Only files are looked at before anything loads: transformers
    spends seconds failing to build a tokenizer for a folder without one."""
    if not TrainedFiles.find(adapter, base).retokenize:
        if not _has_tokenizer(base):
            return None
        try:
            return AutoTokenizer.from_pretrained(base)
        except Exception:
            return None
    with TrainedFiles.load(adapter, base) as found:
        for part in reversed(found.loaded):  # a processor comes first and carries its own tokenizer
            if isinstance(part, PreTrainedTokenizerBase):
                return part
    return None


def _tokenizer(merged: Path, adapter: Path, base: Path) -> tuple[list[str], list[str]]:
    if not _has_tokenizer(merged):
        there = TrainedFiles.find(adapter, base).retokenize or _has_tokenizer(base)
        return [], ["the folder has no tokenizer: serving it needs the one the adapter was trained with "
                    "(d2export's merge writes it)"] if there else []
    expected = _expected_tokenizer(adapter, base)
    if expected is None:
        return [], []
    try:
        tokenizer = AutoTokenizer.from_pretrained(merged)
    except Exception as exc:
        return [f"tokenizer: transformers cannot load the folder's ({type(exc).__name__}: "
                f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"], []
    failures = []
    ours, theirs = tokenizer.get_vocab(), expected.get_vocab()
    if ours != theirs:
        differ = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
        listed = ", ".join(f"{k!r}: {ours.get(k)} (the merge's {theirs.get(k)})" for k in differ[:MAX_LISTED])
        failures.append(f"tokenizer: {len(differ)} vocabulary entries differ from the merge's tokenizer: {listed}")
    for text in PROBES:
        a, b = tokenizer(text)["input_ids"], expected(text)["input_ids"]
        if a != b:
            failures.append(f"tokenizer: {text!r} encodes as {a}; the merge's tokenizer gives {b}")
            break  # one text shows it
    notes = []
    for what in ("chat_template", "all_special_tokens", *TOKENIZER_SETTINGS):
        a, b = getattr(tokenizer, what, None), getattr(expected, what, None)
        if a != b:
            line = f"tokenizer: {what} is {_short(a)}; the merge's tokenizer has {_short(b)}"
            (notes if what in TOKENIZER_SETTINGS else failures).append(line)
    return failures, notes


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _sentence_transformers(merged: Path, adapter: Path, base: Path) -> tuple[list[str], list[str]]:
    st = plan_modules(base, adapter)
    if st is None:
        return [], []
    if not (merged / MODULES_NAME).is_file():
        return [], [f"the base is a sentence-transformers model but the folder has no {MODULES_NAME}: "
                    "SentenceTransformer loads it with mean pooling alone, without the base's other modules "
                    f"({', '.join(m.get('type', '?').rsplit('.', 1)[-1] for m in st.modules[1:]) or 'none'}); "
                    "d2export's merge writes them"]
    failures = []
    found = _json(merged / MODULES_NAME)
    if found != st.modules:
        failures.append(f"{MODULES_NAME}: modules {_modules(found)}; the merge writes {_modules(st.modules)}")
    for name, expected in st.settings.items():
        failures += _json_file(merged / name, name, expected)
    for path, source in st.folders.items():
        for file, relative in side_files(source, set(), ()):
            shown = f"{path}/{relative.as_posix()}"
            target = merged / path / relative
            if not target.is_file():
                failures.append(f"{shown}: missing from the folder")
            elif relative.suffix == ".json":
                failures += _json_file(target, shown, read_json_object(file))
            elif sha256_file(target) != sha256_file(file):
                failures.append(f"{shown}: differs from the {st.sources.get(path, 'base')}'s file")
    return failures, []


def _json(path: Path):
    """The file's JSON, or None where it is not JSON (then it differs from any file the merge writes)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _modules(entries) -> str:
    if not isinstance(entries, list):
        return "(not a JSON list)"
    return "[" + ", ".join(f"{e.get('path') or '.'}: {str(e.get('type', '?')).rsplit('.', 1)[-1]}"
                           for e in entries if isinstance(e, dict)) + "]"


def _json_file(path: Path, shown: str, expected: dict) -> list[str]:
    if not path.is_file():
        return [f"{shown}: missing from the folder"]
    found = _json(path)
    if not isinstance(found, dict):
        return [f"{shown}: not a JSON object"]
    return [f"{shown}: {key} is {json.dumps(found.get(key))}; the merge writes {json.dumps(expected.get(key))}"
            for key in sorted(set(found) | set(expected)) if found.get(key) != expected.get(key)]


__all__ = ["check_files"]
