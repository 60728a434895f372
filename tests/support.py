"""Helpers the test modules share (a plain module, not a test module and not conftest): running
the tiny fixture models, reading a folder's tensors, and writing tiny safetensors model folders."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import build  # fixtures/build.py (conftest puts fixtures/ on sys.path)
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from safetensors.torch import save_file as save_torch_file
from typer.testing import CliRunner

from d2export import merging
from d2export.cli import app


def load_model(path: Path, dtype=torch.float32):
    """A fixture model (base or merged folder) through transformers, in eval mode."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build._load(path).to(dtype).eval()


def model_output(model, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits where the model has a head, else its last hidden state."""
    with torch.no_grad():
        out = model(input_ids=tokens, attention_mask=attention_mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Seeded random token ids inside the fixtures' vocabulary (clear of the special ids 0-2)."""
    return torch.randint(3, build.VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder (its safetensors files, else its .bin files)."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    if not tensors:
        for file in sorted(folder.glob("*.bin")):
            tensors.update(torch.load(file, weights_only=True))
    return tensors


def tamper_tensor(folder: Path, name: str, edit) -> None:
    """Edit one tensor of a merged folder in place, keeping every other byte."""
    for file in folder.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            if name not in f.keys():
                continue
            values = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata()
        edit(values[name])
        save_torch_file(values, file, metadata=metadata)
        return
    raise KeyError(name)


def write_model(folder: Path, tensors: dict[str, np.ndarray] | list[dict[str, np.ndarray]],
                config: dict | None = None) -> Path:
    """A model folder made by hand: ``config.json`` and one safetensors file, or (a list of dicts)
    shards ``model-0000k-of-0000N.safetensors`` with their index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {}))
    if isinstance(tensors, dict):
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, shard in enumerate(tensors):
        name = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def write_adapter(folder: Path, config: dict, tensors: dict[str, np.ndarray], *, prefix: str = "base_model.model."
                  ) -> Path:
    """An adapter folder made by hand: ``adapter_config.json`` and ``adapter_model.safetensors``
    (keys given without PEFT's ``base_model.model.`` prefix; it is added)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file({prefix + k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    return folder


# --------------------------------------------------------------------------- hostile inputs
# Shared by test_hostile.py and test_hostile_process.py (issue 14): a fixture copied into tmp_path,
# broken by a case, run through the CLI in-process, and the refusal checked.

def tree_state(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under ``root``, by relative path."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass
class Ctx:
    tmp: Path
    adapter: Path
    base: Path
    mp: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def argv(self, *extra: str, out: Path | None = None, base: Path | None = None) -> list[str]:
        return ["merge", str(self.adapter), "--base", str(base or self.base), "--out", str(out or self.out),
                "--no-hash", "--quiet", *extra]

    def config(self, edit: Callable[[dict], None], folder: Path | None = None, name: str = "adapter_config.json"
               ) -> None:
        path = (folder or self.adapter) / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def weights(self, edit: Callable[[dict], None], path: Path | None = None) -> None:
        path = path or self.adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})

    def shard_base(self, parts: int = 2) -> dict:
        """The base split into ``parts`` shards with an index; returns the index."""
        tensors = load_file(self.base / "model.safetensors")
        (self.base / "model.safetensors").unlink()
        names = list(tensors)
        weight_map = {}
        for i in range(parts):
            file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[i::parts]}
            save_file(chunk, str(self.base / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, file))
        index = {"metadata": {}, "weight_map": weight_map}
        self.write_index(index)
        return index

    def write_index(self, index: dict) -> None:
        (self.base / "model.safetensors.index.json").write_text(json.dumps(index))


def make_ctx(fixture, name: str, tmp: Path, mp: pytest.MonkeyPatch) -> Ctx:
    src = fixture(name)
    shutil.copytree(src / "adapter", tmp / "adapter", symlinks=True)
    shutil.copytree(src / "base", tmp / "base", symlinks=True)
    return Ctx(tmp, tmp / "adapter", tmp / "base", mp)


def cli(argv: list[str]):
    """The command in-process; a crash (anything but the CLI's own exit) fails the test."""
    result = _runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def check_refused(result, needles: list[str], code: int = 2) -> str:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.exit_code == code, f"exit {result.exit_code}: {out}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def run_case(fixture, tmp_path, monkeypatch, name: str, setup) -> None:
    ctx = make_ctx(fixture, name, tmp_path, monkeypatch)
    argv, needles = setup(ctx)
    before = tree_state(tmp_path)
    result = cli(argv)
    monkeypatch.undo()
    check_refused(result, needles)
    assert tree_state(tmp_path) == before, "an input changed or something was left behind"



def after_weights(c: Ctx, action: Callable[[], None]) -> None:
    """Run ``action`` once the weights are written, inside the run (the temporary folder exists)."""
    write_config = merging.write_config

    def hooked(plan, folder):
        action()
        return write_config(plan, folder)

    c.mp.setattr(merging, "write_config", hooked)


_runner = CliRunner()
