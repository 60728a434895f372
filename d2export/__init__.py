"""d2export: fold LoRA-family adapters (D2-LoRA, LoRA, rsLoRA, DoRA, DiffoRA) into plain weights.

The public API, imported on first use: merging and inspecting never import torch (see
``arrays.py``), and the CLI's start-up stays small; ``verify``, ``export_onnx`` and ``run_bench``
run models and import torch when called.
"""

from importlib import import_module

__version__ = "0.1.0"

from .errors import D2ExportError, OptionError, UnsupportedAdapterError

_LAZY = {
    "load_adapter": "formats", "prepare": "job", "Job": "job",
    "merge": "merging", "MergeResult": "merging", "inspect": "inspection",
    "MergeOptions": "options", "VerifyOptions": "options", "OnnxOptions": "options", "BenchOptions": "options",
    "Thresholds": "options",
    "verify": "verification", "VerifyReport": "verification",
    "export_onnx": "onnx", "OnnxResult": "onnx",
    "run_bench": "bench", "BenchReport": "bench",
}
__all__ = ["D2ExportError", "OptionError", "UnsupportedAdapterError", "__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'd2export' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value
