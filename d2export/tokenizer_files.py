"""The tokenizer, chat template, generation config and processor the merged model ships with: the
ones trained with the adapter where the adapter side has them, the base's otherwise.

The adapter side is the adapter's folder and, for a trainer ``checkpoint-N`` folder, its run folder
(the trainer saves the tokenizer into both; the checkpoint's wins). Each of the four parts comes
whole from one place: a tokenizer is never a mix of the adapter's ``tokenizer_config.json`` and the
base's ``tokenizer.json``.

Parts that come from the adapter side are assembled in a scratch folder (links to the files they
are made of, every link checked as :mod:`d2export.sidefiles` checks the base's) and written by
transformers' own ``from_pretrained`` + ``save_pretrained``, which knows every tokenizer's files
and every place a chat template is kept. transformers imports torch, so it is loaded only then;
a merge whose adapter brings none of these copies the base's files as they are, torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import D2ExportError
from .formats.trainer import CHECKPOINT_DIR
from .reading import CONFIG_NAME, WEIGHT_SUFFIXES
from .sidefiles import side_files

TEMPLATE_DIR = "additional_chat_templates"  # transformers' CHAT_TEMPLATE_DIR
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", TEMPLATE_DIR)
LEGACY_TEMPLATE = "chat_template.json"  # processors' file; AutoTokenizer does not read it
TOKENIZER_MARKERS = ("tokenizer_config.json", "tokenizer.json")
# Written by every tokenizer besides its own vocabulary files (those are its class's
# ``vocab_files_names``); the usual vocabulary names are listed for a base whose class is unknown.
TOKENIZER_FILES = frozenset({*TOKENIZER_MARKERS, "special_tokens_map.json", "added_tokens.json", *TEMPLATE_FILES,
                             "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
                             "sentencepiece.bpe.model"})
GENERATION_FILES = ("generation_config.json",)
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json")
# The adapter's own files, never part of a tokenizer; config.json stays the base's (the merged model's)
ADAPTER_OWN = frozenset({"adapter_config.json", "README.md", CONFIG_NAME})


@dataclass
class TrainedFiles:
    """Which parts come from the adapter side (the folder each comes from), found by file names
    alone (:meth:`find`); :meth:`load` loads them."""

    base: Path
    tokenizer: Path | None = None
    template: Path | None = None  # a chat template kept beside the adapter, without its tokenizer
    generation: Path | None = None
    processor: Path | None = None
    replaced: set[str] = field(default_factory=set)  # the base's top-level names not copied
    loaded: list = field(default_factory=list)  # transformers objects, saved in this order

    @classmethod
    def find(cls, adapter: Path, base: Path) -> TrainedFiles:
        """``adapter``: the folder holding the adapter (``AdapterSpec.path``)."""
        sides = [adapter]
        if CHECKPOINT_DIR.fullmatch(adapter.name):  # a trainer run folder holds the checkpoints
            sides.append(adapter.parent)
        found = cls(base, tokenizer=_first(sides, TOKENIZER_MARKERS), generation=_first(sides, GENERATION_FILES),
                    processor=_first(sides, PROCESSOR_FILES))
        if found.tokenizer is None:
            found.template = _first(sides, TEMPLATE_FILES)
        if found.retokenize:
            found.replaced |= TOKENIZER_FILES | _vocab_names(base)
        if found.generation is not None:
            found.replaced |= set(GENERATION_FILES)
        if found.processor is not None:
            found.replaced |= set(PROCESSOR_FILES)
        return found

    @property
    def retokenize(self) -> bool:
        """The tokenizer is written by transformers (a processor saves one too, so then as well)."""
        return any(p is not None for p in (self.tokenizer, self.template, self.processor))

    @classmethod
    @contextlib.contextmanager
    def load(cls, adapter: Path, base: Path) -> Iterator[TrainedFiles]:
        """:meth:`find`, then load each part the adapter side brings, so that one transformers
        cannot read is refused before the merge writes anything; :meth:`write` saves them. The
        scratch folder they were loaded from lives until the block ends: a tokenizer saves its
        vocabulary by copying the file it was loaded from."""
        found = cls.find(adapter, base)
        if not found.replaced:
            yield found
            return
        with _staged(found) as stage:
            if found.processor is not None:
                found.loaded += _load(found.processor, "processor", lambda: _load_processor(stage))
            if found.retokenize:
                source = found.tokenizer or found.template or found.base
                found.loaded.append(_load(source, "tokenizer", lambda: _load_tokenizer(stage)))
            if found.generation is not None:
                found.loaded.append(_load(found.generation, GENERATION_FILES[0], lambda: _generation(stage)))
            yield found

    def write(self, folder: Path) -> None:
        """Save the loaded parts into ``folder``, after the base's other side files; the processor
        first, so that the tokenizer chosen here is the one that stays."""
        for part in self.loaded:
            part.save_pretrained(folder)


def _first(folders: list[Path], names: tuple[str, ...]) -> Path | None:
    return next((f for f in folders if any((f / n).exists() for n in names)), None)


def _vocab_names(base: Path) -> set[str]:
    """The vocabulary files of the base's tokenizer class (``tokenizer_class`` in its config)."""
    try:
        name = json.loads((base / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return set()
    if not isinstance(name, str) or not name:
        return set()
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    names: set[str] = set()
    for variant in {name, name.removesuffix("Fast"), name.removesuffix("Fast") + "Fast"}:
        with contextlib.suppress(Exception):  # a class this transformers lacks names no file
            tokenizer = tokenizer_class_from_name(variant)
            names |= {n for n in getattr(tokenizer, "vocab_files_names", {}).values() if isinstance(n, str)}
    return names


@contextlib.contextmanager
def _staged(found: TrainedFiles) -> Iterator[Path]:
    """A scratch folder of links: the base's top-level files, with each part that comes from the
    adapter side replaced by that side's files. What transformers loads is exactly this."""
    parts = [(found.tokenizer, TOKENIZER_FILES | _vocab_names(found.base), None),  # None: the whole folder,
             (found.template, frozenset(TEMPLATE_FILES), TEMPLATE_FILES),       # a vocabulary may have any name
             (found.generation, frozenset(GENERATION_FILES), GENERATION_FILES),
             (found.processor, frozenset(PROCESSOR_FILES), PROCESSOR_FILES)]
    dropped = set().union(*(names for side, names, _ in parts if side is not None))
    files = {r: s for s, r in _top_files(found.base) if r.parts[0] not in dropped}
    for side, _, taken in parts:
        if side is not None:
            files.update({r: s for s, r in _top_files(side)
                          if (r.parts[0] in taken if taken else r.parts[0] not in ADAPTER_OWN)})
    with tempfile.TemporaryDirectory(prefix="d2export-tokenizer-") as scratch:
        stage = Path(scratch)
        for relative, source in files.items():
            (stage / relative).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(source, stage / relative)
        yield stage


def _top_files(folder: Path) -> list[tuple[Path, Path]]:
    """(checked source, relative path) of ``folder``'s top-level files and its chat template
    folder; weights and other subfolders are passed over unopened."""
    skip = {p.name for p in folder.iterdir()
            if p.name.endswith(WEIGHT_SUFFIXES) or (p.is_dir() and p.name != TEMPLATE_DIR)}
    return side_files(folder, skip, WEIGHT_SUFFIXES)


def _load_tokenizer(stage: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stage)
    legacy = stage / LEGACY_TEMPLATE
    if legacy.is_file() and not (stage / TEMPLATE_FILES[0]).is_file():
        # AutoTokenizer reads chat_template.jinja and tokenizer_config.json only; a template kept in
        # the processors' older chat_template.json would be lost. A standalone file wins over the
        # config's entry, as in transformers.
        template = json.loads(legacy.read_text()).get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}] as tokenizer_config keeps them
            template = {t["name"]: t["template"] for t in template}
        if template:
            tokenizer.chat_template = template
    return tokenizer


