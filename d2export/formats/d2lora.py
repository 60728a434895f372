"""D2-LoRA checkpoints (docs/design.md §4.2): two signed low-rank branches and the row-norm projection.

``dW = (alpha/r) (B+ A+ - tau B- A-)``; with ``norm_projection`` each row of ``W0 + dW`` is scaled
back to the norm it had in ``W0``. ``tau`` is the config's float unless the module stores a learned
``d2_tau``, which wins.
"""

from __future__ import annotations

import numpy as np

from ..errors import D2ExportError
from ..spec import AdapterSpec, LayerKind, LowRankTerm, ModuleUpdate, Rescale
from .common import RawAdapter, Scaling, check_factor, finish_spec, group_factors, require_number

_SUFFIXES = {
    ".lora_A_pos.weight": ("A_pos", LayerKind.LINEAR),
    ".lora_B_pos.weight": ("B_pos", LayerKind.LINEAR),
    ".lora_A_neg.weight": ("A_neg", LayerKind.LINEAR),
    ".lora_B_neg.weight": ("B_neg", LayerKind.LINEAR),
    ".d2_tau": ("tau", None),
}
_ROLES = ("A_pos", "B_pos", "A_neg", "B_neg")


def orient(A: np.ndarray, B: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Return ``(B, A, swapped)`` with ``B: [out, r]``, ``A: [r, in]``.

    The documented layout (``A: [r, in]``, ``B: [out, r]``) wins whenever it fits; a pair stored
    the paper's way round (``A: [out, r]``, ``B: [r, in]``) is accepted only when the documented
    reading does not fit, so it is never a guess.
    """
    if A.shape[0] == r and B.shape[1] == r:
        return B, A, False
    if A.shape[1] == r and B.shape[0] == r:
        return A, B, True
    raise ValueError(f"A{tuple(A.shape)} B{tuple(B.shape)} have no axis of the rank r={r}")


def read_d2lora(raw: RawAdapter) -> AdapterSpec:
    cfg, where = raw.config, raw.path / "adapter_config.json"
    scaling = Scaling.read(cfg, where)
    tau_default = cfg.get("tau")
    if tau_default is not None:
        tau_default = require_number(cfg, "tau", where, positive=False)
    norm_projection = cfg.get("norm_projection", True)
    if not isinstance(norm_projection, bool):
        raise D2ExportError(f"{where}: 'norm_projection' must be true or false")

    modules, rest = group_factors(raw, _SUFFIXES)
    updates = {}
    for module, parts in sorted(modules.items()):
        missing = [role for role in _ROLES if role not in parts]
        if missing:
            raise D2ExportError(f"{raw.path}: module {module} lacks {', '.join(missing)}")
        r, alpha, scale = scaling.of(module)
        r = int(r)
        tau, learned = _tau(parts.get("tau"), tau_default, module, raw)
        terms, swapped = [], set()
        for sign, coefficient in (("pos", scale), ("neg", -tau * scale)):
            A = check_factor(f"{module}.lora_A_{sign}", parts[f"A_{sign}"], 2, raw.weights_file)
            B = check_factor(f"{module}.lora_B_{sign}", parts[f"B_{sign}"], 2, raw.weights_file)
            try:
                B, A, was_swapped = orient(A, B, r)
            except ValueError as exc:
                raise D2ExportError(f"{raw.path}: {module} {sign} branch: {exc}") from None
            swapped.add(was_swapped)
            terms.append(LowRankTerm(sign, coefficient, B, A))
        if terms[0].shape != terms[1].shape:
            raise D2ExportError(
                f"{raw.path}: {module}: the positive branch is {list(terms[0].shape)} but the "
                f"negative branch is {list(terms[1].shape)}"
            )
        updates[module] = ModuleUpdate(
            module=module,
            kind=LayerKind.LINEAR,
            terms=tuple(terms),
            rescale=Rescale.ORIGINAL_NORM if norm_projection else Rescale.NONE,
            rank=r,
            alpha=alpha,
            tau=tau,
            tau_learned=learned,
            swapped_factors=True in swapped,
        )
    return finish_spec(raw, "d2lora", updates, rest)


def _tau(stored, default, module: str, raw: RawAdapter) -> tuple[float, bool]:
    if stored is not None:
        if stored.size != 1:
            raise D2ExportError(
                f"{raw.path}: {module}.d2_tau has shape {tuple(stored.shape)}; a scalar was expected"
            )
        return float(stored.reshape(()).astype(np.float64)), True
    if default is None:
        raise D2ExportError(
            f"{raw.path}: {module} has no learned d2_tau and adapter_config.json sets no 'tau'"
        )
    return float(default), False
