"""What the folder's config.json declares against what its tensors are: the dtype a loader picks.

verify runs the folder in the dtypes it names, so a config.json whose ``dtype`` (transformers >=
4.56) or ``torch_dtype`` (older) says another dtype than the weights' changes none of its figures.
But ``from_pretrained(dtype="auto")`` and serving stacks read that field: a float32 folder declared
bfloat16 is loaded rounded to bfloat16, a model other than the one verified. A 16-bit folder
declared float32 loads as the same weights, computed in float32 (twice the memory): a note.
"""

from __future__ import annotations

_WIDER = {"float64": 3, "float32": 2, "bfloat16": 1, "float16": 1}
DTYPE_KEYS = ("dtype", "torch_dtype")


def declared_dtypes(config: dict) -> dict[str, str]:
    """The dtypes config.json names, by key (``torch.bfloat16`` read as ``bfloat16``)."""
    found = {}
    for key in DTYPE_KEYS:
        value = config.get(key)
        if isinstance(value, str) and value.removeprefix("torch.") in _WIDER:
            found[key] = value.removeprefix("torch.")
    return found


def dtype_problems(config: dict, weights_dtype: str) -> tuple[list[str], list[str]]:
    """(failures, notes) of config.json's declared dtype against ``weights_dtype``, the dtype of
    most of the folder's floating weights."""
    failures, notes = [], []
    for key, declared in declared_dtypes(config).items():
        if declared == weights_dtype or weights_dtype not in _WIDER:
            continue
        if _WIDER[declared] > _WIDER[weights_dtype]:
            notes.append(f'config.json declares "{key}": "{declared}" but the weights are {weights_dtype}: '
                         f'loaded with dtype="auto" the model computes in {declared}, with the same weights '
                         "and more memory")
        else:
            failures.append(f'config.json declares "{key}": "{declared}" but the weights are {weights_dtype}: '
                            f'from_pretrained(dtype="auto") and serving stacks that read it load the model '
                            f'rounded to {declared}, not the {weights_dtype} model verified; set it to '
                            f'"{weights_dtype}"')
    return failures, notes


__all__ = ["DTYPE_KEYS", "declared_dtypes", "dtype_problems"]
