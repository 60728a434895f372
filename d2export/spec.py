"""The in-memory description every adapter format is read into.

All geometry is in the *canonical* orientation of docs/design.md §2: a matrix ``M`` of shape
``[out, in]`` whose rows are the output units (the axis DoRA and D2-LoRA normalise). The stored
base tensor is ``M`` itself (``nn.Linear``) or ``M.T`` (GPT-2 ``Conv1D`` and embeddings); which one
is decided when the adapter is matched against the base (see ``plan.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np


class LayerKind(StrEnum):
    LINEAR = "linear"  # nn.Linear or Conv1D: factors lora_A [r, in], lora_B [out, r]
    EMBEDDING = "embedding"  # nn.Embedding: lora_embedding_A [r, vocab], lora_embedding_B [dim, r]


class Rescale(StrEnum):
    NONE = "none"
    MAGNITUDE = "magnitude"  # DoRA: g = m / ||V_row||, m learned
    ORIGINAL_NORM = "original_norm"  # D2-LoRA: g = ||W0_row|| / ||V_row||


@dataclass(frozen=True)
class LowRankTerm:
    """One signed low-rank term ``coefficient * B @ A`` in canonical orientation."""

    name: str  # "lora", "pos" or "neg"
    coefficient: float
    B: np.ndarray  # [out, r]
    A: np.ndarray  # [r, in]

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.B.shape[0]), int(self.A.shape[1])


@dataclass(frozen=True)
class ModuleUpdate:
    """What the adapter does to one base module (``module`` is its dotted path in the base)."""

    module: str
    kind: LayerKind
    terms: tuple[LowRankTerm, ...]
    rescale: Rescale = Rescale.NONE
    magnitude: np.ndarray | None = None  # [out], for Rescale.MAGNITUDE
    bias_delta: np.ndarray | None = None  # [out], added to the module's bias (PEFT lora_bias)
    selected: bool = True  # False: a DiffoRA DAM left this module out; it stays the base weight
    rank: int = 0
    alpha: float = 0.0
    tau: float | None = None  # D2-LoRA only
    tau_learned: bool = False
    swapped_factors: bool = False  # D2-LoRA factors were stored in the paper's [out,r]/[r,in] order

    @property
    def weight_key(self) -> str:
        return f"{self.module}.weight"

    @property
    def bias_key(self) -> str:
        return f"{self.module}.bias"

    @property
    def shape(self) -> tuple[int, int]:
        """Canonical [out, in] of the update."""
        return self.terms[0].shape

    @property
    def num_params(self) -> int:
        n = sum(t.A.size + t.B.size for t in self.terms)
        n += 0 if self.magnitude is None else self.magnitude.size
        n += 0 if self.bias_delta is None else self.bias_delta.size
        return n


@dataclass(frozen=True)
class DamSelection:
    """A DiffoRA module selection: ``grid[layer][type_index]`` says whether that module is merged."""

    module_types: tuple[str, ...]
    num_layers: int
    grid: tuple[tuple[bool, ...], ...]
    source: str  # "selected" (stored) or "scores" (re-discretised)
    sample_rate: float | None = None

    def is_selected(self, layer: int, module_type: str) -> bool:
        return self.grid[layer][self.module_types.index(module_type)]

    @property
    def num_selected(self) -> int:
        return sum(sum(row) for row in self.grid)

    def to_dict(self) -> dict:
        return {"source": self.source, "sample_rate": self.sample_rate, "module_types": list(self.module_types),
                "num_layers": self.num_layers, "num_selected": self.num_selected, "grid": [list(r) for r in self.grid]}


@dataclass
class AdapterSpec:
    """One adapter checkpoint, whatever its format, ready to plan and merge."""

    method: str  # "lora", "rslora", "dora", "d2lora"; "+diffora" appended when a DAM selects modules
    path: Path  # folder holding adapter_config.json
    files: list[Path]  # the files read (for hashes in the report)
    config: dict
    updates: dict[str, ModuleUpdate]  # by module path
    # Full tensors that replace the base's (modules_to_save, base_layer copies, trained biases, a
    # head only the adapter has; formats.saved.TokenRows for trainable tokens), keyed by base tensor
    # name. A shape may differ from the base's only as a resized vocabulary (docs/design.md §4.4).
    replacements: dict[str, np.ndarray] = field(default_factory=dict)
    selection: DamSelection | None = None
    base_model_name_or_path: str | None = None
    # replacements saved as a LoRA-wrapped layer's base_layer (formats.saved.base_layer_copies)
    base_layer_copies: frozenset[str] = frozenset()
    # sha256 of the files hashed while they were read (the adapter's weights): not read again
    file_hashes: dict[Path, str] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        return sum(u.num_params for u in self.updates.values())
