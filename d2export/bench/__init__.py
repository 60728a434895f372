"""``bench``: how much faster the merged model serves than the adapter, measured side by side.

Models, loaded one at a time (each freed before the next, so only one is ever in memory):

* ``unmerged``: the base with the adapter applied at run time by d2export's :class:`AdapterLayer`,
  rescaling norms computed in the model dtype as DoRA / D2-LoRA training and evaluation code does
  (not in float64 as the verification reference does: that would time a slower model than users run);
* ``unmerged (PEFT)``: PEFT's own ``PeftModel``, for PEFT LoRA-family adapters when peft is installed;
* ``merged``: the merged folder; ``base``: the base model (merged/base should be 1.0 within noise);
* ``onnxruntime <precision>``: ``model.onnx`` and ``model_quantized.onnx`` of an ONNX export.

Workload: one forward pass (prefill) over seeded random tokens ``[B, L]`` without padding, per
batch size x sequence length. Warm-up runs are discarded; the ``repeats`` timed runs give p50/p95
latency, and throughput is ``B*L / median``. Ratios are taken between models of the same run only.

Modules: :mod:`.report` (the figures), :mod:`.inputs` (workloads and tokens), :mod:`.candidates`
(the models and the checks that they belong together), :mod:`.runner` (:func:`run_bench`),
:mod:`.plot` (the PNG).
"""

from ..options import BenchOptions
from .plot import plot_report, require_matplotlib
from .report import (
    BASE,
    MERGED,
    ONNX_PREFIX,
    PAPER_MERGED_SPEEDUP,
    UNMERGED,
    UNMERGED_PEFT,
    BenchReport,
    BenchRow,
    Ratio,
    Workload,
)
from .runner import run_bench

__all__ = ["BASE", "MERGED", "ONNX_PREFIX", "PAPER_MERGED_SPEEDUP", "UNMERGED", "UNMERGED_PEFT", "BenchOptions",
           "BenchReport", "BenchRow", "Ratio", "Workload", "plot_report", "require_matplotlib", "run_bench"]
