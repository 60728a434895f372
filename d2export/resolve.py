"""Finding the base model an adapter belongs to."""

from __future__ import annotations

from pathlib import Path

from .errors import D2ExportError
from .spec import AdapterSpec


def resolve_base(spec: AdapterSpec, base: str | Path | None) -> Path:
    """``--base`` if given, else the adapter's ``base_model_name_or_path``: a local folder (relative
    paths are tried from the adapter folder too) or a model in the local Hugging Face cache.
    Never touches the network."""
    if base is not None:
        return Path(base)
    name = spec.base_model_name_or_path
    if not name:
        raise D2ExportError(f"{spec.path}: the adapter names no base model; pass --base DIR")
    for candidate in (Path(name), spec.path / name):
        if candidate.is_dir():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise D2ExportError(
            f"base model {name!r} is neither a local folder nor in the local Hugging Face cache; "
            "pass --base DIR"
        ) from None
