"""The one start every command shares: read the adapter, find and open its base, plan the merge.

``merge``, ``inspect``, ``verify`` and ``bench`` all begin with :func:`prepare`; ``merge --verify``
hands its :class:`Job` on to ``verify``, so the adapter is read and the plan built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import D2ExportError, OptionError
from .formats import load_adapter
from .options import MergeOptions
from .plan import MergePlan, build_plan
from .reading import ModelFolder
from .spec import AdapterSpec


class BaseModelError(D2ExportError):
    """The adapter's base model cannot be found or opened."""


class BaseNotGivenError(OptionError, BaseModelError):
    """No base was given and the adapter's own reference does not lead to one."""

    def __init__(self, message: str):
        super().__init__("base", message)


@dataclass
class Job:
    """An adapter, its opened base and the merge plan, ready for any command."""

    spec: AdapterSpec
    base: ModelFolder
    plan: MergePlan
    options: MergeOptions

    @property
    def default_out(self) -> Path:
        """Where a merge goes unless told: ``<adapter>-merged`` beside the adapter folder."""
        return self.spec.path.parent / f"{self.spec.path.name}-merged"

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def prepare(adapter: str | Path | AdapterSpec, base: str | Path | None = None,
            options: MergeOptions | None = None) -> Job:
    """Read ``adapter`` (or take an already read spec), open its base and plan the merge.

    Args:
        adapter: adapter folder, trainer checkpoint folder, or an :class:`AdapterSpec`.
        base: base model folder; default: the adapter's ``base_model_name_or_path``.
        options: what the merge writes (dtype, shards); default :class:`MergeOptions`.

    Returns:
        A :class:`Job`; close it (or use it as a context manager) when done.

    Raises:
        D2ExportError: the adapter or base is unreadable, or they do not fit together.
    """
    spec = adapter if isinstance(adapter, AdapterSpec) else load_adapter(adapter)
    options = options or MergeOptions()
    folder = open_base(spec, base)
    try:
        plan = build_plan(spec, folder, options)
    except BaseException:
        folder.close()
        raise
    return Job(spec, folder, plan, options)


def open_base(spec: AdapterSpec, base: str | Path | None) -> ModelFolder:
    path = resolve_base(spec, base)
    try:  # a base folder that is not a model is the base's problem, not the adapter's
        return ModelFolder.open(path, "base model")
    except D2ExportError as exc:
        raise BaseModelError(str(exc)) from None


def resolve_base(spec: AdapterSpec, base: str | Path | None) -> Path:
    """``base`` if given, else the adapter's ``base_model_name_or_path``: a local folder (relative
    paths are tried from the adapter folder too) or a model in the local Hugging Face cache.
    Never touches the network."""
    if base is not None:
        return Path(base)
    name = spec.base_model_name_or_path
    if not name:
        raise BaseNotGivenError(f"is needed: the adapter {spec.path} names no base model")
    for candidate in (Path(name), spec.path / name):
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise BaseNotGivenError(
            f"is needed: the adapter's base model {name!r} is neither a local folder nor in the local "
            "Hugging Face cache"
        ) from None
