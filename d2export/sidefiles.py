"""Which of a base folder's files travel with the merged model, found without following a symlink
out of the base or around a loop, and copying them."""

from __future__ import annotations

import shutil
from pathlib import Path

from .errors import D2ExportError
from .reading import CONFIG_NAME, SAFE_INDEX, WEIGHT_SUFFIXES
from .report import REPORT_NAME

_MAX_DEPTH = 16  # model folders nest one or two levels (1_Pooling/, tokenizer/)


def side_files(base: Path, skip: set[str], weight_suffixes: tuple[str, ...]) -> list[tuple[Path, Path]]:
    """(file to copy, path relative to ``base``) for every non-weight file of ``base``, except the
    top-level names in ``skip``, hidden files and subfolders holding weights.

    A symlink is followed only if it points inside the base folder (or, for a base in the Hugging
    Face cache, inside the cache's blobs of that model): a link elsewhere would leak an unrelated
    file into an output that may be published, so it is refused, as is a folder link that loops
    back on itself.
    """
    walk = _Walk(_link_roots(base), skip, weight_suffixes)
    return walk.folder(base, (base.resolve(),), top=True)[0]


def _link_roots(base: Path) -> tuple[Path, ...]:
    roots = [base.resolve()]
    for path in (base.absolute(), *base.absolute().parents, base.resolve(), *base.resolve().parents):
        if path.parent.name == "snapshots":  # <cache>/models--org--name/snapshots/<revision>/
            roots.append((path.parent.parent / "blobs").resolve())
            break
    return tuple(roots)


class _Walk:
    def __init__(self, roots: tuple[Path, ...], skip: set[str], weight_suffixes: tuple[str, ...]):
        self.roots, self.skip, self.weight_suffixes = roots, skip, weight_suffixes

    def folder(self, directory: Path, ancestors: tuple[Path, ...], top: bool = False
               ) -> tuple[list[tuple[Path, Path]], bool]:
        """(source file, path relative to ``directory``) of each file to copy, and whether the
        folder holds weights (then none of a subfolder is copied)."""
        if len(ancestors) > _MAX_DEPTH:
            raise D2ExportError(f"{directory}: side folders nested more than {_MAX_DEPTH} deep")
        files: list[tuple[Path, Path]] = []
        for item in sorted(directory.iterdir()):
            if item.name.startswith(".") or (top and item.name in self.skip):
                continue
            real = self.target(item)
            if real.is_dir():
                if real in ancestors:
                    raise D2ExportError(f"{item} is a symlink back to {real}: a loop in the base folder")
                inner, weights = self.folder(item, (*ancestors, real))
                if weights and not top:
                    return [], True
                files += [(source, Path(item.name) / relative) for source, relative in inner]
            elif item.name.endswith(self.weight_suffixes):
                if not top:
                    return [], True
            elif real.is_file():  # not a FIFO, socket or device: those are no model files
                files.append((real, Path(item.name)))
        return files, False

    def target(self, item: Path) -> Path:
        """Where ``item`` leads, refused if a symlink leads out of the allowed roots."""
        real = item.resolve()
        if item.is_symlink() and not any(real == root or root in real.parents for root in self.roots):
            raise D2ExportError(f"{item} is a symlink to {real}, outside the base folder; it is not copied "
                                "into the output (copy the file itself into the base if it belongs there)")
        return real


def copy_side_files(base: Path, folder: Path, skip: set[str] = frozenset()) -> None:
    """Tokenizer, generation config and other small files travel with the model; weights, indexes
    and the old config do not (they are rewritten), nor does a subfolder holding weights. Links
    out of the base or looping back are refused (:func:`side_files`). Top-level
    names in ``skip`` are not copied either (the adapter side brings its own)."""
    skip = {*skip, CONFIG_NAME, SAFE_INDEX, "pytorch_model.bin.index.json", "README.md", REPORT_NAME}
    for source, relative in side_files(base, skip, WEIGHT_SUFFIXES):
        target = folder / relative
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        except OSError as exc:
            raise D2ExportError(f"cannot copy {base / relative} into the output ({exc.strerror or exc})") from None
