"""Helpers the test modules share (a plain module, not a test module and not conftest): running
the tiny fixture models, reading a folder's tensors, and writing tiny safetensors model folders."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import build  # fixtures/build.py (conftest puts fixtures/ on sys.path)
import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save_file


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
