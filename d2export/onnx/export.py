"""ONNX export through optimum-onnx, checked with ONNX Runtime against the PyTorch model.

optimum's exporter validates too, but only logs a warning when outputs disagree, so an export is
never trusted here until it has been run: the exported graph (and its int8 variant) and the merged
PyTorch model (in float32) see the same padded batches and their outputs are compared on the real
positions; a ``-with-past`` graph also runs one decode step fed its own past key/values, and a
causal LM is loaded with optimum's ``ORTModelForCausalLM`` (what serving code uses) and must
reproduce PyTorch's greedy tokens. The figures go into ``onnx_report.json`` beside the model.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..arrays import dtype_name, is_float
from ..errors import D2ExportError, OptionError
from ..options import OnnxOptions, with_settings
from ..progress import Progress, silent
from ..reading import ModelFolder
from ..runtime.calibration import config_batches
from ..st_modules import is_sentence_transformers
from ..writing import atomic_output, check_output_location, current_umask, write_json
from .embeddings import EMBEDDING_TASK, carry_sentence_transformers, validate_embeddings
from .files import (
    MODEL_NAME,
    QUANTIZED_NAME,
    file_sizes,
    graph_opset,
    quantize_int8,
    quiet,
    to_external_data,
    uses_external_data,
)
from .tasks import resolve_task
from .validate import validate_export

REPORT_NAME = "onnx_report.json"
# A protobuf message (one .onnx file holding its weights inline) cannot exceed 2 GiB.
PROTOBUF_LIMIT = 2**31


@dataclass
class OnnxResult:
    out: Path
    report: dict
    passed: bool



def export_onnx(model_dir: str | Path, out: str | Path | None = None, *, options: OnnxOptions | None = None,
                progress: Progress = silent, **settings) -> OnnxResult:
    """Export a (merged) Hugging Face model folder to ONNX and check the result with ONNX Runtime.

    Writes ``model.onnx`` (``model_quantized.onnx`` beside it with ``quantize="int8"``), optimum's
    config/tokenizer files and ``onnx_report.json`` into ``out`` (default ``<model_dir>-onnx``),
    atomically. ``external_data``: ``None`` writes ``model.onnx`` + ``model.onnx_data`` when the
    weights pass 2 GiB, ``True`` always, ``False`` refuses a model too large for one file.

    Args:
        model_dir: the model folder to export.
        out: output folder; default ``<model_dir>-onnx``.
        options: an :class:`OnnxOptions`; ``settings`` (its field names as keywords) override it.
        progress: called with (stage, 0, 0) as the export goes.

    Returns:
        An :class:`OnnxResult`. A failed validation does not raise: the folder is written (so it
        can be inspected), the report says so and ``passed`` is False (``validate=False`` skips
        the check, notes it, and leaves ``passed`` True).

    Raises:
        D2ExportError: bad input or an export optimum refuses; nothing is written.
    """
    options = with_settings(OnnxOptions, options, settings)

    def say(stage: str) -> None:
        progress(stage, 0, 0)

    _require_onnx_stack()
    _check_opset(options.opset)
    model_dir = Path(model_dir)
    # a folder with a config but no weights is not a model either
    with ModelFolder.open(model_dir) as weights:
        return _export(weights, Path(out) if out is not None else model_dir.parent / f"{model_dir.name}-onnx",
                       options, say)


def _export(weights: ModelFolder, out: Path, options: OnnxOptions, say) -> OnnxResult:
    model_dir, config = weights.path, weights.config
    if config.get("is_encoder_decoder"):
        raise D2ExportError(f"{model_dir}: encoder-decoder models (several ONNX graphs) are not supported yet")
    task, notes = resolve_task(config, options.task, options.past, options.validate)
    check_output_location(out, [model_dir], options.force)
    if options.optimize is not None:
        _check_optimizable(config["model_type"], options.optimize)
    source_dtype = _source_dtype(config, weights)
    precision = "float16" if options.fp16 else "float32"
    if source_dtype in ("bfloat16", "float16") and source_dtype != precision:
        reason = "ONNX Runtime has no bf16 CPU kernels" if source_dtype == "bfloat16" else "fp16 not asked for"
        notes.append(f"model is {source_dtype}; exported {precision} ({reason})")
    want_external = _external_data(weights, options, precision)

    with atomic_output(out, replace=options.force) as tmp:
        started = time.perf_counter()
        _write_graphs(model_dir, tmp, task, options, want_external, say)
        sentence_transformers = None
        if task == EMBEDDING_TASK:
            sentence_transformers = carry_sentence_transformers(model_dir, tmp)  # modules.json, 1_Pooling/, ...
        elif is_sentence_transformers(model_dir):
            # SentenceTransformer(backend="onnx") reads the graph's last_hidden_state: with another
            # task's graph (a classifier merged over a sentence-transformers base) it cannot run
            notes.append(f"sentence-transformers modules not carried: the graph is {task}; export with --task "
                         f"{EMBEDDING_TASK} for SentenceTransformer(backend='onnx')")
        report = {
            "tool": "d2export", "version": __version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "source": str(model_dir.resolve()),
            "architecture": (config.get("architectures") or [None])[0],
            "model_type": config["model_type"],
            "task": task, "opset": graph_opset(tmp / MODEL_NAME),
            "source_dtype": source_dtype, "dtype": precision,
            "optimize": options.optimize, "quantize": options.quantize,
            "external_data": uses_external_data(tmp / MODEL_NAME),
            "notes": notes, "export_seconds": round(time.perf_counter() - started, 2),
        }
        if sentence_transformers is not None:
            report["sentence_transformers"] = sentence_transformers
        passed = _validate(tmp, weights, task, options, report, say)
        report["passed"] = passed
        report["files"] = file_sizes(tmp)
        write_json(tmp / REPORT_NAME, report)
        _usual_modes(tmp)
    return OnnxResult(out, report, passed)


def _external_data(weights: ModelFolder, options: OnnxOptions, precision: str) -> bool:
    """Whether the weights go to ``model.onnx_data``. The exporter moves them out by itself once the
    protobuf would pass 2 GiB; deciding from the weights as well makes "automatic" independent of
    that and of the exact boundary."""
    graph_bytes = sum(t.nbytes // t.dtype.itemsize for t in weights.tensors.values() if is_float(t.dtype))
    graph_bytes *= 2 if options.fp16 else 4
    if options.external_data is False and graph_bytes >= PROTOBUF_LIMIT:
        raise OptionError("external_data", f"is off but the {precision} weights take {graph_bytes / 2**30:.1f} GiB, "
                          "more than one .onnx file can hold (2 GiB)")
    return options.external_data if options.external_data is not None else graph_bytes >= PROTOBUF_LIMIT


def _write_graphs(model_dir: Path, tmp: Path, task: str, options: OnnxOptions, want_external: bool, say) -> None:
    say("exporting")
    _run_optimum(model_dir, tmp, task=task, opset=options.opset, optimize=options.optimize, fp16=options.fp16)
    if want_external and not uses_external_data(tmp / MODEL_NAME):
        say("writing external data")
        to_external_data(tmp / MODEL_NAME)
    if options.quantize == "int8":
        say("quantizing")
        quantize_int8(tmp / MODEL_NAME, tmp / QUANTIZED_NAME)


def _validate(tmp: Path, weights: ModelFolder, task: str, options: OnnxOptions, report: dict, say) -> bool:
    """Run the export against the PyTorch model (the figures go into ``report``); the verdict."""
    if not options.validate:
        report["notes"].append("not validated (validate=False)")
        return True
    say("validating")
    started = time.perf_counter()
    validation = validate_export(tmp, weights, task, progress=say, approximate=options.optimize == "O3")
    report["validation"] = validation.to_dict()
    passed = validation.passed
    if "sentence_transformers" in report:  # also through SentenceTransformer(backend="onnx")
        say("validating sentence embeddings")
        graphs = {c.file: (c.precision, c.approximate) for c in validation.checks}
        embeddings = validate_embeddings(tmp, weights.path, config_batches(weights.config), graphs)
        report["validation"]["sentence_transformers"] = embeddings.to_dict()
        passed = passed and embeddings.passed
    report["validation_seconds"] = round(time.perf_counter() - started, 2)
    if not passed:
        report["notes"].append("VALIDATION FAILED: the files were written for inspection only; do not deploy them")
    return passed


def _require_onnx_stack() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import optimum.exporters.onnx  # noqa: F401
    except ImportError as exc:
        raise D2ExportError(f"ONNX export needs the onnx extras ({exc.name} is missing): "
                            "pip install 'd2export[onnx]'") from None


def _usual_modes(folder: Path) -> None:
    """Give the files the modes a plain open() would: onnx writes external data 0600, which a
    serving process running as another user could not read."""
    mode = 0o666 & ~current_umask()
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, mode)


def _check_opset(opset: int | None) -> None:
    low, high = _opset_range()
    if opset is not None and not low <= opset <= high:
        raise OptionError("opset", f"{opset} is not one torch's ONNX exporter writes ({low} to {high})")


def _opset_range() -> tuple[int, int]:
    from torch.onnx import _constants  # the TorchScript exporter's limits, the one optimum drives

    return (getattr(_constants, "ONNX_MIN_OPSET", 7), getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def _check_optimizable(model_type: str, level: str) -> None:
    from optimum.onnxruntime import AutoOptimizationConfig
    from optimum.onnxruntime.utils import ORTConfigManager

    try:
        config = AutoOptimizationConfig.with_optimization_level(level)
        ORTConfigManager.check_optimization_supported_model(model_type, config)
    except (NotImplementedError, KeyError):
        raise OptionError("optimize", f"is not available: ONNX Runtime has no graph optimisation for {model_type}"
                          ) from None


def _source_dtype(config: dict, weights) -> str:
    """The floating dtype of the stored weights (what the merge wrote), else config.json's."""
    dtypes = {dtype_name(t.dtype) for t in weights.tensors.values() if is_float(t.dtype)}
    if len(dtypes) == 1:
        return dtypes.pop()
    return str(config.get("dtype") or config.get("torch_dtype") or "float32")


