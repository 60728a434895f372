"""Shared test fixtures: tiny models and trained adapters built once per session (seconds), and
their merges. Helper functions live in ``support.py``; no test module imports another."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest

from d2export.merging import MergeResult, merge

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


@pytest.fixture(scope="session")
def merge_result(fixture, tmp_path_factory):
    """``merge_result(name)`` -> (fixture folder, :class:`~d2export.merging.MergeResult`): the fixture's
    adapter merged into its base with the default options, once per session.

    The merged folders are shared by every module: read them, or copy them before changing
    anything. Only test_bench.py writes beside one (``d2lora-llama-onnx``, which its bench finds);
    test_onnx.py exports beside merged folders of its own.
    """
    root = tmp_path_factory.mktemp("merged")
    done: dict[str, MergeResult] = {}

    def get(name: str) -> tuple[Path, MergeResult]:
        folder = fixture(name)
        if name not in done:
            done[name] = merge(folder / "adapter", base=folder / "base", out=root / name)
        return folder, done[name]

    return get


@pytest.fixture(scope="session")
def merged(merge_result):
    """``merged(name)`` -> (fixture folder, merged folder): see :func:`merge_result`."""

    def get(name: str) -> tuple[Path, Path]:
        folder, result = merge_result(name)
        return folder, result.out

    return get
