"""sentence-transformers folders: the modules around the transformer, and their settings.

A sentence-transformers model is a transformers model at the folder's root (module 0) followed by
modules listed in ``modules.json`` (pooling, dense projections, normalisation), each in its own
subfolder, some with weights of their own (``2_Dense/model.safetensors``). The merge folds the
adapter into the root model only; every other module is carried into the output as it is, from the
adapter side when the training run saved its own copy (a Dense layer trained with the adapter),
else from the base. Settings the run saved beside the adapter (``sentence_bert_config.json``,
``config_sentence_transformers.json``) override the base's key by key. See docs/design.md §5.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import D2ExportError
from .formats.trainer import CHECKPOINT_DIR
from .jsonfiles import SIDE_FILES, check_side_file, parse_json, read_json_object
from .reading import WEIGHT_SUFFIXES
from .sidefiles import side_files
from .writing import sha256_file, write_json, write_text

MODULES_NAME = "modules.json"
SETTINGS_NAMES = ("sentence_bert_config.json", "config_sentence_transformers.json")
TOKENIZER_CONFIG = "tokenizer_config.json"
# transformers' "no limit" placeholder for model_max_length (int(1e30)); anything that large is no setting
_NO_LIMIT = 10**12


@dataclass
class StModules:
    """What the output of a merge (or an ONNX export) needs to load as a sentence-transformers model."""

    modules: list[dict]  # the modules.json to write
    folders: dict[str, Path] = field(default_factory=dict)  # module path -> the folder copied there
    settings: dict[str, dict] = field(default_factory=dict)  # settings file name -> its merged content
    sources: dict[str, str] = field(default_factory=dict)  # file or module path -> "base" / "adapter"
    notes: list[str] = field(default_factory=list)
    weights: dict[str, str] = field(default_factory=dict)  # module weight file copied -> sha256 (once written)

    def summary(self) -> dict:
        """The report's record: where each module and setting came from, and the module weights' hashes."""
        return {"modules": [m.get("path", "") for m in self.modules], "sources": dict(sorted(self.sources.items())),
                "weights": dict(sorted(self.weights.items())), "notes": self.notes}


def is_sentence_transformers(folder: Path) -> bool:
    return (folder / MODULES_NAME).is_file()


def plan_modules(base: Path, adapter: Path | None = None) -> StModules | None:
    """The sentence-transformers files for an output merged from ``base`` and the adapter folder
    ``adapter`` (None: carry ``base`` as it is, for an export). The adapter side is ``adapter`` and,
    for a trainer ``checkpoint-N``, its run folder (the checkpoint's wins), as for the tokenizer
    (:mod:`d2export.tokenizer_files`). None when no side is a sentence-transformers folder."""
    sides = [("adapter", adapter)] if adapter is not None else []
    if adapter is not None and CHECKPOINT_DIR.fullmatch(adapter.name):
        sides.append(("run", adapter.parent))  # the trainer saves the model into its run folder too
    sides.append(("base", base))
    found = [(name, folder) for name, folder in sides if is_sentence_transformers(folder)]
    if not found:
        return None
    side, folder = found[0]  # the adapter side's module list describes the pipeline it was trained in
    modules = _read_modules(folder / MODULES_NAME)
    st = StModules(modules, sources={MODULES_NAME: side})
    for entry in modules:
        path = entry.get("path", "")
        _check_module(entry, folder / MODULES_NAME)
        if path == "":
            continue  # the transformer itself: the merged weights
        for name, root in sides:
            if (root / path).is_dir():
                _check_inside(root, root / path)
                st.folders[path] = root / path
                st.sources[path] = name
                break
        # A module without a folder (Normalize) has nothing to carry; sentence-transformers builds it.
    for name in SETTINGS_NAMES:
        merged: dict = {}
        for side_name, root in reversed(sides):  # base first, the adapter side's keys win
            if (root / name).is_file():
                data = read_json_object(root / name, SIDE_FILES[name])
                merged.update(data)
                st.sources[name] = side_name if name not in st.sources else f"{st.sources[name]}+{side_name}"
        if merged:
            st.settings[name] = merged
    if adapter is not None:
        _adapter_max_seq_length(adapter, st)
    return st


def _adapter_max_seq_length(adapter: Path, st: StModules) -> None:
    """sentence-transformers 5 keeps ``max_seq_length`` in the tokenizer's ``model_max_length``, no
    longer in sentence_bert_config.json; a base saved by an older version still has it there, and
    that key would win over the tokenizer at load. So the adapter side's limit is written into the
    merged sentence_bert_config.json explicitly, whichever tokenizer files the output holds."""
    name = SETTINGS_NAMES[0]
    own = adapter / name
    if not own.is_file() or "max_seq_length" in read_json_object(own, SIDE_FILES[name]):
        return
    tokenizer = adapter / TOKENIZER_CONFIG
    if not tokenizer.is_file():
        return
    limit = read_json_object(tokenizer).get("model_max_length")
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _NO_LIMIT:
        before = st.settings.setdefault(name, {}).get("max_seq_length")
        st.settings[name]["max_seq_length"] = limit
        if before is not None and before != limit:
            st.notes.append(f"max_seq_length {limit} from the adapter's {TOKENIZER_CONFIG} "
                            f"(the base's {name} said {before})")


def _read_modules(path: Path) -> list[dict]:
    check_side_file(path)
    return parse_json(path, strict=False)


def _check_module(entry: dict, where: Path) -> None:
    path = entry.get("path", "")
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or "\\" in path:
        raise D2ExportError(f"{where}: module path {path!r} leads out of the model folder")
    if path and entry["type"].rsplit(".", 1)[-1] == "Transformer":
        # Older sentence-transformers folders keep the transformer in 0_Transformer/: the merge
        # writes the root model, so such an output would still load the unmerged weights.
        raise D2ExportError(f"{where}: the transformer module lives in {path}/, not at the folder's root; "
                            "point --base at that subfolder")


def _check_inside(root: Path, folder: Path) -> None:
    real = folder.resolve()
    if not real.is_relative_to(root.resolve()):
        raise D2ExportError(f"{folder} is a symlink to {real}, outside {root}; it is not copied into the output "
                            "(copy the folder itself in if it belongs there)")


def write_modules(st: StModules, folder: Path) -> None:
    """Write ``st`` into the output ``folder``: modules.json, the merged settings, and every
    module folder whole (weights included), replacing what the side-file copy put there."""
    write_text(folder / MODULES_NAME, json.dumps(st.modules, indent=2) + "\n")
    for name, data in st.settings.items():
        write_json(folder / name, data)
    for path, source in st.folders.items():
        target = folder / path
        if target.exists():
            shutil.rmtree(target)  # a base copy must not mix with the adapter side's module
        try:  # made even when empty (a Normalize module's folder): modules.json names it
            target.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise D2ExportError(f"cannot create {path} in the output ({exc.strerror or exc})") from None
        # side_files with no weight suffixes lists every file, under its symlink rules
        for file, relative in side_files(source, set(), ()):
            try:
                (target / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(file, target / relative)
            except OSError as exc:
                raise D2ExportError(f"cannot copy {source / relative} into the output ({exc.strerror or exc})"
                                    ) from None
            if relative.name.endswith(WEIGHT_SUFFIXES):  # hashed as written, like the shards
                st.weights[(PurePosixPath(path) / relative.as_posix()).as_posix()] = sha256_file(target / relative)
