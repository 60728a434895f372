"""Validation of an export: ONNX Runtime against the float32 PyTorch model, on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import D2ExportError
from ..reading import ModelFolder
from ..runtime.calibration import Batch, model_batches
from ..runtime.comparison import OutputComparison
from ..runtime.models import head_kind, load_model
from .files import graph_precision, quiet

# head_kind() of the shared loader for the tasks it loads with the right Auto class.
SHARED_LOADER_KINDS = {"text-generation": "causal-lm", "text-classification": "sequence-classification",
                       "feature-extraction": "encoder", "image-classification": "image-classification"}

# --- tolerances -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    max_relative: float | None  # max |diff| / max |reference|
    mean_relative: float | None  # mean |diff| / max |reference|
    min_top1: float  # arg-max agreement, where outputs are distributions (logits)
    identical_generate: bool  # ORTModelForCausalLM's greedy tokens must equal PyTorch's

    def to_dict(self) -> dict:
        return asdict(self)


# A float32 graph computes what PyTorch computes in float32, only with other kernels and another
# summation order (and, with --optimize, fused ops): the difference is float32 round-off, a few
# ulps (2^-24 relative) per op, amplified through the layers. Measured on the test fixtures it is
# at most ~1e-6 of the largest |output| (tiny Llama/GPT-2/BERT, real MiniLM, with and without
# O2 fusions; see tests/test_onnx.py). 1e-4 of the output scale leaves two orders of magnitude of
# margin and is still far below what a real export defect does (a model merged with another
# adapter, a wrong mask or position moves outputs by 1e-2 of the scale and more). At 1e-4 of the
# scale two logits only swap where they tie to that precision, so every arg-max must agree and
# greedy generation must give the same tokens.
FLOAT32 = Tolerance(max_relative=1e-4, mean_relative=None, min_top1=1.0, identical_generate=True)
# Reduced precision (int8, fp16, O3's fast GELU) is reported against float32 PyTorch, not held to
# float32 round-off; the bound only catches a broken graph. Rounding moves a few values far (an
# outlier activation quantised with its whole tensor: measured max |diff| up to 9% of the scale for
# int8 on the real MiniLM, 4% on the tiny Llama) but the bulk little (mean |diff| 0.65% and
# 0.3% of the scale; fp16 0.01%), so the bound is on the mean: 5% of the scale, or fewer than half
# of the arg-maxes agreeing (measured int8: 96%), is no longer rounding but a wrong model.
APPROXIMATE = Tolerance(max_relative=None, mean_relative=0.05, min_top1=0.5, identical_generate=False)

GENERATE_PROMPTS = 2  # unpadded prompts taken from the calibration batches
GENERATE_TOKENS = 8



@dataclass
class GraphCheck:
    """Validation of one ``.onnx`` file against the float32 PyTorch model."""

    file: str
    precision: str  # "float32", "float16", "int8"
    approximate: bool  # judged by the loose bounds (int8, fp16, O3's fast GELU), not float32 round-off
    outputs: dict[str, OutputComparison] = field(default_factory=dict)
    decode_step: OutputComparison | None = None
    generate: dict | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def tolerance(self) -> Tolerance:
        return APPROXIMATE if self.approximate else FLOAT32

    def judge(self) -> None:
        limits = self.tolerance
        named = dict(self.outputs)
        if self.decode_step is not None:
            named["decode_step.logits"] = self.decode_step
        for name, c in named.items():
            if not np.isfinite(c.max_abs):
                self.failures.append(f"{name}: non-finite values")
                continue
            mean_relative = c.mean_abs / c.scale if c.scale else 0.0
            if limits.max_relative is not None and c.relative > limits.max_relative:
                self.failures.append(f"{name}: max |diff| {c.max_abs:.3g} is {c.relative:.3g} of the output scale "
                                     f"(limit {limits.max_relative:g})")
            if limits.mean_relative is not None and mean_relative > limits.mean_relative:
                self.failures.append(f"{name}: mean |diff| {c.mean_abs:.3g} is {mean_relative:.3g} of the output "
                                     f"scale (limit {limits.mean_relative:g})")
            if c.top1 is not None and c.top1 < limits.min_top1:
                self.failures.append(f"{name}: top-1 agreement {c.top1:.4f} (limit {limits.min_top1:g})")
        if self.generate is not None and limits.identical_generate and not self.generate["identical"]:
            self.failures.append("generate: ORTModelForCausalLM's greedy tokens differ from PyTorch's")

    def to_dict(self) -> dict:
        data = {
            "precision": self.precision,
            "tolerance": self.tolerance.to_dict(),
            "outputs": {name: _figures(c) for name, c in self.outputs.items()},
        }
        if self.decode_step is not None:
            data["decode_step"] = _figures(self.decode_step)
        if self.generate is not None:
            data["generate"] = self.generate
        data.update(failures=self.failures, passed=self.passed)
        return data


def _figures(comparison: OutputComparison) -> dict:
    return {**comparison.to_dict(),
            "mean_relative": comparison.mean_abs / comparison.scale if comparison.scale else 0.0}


@dataclass
class Validation:
    reference: str
    calibration: dict
    checks: list[GraphCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(check.passed for check in self.checks)

    def to_dict(self) -> dict:
        return {"reference": self.reference, "calibration": self.calibration,
                "graphs": {check.file: check.to_dict() for check in self.checks}, "passed": self.passed}


def validate_export(onnx_dir: Path, model: ModelFolder, task: str, *, approximate: bool = False,
                    progress: Callable[[str], None] | None = None) -> Validation:
    """Check every ``.onnx`` file in ``onnx_dir`` against the float32 PyTorch model in ``model_dir``.

    ``approximate``: the float graph itself is not float32 round-off (O3's fast GELU); float16 and
    int8 graphs are recognised from the files.
    """
    say = progress or (lambda stage: None)
    config = model.config
    reference = load_reference(model.path, config, task)
    batches = model_batches(config)
    if batches[0].pixel_values is not None:
        calibration = {"kind": "seeded random images", "batches": len(batches),
                       "batch_size": int(batches[0].pixel_values.shape[0]),
                       "image": list(batches[0].pixel_values.shape[1:])}
    else:
        calibration = {"kind": "seeded random tokens, right-padded", "batches": len(batches),
                       "lengths": [int(b.input_ids.shape[1]) for b in batches],
                       "batch_size": int(batches[0].input_ids.shape[0]),
                       "tokens": sum(b.num_tokens for b in batches)}
    validation = Validation(reference=f"{type(reference).__name__} (PyTorch, float32)", calibration=calibration)
    for file in sorted(p.name for p in onnx_dir.glob("*.onnx")):
        say(f"validating {file}")
        graph = OnnxGraph(onnx_dir / file)
        check = GraphCheck(file, graph.precision, approximate or graph.precision != "float32")
        compare_graph(graph, reference, batches, check)
        if task.startswith("text-generation"):
            check.generate = compare_generate(onnx_dir, file, reference, batches, config,
                                              with_past=task.endswith("-with-past"))
        check.judge()
        validation.checks.append(check)
    return validation


def load_reference(model_dir: Path, config: dict, task: str) -> torch.nn.Module:
    """The merged model in float32, loaded with the transformers class optimum exported for ``task``."""
    base = task.removesuffix("-with-past")
    if SHARED_LOADER_KINDS.get(base) == head_kind(config):
        return load_model(model_dir, torch.float32)
    from optimum.exporters.tasks import TasksManager

    cls = TasksManager.get_model_class_for_task(base, framework="pt", library="transformers")
    with quiet():
        try:
            model = cls.from_pretrained(model_dir, dtype=torch.float32)
        except (OSError, ValueError, KeyError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise D2ExportError(f"{model_dir}: transformers cannot load it ({msg})") from None
    return model.eval()


class OnnxGraph:
    """One ``.onnx`` file in an ONNX Runtime CPU session, fed the way optimum's ORT models feed it."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = path
        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.past_inputs = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.precision = graph_precision(path)
        known = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", *self.past_inputs}
        unknown = sorted(set(self.inputs) - known)
        if unknown:
            raise D2ExportError(f"{path.name}: the validator does not know how to feed inputs {unknown}")

    def feeds(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: list[np.ndarray] | None = None
              ) -> dict[str, np.ndarray]:
        """ONNX inputs; ``attention_mask`` covers past + new tokens, as in the graph."""
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
        if "position_ids" in self.inputs:
            feeds["position_ids"] = position_ids(attention_mask, input_ids.shape[1]).numpy()
        if self.past_inputs:
            past = past if past is not None else [self._empty_past(name, len(input_ids)) for name in self.past_inputs]
            feeds.update(zip(self.past_inputs, past, strict=True))
        return {name: value for name, value in feeds.items() if name in self.inputs}

    def _empty_past(self, name: str, batch: int) -> np.ndarray:
        # Static dims (heads, head size) come from the graph; "batch_size" is the batch and the
        # symbolic past length is 0 on the first pass, as ORTModelForCausalLM feeds it.
        info = self.inputs[name]
        shape = [d if isinstance(d, int) else (batch if "batch" in str(d) else 0) for d in info.shape]
        return np.zeros(shape, dtype=np.float16 if "float16" in info.type else np.float32)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.outputs, self.session.run(None, feeds), strict=True))


