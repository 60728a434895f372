"""Streamed models read their linear layers and embeddings by rows (runtime/rows.py,
``_ByRows``), the unmerged model's adapter layers and the correctly rounded merge computed at
every pass included: no whole weight is held, an embedding reads the same values, and what verify
requires to be equal to the bit still is, with blocks of a few rows (the tiny fixtures' layers
fit one block of the default size)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from d2export import verify
from d2export.runtime import rows, streaming
from d2export.runtime.calibration import config_batches
from d2export.runtime.models import load_model, model_output

FEW_ROWS = 512  # bytes of a 16-bit row block: 4 rows of the fixtures' 64 features


@pytest.fixture
def few_rows(monkeypatch):
    """Row blocks of a few rows, and the blocks read from files, taken from memory and computed,
    counted."""
    monkeypatch.setattr(streaming, "READ_CHUNK", FEW_ROWS)
    counts = {"file": 0, "memory": 0, "computed": 0}
    for cls, kind in ((rows._FileRows, "file"), (rows._TensorRows, "memory"),
                      (rows._ComputedRows, "computed")):
        def counted(self, start, stop, block=cls.block, kind=kind):
            counts[kind] += 1
            return block(self, start, stop)
        monkeypatch.setattr(cls, "block", counted)
    return counts


def _pooled(model: nn.Module) -> set[int]:
    """The numbers of dimensions of the weights a streamed model's pool holds whole (row blocks and
    the read buffer aside, which it must hold)."""
    pool = next(h.weights_map.pool for m in model.modules() for h in streaming.offload_hooks(m)
                if isinstance(h.weights_map, streaming._Reused))
    slots = [slot for slot in pool if isinstance(slot, tuple)]
    assert {"rows", "raw"} <= {kind for kind, _ in slots}
    return {len(shape) for kind, shape in slots if kind not in ("rows", "raw")}


def test_a_streamed_model_holds_no_whole_weight_and_embeds_the_same_rows(merged, few_rows):
    """A bf16 folder run in float32, streamed: its pool of buffers never holds a whole matrix (only
    row blocks and the norms' vectors); the embedding gives the whole model's values to the bit,
    and the logits are the whole model's up to float32 rounding (a block of output features is a
    narrower product, which BLAS may sum in another order)."""
    _, out = merged("d2lora-llama-bf16")
    whole, streamed = load_model(out, torch.float32), load_model(out, torch.float32, resident_bytes=1)
    embedded = {}
    for name, model in (("whole", whole), ("streamed", streamed)):
        model.get_input_embeddings().register_forward_hook(
            lambda _m, _a, output, name=name: embedded.__setitem__(name, output))
    for batch in config_batches(whole.config.to_dict()):
        torch.testing.assert_close(model_output(streamed, batch), model_output(whole, batch))
        assert torch.equal(embedded["streamed"], embedded["whole"])
    assert few_rows["file"] > 2 * sum(isinstance(m, nn.Linear) for m in streamed.modules())
    assert _pooled(streamed) == {1}  # norms only


@pytest.mark.parametrize("name", ["d2lora-llama-bf16", "lora-llama-tied"])
def test_the_folder_and_the_correctly_rounded_merge_stay_equal_with_weights_read_by_rows(merged, few_rows, name):
    """The loading rung requires the folder's outputs to equal the correctly rounded merge's: with
    every linear layer computed in blocks of a few rows, from the folder's file in one model and
    from memory in the other, they are still equal to the bit."""
    folder, out = merged(name)
    report = verify(out, folder / "adapter", base=folder / "base", resident=1)
    loading = [o for o in report.outputs if o.rung == "loading"]
    assert report.passed, report.failures
    assert loading and all(o.comparison.max_abs == 0.0 for o in loading)
    assert few_rows["file"] and few_rows["memory"]


def test_the_unmerged_model_reads_its_adapted_weights_by_rows_too(fixture, few_rows):
    """The run-time adapter layers of a streamed model take the base's product and the rows' norms
    (D2-LoRA rescales rows) from the weight read by rows, not loaded whole: row scales and outputs
    equal to the whole model's up to float32 rounding, and no whole matrix in the pool."""
    from d2export.job import prepare
    from d2export.runtime.layers import AdapterLayer
    from d2export.runtime.models import unmerged_model

    folder = fixture("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job:
        batches = config_batches(job.base.config)
        whole = unmerged_model(job.base.path, job.spec, torch.float32)
        streamed = unmerged_model(job.base.path, job.spec, torch.float32, resident_bytes=1)
    for batch in batches:
        torch.testing.assert_close(model_output(streamed, batch), model_output(whole, batch))
    layers = [[m for m in model.modules() if isinstance(m, AdapterLayer)] for model in (whole, streamed)]
    assert layers[1] and all(layer.by_rows is not None for layer in layers[1])
    for w, s in zip(*layers, strict=True):  # its norms' low-rank rows taken a few at a time
        torch.testing.assert_close(w.row_scale(), s.row_scale())
    assert _pooled(streamed) == {1}


def test_a_streamed_embedding_refuses_an_id_outside_its_rows_as_a_whole_one_does(merged):
    """Read by rows, an id past the vocabulary would read another tensor's bytes: it is refused as
    torch's embedding refuses it."""
    _, out = merged("d2lora-llama-bf16")
    streamed = load_model(out, torch.float32, resident_bytes=1)
    embedding = streamed.get_input_embeddings()
    assert isinstance(embedding.forward, rows._ByRows)
    with pytest.raises(IndexError, match="index out of range"):
        embedding(torch.tensor([[1, embedding.num_embeddings]]))


def test_the_correctly_rounded_merge_computed_at_every_pass_is_computed_by_rows(fixture, few_rows):
    """Where verify cannot take the folder's tensors, the correctly rounded merge is computed at
    every pass over the model: streamed, a block of merged rows at a time from the base's rows
    (merging.merged_rows), never a whole merged weight; its outputs are the whole merge's up to
    float32 rounding."""
    from d2export.job import prepare
    from d2export.runtime.models import merged_model

    folder = fixture("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job:
        batches = config_batches(job.base.config)
        whole = merged_model(job.plan, torch.float32)
        streamed = merged_model(job.plan, torch.float32, resident_bytes=1)
        for batch in batches:
            torch.testing.assert_close(model_output(streamed, batch), model_output(whole, batch))
    adapted = sum(t.update is not None for t in job.plan.tensors)
    assert few_rows["computed"] > 2 * adapted
    assert _pooled(streamed) == {1}
