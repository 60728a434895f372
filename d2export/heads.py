"""Where the adapted model's shape differs from the base's: a task head only the adapter has
(a classifier trained over a plain encoder), a classifier at another label count, and a resized
vocabulary (docs/design.md §2, §4.4).

The plan decides them (:func:`task_head`, :func:`shape_change`, :func:`shape_updates`); the
run-time models load the base in the same shape (:func:`output_changes`), so the unmerged
references compute what the adapter was trained as.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import D2ExportError
from .quiet import libraries_quiet

# PEFT task types whose model adds a head to the base, -> transformers' table of those head classes.
TASK_HEADS = {
    "SEQ_CLS": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "TOKEN_CLS": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


@dataclass
class TaskHead:
    """The head model the output becomes: its class, prefix, labels and every tensor it stores."""

    architecture: str
    prefix: str  # the head model's base_model_prefix: base tensors are written under it
    num_labels: int
    shapes: dict[str, tuple[int, ...]]  # the head model's state dict, name -> shape
    id2label: dict[int, str]

    def config_updates(self) -> dict:
        return {"architectures": [self.architecture], **_label_keys(self.id2label)}


def task_head(spec, base_config: dict, head_only: dict[str, tuple[int, ...]]) -> TaskHead | None:
    """The head model the adapter was trained as, when its ``task_type`` adds a head the base's
    architecture lacks and ``head_only`` (adapter tensors with no base tensor, name -> shape) are
    that head's. None when the adapter says no such thing."""
    table = TASK_HEADS.get(str(spec.config.get("task_type") or "").upper())
    if table is None or not head_only:
        return None
    import transformers.models.auto.modeling_auto as auto

    architecture = getattr(auto, table).get(base_config.get("model_type"))
    if architecture is None or architecture in (base_config.get("architectures") or []):
        return None
    # The label count is the first dimension of one of the head's tensors: try each, keep the one
    # under which every head tensor has the head model's shape.
    for rows in dict.fromkeys(s[0] for s in head_only.values() if len(s) == 2):
        shapes, prefix = _head_shapes(architecture, base_config, rows)
        if all(_lookup(shapes, name, prefix) == shape for name, shape in head_only.items()):
            return TaskHead(architecture, prefix, rows, shapes, _labels(spec.path, rows))
    raise D2ExportError(
        f"{spec.path}: task_type {spec.config.get('task_type')}: the adapter's tensors "
        f"{', '.join(sorted(head_only))} are not the head of {architecture}")


def _lookup(shapes: dict, name: str, prefix: str):
    from .names import find_name

    found = find_name(name, shapes, prefix)
    return None if found is None else shapes[found]


