"""The models a benchmark times, each loaded only when its turn comes, and the checks that the
merged folder, the adapter and an ONNX export belong together."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import D2ExportError
from ..job import Job
from ..plan import Action
from ..reading import ModelFolder, read_json_object
from ..runtime.models import load_model, peft_model, peft_usable, unmerged_model
from ..spec import AdapterSpec
from .report import BASE, MERGED, ONNX_PREFIX, UNMERGED, UNMERGED_PEFT

ONNX_FILES = ("model.onnx", "model_quantized.onnx")  # what export_onnx writes (float, quantize="int8")

Step = Callable[[], object]  # one timed forward pass, inputs bound
Runner = Callable[[torch.Tensor, torch.Tensor], Step]  # binds (input_ids, attention_mask) to a step


@dataclass(frozen=True)
class Candidate:
    """A model row: its name and how to load it (called once, when its turn comes)."""

    name: str
    load: Callable[[], Runner]


def torch_runner(model: nn.Module) -> Runner:
    def bind(ids: torch.Tensor, mask: torch.Tensor) -> Step:
        return lambda: model(input_ids=ids, attention_mask=mask)

    return bind


def onnx_runner(path: Path, threads: int) -> Runner:
    import onnxruntime as ort

    from ..onnx.validate import OnnxGraph

    graph = OnnxGraph(path)  # knows how to feed the graph (token types, positions, empty past)
    # Its session has ONNX Runtime's default pool size and no spinning (right while validating,
    # where PyTorch runs in between). Timed alone, the graph gets the same thread count as PyTorch
    # and ONNX Runtime's serving default of spinning workers. The first session is dropped before
    # the second is made, so only one copy is ever in memory.
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    options.intra_op_num_threads = threads
    graph.session = None
    graph.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def bind(ids: torch.Tensor, mask: torch.Tensor) -> Step:
        feeds = graph.feeds(ids, mask)
        return lambda: graph.run(feeds)

    return bind


def candidates(merged: Path, base: Path, spec: AdapterSpec, dtype: torch.dtype,
               onnx_models: list[tuple[str, Path]], threads: int) -> list[Candidate]:
    """The rows in the order they are timed: unmerged (ours, then PEFT's), merged, base, ONNX."""
    models = [Candidate(UNMERGED, lambda: torch_runner(unmerged_model(base, spec, dtype, reference_norms=False)))]
    if peft_usable(spec):
        models.append(Candidate(UNMERGED_PEFT, lambda: torch_runner(peft_model(base, spec, dtype))))
    models.append(Candidate(MERGED, lambda: torch_runner(load_model(merged, dtype))))
    models.append(Candidate(BASE, lambda: torch_runner(load_model(base, dtype))))
    for name, path in onnx_models:
        models.append(Candidate(name, lambda path=path: onnx_runner(path, threads)))
    return models


def onnx_files(merged: Path, onnx_dir: Path | None) -> tuple[Path | None, list[tuple[str, Path]], list[str]]:
    """(folder, [(row name, file)], notes): ``onnx_dir`` must hold an export; without it,
    ``<merged>-onnx`` is used when it exists."""
    from ..onnx.files import graph_precision

    if onnx_dir is None:
        default = merged.parent / f"{merged.name}-onnx"
        if not default.is_dir():
            return None, [], [f"no ONNX export at {default}, so ONNX Runtime is not timed (export one there first)"]
        onnx_dir = default
    if not onnx_dir.is_dir():
        raise D2ExportError(f"ONNX folder not found: {onnx_dir}")
    files = [onnx_dir / name for name in ONNX_FILES if (onnx_dir / name).is_file()]
    if not files:
        raise D2ExportError(f"{onnx_dir}: no {' or '.join(ONNX_FILES)} (write one with export_onnx)")
    if importlib.util.find_spec("onnxruntime") is None:
        raise D2ExportError("onnxruntime is not installed: pip install 'd2export[onnx]' (or leave out onnx_dir)")
    named: list[tuple[str, Path]] = []
    for path in files:
        name = f"{ONNX_PREFIX} {graph_precision(path)}"
        named.append((f"{name} ({path.name})" if any(n == name for n, _ in named) else name, path))
    return onnx_dir, named, onnx_source_notes(merged, onnx_dir)


def onnx_source_notes(merged: Path, onnx_dir: Path) -> list[str]:
    """Warnings when the export's report says it was made from another folder or failed validation."""
    try:
        report = read_json_object(onnx_dir / "onnx_report.json")
    except D2ExportError:
        return [f"{onnx_dir}: no onnx_report.json; cannot tell which model it was exported from"]
    notes = []
    source = report.get("source")
    if source and Path(source) != merged.resolve():
        notes.append(f"the ONNX export was made from {source}, not from {merged}")
    if report.get("passed") is False:
        notes.append(f"the ONNX export in {onnx_dir} failed its validation; its timings are of a wrong model")
    return notes


def check_models(merged: ModelFolder, job: Job) -> None:
    """The merged folder must be a model of the base's architecture holding every tensor the
    merge rewrites, in the same shape (``job.plan`` already proved the adapter fits the base)."""
    arch = (merged.config.get("architectures") or [None])[0]
    base_arch = (job.base.config.get("architectures") or [None])[0]
    if arch != base_arch:
        raise D2ExportError(f"{merged.path} is a {arch} but the adapter's base {job.base.path} is a {base_arch}")
    for tensor in job.plan.tensors:
        if tensor.action is not Action.MERGE or tensor.name != tensor.source:
            continue
        info = merged.tensors.get(tensor.name)
        if info is None or tuple(info.shape) != tuple(tensor.shape):
            have = "missing" if info is None else f"shape {list(info.shape)}"
            raise D2ExportError(f"{merged.path}: tensor {tensor.name} is {have}, the merge of {job.spec.path} "
                                f"writes {list(tensor.shape)}; is it a merge of this adapter?")
