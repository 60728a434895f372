"""The run-time adapter layer answers as the module it wraps and computes the merged formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2export.runtime.layers import AdapterLayer
from d2export.spec import Rescale


@pytest.mark.parametrize("base", [nn.Linear(6, 4), nn.Linear(6, 4, bias=False), nn.Embedding(10, 4)])
def test_layer_exposes_the_wrapped_modules_attributes(base):
    layer = AdapterLayer(base, rank=2, scale=1.0)
    assert layer.weight is base.weight
    if isinstance(base, nn.Linear):
        assert layer.bias is base.bias and layer.in_features == 6 and layer.out_features == 4
    else:
        assert layer.num_embeddings == 10 and layer.padding_idx is None
    with pytest.raises(AttributeError):
        _ = layer.no_such_attribute


def test_forward_equals_the_merged_weight():
    torch.manual_seed(0)
    base = nn.Linear(6, 4).double()
    layer = AdapterLayer(base, rank=2, scale=0.5, branches=("pos", "neg"), rescale=Rescale.ORIGINAL_NORM, tau=0.3)
    layer = layer.double()
    with torch.no_grad():
        for b in layer.branches:
            layer.A[b].normal_()
            layer.B[b].normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    v = base.weight + 0.5 * (layer.B["pos"] @ layer.A["pos"]) - 0.3 * 0.5 * (layer.B["neg"] @ layer.A["neg"])
    merged = v * (base.weight.norm(dim=1) / v.norm(dim=1))[:, None]
    torch.testing.assert_close(layer(x), x @ merged.T + base.bias, rtol=1e-6, atol=1e-6)


def _d2lora_pair(seed: int = 0):
    """A training layer and a fixed one (as read from files) over the same base and factors."""
    torch.manual_seed(seed)
    base = nn.Linear(6, 5).double()
    layers = [AdapterLayer(base, rank=2, scale=0.5, branches=("pos", "neg"), rescale=Rescale.ORIGINAL_NORM, tau=0.3,
                           fixed=fixed).double() for fixed in (False, True)]
    with torch.no_grad():
        for b in layers[0].branches:
            layers[0].A[b].normal_()
            layers[0].B[b].normal_()
            layers[1].A[b].copy_(layers[0].A[b])
            layers[1].B[b].copy_(layers[0].B[b])
    return layers


@pytest.mark.parametrize("chunk", [None, 6, 13])  # the norms whole, a row at a time, two rows at a time
def test_a_fixed_layer_keeps_its_row_scale_and_a_training_layer_follows_its_factors(monkeypatch, chunk):
    from d2export.runtime import layers as layers_module

    if chunk is not None:
        monkeypatch.setattr(layers_module, "NORM_CHUNK_ELEMENTS", chunk)
    training, fixed = _d2lora_pair()
    assert fixed.original_norm is None  # a streamed base has no values yet: taken at the first forward
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(training(x), fixed(x))
        assert torch.equal(fixed.original_norm, training.original_norm)
        kept = fixed.row_scale()
        assert fixed.row_scale() is kept  # computed once
        training.A["pos"].mul_(2.0)  # a training step
        fixed.A["pos"].mul_(2.0)  # never happens to a fixed layer: it keeps the scale it had
        A, B = training.A, training.B
        v = training.weight + 0.5 * (B["pos"] @ A["pos"]) - 0.15 * (B["neg"] @ A["neg"])
        merged = v * (training.weight.norm(dim=1) / v.norm(dim=1))[:, None]
        # (the original norms are kept in float32, as the constructor always kept them)
        torch.testing.assert_close(training(x), x @ merged.T + training.bias, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(training.row_scale(), kept, rtol=1e-3)  # the step moved the scale
        assert fixed.row_scale() is kept


def test_a_layer_from_files_holds_the_adapters_own_float32_factors(fixture):
    """The reader keeps small factors in memory as float32 arrays: the run-time layer takes them as
    they are (no second copy beside the running model), and its product is unchanged."""
    import numpy as np

    from d2export.job import prepare
    from d2export.runtime.models import unmerged_model

    folder = fixture("lora-llama")
    with prepare(folder / "adapter", folder / "base") as job:
        model = unmerged_model(job.base.path, job.spec, torch.float32)
        layers = {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}
        shared = 0
        for update in job.spec.updates.values():
            layer = next(m for n, m in layers.items() if n.endswith(update.module))
            for term in update.terms:
                for kept, param in ((term.A, layer.A[term.name]), (term.B, layer.B[term.name])):
                    assert torch.equal(param, torch.from_numpy(np.asarray(kept, dtype=np.float32)))
                    if isinstance(kept, np.ndarray) and kept.dtype == np.float32:
                        assert param.data_ptr() == kept.ctypes.data
                        shared += 1
        assert shared


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_streamed_model_reads_the_factors_its_reader_left_in_the_file_at_each_forward(fixture, monkeypatch, dtype):
    """A streamed base's adapter layers hold no factor the adapter's reader left in its file (their
    parameters are placeholders on the meta device) and read them at each forward, with the same
    outputs to the bit as the layers holding them."""
    from d2export.formats import stored
    from d2export.job import prepare
    from d2export.runtime import layers as layers_module
    from d2export.runtime.calibration import config_batches
    from d2export.runtime.models import model_output, unmerged_model

    monkeypatch.setattr(stored, "KEEP_BYTES", 0)  # every factor a file reference, as large ones are
    folder = fixture("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job:
        batch = config_batches(job.base.config)[1]
        streamed = unmerged_model(job.base.path, job.spec, dtype, resident_bytes=1)
        adapted = [m for m in streamed.modules() if isinstance(m, AdapterLayer)]
        assert adapted and all(len(m.stored) == 2 * len(m.branches) for m in adapted)
        assert all(p.is_meta for m in adapted for p in [*m.A.values(), *m.B.values()])
        assert all(p.dtype == dtype for m in adapted for p in m.A.values())
        got = model_output(streamed, batch)
        from_update = AdapterLayer.from_update.__func__
        monkeypatch.setattr(layers_module.AdapterLayer, "from_update", classmethod(
            lambda cls, base, update, **kwargs: from_update(cls, base, update, **{**kwargs, "stream": False})))
        held = unmerged_model(job.base.path, job.spec, dtype, resident_bytes=1)
        assert not any(m.stored for m in held.modules() if isinstance(m, AdapterLayer))
        assert torch.equal(got, model_output(held, batch))
