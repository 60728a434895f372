"""Adapter readers: every supported checkpoint becomes one :class:`~d2export.spec.AdapterSpec`."""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedAdapterError
from ..spec import AdapterSpec
from .common import read_adapter
from .d2lora import read_d2lora
from .diffora import DAM_NAME, apply_selection, read_dam
from .peft import read_peft

_READERS = {"LORA": read_peft, "D2LORA": read_d2lora}


def load_adapter(path: str | Path, checkpoint: str | None = None) -> AdapterSpec:
    """Read an adapter checkpoint into an :class:`AdapterSpec`.

    Args:
        path: the folder holding ``adapter_config.json`` (or a trainer run folder holding exactly
            one such checkpoint); a file inside it is taken as its folder.
        checkpoint: in a trainer run folder, which ``checkpoint-N`` to read: ``latest``, ``best``
            (from ``trainer_state.json``) or a step number.

    Returns:
        The adapter as low-rank terms, rescalings and full tensors per base module, in canonical
        orientation, with the DiffoRA selection applied when ``diffora_dam.json`` is present.

    Raises:
        UnsupportedAdapterError: a method or option that cannot be folded into plain weights.
        D2ExportError: the checkpoint is missing, malformed or inconsistent.
    """
    raw = read_adapter(path, checkpoint)
    peft_type = str(raw.config.get("peft_type", "")).upper()
    reader = _READERS.get(peft_type)
    if reader is None:
        raise UnsupportedAdapterError(
            f"{raw.path}: peft_type {raw.config.get('peft_type')!r} is not supported "
            f"(supported: {', '.join(sorted(_READERS))})"
        )
    spec = reader(raw)
    dam = raw.path / DAM_NAME
    if dam.is_file():
        apply_selection(spec, read_dam(dam), dam)
    return spec


__all__ = ["load_adapter"]
