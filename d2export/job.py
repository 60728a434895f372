"""The one start every command shares: read the adapter, find and open its base, plan the merge.

``merge``, ``inspect``, ``verify`` and ``bench`` all begin with :func:`prepare`; ``merge --verify``
hands its :class:`Job` on to ``verify``, so the adapter is read and the plan built once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .basesource import BaseModelError, BaseNotGivenError, BaseSource, resolve_base
from .errors import D2ExportError
from .formats import load_adapter
from .options import MergeOptions
from .plan import MergePlan, build_plan
from .reading import ModelFolder
from .spec import AdapterSpec

__all__ = ["BaseModelError", "BaseNotGivenError", "Job", "open_base", "prepare"]


@dataclass
class Job:
    """An adapter, its opened base and the merge plan, ready for any command."""

    spec: AdapterSpec
    base: ModelFolder
    plan: MergePlan
    options: MergeOptions
    source: BaseSource | None = None  # how the base was found (None: a Job built by hand)

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
        base: base model folder (or a model id in the local Hugging Face cache); default: the
            adapter's ``base_model_name_or_path`` at its ``revision``.
        options: what the merge writes (dtype, shards) and the base's ``revision``; default
            :class:`MergeOptions`.

    Returns:
        A :class:`Job`; close it (or use it as a context manager) when done.

    Raises:
        D2ExportError: the adapter or base is unreadable, or they do not fit together.
    """
    spec = adapter if isinstance(adapter, AdapterSpec) else load_adapter(adapter)
    options = options or MergeOptions()
    source, folder = open_base(spec, base, options.revision)
    try:
        plan = build_plan(spec, folder, options)
    except BaseException:
        folder.close()
        raise
    asked = spec.config.get("revision")
    if asked and source.snapshot is None:
        plan.notes.append(f"the adapter names revision {asked} of its base; the base is the local folder "
                          f"{source.path}, used as it is")
    return Job(spec, folder, plan, options, source)


def open_base(spec: AdapterSpec, base: str | Path | None, revision: str | None = None
              ) -> tuple[BaseSource, ModelFolder]:
    """Find the base (:func:`~d2export.basesource.resolve_base`) and open it."""
    source = resolve_base(spec.path, spec.base_model_name_or_path, spec.config.get("revision"), base, revision)
    try:  # a base folder that is not a model is the base's problem, not the adapter's
        return source, ModelFolder.open(source.path, "base model")
    except D2ExportError as exc:
        raise BaseModelError(str(exc)) from None
