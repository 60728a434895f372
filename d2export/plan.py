"""Match every adapter tensor to a base tensor and check every shape before anything is written.

The result, a :class:`MergePlan`, lists each output tensor with where its value comes from, and
the output's shard layout. Anything that does not fit is a :class:`D2ExportError` naming the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from .adapter_notes import adapter_notes
from .architecture import RESCALED_WHEN_TIED, Architecture, probe_architecture
from .arrays import is_float
from .errors import D2ExportError
from .formats.saved import TokenRows
from .heads import TaskHead, shape_change, shape_updates, task_head
from .names import find_name
from .options import MergeOptions
from .reading import ModelFolder
from .spec import AdapterSpec, LayerKind, ModuleUpdate

DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' own default for save_pretrained


class Action(StrEnum):
    COPY = "copy"  # the base tensor, unchanged (bit-identical when the dtype is kept)
    MERGE = "merge"  # W' from the low-rank terms and rescaling
    UNSELECTED = "unselected"  # adapted, but the DiffoRA DAM left it out: copied like COPY
    REPLACE = "replace"  # a full tensor saved by the adapter
    BIAS = "bias"  # base bias + lora_bias


@dataclass
class TensorPlan:
    name: str  # output tensor name
    source: str  # base tensor it starts from (may differ from name for untied copies)
    shape: tuple[int, ...]
    out_dtype: np.dtype
    action: Action
    update: ModuleUpdate | None = None
    transposed: bool = False
    replacement: np.ndarray | None = None  # the adapter's full tensor (REPLACE, or W0 for MERGE)

    @property
    def nbytes(self) -> int:
        n = self.out_dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class MergePlan:
    spec: AdapterSpec
    base: ModelFolder
    arch: Architecture
    tensors: list[TensorPlan]
    shards: list[tuple[str, list[TensorPlan]]]  # (file name, tensors) in write order
    compute_dtype: np.dtype
    out_dtype: str | None = None  # every floating tensor written in this dtype; None: each keeps its own
    config_updates: dict = field(default_factory=dict)  # keys config.json gets besides the dtype
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def build_plan(spec: AdapterSpec, base: ModelFolder, options: MergeOptions | None = None, *,
               arch: Architecture | None = None) -> MergePlan:
    """Match ``spec`` against ``base`` and decide every output tensor; raises on any mismatch."""
    options = options or MergeOptions()
    out_dtype = None if options.out_dtype is None else np.dtype(options.out_dtype)
    arch = arch if arch is not None else probe_architecture(base.config)
    notes: list[str] = []
    if not arch.known:
        notes.append(f"architecture not instantiable ({arch.problem}); layouts inferred from shapes")
    resolve = _Resolver(base, arch)
    targets = _Targets.of(spec, resolve)
    head = _head(spec, base, targets)
    out_names, config_updates = _untie(base, arch, targets.touched, resolve, notes)
    tensors = []
    for name in out_names:
        source = resolve.alias.get(name, name)
        info = base.tensors[source]
        dtype = out_dtype if out_dtype is not None and is_float(info.dtype) else info.dtype
        plan = TensorPlan(name, source, info.shape, dtype, Action.COPY)
        targets.apply(plan, arch, spec, base)
        tensors.append(plan)
    updates, changed = shape_updates(spec.path, tensors, targets.reshaped, base.config)
    config_updates.update(updates)
    notes += changed
    if head is not None:
        tensors += head_tensors(head, targets.head_only, base, out_dtype)
        dropped = rename_for_head(tensors, head)
        config_updates.update(head.config_updates())
        if dropped:
            notes.append(f"left out, {head.architecture} has no place for them: {', '.join(dropped)}")
        notes.append(f"written as {head.architecture} with {head.num_labels} labels: the adapter's task head "
                     f"({', '.join(sorted(targets.head_only))}) is not in the base")
    notes += adapter_notes(spec)
    return MergePlan(
        spec=spec, base=base, arch=arch, tensors=tensors,
        shards=_shard_layout(tensors, base, options.max_shard_size),
        compute_dtype=np.dtype(options.compute_dtype), out_dtype=options.out_dtype,
        config_updates=config_updates, notes=notes,
    )


@dataclass
class _Targets:
    """What each output tensor gets from the adapter, keyed by output tensor name."""

    weights: dict[str, ModuleUpdate]
    biases: dict[str, ModuleUpdate]
    replacements: dict[str, np.ndarray]
    head_only: dict[str, np.ndarray] = field(default_factory=dict)  # full tensors the base has no place for
    # heads.shape_change's kind ("vocab", "labels") -> output name -> the base's shape
    reshaped: dict[str, dict[str, tuple[int, ...]]] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: AdapterSpec, resolve: _Resolver) -> _Targets:
        weights: dict[str, ModuleUpdate] = {}
        biases: dict[str, ModuleUpdate] = {}
        sources: dict[str, str] = {}  # base tensor -> the adapter entry that resolved to it
        for update in spec.updates.values():
            key = _claim(sources, resolve(update.weight_key, f"adapter module {update.module}"),
                         f"module {update.module}")
            weights[key] = update
            if update.bias_delta is not None:
                key = resolve(update.bias_key, f"lora_bias of {update.module}", missing=(
                    f"{update.module} has a trained lora_bias but the base module has no bias; "
                    "it cannot be merged (PEFT refuses this too)"))
                biases[_claim(sources, key, f"lora_bias of {update.module}")] = update
        replacements: dict[str, np.ndarray] = {}
        claimed: dict[str, str] = {}  # a full tensor may be the starting point of a module's merge
        head_only: dict[str, np.ndarray] = {}
        for k, v in spec.replacements.items():
            found = resolve.find(k)
            if found is None:  # a task head only the adapter has, or an error (plan._head decides)
                head_only[k] = v
                continue
            replacements[_claim(claimed, found, f"tensor {k}")] = v
        # The layers tied to an embedding (a tied lm_head) take what PEFT gives that embedding's
        # parameter unless they have their own: its token adapter's rows (PEFT ties the head to the
        # embedding's token adapter, not the other way round), or the saved base of a LoRA-wrapped
        # embedding (resized with the vocabulary: the very parameter the tied layers use)
        embeddings = {f"{m}.weight" for m in resolve.arch.embeddings}
        shared = {resolve.find(k) for k in spec.base_layer_copies} - {None}
        for group in resolve.arch.tied:
            given = [n for n in sorted(group) if n in replacements and (
                n in shared or (n in embeddings and isinstance(replacements[n], TokenRows)))]
            for name in group if given else ():
                replacements.setdefault(name, replacements[given[0]])
        return cls(weights, biases, replacements, head_only)

    @property
    def touched(self) -> set[str]:
        return set(self.weights) | set(self.biases) | set(self.replacements)

    def apply(self, plan: TensorPlan, arch: Architecture, spec: AdapterSpec, base: ModelFolder) -> None:
        """Set ``plan``'s action (and its inputs) from what the adapter does to that tensor."""
        name = plan.name
        if name in self.replacements:
            value = self.replacements[name]
            if isinstance(value, TokenRows):
                value = _bind_rows(value, plan, base)
            if tuple(value.shape) != plan.shape:
                kind = shape_change(name, tuple(value.shape), plan.shape, base.config)
                self.reshaped.setdefault(kind, {})[name] = plan.shape
            plan.action, plan.replacement, plan.shape = Action.REPLACE, value, tuple(value.shape)
            if isinstance(value, TokenRows) and name in self.weights:
                raise D2ExportError(f"{name}: trainable tokens and a LoRA update on one weight cannot be merged")
        shape = plan.shape
        if name in self.weights:
            update = plan.update = self.weights[name]
            plan.transposed = _layout(update, shape, arch, spec)
            plan.action = Action.MERGE if update.selected else Action.UNSELECTED
            if plan.action is Action.UNSELECTED:
                plan.replacement = None  # unselected modules stay exactly the base weights
        elif name in self.biases:
            update = self.biases[name]
            if shape != (update.shape[0],):
                raise D2ExportError(f"{name}: base bias has shape {shape}, lora_bias has [{update.shape[0]}]")
            plan.update = update
            if update.selected:
                plan.action = Action.BIAS


