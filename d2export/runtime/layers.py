"""Run-time (unmerged) adapter layers: the forward pass training computes, as a reference.

``AdapterLayer`` wraps a base ``nn.Linear``, GPT-2 ``Conv1D`` or ``nn.Embedding`` and computes

    y = g * (base(x) + sum_t c_t * lowrank_t(x)) + b         g = m / ||W0 + dW||_row  (or 1)

without ever forming the merged weight in the output path: the low-rank paths run as two thin
matmuls, as during training. fixtures/build.py trains the D2-LoRA fixtures with the same class.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arrays import to_torch
from ..formats.stored import StoredTensor
from ..names import name_variants
from ..spec import AdapterSpec, ModuleUpdate, Rescale
from .rows import by_rows
from .streaming import hoist, is_streamed, materialized, override_weights

# Elements per block of the reference row norms, worked in one float64 scratch buffer per call:
# 512 KB, so that it and the temporaries of the product and the norm stay below the size from which
# verify's heap maps blocks afresh (cli.process.tune_malloc), where each would be page-faulted at
# every block (docs/design.md §6, *Cost*).
NORM_CHUNK_ELEMENTS = 2**16


def _factor(value, placeholder: nn.Parameter) -> nn.Parameter:
    """A factor as the layer's parameter: the adapter's own float32 array where it is one (the
    reader keeps small factors in memory, and a copy of each doubled them beside the running model),
    else a float32 copy of it."""
    tensor = to_torch(np.asarray(value))
    _check_shape(tensor.shape, placeholder)
    return nn.Parameter(tensor.float(), requires_grad=placeholder.requires_grad)


def _check_shape(shape, placeholder: nn.Parameter) -> None:
    if tuple(shape) != tuple(placeholder.shape):
        raise ValueError(f"factor of shape {tuple(shape)} where {tuple(placeholder.shape)} is expected")


class AdapterLayer(nn.Module):
    """One adapted module. Factors are canonical: ``B_t: [out, r]``, ``A_t: [r, in]``."""

    def __init__(self, base: nn.Module, *, rank: int, scale: float, branches=("lora",),
                 rescale: Rescale = Rescale.NONE, tau: float | None = None, learn_tau: bool = False,
                 reference_norms: bool = True, fixed: bool = False):
        super().__init__()
        self.base = base
        # True: row norms in float64 (the accuracy reference verify compares against). False: in the
        # weight dtype, as DoRA / D2-LoRA training and evaluation code computes them (what the
        # benchmark times, so the unmerged model costs what users' unmerged models cost).
        self.reference_norms = reference_norms
        # ``fixed``: nothing changes the weights or factors after the first forward (a model built
        # from files to be run), so the reference row scale is computed once and kept. Training
        # (fixtures) builds layers without it and gets the scale of the current factors every time.
        self.fixed = fixed
        self._kept_scale: torch.Tensor | None = None
        # the base's forward that reads a streamed weight by rows (rows.by_rows), used here in
        # place of the whole weight; None: ``base.weight`` is there whenever this layer runs
        self.by_rows = None
        self.embedding = isinstance(base, nn.Embedding)
        self.transposed = self.embedding or type(base).__name__ == "Conv1D"
        out, inp = self._canonical_weight().shape
        self.scale = scale
        self.branches = tuple(branches)
        self.rescale = rescale
        self.A = nn.ParameterDict({b: nn.Parameter(torch.zeros(rank, inp)) for b in self.branches})
        self.B = nn.ParameterDict({b: nn.Parameter(torch.zeros(out, rank)) for b in self.branches})
        # factors left in the adapter's file, read at each use (their parameters are placeholders
        # on the meta device, for their shape and dtype): see ``from_update``
        self.stored: dict[tuple[str, str], StoredTensor] = {}
        self.tau = None if tau is None else nn.Parameter(torch.tensor(float(tau)), requires_grad=learn_tau)
        self.magnitude = nn.Parameter(torch.ones(out)) if rescale is Rescale.MAGNITUDE else None
        self.bias_delta: nn.Parameter | None = None
        if rescale is Rescale.ORIGINAL_NORM:
            # a fixed layer's base may be streamed (its weight not loaded yet): it takes the norms
            # at its first forward, when the weight is there anyway, instead of reading it now
            self.register_buffer("original_norm", None if fixed else self._row_norms().float(),
                                 persistent=False)

    def __getattr__(self, name: str):
        """What the wrapped module has (``weight``, ``bias``, ``in_features``, ...): model code reads
        these off the layer it calls (T5 checks ``wo.weight.dtype``), so the layer must answer as
        the module it wraps does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(super().__getattr__("base"), name)

    @classmethod
    def from_update(cls, base: nn.Module, update: ModuleUpdate, *, reference_norms: bool = True,
                    stream: bool = False) -> AdapterLayer:
        """The layer of an adapter read from its files, to be run (``fixed``). ``stream`` (the base
        module's weight is read from its file at each forward): factors the adapter's reader left in
        its file stay there and are read at each forward too (docs/design.md §6, *Bounded memory*).
        A module held in memory keeps its factors in memory, so that a model held whole costs what
        users' unmerged models cost (the benchmark times it)."""
        names = tuple(t.name for t in update.terms)
        scale = update.terms[0].coefficient
        tau = -update.terms[1].coefficient / scale if len(update.terms) == 2 else None
        layer = cls(base, rank=update.rank, scale=scale, branches=names, rescale=update.rescale, tau=tau,
                    reference_norms=reference_norms, fixed=True)
        with torch.no_grad():
            for term in update.terms:
                for kind, value in (("A", term.A), ("B", term.B)):
                    factors = getattr(layer, kind)
                    if stream and isinstance(value, StoredTensor):
                        _check_shape(value.shape, factors[term.name])
                        factors[term.name] = nn.Parameter(factors[term.name].to("meta"), requires_grad=False)
                        layer.stored[kind, term.name] = value
                    else:
                        factors[term.name] = _factor(value, factors[term.name])
            if update.magnitude is not None:
                layer.magnitude.copy_(to_torch(update.magnitude))
        if update.bias_delta is not None:
            layer.bias_delta = nn.Parameter(to_torch(update.bias_delta).float(), requires_grad=False)
        return layer

    def _canonical_weight(self) -> torch.Tensor:
        w = self.base.weight
        return w.T if self.transposed else w

    def coefficient(self, branch: str) -> torch.Tensor | float:
        return -self.tau * self.scale if branch == "neg" else self.scale

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each branch's ``(A, B)``, those left in the adapter's file read now."""
        return {b: (self._held_or_read("A", b), self._held_or_read("B", b)) for b in self.branches}

    def _held_or_read(self, kind: str, branch: str) -> torch.Tensor:
        parameter = getattr(self, kind)[branch]
        stored = self.stored.get((kind, branch))
        return parameter if stored is None else to_torch(stored.read()).to(parameter.dtype)

    def delta(self, rows: slice = slice(None), factors=None) -> torch.Tensor:
        """The canonical low-rank update, of ``rows`` (only used for the row norms, as DoRA does).
        ``factors``: :meth:`factors`, read once by a caller that asks for many row blocks."""
        factors = self.factors() if factors is None else factors
        return sum(self.coefficient(b) * (B[rows] @ A) for b, (A, B) in factors.items())

    def row_scale(self) -> torch.Tensor | None:
        if self.rescale is Rescale.NONE:
            return None
        if not self.reference_norms:
            return self._row_scale_in_weight_dtype()
        if self._kept_scale is not None:
            return self._kept_scale
        # norms of the adapted rows in float64, so the reference itself adds no rounding worth speaking of
        factors = self.factors()
        norms = self._row_norms(lambda rows: self.delta(rows, factors))
        scale = (self._target().double() / norms).to(self.base.weight.dtype)
        if self.fixed and not torch.is_grad_enabled():
            self._kept_scale = scale
        return scale

    @torch.no_grad()  # DoRA and D2-LoRA treat the norms as constants in the backward pass
    def _row_norms(self, delta=None) -> torch.Tensor:
        """float64 norms of the rows of the canonical weight plus ``delta(rows)`` (None: of the
        weight), a few rows at a time: float64 copies of a whole 7B weight are over a GB."""
        w = self._canonical_weight().detach()
        out, width = w.shape
        norms = torch.empty(out, dtype=torch.float64)
        step = max(1, NORM_CHUNK_ELEMENTS // max(1, width))
        scratch = torch.empty((min(step, out), width), dtype=torch.float64)
        source = None if self.by_rows is None else self.by_rows.rows()
        # rows read at once: whole norm steps, so that each norm is taken over the rows it is taken
        # over from a whole weight
        block = out if source is None else (self.by_rows.step // step * step or self.by_rows.step)
        for first in range(0, out, block):
            end = min(first + block, out)
            held = w if source is None else source.block(first, end)
            for start in range(first, end, step):
                rows = slice(start, min(start + step, end))
                v = scratch[: rows.stop - start]
                v.copy_(held[start - first: rows.stop - first])
                if delta is not None:
                    v.add_(delta(rows))  # in float64, the float32 delta converted exactly
                torch.linalg.vector_norm(v, dim=1, out=norms[rows])
        return norms

    def _target(self) -> torch.Tensor:
        """What the rows are rescaled to: DoRA's learned magnitude, or D2-LoRA's original row norms."""
        if self.magnitude is not None:
            return self.magnitude
        if self.original_norm is None:
            self.original_norm = self._row_norms().float()
        return self.original_norm

    def _row_scale_in_weight_dtype(self) -> torch.Tensor:
        dtype = self.base.weight.dtype
        v = self._canonical_weight() + self.delta().to(dtype)
        norms = torch.linalg.vector_norm(v, dim=1).detach()
        return self._target().to(dtype) / norms

    def _embed_scale(self) -> torch.Tensor | None:
        """The scalar a scaled word embedding (Gemma3's, BART's with ``scale_embedding``) multiplies
        its rows by in its own forward, which this layer's forward replaces: it scales the update
        too, as in the merged embedding's forward and in PEFT's (``_get_embed_scale``)."""
        scale = getattr(self.base, "embed_scale", None)
        if isinstance(scale, int | float):
            return torch.tensor(float(scale))
        return scale if isinstance(scale, torch.Tensor) and scale.numel() == 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        factors = self.factors()
        if self.embedding:
            base = self.base
            y = F.embedding(x, base.weight, base.padding_idx, base.max_norm, base.norm_type,
                            base.scale_grad_by_freq, base.sparse)
            for b, (A, B) in factors.items():
                y = y + self.coefficient(b) * (F.embedding(x, A.T) @ B.T)
            bias = None
        else:
            if self.by_rows is not None:
                y, bias = self.by_rows.product(x, self.by_rows.rows()), self.by_rows.bias()
            else:
                bias = self.base.bias
                y = x @ self.base.weight if self.transposed else F.linear(x, self.base.weight)
            for b, (A, B) in factors.items():
                y = y + self.coefficient(b) * ((x @ A.T) @ B.T)
        del factors
        g = self.row_scale()
        if g is not None:
            y = y * g
        embed_scale = self._embed_scale() if self.embedding else None
        if embed_scale is not None:
            y = y * embed_scale.to(y.dtype)
        if bias is not None:
            y = y + bias
        if self.bias_delta is not None:
            y = y + self.scale * self.bias_delta
        return y


def _with_rows(weight: torch.Tensor, tokens) -> torch.Tensor:
    """A copy of ``weight`` with the rows of a trainable-tokens adapter (``tokens.indices``,
    ``tokens.values``) set."""
    rows = weight.detach().clone()
    rows[torch.as_tensor(tokens.indices)] = to_torch(tokens.values).to(rows.dtype)
    return rows


def _resolve_module(model: nn.Module, path: str) -> tuple[str, nn.Module]:
    for candidate in name_variants(path, getattr(model, "base_model_prefix", "") or ""):
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    raise KeyError(f"module {path} not found in the model")


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject_adapter(model: nn.Module, spec: AdapterSpec, *, reference_norms: bool = True) -> nn.Module:
    """Apply ``spec`` to ``model`` at run time, in place: full tensors replace the model's (untied
    from whatever they were tied to), selected modules get an :class:`AdapterLayer`.
    ``reference_norms=False``: rescaling norms in the model dtype (see :class:`AdapterLayer`)."""
    owned = {f"{_resolve_module(model, n.rpartition('.')[0])[0]}.{n.rpartition('.')[2]}" for n in spec.replacements}
    for name, value in spec.replacements.items():
        module_path, _, param = name.rpartition(".")
        path, module = _resolve_module(model, module_path)
        if is_streamed(module):  # its tensors are read at each forward: replace what is read
            if getattr(value, "needs_base", False):  # trainable tokens: the base's rows, some replaced
                with materialized(module):
                    rows = _with_rows(getattr(module, param), value)
                override_weights(module, {param: lambda rows=rows: rows})
            else:
                override_weights(module, {param: lambda value=value: to_torch(value)})
            continue
        old = getattr(module, param)
        tokens = getattr(value, "needs_base", False)
        if tokens:  # trainable tokens over the base's own weight: its rows replaced
            new = nn.Parameter(_with_rows(old, value), requires_grad=False)
        else:
            new = nn.Parameter(to_torch(value).to(old.dtype).clone(), requires_grad=False)
        if tokens or name in spec.base_layer_copies:
            # PEFT ties a layer sharing the embedding's weight (a tied lm_head) to the embedding's token
            # adapter, and to a LoRA-wrapped embedding's base (the same parameter): it takes the same
            # values unless the adapter gives it its own
            for shared, p in model.named_parameters(remove_duplicate=False):
                if isinstance(module, nn.Embedding) and p is old and shared not in owned:
                    owner, _, attr = shared.rpartition(".")
                    setattr(model.get_submodule(owner), attr, new)
        setattr(module, param, new)
    for update in spec.updates.values():
        if not update.selected:
            continue
        path, module = _resolve_module(model, update.module)
        # built from the module's shape and dtype, which a streamed module has without its values
        layer = AdapterLayer.from_update(module, update, reference_norms=reference_norms, stream=is_streamed(module))
        layer.to(module.weight.dtype)
        set_module(model, path, layer)
        # a streamed weight read by rows, as the merged models read it; else loaded whole around the
        # layer's forward (the norms in the weight's dtype take the whole weight)
        layer.by_rows = by_rows(module) if reference_norms else None
        if layer.by_rows is None:
            hoist(layer, module)
    return model


__all__ = ["AdapterLayer", "inject_adapter"]
