"""sentence-transformers folders exported to ONNX, in the layout ``SentenceTransformer(dir,
backend="onnx")`` loads, and checked through it end to end.

The graph optimum exports for ``feature-extraction`` is the transformer alone (token embeddings);
pooling, a Dense projection and normalisation are sentence-transformers modules that run after it
in PyTorch. sentence-transformers' ONNX backend loads ``model.onnx`` from the folder's root (else
from ``onnx/``; ``backend/utils.py: backend_should_export``) as module 0 and builds the other modules
from ``modules.json`` and their folders. So the export folder gets the source's modules.json,
settings and module folders next to ``model.onnx``; without them sentence-transformers falls back to
plain mean pooling, and the embeddings are not the model's. The check loads the folder that way and
compares its sentence embeddings with the PyTorch ``SentenceTransformer``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..runtime.calibration import Batch
from ..runtime.comparison import OutputComparison
from ..st_modules import plan_modules, write_modules
from .files import quiet
from .validate import GraphCheck, session_options

OUTPUT = "sentence_embedding"
EMBEDDING_TASK = "feature-extraction"  # the only graph it loads as module 0 (it reads last_hidden_state)
# Real sentences of uneven lengths, encoded in one batch: the tokenizer, its padding and the
# max_seq_length setting take part as in serving (the random-token batches skip the tokenizer).
TEXTS = (
    "A man is playing a guitar.",
    "The new movie is awesome and everyone in the theatre loved every minute of it, even the ending.",
    "Stocks fell sharply on Monday.",
    "How do I merge a LoRA adapter into its base model before exporting it to ONNX Runtime?",
)


def carry_sentence_transformers(model_dir: Path, out: Path) -> dict | None:
    """Copy ``model_dir``'s sentence-transformers modules and settings into the export ``out``;
    the report's record of them, or None when ``model_dir`` is no sentence-transformers folder."""
    st = plan_modules(model_dir)
    if st is None:
        return None
    write_modules(st, out)
    return st.summary()


@dataclass
class EmbeddingCheck:
    """One ``.onnx`` file loaded by ``SentenceTransformer(backend="onnx")`` against the PyTorch one."""

    graph: GraphCheck
    min_cosine: float | None = None  # None: no sequence was compared (the graph could not run)
    sequences: int = 0

    @property
    def passed(self) -> bool:
        return self.graph.passed

    def to_dict(self) -> dict:
        return {**self.graph.to_dict(), "min_cosine": self.min_cosine, "sequences": self.sequences}


@dataclass
class EmbeddingValidation:
    checks: list[EmbeddingCheck] = field(default_factory=list)
    error: str | None = None  # the PyTorch reference could not be loaded

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        return {"reference": "SentenceTransformer (PyTorch, float32)", "texts": len(TEXTS), "error": self.error,
                "graphs": {c.graph.file: c.to_dict() for c in self.checks}, "passed": self.passed}


def validate_embeddings(onnx_dir: Path, model_dir: Path, batches: list[Batch], graphs: dict[str, tuple[str, bool]]
                        ) -> EmbeddingValidation:
    """Sentence embeddings of every graph (file -> (precision, approximate)), through
    sentence-transformers, against the PyTorch model's on ``batches`` and ``TEXTS``."""
    validation = EmbeddingValidation()
    try:
        with quiet():
            reference = _load(model_dir, backend="torch", model_kwargs={"dtype": torch.float32}).eval()
    except Exception as exc:  # custom modules, remote code...: a failed check, not a crash after the export
        validation.error = f"sentence-transformers cannot load {model_dir}: {_first_line(exc)}"
        return validation
    for file, (precision, approximate) in graphs.items():
        check = EmbeddingCheck(GraphCheck(file, precision, approximate))
        validation.checks.append(check)
        try:
            with quiet():
                model = _load(onnx_dir, backend="onnx", model_kwargs={
                    "file_name": file, "provider": "CPUExecutionProvider", "session_options": session_options()})
            comparison = check.graph.outputs.setdefault(OUTPUT, OutputComparison(distributions=False))
            for expected, got in _embeddings(reference, model, batches):
                comparison.add(expected, got)
                cosine = torch.nn.functional.cosine_similarity(expected.double(), got.double(), dim=-1)
                low = float(cosine.min())
                check.min_cosine = low if check.min_cosine is None else min(check.min_cosine, low)
                check.sequences += len(expected)
        except Exception as exc:  # whatever stops sentence-transformers from serving the graph fails it
            check.graph.failures.append(f"SentenceTransformer(backend='onnx') cannot run {file}: {_first_line(exc)}")
            continue
        check.graph.judge()
    return validation


def _load(path: Path, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", local_files_only=True, **kwargs)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@torch.no_grad()
def _embeddings(reference, model, batches: list[Batch]):
    """(PyTorch, ONNX) sentence embeddings: each random batch fed as features (pooling masks the
    padding), then ``TEXTS`` through ``encode``."""
    names = getattr(reference.tokenizer, "model_input_names", None) or ["input_ids", "attention_mask"]
    for batch in batches:
        features = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if "token_type_ids" in names:
            features["token_type_ids"] = torch.zeros_like(batch.input_ids)
        expected = reference(dict(features))[OUTPUT]
        got = model(dict(features))[OUTPUT]
        yield expected, got
    with quiet():
        expected = reference.encode(list(TEXTS), convert_to_tensor=True, batch_size=len(TEXTS))
        got = model.encode(list(TEXTS), convert_to_tensor=True, batch_size=len(TEXTS))
    yield expected, got
