"""Models as they run: a folder loaded the way a serving stack would, the unmerged model (the base
with the adapter applied at run time, by d2export's layers or by PEFT), d2export's merge held in
memory, and running any of them on a calibration batch."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import torch
from torch import nn

from ..arrays import to_torch
from ..errors import D2ExportError
from ..formats.stored import forget_recent
from ..heads import label_count
from ..names import find_name
from ..quiet import libraries_quiet
from ..reading import read_config
from ..spec import AdapterSpec
from .calibration import Batch
from .layers import inject_adapter
from .rows import read_by_rows
from .streaming import is_streamed, keep_spill_folder, override_weights, reuse_buffers, streaming_kwargs

# The dtypes models run in, by the names config.json and the options use.
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_METHODS = {"lora", "rslora", "dora"}


class _OwnOffloadNotice(logging.Filter):
    """Drops accelerate's "Some parameters are on the meta device" warning while this thread loads
    a model d2export streams on purpose: Python's last-resort handler would print it to a library
    caller's stderr (the CLI silences accelerate's log altogether). A filter, installed once, that
    looks at a per-thread flag: changing the logger's level would silence the host's own loads too."""

    loading = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.loading, "active", False)
                    and str(record.msg).startswith("Some parameters are on the meta device"))


_OFFLOAD_NOTICE = _OwnOffloadNotice()


@contextlib.contextmanager
def _own_offload_quiet():
    logging.getLogger("accelerate.big_modeling").addFilter(_OFFLOAD_NOTICE)  # once: a filter is added once
    _OFFLOAD_NOTICE.loading.active = True
    try:
        yield
    finally:
        _OFFLOAD_NOTICE.loading.active = False


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Heads loaded with their own Auto class, by the ending of the config's architecture. The head
# must load: a merge may change it (a tied decoder untied, a modules_to_save classifier), and under
# AutoModel it would be dropped unseen (and its tensors not found by the in-memory merge).
HEAD_ENDINGS = (
    ("ForSequenceClassification", "sequence-classification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "image-classification", "AutoModelForImageClassification"),
    ("ForMaskedLM", "masked-lm", "AutoModelForMaskedLM"),
    ("ForTokenClassification", "token-classification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "question-answering", "AutoModelForQuestionAnswering"),
)
AUTO_CLASSES = {"causal-lm": "AutoModelForCausalLM", "seq2seq-lm": "AutoModelForSeq2SeqLM",
                **{kind: auto for _, kind, auto in HEAD_ENDINGS}}


def head_kind(config: dict) -> str:
    """``causal-lm``, ``seq2seq-lm``, a head of :data:`HEAD_ENDINGS` (``sequence-classification``,
    ``image-classification``, ``masked-lm``, ``token-classification``, ``question-answering``) or
    ``encoder`` (hidden states, no head)."""
    arch = (config.get("architectures") or [""])[0]
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "causal-lm"
    if arch.endswith("ForConditionalGeneration") and config.get("is_encoder_decoder"):
        return "seq2seq-lm"
    return next((kind for ending, kind, _ in HEAD_ENDINGS if arch.endswith(ending)), "encoder")


def load_model(folder: Path, dtype: torch.dtype = torch.float32, *, resident_bytes: int | None = None,
               stream_leaves: bool = True, relabeled: bool = False, model_class: str | None = None,
               **config_overrides) -> nn.Module:
    """``from_pretrained`` with the Auto class the config's architecture calls for, in eval mode.
    ``resident_bytes``: stream the weights beyond that many bytes from the folder's files, layer by
    layer (:mod:`.streaming`); None: load them all. ``stream_leaves`` False: embeddings and heads
    stay in memory whatever their size. ``relabeled``: the overrides give the classifier another
    label count, so its head is left out of the loading (the adapter's head replaces it).
    ``model_class``: a transformers class to load instead of the Auto class."""
    import transformers
    from transformers.utils import logging as transformers_logging

    # the class the overrides call for: an adapter-only task head loads the base as that head model
    cls = getattr(transformers, model_class or AUTO_CLASSES.get(head_kind({**read_config(folder), **config_overrides}),
                                                               "AutoModel"))
    # d2export shows its own progress (one bar per shard is noise); a caller's setting comes back after
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    with libraries_quiet():
        try:
            model = _from_pretrained(cls, folder, dtype, resident_bytes, config_overrides, stream_leaves,
                                     {"ignore_mismatched_sizes": True} if relabeled else {})
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
            # a state dict that does not fit: the first "size mismatch" line names the tensor
            msg = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)
            raise D2ExportError(f"{folder}: transformers cannot load it ({msg})") from None
        finally:
            if bars:
                transformers_logging.enable_progress_bar()
    return model.eval()


# What a model's forward takes first (transformers' ``main_input_name``), for inputs the output
# checks cannot make: their calibration is token ids (text) or pixel values (images).
OTHER_INPUTS = {"input_values": "audio samples", "input_features": "audio features"}


def inputs_problem(config: dict) -> str | None:
    """Why the output checks cannot feed the model ``config`` describes (None: they can)."""
    import transformers

    name = (config.get("architectures") or [None])[0]
    if isinstance(config.get("text_config"), dict) and isinstance(config.get("vision_config"), dict):
        return f"{name or config.get('model_type')} takes text and images together"
    main = getattr(getattr(transformers, str(name), None), "main_input_name", "input_ids")
    if main in ("input_ids", "pixel_values"):
        return None
    return f"{name} takes {OTHER_INPUTS.get(main, main)} ({main})"


def import_model_code(folder: Path) -> None:
    """Import the transformers code that loading ``folder``'s model runs, without loading it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    auto = getattr(transformers, AUTO_CLASSES.get(head_kind(read_config(folder)), "AutoModel"))
    with contextlib.suppress(KeyError, ValueError, AttributeError):  # loading says what is wrong
        auto._model_mapping[type(config)]


def _from_pretrained(cls, folder: Path, dtype: torch.dtype, resident_bytes: int | None, overrides: dict,
                     stream_leaves: bool, loading: dict) -> nn.Module:
    streaming = streaming_kwargs(cls, folder, dtype, resident_bytes, overrides, stream_leaves)
    with _own_offload_quiet():
        model = keep_spill_folder(cls.from_pretrained(folder, dtype=dtype, **streaming, **loading, **overrides),
                                  streaming)
    return read_by_rows(reuse_buffers(model)) if streaming and dtype == torch.float32 else model


@torch.no_grad()
def model_output(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Logits (``[B, T, V]`` for LMs, ``[B, labels]`` for classifiers, start and end ``[B, T, 2]``
    for question answering) or the last hidden state.
    An encoder-decoder is teacher-forced with the batch as decoder input too, so every decoder
    position (and the cross-attention to every encoder position) is compared."""
    kwargs = batch.model_inputs()
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs.update(decoder_input_ids=batch.input_ids, decoder_attention_mask=batch.attention_mask)
    out = model(**kwargs)
    logits = getattr(out, "logits", None)
    if logits is None and getattr(out, "start_logits", None) is not None:  # question answering: [B, T, 2]
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return logits if logits is not None else out.last_hidden_state


@torch.no_grad()
def greedy_tokens(model: nn.Module, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` greedy tokens after ``prompt`` ([T], no padding), by full forwards (no cache), so
    the run-time adapter model and any merged model take exactly the same path."""
    ids = prompt.unsqueeze(0)
    for _ in range(steps):
        logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.numel():]


def unmerged_model(base: Path, spec: AdapterSpec, dtype: torch.dtype, *, reference_norms: bool = True,
                   resident_bytes: int | None = None, **config_overrides) -> nn.Module:
    """The base with the adapter applied at run time by d2export's layers. ``reference_norms``:
    rescaling norms in float64 (the accuracy reference); False: in the model dtype, as training
    code computes them (what the benchmark times)."""
    model = adapted_base(base, spec, dtype, resident_bytes=resident_bytes, **config_overrides)
    try:
        return inject_adapter(model, spec, reference_norms=reference_norms).eval()
    except KeyError as exc:  # a module the plan check did not catch; say it as bad input
        raise D2ExportError(f"{spec.path}: {exc.args[0]}") from None
    finally:
        forget_recent()  # every module's factors were read once, into the layers


def adapted_base(base: Path, spec: AdapterSpec, dtype: torch.dtype, **kwargs) -> nn.Module:
    """The base as the adapter was trained on it: with the class and labels of a task head only the
    adapter has, and its vocabulary size (docs/design.md §2). Ties stay: the adapter unties what it
    replaces, as PEFT does."""
    return shaped_base(base, dtype, _adapter_changes(spec, base), **kwargs)


def _adapter_changes(spec: AdapterSpec, base: Path) -> dict:
    """The config changes :func:`adapted_base` loads the base with."""
    if not spec.replacements:  # only full tensors can bring a head or a new vocabulary
        return {}
    from ..heads import output_changes

    changes = output_changes(spec, base)
    changes.pop("tie_word_embeddings", None)
    return changes


def shaped_base(base: Path, dtype: torch.dtype, changes: dict, *, resident_bytes: int | None = None,
                model_class: str | None = None, **config_overrides) -> nn.Module:
    """The base loaded with the config ``changes`` of a merge. A new ``vocab_size`` is applied by
    ``resize_token_embeddings`` after loading (from_pretrained refuses the base's tensors at a new
    size); the new rows are then set from the adapter's tensors by the caller."""
    changes = dict(changes)
    vocab = changes.pop("vocab_size", None)
    relabeled = False
    if "id2label" in changes:  # JSON keys are strings; transformers' configs take ints
        changes["id2label"] = {int(k): v for k, v in changes["id2label"].items()}
        relabeled = label_count(read_config(base)) not in (None, len(changes["id2label"]))
    model = load_model(base, dtype, resident_bytes=resident_bytes, stream_leaves=vocab is None, relabeled=relabeled,
                       model_class=model_class, **changes, **config_overrides)
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
        if dtype == torch.float32 and any(is_streamed(m) for m in model.modules()):
            read_by_rows(model)  # the new embedding and head computed as the folder's will be
    return model


def peft_usable(spec: AdapterSpec) -> bool:
    """Whether PEFT itself can load this adapter (a PEFT LoRA-family adapter, peft installed)."""
    import importlib.util

    return (spec.method in PEFT_METHODS and spec.config.get("peft_type", "LORA") == "LORA"
            and importlib.util.find_spec("peft") is not None)


def peft_model(base: Path, spec: AdapterSpec, dtype: torch.dtype) -> nn.Module | None:
    """PEFT's own unmerged model, where PEFT can load the adapter (and is installed). Always loaded
    whole: PEFT re-dispatches a streamed model and initialises DoRA from base weights, and on
    streamed weights that fails or computes something else (measured: NaN on a ``.bin`` base,
    0.08 off on a tied head)."""
    if not peft_usable(spec):
        return None
    import transformers
    from peft import PeftModel

    changes = _adapter_changes(spec, base)
    config = {**read_config(base), **changes}
    trained_on = (config.get("architectures") or [None])[0]
    prefix = getattr(getattr(transformers, str(trained_on), None), "base_model_prefix", "") or ""
    # Trained on the checkpoint's own class (ElectraForPreTraining), which verify loads as its bare
    # model (AutoModel, head_kind "encoder"): PEFT finds the adapter's keys ("electra.encoder...")
    # only on that class, and left unmatched it would run its layers' initial factors. That class is
    # loaded, and the bare model inside it runs.
    own_class = (bool(prefix) and head_kind(config) == "encoder"
                 and any(m.startswith(f"{prefix}.") for m in spec.updates))
    model = shaped_base(base, dtype, changes, model_class=trained_on if own_class else None)
    with libraries_quiet():
        peft = PeftModel.from_pretrained(model, spec.path).eval()
    inner = getattr(peft.base_model.model, prefix, None) if own_class else None  # None: a bare model itself
    return inner if isinstance(inner, nn.Module) else peft


def merged_model(plan, dtype: torch.dtype, *, resident_bytes: int | None = None, values=None) -> nn.Module:
    """d2export's merge of ``plan`` (a :class:`~d2export.plan.MergePlan`) in the base model, each
    merged tensor computed when the forward reaches it (streamed) or set up front (resident): the
    model the folder should load as, without reading the folder. ``values``: a function giving a
    planned tensor's merged value instead of computing it (verify passes the folder's own tensors
    once the weight check found every one equal to the correctly rounded value)."""
    from ..merging import merged_rows, produce
    from ..plan import Action

    value = values if values is not None else (lambda t: produce(plan, t)[0])
    model = shaped_base(plan.base.path, dtype, plan.config_updates, resident_bytes=resident_bytes)
    keys = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = {}
    for t in plan.tensors:
        # A copy under its own name, in the base's dtype, is what the base already loaded. Any other copy
        # must be set: one rounded to another dtype (merge --dtype bfloat16 of a float32 base: the model
        # runs in float32, so the base's unrounded values would stay), or one under another name, an
        # untied member of a tied group (Gemma's head when only the embedding is adapted), which the
        # base loaded with tie_word_embeddings false lacks and would leave random.
        if t.action is Action.COPY and t.name == t.source and t.out_dtype == plan.base.tensors[t.source].dtype:
            continue
        key = find_name(t.name, keys, prefix)
        if key is None:
            raise D2ExportError(f"in-memory merge: {t.name} is not a parameter of the loaded base model")
        module_path, _, param = key.rpartition(".")
        module = model.get_submodule(module_path)
        if is_streamed(module):
            rows = merged_rows(plan, t) if values is None else None  # computed at every pass: by rows
            computed = None if rows is None else {param: lambda start, stop, rows=rows: to_torch(rows(start, stop))}
            override_weights(module, {param: lambda t=t: to_torch(value(t))}, computed)
        else:
            state[key] = to_torch(value(t)).to(dtype)
    model.load_state_dict(state, strict=False)
    return model.eval()