def session_options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # ONNX Runtime's worker threads spin after each run by default, taking the cores PyTorch's
    # reference forward (which runs in between) needs: validation ran several times slower.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last ``new_tokens`` tokens, counted over real tokens only (as optimum and
    transformers' generate build them); pads get 1 and are never compared."""
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 1)
    return positions[:, -new_tokens:]


@torch.no_grad()
def compare_graph(graph: OnnxGraph, reference: torch.nn.Module, batches: list[Batch], check: GraphCheck) -> None:
    """Every output the graph shares with the PyTorch model, on the real positions of every batch;
    for a graph with past inputs also one decode step fed the past it returned."""
    for batch in batches:
        if batch.pixel_values is not None:
            feeds = {"pixel_values": batch.pixel_values.numpy()}
        else:
            feeds = graph.feeds(batch.input_ids, batch.attention_mask)
        onnx_out = graph.run(feeds)
        kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if not k.startswith("past_key_values.")}
        if graph.past_inputs:
            kwargs["use_cache"] = True
        torch_out = reference(**kwargs)
        for name, value in onnx_out.items():
            expected = getattr(torch_out, name, None) if not name.startswith("present.") else None
            if not isinstance(expected, torch.Tensor):
                continue  # present.* feed the decode step below; extra outputs have no PyTorch twin
            # logits / start_logits / end_logits are distributions (top-1, KL); hidden states are not.
            comparison = check.outputs.setdefault(name, OutputComparison(distributions="logits" in name))
            comparison.add(expected, torch.from_numpy(value), batch.attention_mask if expected.dim() == 3 else None)
        if graph.past_inputs:
            if check.decode_step is None:
                check.decode_step = OutputComparison()
            _decode_step(graph, reference, batch, onnx_out, torch_out, check.decode_step)
    if not check.outputs:
        raise D2ExportError(f"{graph.path.name}: no output shares a name with the PyTorch model's outputs")