def _claim(sources: dict[str, str], key: str, what: str) -> str:
    """``key``, refused if another adapter entry already resolved to the same base tensor: one of the
    two would be silently dropped (e.g. one saved with the base-model prefix and one without)."""
    if key in sources:
        raise D2ExportError(f"adapter {sources[key]} and {what} both resolve to the base tensor {key}; "
                            "remove one of them from the adapter")
    sources[key] = what
    return key


def _untie(base: ModelFolder, arch: Architecture, touched: set[str], resolve: _Resolver,
           notes: list[str]) -> tuple[list[str], dict]:
    """The output's tensor names and config changes: a tied group the adapter touches is written
    untied (each member its own tensor), so the change does not reach the others through the tie."""
    out_names = list(base.tensors)
    config_updates: dict = {}
    for group in arch.tied:
        stored = [n for n in group if n in base.tensors]
        if not group & touched or not stored:
            continue
        if base.config.get("model_type") in RESCALED_WHEN_TIED:
            head = base.config.get("tie_word_embeddings", True) and any(n.startswith("lm_head") for n in group)
            why = ("which scales its decoder output by d_model**-0.5 only while they are tied" if head else
                   "whose code ties its shared embedding to both stacks' embed_tokens whatever config.json says")
            raise D2ExportError(
                f"the adapter changes {', '.join(sorted(group & touched))}, tied to "
                f"{', '.join(sorted(group - touched))} in a {base.config['model_type']} model, {why}: no untied "
                "folder computes the adapted model")
        for name in sorted(group - set(out_names)):
            out_names.append(name)
            resolve.alias[name] = stored[0]
        config_updates["tie_word_embeddings"] = False
        notes.append(
            f"tied weights {', '.join(sorted(group))} written untied (tie_word_embeddings=false): the adapter "
            f"changes {', '.join(sorted(group & touched))} and must not reach the others through the tie"
        )
    if config_updates:
        _check_untied(base.config, config_updates, touched)
    return out_names, config_updates


