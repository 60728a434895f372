"""Task-level gap (the paper's metric): accuracy of the merged and the unmerged model on a small
labelled classification set, and the difference in percentage points.

The set is JSON lines ``{"text": ..., "label": ..., "split": "train" | "test"}``. Classifier
models (``*ForSequenceClassification``) are scored by their head; any other model by nearest class
centroid of its mean-pooled last hidden states, the centroids computed by that same model from the
``train`` split (the way sentence encoders such as all-MiniLM-L6-v2 are used).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import D2ExportError
from ..runtime.calibration import tokenize
from ..runtime.models import head_kind


@dataclass(frozen=True)
class TaskData:
    path: Path
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]

    @property
    def labels(self) -> list[str]:
        return sorted({label for _, label in self.train + self.test})


@dataclass
class TaskResult:
    dtype: str
    scoring: str  # "classifier head" or "nearest centroid"
    examples: int
    unmerged_accuracy: float
    merged_accuracy: float
    disagreements: int  # test examples the two models label differently

    @property
    def gap_pp(self) -> float:
        return 100.0 * (self.merged_accuracy - self.unmerged_accuracy)

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "scoring": self.scoring, "examples": self.examples,
                "unmerged_accuracy": self.unmerged_accuracy, "merged_accuracy": self.merged_accuracy,
                "gap_pp": self.gap_pp, "disagreements": self.disagreements}


def load_task(path: str | Path) -> TaskData:
    path = Path(path)
    train, test = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise D2ExportError(f"task data {path}: cannot read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label, split = row["text"], str(row["label"]), row.get("split", "test")
        except (json.JSONDecodeError, KeyError, TypeError):
            raise D2ExportError(f"task data {path}:{number}: expected JSON with text, label, split") from None
        if not isinstance(text, str) or not text.strip():
            raise D2ExportError(f"task data {path}:{number}: text must be a non-empty string")
        (train if split == "train" else test).append((text, label))
    if not test:
        raise D2ExportError(f"task data {path}: no test examples")
    data = TaskData(path, train, test)
    if len(data.labels) < 2:
        # every model scores 100% (or a classifier head by chance): a gap of 0 that proves nothing
        raise D2ExportError(f"task data {path}: one label ({data.labels[0]}); an accuracy needs two or more")
    return data


def check_scorable(data: TaskData, config: dict) -> None:
    """Refuse a set the model's scoring cannot use (checked before any model runs)."""
    if scoring(config) == "classifier head":
        return
    if not data.train:
        raise D2ExportError(f"task data {data.path}: centroid scoring needs a train split")
    untrained = sorted({y for _, y in data.test} - {y for _, y in data.train})
    if untrained:  # a class without train examples has no centroid (a mean of nothing: NaN scores)
        raise D2ExportError(f"task data {data.path}: centroid scoring needs train examples of every label; "
                            f"none for {', '.join(untrained)}")


def scoring(config: dict) -> str:
    return "classifier head" if head_kind(config) == "sequence-classification" else "nearest centroid"


@torch.no_grad()
def predict(model: nn.Module, tokenizer, config: dict, data: TaskData, *, batch_size: int = 32) -> list[str]:
    """Labels the model gives to the test split."""
    texts = [t for t, _ in data.test]
    if scoring(config) == "classifier head":
        id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
        predictions = []
        for start in range(0, len(texts), batch_size):
            enc = tokenize(tokenizer, texts[start:start + batch_size], 128)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            for i in logits.argmax(-1).tolist():  # the set may name labels as the config does, or by index
                name = id2label.get(i, str(i))
                predictions.append(name if name in data.labels else str(i))
        return predictions
    check_scorable(data, config)
    train = _embed(model, tokenizer, [t for t, _ in data.train], batch_size)
    labels = data.labels
    centroids = torch.stack([
        torch.nn.functional.normalize(train[[i for i, (_, y) in enumerate(data.train) if y == label]].mean(0), dim=0)
        for label in labels
    ])
    scores = _embed(model, tokenizer, texts, batch_size) @ centroids.T
    return [labels[i] for i in scores.argmax(-1).tolist()]


def _embed(model: nn.Module, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens, L2-normalised, in float64."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenize(tokenizer, texts[start:start + batch_size], 128)
        result = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        hidden = result.hidden_states[-1].double()
        mask = enc["attention_mask"].unsqueeze(-1).double()
        out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def accuracy(predictions: list[str], data: TaskData) -> float:
    return sum(p == y for p, (_, y) in zip(predictions, data.test, strict=True)) / len(data.test)
