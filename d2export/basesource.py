"""Which folder is the adapter's base, and why (docs/design.md §5): ``--base``, else the adapter's
``base_model_name_or_path`` as a local folder or, at the adapter's ``revision``, a snapshot in the
local Hugging Face cache. Never the network.

Picking the wrong base is silent: the merge and ``verify`` run happily against it. So every rule
here refuses rather than guesses: a relative name found both beside the adapter and under the
current directory, a revision the cache does not hold, ``--revision`` with a plain folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import D2ExportError, OptionError
from .reading import CONFIG_NAME


class BaseModelError(D2ExportError):
    """The adapter's base model cannot be found or opened."""


class BaseNotGivenError(OptionError, BaseModelError):
    """No base was given and the adapter's own reference does not lead to one."""

    def __init__(self, message: str):
        super().__init__("base", message)


class RevisionError(OptionError, BaseModelError):
    """``--revision`` asked of a base that is not taken from the Hugging Face cache."""

    def __init__(self, message: str):
        super().__init__("revision", message)


@dataclass(frozen=True)
class BaseSource:
    """The base folder a job uses and how it was found (recorded in the merge and verify reports)."""

    path: Path  # absolute
    found: str  # "given" (--base), "adapter folder", "current directory", "absolute path", "hub cache"
    name: str | None = None  # as written: --base, or the adapter's base_model_name_or_path
    repo_id: str | None = None  # from the Hugging Face cache only
    revision: str | None = None  # the revision asked for (None: main)
    snapshot: str | None = None  # commit hash of the cache snapshot used

    def describe(self) -> str:
        """One phrase for a summary line: the repo and snapshot when from the cache, else the path."""
        if self.repo_id is None:
            return str(self.path)
        asked = f" ({self.revision})" if self.revision and self.revision != self.snapshot else ""
        return f"{self.repo_id}@{self.snapshot}{asked} at {self.path}"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "found": self.found, "name": self.name, "repo_id": self.repo_id,
                "revision": self.revision, "snapshot": self.snapshot}


def resolve_base(adapter_dir: Path, configured: str | None, configured_revision: str | None,
                 base: str | Path | None = None, revision: str | None = None) -> BaseSource:
    """The base folder for an adapter in ``adapter_dir``.

    Args:
        adapter_dir: the folder holding ``adapter_config.json``.
        configured: the adapter's ``base_model_name_or_path``.
        configured_revision: the adapter's ``revision`` (the base's commit, branch or tag).
        base: ``--base``: a folder (relative to the current directory, as any command-line path)
            or a model id in the cache; overrides ``configured``.
        revision: ``--revision``; overrides ``configured_revision``.

    Raises:
        BaseModelError: nothing found, a relative name found in two places, or a revision that
            the cache does not hold (one line saying what it does hold).
    """
    if base is not None:
        name = str(base)
        if Path(base).is_dir():
            _no_revision(revision, name, Path(base))
            return BaseSource(Path(base).resolve(), "given", name)
        # the adapter's revision belongs to the adapter's base, not to another model named by --base
        if revision is None and name == configured:
            revision = configured_revision
        source = _from_cache(name, revision, "given")
        if source is not None:
            return source
        if not _is_repo_id(name):
            raise BaseModelError(f"base model folder not found: {Path(base).absolute()}")
        raise BaseModelError(f"base model {name!r} is neither a folder nor a model in the local Hugging Face cache "
                             f"({_cache_dir()})")
    if not configured:
        raise BaseNotGivenError(f"is needed: the adapter {adapter_dir} names no base model")
    local = _local_folder(adapter_dir, configured)
    if local is not None:
        _no_revision(revision, configured, local.path)
        return local
    source = _from_cache(configured, revision or configured_revision, "hub cache")
    if source is None:
        raise BaseNotGivenError(f"is needed: the adapter's base model {configured!r} is neither a local folder nor in "
                                f"the local Hugging Face cache ({_cache_dir()})")
    return source


