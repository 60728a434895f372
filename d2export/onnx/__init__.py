"""ONNX export through optimum-onnx, checked with ONNX Runtime (``d2export onnx``)."""

from .export import OnnxResult, export_onnx
from .tasks import infer_task, resolve_task
from .validate import APPROXIMATE, FLOAT32, validate_export

__all__ = ["APPROXIMATE", "FLOAT32", "OnnxResult", "export_onnx", "infer_task", "resolve_task", "validate_export"]
