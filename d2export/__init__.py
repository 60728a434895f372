"""d2export: fold LoRA-family adapters (D2-LoRA, LoRA, rsLoRA, DoRA, DiffoRA) into plain weights.

Merging and inspecting never import torch (see ``arrays.py``); ``verify``, ``export_onnx`` and the
benchmark run models and do, so they are imported on first use.
"""

from importlib import import_module

__version__ = "0.1.0"  # before the imports below: report.py reads it

from .errors import D2ExportError, UnsupportedAdapterError
from .formats import load_adapter
from .inspect import inspect
from .merge import MergeResult, merge

_LAZY = {"Thresholds": "verification", "VerifyReport": "verification", "verify": "verification",
         "OnnxResult": "onnx", "export_onnx": "onnx"}
__all__ = [
    "D2ExportError", "MergeResult", "OnnxResult", "Thresholds", "UnsupportedAdapterError", "VerifyReport",
    "__version__", "export_onnx", "inspect", "load_adapter", "merge", "verify",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'd2export' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value