def _local_folder(adapter_dir: Path, name: str) -> BaseSource | None:
    """``name`` as a folder: an absolute path as is; a relative one beside the adapter first (where
    the training run wrote it, e.g. ``../base``), else under the current directory. Found in both
    as two different model folders, it is refused: which one the user meant cannot be known."""
    path = Path(name)
    if path.is_absolute():
        return BaseSource(path.resolve(), "absolute path", name) if path.is_dir() else None
    beside, here = (adapter_dir / path).absolute(), path.absolute()
    if _is_model(beside) and _is_model(here) and beside.resolve() != here.resolve():
        raise BaseModelError(f"the adapter's base model {name!r} is ambiguous: it names both {beside} (beside the "
                             f"adapter) and {here} (under the current directory); pass --base")
    for folder, found in ((beside, "adapter folder"), (here, "current directory")):
        if folder.is_dir():
            return BaseSource(folder.resolve(), found, name)
    return None


def _is_model(folder: Path) -> bool:
    # a folder without config.json cannot be the base, so it makes no name ambiguous
    return (folder / CONFIG_NAME).is_file()


def _no_revision(revision: str | None, name: str, folder: Path) -> None:
    if revision is not None:
        named = "" if Path(name).absolute() == folder.absolute() else f" {name!r}"
        raise RevisionError(f"{revision}: a revision picks a snapshot in the Hugging Face cache, but the base{named} "
                            f"is the local folder {folder.resolve()}; drop --revision or pass a model id")


def _cache_dir() -> str:
    # read when used, not when imported: huggingface_hub's own default (HF_HUB_CACHE, HF_HOME)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _from_cache(repo_id: str, revision: str | None, found: str) -> BaseSource | None:
    """The snapshot of ``repo_id`` at ``revision`` (default main) in the local cache, found by
    huggingface_hub itself (``refs/<branch or tag>`` or a commit hash); None if the repo is not
    cached at all. A cached repo without that revision is an error: falling back to another
    snapshot is exactly the silent wrong base this module exists to prevent."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if not _is_repo_id(repo_id):
        return None
    cache = _cache_dir()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        snapshots = _cached_snapshots(repo_id, cache)
        if snapshots is None:
            return None
        held = ", ".join(snapshots) if snapshots else "no complete snapshot"
        raise BaseModelError(f"revision {revision or 'main'} of the base model {repo_id} is not in the local Hugging "
                             f"Face cache ({cache}), which holds {held}; download it or pass --revision or "
                             "--base") from None
    return BaseSource(folder.resolve(), found, repo_id, repo_id, revision, folder.name)


def _cached_snapshots(repo_id: str, cache: str) -> list[str] | None:
    """``hash (refs)`` of every snapshot of ``repo_id`` in the cache; None if it is not cached."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.file_download import repo_folder_name

    folder = Path(cache) / repo_folder_name(repo_id=repo_id, repo_type="model")
    if not folder.is_dir():
        return None
    # the error path only: scanning the whole cache costs a directory walk, which is fine here
    for repo in scan_cache_dir(cache).repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            return [rev.commit_hash + (f" ({', '.join(sorted(rev.refs))})" if rev.refs else "")
                    for rev in sorted(repo.revisions, key=lambda r: r.commit_hash)]
    # scan_cache_dir leaves out a whole repo it finds damaged (a ref to a missing snapshot, a link to a
    # missing blob): its snapshot folders as they are, which may be incomplete
    refs: dict[str, list[str]] = {}
    for ref in sorted(p for p in (folder / "refs").rglob("*") if p.is_file()):
        refs.setdefault(ref.read_text().strip(), []).append(ref.relative_to(folder / "refs").as_posix())
    snapshots = folder / "snapshots"
    names = sorted(p.name for p in snapshots.iterdir() if p.is_dir()) if snapshots.is_dir() else []
    return [f"{name} ({', '.join(refs[name])}; may be incomplete)" if name in refs else f"{name} (may be incomplete)"
            for name in names]
