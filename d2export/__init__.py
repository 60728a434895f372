"""d2export: fold LoRA-family adapters (D2-LoRA, LoRA, rsLoRA, DoRA, DiffoRA) into plain weights."""

__version__ = "0.1.0"

from .errors import D2ExportError, UnsupportedAdapterError
from .formats import load_adapter
from .inspect import inspect
from .merge import MergeResult, merge
from .onnx import OnnxResult, export_onnx
from .verify import Thresholds, VerifyReport, verify

__all__ = [
    "D2ExportError", "MergeResult", "OnnxResult", "Thresholds", "UnsupportedAdapterError", "VerifyReport",
    "__version__", "export_onnx", "inspect", "load_adapter", "merge", "verify",
]