class _Resolver:
    """Maps adapter-side tensor names to base tensor names (tolerating the base-model prefix
    difference between e.g. ``BertModel`` and ``BertFor...`` checkpoints)."""

    def __init__(self, base: ModelFolder, arch: Architecture):
        self.base, self.arch = base, arch
        self.alias: dict[str, str] = {}

    def _known(self, name: str) -> bool:
        """Stored in the base, or tied to a stored tensor (not stored on its own: the plan unties it)."""
        group = self.arch.tied_group(name)
        return name in self.base.tensors or bool(group and any(n in self.base.tensors for n in group))

    def find(self, key: str) -> str | None:
        return find_name(key, self._known, self.arch.base_model_prefix)

    def __call__(self, key: str, what: str, missing: str | None = None) -> str:
        found = self.find(key)
        if found is None:
            raise D2ExportError(missing or f"{what} has no base tensor {key} in {self.base.path}")
        return found


def _layout(update: ModuleUpdate, shape: tuple[int, ...], arch: Architecture, spec: AdapterSpec) -> bool:
    """Whether the stored tensor is the canonical [out, in] transposed."""
    out, inp = update.shape
    name = update.weight_key
    if len(shape) != 2:
        raise D2ExportError(f"{name}: base tensor has shape {shape}; only 2-d weights can take a low-rank update")
    if update.kind is LayerKind.EMBEDDING:
        if shape != (inp, out):
            raise D2ExportError(f"{name}: embedding is {shape} but the adapter expects [vocab={inp}, dim={out}]")
        return True
    module = update.module
    if arch.known:
        if module in arch.embeddings:
            raise D2ExportError(f"{name}: an embedding adapted with Linear-style factors (lora_A/lora_B)")
        transposed = module in arch.conv1d
    elif out != inp:
        transposed = shape == (inp, out)
    else:
        transposed = bool(spec.config.get("fan_in_fan_out", False))
    expected = (inp, out) if transposed else (out, inp)
    if shape != expected:
        raise D2ExportError(
            f"{name}: base shape {shape} does not fit the adapter's update "
            f"[out={out}, in={inp}]{' stored [in, out] (Conv1D)' if transposed else ''}"
        )
    return transposed


def _check_untied(config: dict, updates: dict, touched: set[str]) -> None:
    """Untying through the config must really untie: re-instantiate with it and look."""
    after = probe_architecture({**config, **updates})
    for group in after.tied:
        if group & touched:
            raise D2ExportError(
                f"the adapter changes {sorted(group & touched)}, tied to {sorted(group - touched)}, "
                "and this architecture cannot be untied through tie_word_embeddings"
            )