def _head_shapes(architecture: str, base_config: dict, num_labels: int) -> tuple[dict, str]:
    """State-dict shapes of ``architecture`` with ``num_labels``, built on the meta device."""
    import torch
    import transformers

    config = {k: v for k, v in base_config.items() if k not in ("id2label", "label2id", "architectures")}
    cfg = transformers.AutoConfig.for_model(**config, num_labels=num_labels)
    with torch.device("meta"), libraries_quiet():
        model = getattr(transformers, architecture)._from_config(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return shapes, getattr(model, "base_model_prefix", "") or ""


def _labels(adapter: Path, num_labels: int) -> dict[int, str]:
    """The adapter side's label names (a ``config.json`` saved beside the adapter, as a Trainer
    run may leave it) when they fit the head, else transformers' defaults ``LABEL_i``."""
    try:
        saved = json.loads((adapter / "config.json").read_text()).get("id2label") or {}
        labels = {int(k): str(v) for k, v in saved.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        labels = {}
    return labels if sorted(labels) == list(range(num_labels)) else {i: f"LABEL_{i}" for i in range(num_labels)}


# Architectures whose head's first dimension is the label count (config.json's id2label).
CLASSIFIER_ENDINGS = ("ForSequenceClassification", "ForTokenClassification", "ForImageClassification",
                      "ForAudioClassification")


def label_count(config: dict) -> int | None:
    labels = config.get("id2label")
    return len(labels) if isinstance(labels, dict) and labels else None


def shape_change(name: str, new: tuple[int, ...], old: tuple[int, ...], config: dict) -> str:
    """How an adapter's full tensor of shape ``new`` may differ from the base's ``old``: in its first
    dimension only, as ``"labels"``, a classifier's head at another label count (the base a
    classifier with ``old[0]`` labels: PEFT's ``modules_to_save`` classifier trained with
    ``ignore_mismatched_sizes`` for a new label set, as PEFT's image classification guide does), or
    as ``"vocab"``, a resized vocabulary (the config's ``vocab_size``). Anything else is refused."""
    vocab, labels = vocab_size_of(config), label_count(config)
    if len(new) == len(old) and new[1:] == old[1:]:
        if (config.get("architectures") or [""])[0].endswith(CLASSIFIER_ENDINGS) and old[0] == labels != vocab:
            return "labels"
        if old[0] == vocab:
            return "vocab"
    allowed = "a resized vocabulary" if vocab is None else f"a resized vocabulary (a first dimension of {vocab})"
    if labels is not None:
        allowed += f" or a classifier's label count (a first dimension of {labels})"
    raise D2ExportError(f"adapter tensor for {name} has shape {new}, the base has {old} (only {allowed} may "
                        "change a shape)")


def shape_updates(adapter: Path, tensors: list, changed: dict[str, dict[str, tuple[int, ...]]], config: dict
                  ) -> tuple[dict, list[str]]:
    """config.json's changes and the plan's notes for the tensors :func:`shape_change` let through
    (``changed``: kind -> output name -> the base's shape): the new vocabulary size, the new labels."""
    updates, notes = {}, []
    vocab = _new_vocab_size(tensors, changed.get("vocab", {}))
    if vocab is not None:  # the adapter side's tokenizer, which knows the added tokens, ships (tokenizer_files.py)
        updates["vocab_size"] = vocab
        notes.append(f"vocabulary resized from {config.get('vocab_size')} to {vocab} tokens (the adapter's)")
    relabeled = changed.get("labels", {})
    labels = _new_label_count(tensors, relabeled, config)
    if labels is not None:
        updates.update(_label_keys(_labels(adapter, labels)))
        notes.append(f"the base's {label_count(config)} labels replaced by the adapter's {labels} (its "
                     f"{', '.join(sorted(relabeled))}): written as a {labels}-label classifier")
    return updates, notes


def _new_vocab_size(tensors: list, resized: dict[str, tuple[int, ...]]) -> int | None:
    """The adapter's vocabulary size, when it resized the base's: one new size for every resized
    tensor, and no tensor of a resized one's old shape left at it (an output embedding left at the
    old size would not load)."""
    if not resized:
        return None
    by_name = {t.name: t for t in tensors}
    sizes = {by_name[n].shape[0] for n in resized}
    if len(sizes) > 1:
        raise D2ExportError(f"the adapter resizes the vocabulary inconsistently: {', '.join(sorted(resized))} "
                            f"have {sorted(sizes)} rows")
    old = set(resized.values())
    left = sorted(t.name for t in tensors if t.name not in resized and t.shape in old)
    if left:
        raise D2ExportError(f"the adapter resizes the vocabulary to {sizes.pop()} but not {', '.join(left)}, "
                            "which has the old size")
    return sizes.pop()


def _new_label_count(tensors: list, relabeled: dict[str, tuple[int, ...]], config: dict) -> int | None:
    """The adapter's label count, when it relabels the base's classifier: one count for every
    relabeled tensor, and none of the base's head tensors left at the old count (it would not load)."""
    if not relabeled:
        return None
    by_name = {t.name: t for t in tensors}
    counts = {by_name[n].shape[0] for n in relabeled}
    old = label_count(config)
    left = sorted(t.name for t in tensors if t.name not in relabeled and t.shape and t.shape[0] == old
                  and any(t.name.rpartition(".")[0] == n.rpartition(".")[0] for n in relabeled))
    if len(counts) > 1 or left:
        raise D2ExportError(f"the adapter changes the classifier's labels inconsistently: "
                            f"{', '.join(sorted(relabeled))} have {sorted(counts)} rows"
                            + (f", {', '.join(left)} keeps the base's {old}" if left else ""))
    return counts.pop()


def _label_keys(id2label: dict[int, str]) -> dict:
    return {"id2label": {str(k): v for k, v in id2label.items()}, "label2id": {v: k for k, v in id2label.items()}}


def vocab_size_of(config: dict) -> int | None:
    value = config.get("vocab_size")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def output_changes(spec, base: Path) -> dict:
    """The config keys the merge of ``spec`` into ``base`` changes (architecture and labels of an
    adapter-only head, ``vocab_size``, untied weights): what a run-time model of the base needs to be
    loaded as to take the adapter. Plans the merge (no weights are read)."""
    from .plan import build_plan
    from .reading import ModelFolder

    folder = ModelFolder.open(base, "base model")
    try:
        return dict(build_plan(spec, folder).config_updates)
    finally:
        folder.close()
