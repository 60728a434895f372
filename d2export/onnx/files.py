"""ONNX files: external data, int8 quantisation, and what a graph holds."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from ..quiet import libraries_quiet

MODEL_NAME = "model.onnx"
QUANTIZED_NAME = "model_quantized.onnx"  # optimum's ORTQuantizer naming, so ORTModel*(file_name=...) finds it
QUANTIZED_OPS = {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul",
                 "DequantizeLinear", "MatMulNBits"}


def uses_external_data(path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data as tensor_is_external

    model = onnx.load(str(path), load_external_data=False)
    return any(tensor_is_external(t) for t in model.graph.initializer)


def to_external_data(path: Path) -> None:
    """Re-save ``path`` as ``<name>`` + ``<name>_data`` (every weight in one side file, optimum's
    layout), replacing whatever side files it had."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.external_data_helper import uses_external_data as tensor_is_external

    model = onnx.load(str(path), load_external_data=False)
    old = {ExternalDataInfo(t).location for t in model.graph.initializer if tensor_is_external(t)}
    onnx.load_external_data_for_model(model, str(path.parent))
    for name in {path.name, *old}:
        (path.parent / name).unlink()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + "_data",
                    # optimum's choice: tensors under 100 bytes (shape constants) stay inline, every weight moves.
                    size_threshold=100)


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation beside the float model: int8 weights, per output channel (one
    scale per row keeps a row with small weights from being rounded to zero by a large one), and
    activations quantised at run time, so no calibration data is needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    external = uses_external_data(source)
    with quiet():
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True,
                         use_external_data_format=external)
    if external:  # the quantizer names its side file "<name>.data"; keep optimum's "<name>_data"
        to_external_data(target)


def graph_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def file_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}



def graph_precision(path: Path) -> str:
    """``int8`` when the graph quantises (dynamic quantisation's ops), else its float type."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(node.op_type in QUANTIZED_OPS for node in model.graph.node):
        return "int8"
    # optimum's fp16 export keeps fp16 outputs (and past key/values); float32 graphs give float32.
    outputs = {o.type.tensor_type.elem_type for o in model.graph.output}
    return "float16" if onnx.TensorProto.FLOAT16 in outputs else "float32"



@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' chatter (tracer warnings, deprecations, info logs) for one block.

    Only warnings and log records are filtered: exceptions still propagate.
    """
    from transformers.utils import logging as hf_logging

    # The root logger too: onnxruntime's transformers optimizer and quantizer log through
    # loggers named after bare module names (and logging.warning) that only the root governs.
    loggers = [logging.getLogger(name) for name in ("", "optimum", "onnxruntime", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    hf_level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    with libraries_quiet():
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # "Loading checkpoint shards": d2export shows its own progress
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            hf_logging.set_verbosity(hf_level)
            if bars:
                hf_logging.enable_progress_bar()
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


