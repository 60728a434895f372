"""Shared test fixtures: tiny models and trained adapters built once per session (seconds)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fixtures"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import build  # noqa: E402  (fixtures/build.py)


@pytest.fixture(scope="session")
def fixture():
    """``fixture(name)`` -> folder holding ``base/`` and ``adapter/`` (built on first use)."""
    root = Path(os.environ.get("D2EXPORT_FIXTURES", "")) if os.environ.get("D2EXPORT_FIXTURES") else None
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            folder = (root or _session_tmp()) / name
            if not (folder / "adapter" / "adapter_config.json").is_file():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    build.build(name, folder)
            made[name] = folder
        return made[name]

    return get


_TMP: list[Path] = []


def _session_tmp() -> Path:
    if not _TMP:
        import tempfile

        _TMP.append(Path(tempfile.mkdtemp(prefix="d2export-fixtures-")))
    return _TMP[0]


def load_model(path: Path, dtype=torch.float32):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build._load(path).to(dtype).eval()


def model_output(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, build.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