def _shard_layout(tensors: list[TensorPlan], base: ModelFolder, max_shard_size: int | None
                  ) -> list[tuple[str, list[TensorPlan]]]:
    """The base's own layout (same files, same grouping; a ``.bin`` base's files named as
    safetensors ones: ``pytorch_model-00001-of-00002.bin`` -> ``model-00001-of-00002.safetensors``)
    unless a maximum shard size is given."""
    if max_shard_size is None:
        groups: dict[str, list[TensorPlan]] = {f: [] for f in base.files}
        for t in tensors:  # a tensor the base lacks (an adapter-only head) goes with the last file's
            groups[base.tensors[t.source].file if t.source in base.tensors else base.files[-1]].append(t)
        return [(_safetensors_name(f), g) for f, g in groups.items() if g]
    limit = max_shard_size if max_shard_size is not None else DEFAULT_SHARD_SIZE
    chunks: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        if chunks[-1] and size + t.nbytes > limit:
            chunks.append([])
            size = 0
        chunks[-1].append(t)
        size += t.nbytes
    if len(chunks) == 1:
        return [("model.safetensors", chunks[0])]
    n = len(chunks)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", c) for i, c in enumerate(chunks)]


def _safetensors_name(file: str) -> str:
    if file.endswith(".safetensors"):
        return file
    stem = file.removesuffix(".bin")
    return ("model" + stem.removeprefix("pytorch_model") if stem.startswith("pytorch_model") else stem) + ".safetensors"


def _bind_rows(value: TokenRows, plan: TensorPlan, base: ModelFolder) -> TokenRows:
    """Trainable tokens over the base's own tensor (read when the merge reaches it), their rows checked."""
    if value.needs_base:
        source = plan.source
        value = value.over(lambda: base.read(source), plan.shape, base.tensors[source].dtype)
    if len(value.shape) != 2 or value.values.shape[1] != value.shape[1] or int(value.indices.max()) >= value.shape[0]:
        raise D2ExportError(f"{plan.name}: trainable tokens ({len(value.indices)} rows of width "
                            f"{value.values.shape[1]}, up to id {int(value.indices.max())}) do not fit {value.shape}")
    return value


def _head(spec: AdapterSpec, base: ModelFolder, targets: _Targets) -> TaskHead | None:
    """The task head the adapter brings, when some of its full tensors have no base tensor."""
    if not targets.head_only:
        return None
    head = task_head(spec, base.config, {k: tuple(v.shape) for k, v in targets.head_only.items()})
    if head is None:
        key = sorted(targets.head_only)[0]
        raise D2ExportError(f"adapter tensor {key} has no base tensor {key} in {base.path}")
    return head


def head_tensors(head: TaskHead, head_only: dict, base: ModelFolder, out_dtype: np.dtype | None) -> list[TensorPlan]:
    """The head's tensors, written in the base's floating dtype (or the one asked for)."""
    floats = [i.dtype for i in base.tensors.values() if is_float(i.dtype)]
    dtype = out_dtype if out_dtype is not None else (floats[0] if floats else None)
    return [TensorPlan(name, "", tuple(value.shape), dtype if dtype is not None and is_float(value.dtype)
                       else value.dtype, Action.REPLACE, replacement=value)
            for name, value in sorted(head_only.items())]


def rename_for_head(tensors: list[TensorPlan], head: TaskHead) -> list[str]:
    """Every tensor under the head model's name (base tensors gain its prefix: a head model's
    checkpoint mixing prefixed and bare names does not load), and none of the head model's missing.
    Base tensors the head model has no place for (BertModel's pooler under a token classifier) are
    left out, as the head model's own save leaves them out; their names are returned."""
    dropped = []
    for t in list(tensors):
        name = find_name(t.name, head.shapes, head.prefix)
        if name is None and t.action is Action.COPY:
            tensors.remove(t)
            dropped.append(t.name)
            continue
        if name is None:
            raise D2ExportError(f"{t.name} has no place in {head.architecture}, and the adapter changes it")
        t.name = name
    missing = sorted(set(head.shapes) - {t.name for t in tensors})
    if missing:
        raise D2ExportError(f"{head.architecture} would lack {', '.join(missing)}: neither the base nor the adapter "
                            "has it")
    return dropped