def _load_processor(stage: Path) -> list:
    """The processor where one is named (``processor_config.json``, or ``processor_class`` in a
    preprocessor or tokenizer config), else the feature extractor, image and video processors the
    files describe: AutoProcessor would fall back to the tokenizer alone and drop them."""
    from transformers import AutoFeatureExtractor, AutoImageProcessor, AutoProcessor, AutoVideoProcessor

    configs = {name: json.loads((stage / name).read_text()) for name in (*PROCESSOR_FILES, "tokenizer_config.json")
               if (stage / name).is_file()}
    if "processor_config.json" in configs or any("processor_class" in c for c in configs.values()):
        return [AutoProcessor.from_pretrained(stage)]
    parts = []
    if "preprocessor_config.json" in configs:
        image = "image_processor_type" in configs["preprocessor_config.json"]
        parts.append((AutoImageProcessor if image else AutoFeatureExtractor).from_pretrained(stage))
    if "video_preprocessor_config.json" in configs:
        parts.append(AutoVideoProcessor.from_pretrained(stage))
    return parts


@dataclass
class _CheckedFile:
    """A file transformers has read, saved as it is."""

    path: Path

    def save_pretrained(self, folder: Path) -> None:
        shutil.copyfile(self.path, folder / self.path.name)


def _generation(stage: Path) -> _CheckedFile:
    """The generation config, read by transformers but copied as written: its save_pretrained
    refuses what its strict validation only warns about on load (a temperature without sampling,
    as many shipped configs have), which would fail a merge over a setting the model keeps."""
    from transformers import GenerationConfig

    GenerationConfig.from_pretrained(stage)
    return _CheckedFile(stage / GENERATION_FILES[0])


def _load(source: Path, what: str, load: Callable[[], Any]) -> Any:
    try:
        return load()
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad folder
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise D2ExportError(f"{source}: its {what} cannot be loaded by transformers ({reason}); "
                            "fix or remove those files") from None