def _run_optimum(model_dir: Path, output: Path, *, task: str, opset: int | None, optimize: str | None,
                 fp16: bool) -> None:
    from optimum.exporters.onnx import main_export
    from torch.onnx.errors import OnnxExporterError

    with quiet():
        try:
            main_export(
                model_name_or_path=str(model_dir), output=output, task=task, opset=opset, device="cpu",
                # Load in float32 (or float16): a bf16 model would otherwise be traced in bf16, which
                # ONNX Runtime's CPU provider cannot run.
                dtype="fp16" if fp16 else "fp32",
                optimize=optimize,
                # The folder is validated below, against transformers' class for the task; optimum's own
                # check only logs a warning. "transformers" also keeps a sentence-transformers folder
                # (modules.json) exporting the transformer itself rather than optimum's pooled variant.
                do_validation=False, library_name="transformers", local_files_only=True,
            )
        # optimum's messages for what it refuses, and torch's for an operator the opset lacks
        except (ValueError, KeyError, NotImplementedError, OnnxExporterError) as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise D2ExportError(f"optimum cannot export {model_dir}: {message}") from exc
    if not (output / MODEL_NAME).is_file():
        raise D2ExportError(f"optimum wrote no {MODEL_NAME} for task {task} (files: {sorted(file_sizes(output))})")