def _decode_step(graph: OnnxGraph, reference: torch.nn.Module, batch: Batch, onnx_out: dict, torch_out,
                 comparison: OutputComparison) -> None:
    """One new token per row (PyTorch's greedy choice after its last real token) through the graph,
    fed the graph's own ``present.*``, against PyTorch fed its own cache."""
    last = batch.attention_mask.sum(1) - 1
    rows = torch.arange(len(last))
    next_ids = torch_out.logits[rows, last].argmax(-1, keepdim=True)
    mask = torch.cat([batch.attention_mask, torch.ones_like(next_ids)], dim=1)
    past = [onnx_out[name.replace("past_key_values.", "present.")] for name in graph.past_inputs]
    onnx_logits = graph.run(graph.feeds(next_ids, mask, past))["logits"]
    torch_logits = reference(input_ids=next_ids, attention_mask=mask, position_ids=position_ids(mask, 1),
                             past_key_values=torch_out.past_key_values, use_cache=True).logits
    comparison.add(torch_logits, torch.from_numpy(onnx_logits))


@torch.no_grad()
def compare_generate(onnx_dir: Path, file: str, reference: torch.nn.Module, batches: list[Batch], config: dict,
                     *, with_past: bool) -> dict:
    """Greedy ``generate()`` through optimum's ``ORTModelForCausalLM`` (what serving code loads)
    against PyTorch's ``generate()`` with the same settings, on unpadded prompts."""
    from optimum.onnxruntime import ORTModelForCausalLM

    with quiet():
        model = ORTModelForCausalLM.from_pretrained(onnx_dir, file_name=file, use_cache=with_past, use_io_binding=False,
                                                    session_options=session_options(), local_files_only=True)
    pad = config.get("pad_token_id")
    settings = {"max_new_tokens": GENERATE_TOKENS, "do_sample": False,
                "pad_token_id": pad if isinstance(pad, int) else 0}
    prompts = _prompts(batches)
    torch_tokens, onnx_tokens = [], []
    for prompt in prompts:
        ids = prompt.unsqueeze(0)
        mask = torch.ones_like(ids)
        with quiet():
            expected = reference.generate(input_ids=ids, attention_mask=mask, **settings)[0, ids.shape[1]:]
            got = model.generate(input_ids=ids, attention_mask=mask, use_cache=with_past, **settings)[0, ids.shape[1]:]
        torch_tokens.append(expected.tolist())
        onnx_tokens.append(got.tolist())
    matching = sum(a == b for a, b in zip(torch_tokens, onnx_tokens, strict=True))
    return {"class": "ORTModelForCausalLM", "use_cache": with_past, "prompts": len(prompts),
            "new_tokens": GENERATE_TOKENS, "matching": matching, "identical": matching == len(prompts),
            "pytorch": torch_tokens, "onnx": onnx_tokens}


def _prompts(batches: list[Batch]) -> list[torch.Tensor]:
    prompts = []
    for batch in batches:
        for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
            if len(prompts) < GENERATE_PROMPTS and bool(mask.all()):
                prompts.append(ids)
    return prompts
