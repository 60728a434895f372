"""PEFT LoRA checkpoints (LoRA, rsLoRA, DoRA, rank/alpha patterns, lora_bias, modules_to_save,
trainable tokens (formats/saved.py),
adapted embeddings, GPT-2 Conv1D), as ``peft``'s ``save_pretrained`` writes them."""

from __future__ import annotations

from ..errors import D2ExportError, UnsupportedAdapterError
from ..spec import AdapterSpec, LayerKind, LowRankTerm, ModuleUpdate, Rescale
from .common import RawAdapter, Scaling, check_factor, finish_spec, group_factors

# Suffix of an adapter key -> (role, layer kind).
_FACTOR_SUFFIXES = {
    ".lora_A.weight": ("A", LayerKind.LINEAR),
    ".lora_B.weight": ("B", LayerKind.LINEAR),
    ".lora_B.bias": ("bias", LayerKind.LINEAR),
    ".lora_embedding_A": ("A", LayerKind.EMBEDDING),
    ".lora_embedding_B": ("B", LayerKind.EMBEDDING),
    ".lora_magnitude_vector": ("magnitude", None),
}

# Config options whose adapters cannot be folded into the base as plain LoRA algebra.
_REFUSED_OPTIONS = {
    "layer_replication": "layer replication changes the model's layer structure (PEFT cannot merge it either)",
    "target_parameters": "LoRA on raw nn.Parameters (target_parameters) is not supported",
    "alora_invocation_tokens": "activated LoRA (aLoRA) depends on the input and cannot be merged",
    "use_bdlora": "BD-LoRA is not supported",
    "arrow_config": "Arrow routing depends on the input and cannot be merged",
    "use_qalora": "QA-LoRA is not supported",
    "lora_ga_config": "LoRA-GA rewrites the base weights at init; convert the adapter first",
    "monteclora_config": "MonteCLoRA is not supported",
    "velora_config": "VeLoRA is not supported",
    "kasa_config": "KaSA truncates the base's singular values and scales the update by a learned diagonal",
}
# Variant switches (``use_*``, ``*_config``) PEFT 0.21's LoraConfig has that leave the merge plain
# LoRA algebra (or are read elsewhere: DoRA, rsLoRA, the base-rewriting inits). A set one outside
# these and the refused ones is a variant d2export does not know, which may change the algebra
# without saving a tensor of its own: refused rather than merged as plain LoRA.
_PLAIN_VARIANT_KEYS = {"use_rslora", "use_dora", "megatron_config", "loftq_config", "eva_config", "corda_config",
                       "runtime_config"}
_VALID_BIAS = ("none", "all", "lora_only")
# init_lora_weights values whose adapters only work with a base that was rewritten at init.
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


def read_peft(raw: RawAdapter) -> AdapterSpec:
    cfg, where = raw.config, raw.path / "adapter_config.json"
    _refuse_unfoldable(cfg, where)
    scaling = Scaling.read(cfg, where)
    use_dora = bool(cfg.get("use_dora", False))

    modules, rest = group_factors(raw, _FACTOR_SUFFIXES)
    updates = {}
    for module, parts in sorted(modules.items()):
        kinds = parts.get("kinds", set())
        if len(kinds) != 1 or "A" not in parts or "B" not in parts:
            have = sorted(k for k in parts if k != "kinds")
            raise D2ExportError(
                f"{raw.path}: module {module} has an incomplete LoRA pair (found {', '.join(have)})"
            )
        kind = kinds.pop()
        r, alpha, scale = scaling.of(module)
        A = check_factor(f"{module} A", parts["A"], 2, raw.weights_file)
        B = check_factor(f"{module} B", parts["B"], 2, raw.weights_file)
        if A.shape[0] != r or B.shape[1] != r:
            raise D2ExportError(
                f"{raw.path}: {module}: factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not "
                f"have the configured rank r={r:g}"
            )
        magnitude = _magnitude(raw, module, parts.get("magnitude"), use_dora, B.shape[0])
        bias = parts.get("bias")
        if bias is not None and (bias.ndim != 1 or bias.shape[0] != B.shape[0]):
            raise D2ExportError(f"{raw.path}: {module}: lora_B.bias has shape {tuple(bias.shape)}")
        updates[module] = ModuleUpdate(
            module=module,
            kind=kind,
            terms=(LowRankTerm("lora", scale, B, A),),
            rescale=Rescale.MAGNITUDE if magnitude is not None else Rescale.NONE,
            magnitude=magnitude,
            bias_delta=bias,
            rank=int(r),
            alpha=alpha,
        )
    method = "dora" if use_dora else ("rslora" if scaling.rslora else "lora")
    return finish_spec(raw, method, updates, rest)


def _refuse_unfoldable(cfg: dict, where) -> None:
    """Refuse a config whose adapter is not plain LoRA algebra over the saved base (or that PEFT
    itself would not read)."""
    for option, why in _REFUSED_OPTIONS.items():
        if cfg.get(option):
            raise UnsupportedAdapterError(f"{where}: {option} is set: {why}")
    unknown = sorted(k for k, v in cfg.items() if v and (k.startswith("use_") or k.endswith("_config"))
                     and k not in _PLAIN_VARIANT_KEYS)
    if unknown:
        raise UnsupportedAdapterError(f"{where}: {', '.join(unknown)} set: a LoRA variant d2export does not know, "
                                      "whose merge may not be plain LoRA algebra")
    if cfg.get("bias", "none") not in _VALID_BIAS:
        raise D2ExportError(f"{where}: 'bias' must be one of {', '.join(_VALID_BIAS)}; got {cfg.get('bias')!r}")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise UnsupportedAdapterError(
            f"{where}: init_lora_weights={init!r} rewrote the base weights during training; convert "
            "the adapter with PEFT (path_initial_model_for_weight_conversion) and merge that"
        )


def _magnitude(raw: RawAdapter, module: str, magnitude, use_dora: bool, rows: int):
    """A module's DoRA magnitude vector, checked against the config and the factor's rows."""
    if use_dora and magnitude is None:
        raise D2ExportError(f"{raw.path}: use_dora is set but {module} has no lora_magnitude_vector")
    if magnitude is not None and not use_dora:
        # PEFT reads the config: it ignores the magnitudes and runs plain LoRA
        raise D2ExportError(f"{raw.path}: {module} has a lora_magnitude_vector (DoRA) but adapter_config.json "
                            "does not set use_dora: PEFT runs it as plain LoRA; set use_dora or drop the vectors")
    if magnitude is not None and (magnitude.ndim != 1 or magnitude.shape[0] != rows):
        raise D2ExportError(
            f"{raw.path}: {module}: lora_magnitude_vector has shape {tuple(magnitude.shape)}, expected [{rows}]"
        )
    return magnitude
