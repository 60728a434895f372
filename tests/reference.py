"""An independent float64 merge, written from docs/design.md §2 and the raw checkpoint files.

It shares no code with ``d2export.formats`` or ``d2export.algebra`` so that a bug there cannot
hide in both the result and the reference.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def load_raw(adapter: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file) if file.exists() else torch.load(adapter / "adapter_model.bin", weights_only=True)
    return config, {k.removeprefix("base_model.model."): v.double() for k, v in tensors.items()}


def expected_weight(adapter: Path, module: str, w0: torch.Tensor, *, conv1d: bool = False) -> torch.Tensor:
    """The exact (float64) merged weight of ``module`` given its stored base weight ``w0``."""
    config, t = load_raw(adapter)
    w0 = w0.double()
    embedding = f"{module}.lora_embedding_A" in t
    transposed = conv1d or embedding
    M = w0.T if transposed else w0  # canonical [out, in]
    r = _pattern(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    if config["peft_type"] == "D2LORA":
        tau = float(t[f"{module}.d2_tau"].reshape(())) if f"{module}.d2_tau" in t else config["tau"]
        delta = scale * (t[f"{module}.lora_B_pos.weight"] @ t[f"{module}.lora_A_pos.weight"]
                         - tau * t[f"{module}.lora_B_neg.weight"] @ t[f"{module}.lora_A_neg.weight"])
        V = M + delta
        if config.get("norm_projection", True):
            V = V * (M.norm(dim=1) / V.norm(dim=1)).unsqueeze(1)
    else:
        if embedding:
            delta = scale * t[f"{module}.lora_embedding_B"] @ t[f"{module}.lora_embedding_A"]
        else:
            delta = scale * t[f"{module}.lora_B.weight"] @ t[f"{module}.lora_A.weight"]
        V = M + delta
        if f"{module}.lora_magnitude_vector" in t:
            V = V * (t[f"{module}.lora_magnitude_vector"] / V.norm(dim=1)).unsqueeze(1)
    return V.T if transposed else V


def correctly_rounded(exact: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    """Elementwise: is ``rounded`` the round-to-nearest-even value of float64 ``exact``?

    Checked against both neighbours in the target format; the differences are exact in float64
    (Sterbenz), so this does not depend on any conversion routine.
    """
    inf = torch.full_like(rounded, math.inf)
    up = torch.nextafter(rounded, inf).double()
    down = torch.nextafter(rounded, -inf).double()
    r = rounded.double()
    err = (r - exact).abs()
    ok = (err <= (up - exact).abs()) & (err <= (down - exact).abs())
    tie = (err == (up - exact).abs()) | (err == (down - exact).abs())
    bits = rounded.view(torch.int16) if rounded.element_size() == 2 else rounded.view(torch.int32)
    return ok & (~tie | (bits % 2 == 0))
