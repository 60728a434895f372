"""The fast paths of the merge give the same bytes as the plain float64 merge: the float32 products
with their proven bound (d2export.blocks) on values built to sit next to rounding boundaries, the
row-block pipeline over threads, hashing what is read, and adapter factors read on use."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import correctly_rounded
from safetensors.numpy import save_file

import d2export.blocks as blocks
import d2export.merging as merging
from d2export import load_adapter, merge
from d2export.algebra import MergeError
from d2export.arrays import bfloat16, float16, float32, float64
from d2export.blocks import merge_block, prepare_factors
from d2export.formats.stored import StoredTensor
from d2export.spec import LayerKind, LowRankTerm, ModuleUpdate, Rescale
from d2export.writing import ReadHashes

OUT, IN, RANK = 48, 40, 4


def _factors(rng, out=OUT, inp=IN, rank=RANK):
    return (LowRankTerm("pos", 2.0, rng.standard_normal((out, rank)).astype(np.float32) * 0.01,
                        rng.standard_normal((rank, inp)).astype(np.float32) * 0.1),
            LowRankTerm("neg", -0.75, rng.standard_normal((out, rank)).astype(np.float32) * 0.01,
                        rng.standard_normal((rank, inp)).astype(np.float32) * 0.1))


def _delta(terms) -> np.ndarray:
    return sum(t.coefficient * (t.B.astype(float64) @ t.A.astype(float64)) for t in terms)


def _halfway_grid(rng, shape, dtype) -> np.ndarray:
    """float64 halfway points of ``dtype`` (between two neighbours) spread over many binades."""
    low = (rng.standard_normal(shape) * 2.0 ** rng.integers(-12, 4, shape)).astype(dtype)
    high = np.nextafter(low.astype(float32), np.float32(np.inf)).astype(dtype)
    high = np.where(high == low, (low.astype(float64) * (1 + 2**-6)).astype(dtype), high)
    for _ in range(20):  # step up to the next value of dtype, float32 steps at a time
        same = high == low
        if not same.any():
            break
        high = np.where(same, np.nextafter(high.astype(float32), np.float32(np.inf)).astype(dtype), high)
    return (low.astype(float64) + high.astype(float64)) / 2


def _adversarial(rng, dtype, rescale):
    """An update and a float32 base whose exact merge lies within a float32 ulp or so of a halfway
    point of ``dtype`` in nearly every element, on either side: where a float32 result cannot tell."""
    terms = _factors(rng)
    delta = _delta(terms)
    target = _halfway_grid(rng, (OUT, IN), dtype)
    g = 1.0 + rng.random(OUT) if rescale is Rescale.MAGNITUDE else np.ones(OUT)
    w0 = (target / g[:, None] - delta).astype(float32)  # rounding to float32 moves V by < 1 ulp
    magnitude = None
    if rescale is Rescale.MAGNITUDE:
        v = w0.astype(float64) + delta
        magnitude = (g * np.sqrt(np.einsum("ij,ij->i", v, v))).astype(float32)
    return w0, ModuleUpdate("m", LayerKind.LINEAR, terms, rescale=rescale, magnitude=magnitude, rank=RANK)


def _exact(w0: np.ndarray, update: ModuleUpdate) -> np.ndarray:
    """Independent float64 (torch) merge of the canonical [out, in] ``w0``."""
    v = torch.from_numpy(w0.astype(float64)) + torch.from_numpy(_delta(update.terms))
    if update.rescale is Rescale.MAGNITUDE:
        v = v * (torch.from_numpy(update.magnitude.astype(float64)) / v.norm(dim=1)).unsqueeze(1)
    elif update.rescale is Rescale.ORIGINAL_NORM:
        v = v * (torch.from_numpy(w0.astype(float64)).norm(dim=1) / v.norm(dim=1)).unsqueeze(1)
    return v


def _merge(w0, update, dtype, fast: bool, monkeypatch) -> tuple[np.ndarray, int]:
    monkeypatch.setattr(blocks, "FLOAT32_PRODUCTS", fast)
    factors = prepare_factors(update, w0.dtype, dtype)
    assert factors.fast is fast
    block = merge_block(w0, update, factors, slice(0, w0.shape[0]), dtype, "m")
    return block.value, block.recomputed


@pytest.mark.parametrize("dtype", [bfloat16, float16])
@pytest.mark.parametrize("rescale", [Rescale.NONE, Rescale.MAGNITUDE, Rescale.ORIGINAL_NORM])
def test_float32_path_is_correctly_rounded_on_halfway_cases(dtype, rescale, monkeypatch):
    rng = np.random.default_rng(7)
    w0, update = _adversarial(rng, dtype, Rescale.MAGNITUDE if rescale is Rescale.MAGNITUDE else Rescale.NONE)
    if rescale is Rescale.ORIGINAL_NORM:  # D2-LoRA's rescaling, on the same near-boundary base
        update = ModuleUpdate("m", LayerKind.LINEAR, update.terms, rescale=rescale, rank=RANK)
    fast, recomputed = _merge(w0, update, dtype, True, monkeypatch)
    slow, _ = _merge(w0, update, dtype, False, monkeypatch)
    exact = _exact(w0, update)
    torch_dtype = torch.bfloat16 if dtype == bfloat16 else torch.float16
    ours = torch.from_numpy(fast.view(np.int16)).view(torch_dtype)
    finite = exact.abs() < torch.finfo(torch_dtype).max
    assert correctly_rounded(exact[finite], ours[finite]).all()
    assert np.array_equal(fast.view(np.uint16), slow.view(np.uint16))
    if rescale is not Rescale.ORIGINAL_NORM:
        # the cases are adversarial: the bound sends most elements to float64, and a float32
        # merge rounded to the 16-bit type gets many of them wrong
        assert recomputed > fast.size // 2
        naive = torch.from_numpy(w0.astype(float64) + _delta(update.terms).astype(float32)).float()
        if rescale is Rescale.NONE:
            assert not correctly_rounded(exact, naive.to(torch_dtype)).all()


@pytest.mark.parametrize("dtype", [bfloat16, float16])
def test_float32_path_recomputes_few_elements_on_ordinary_weights(dtype, monkeypatch):
    rng = np.random.default_rng(3)
    terms = _factors(rng, 256, 512, 8)
    update = ModuleUpdate("m", LayerKind.LINEAR, terms, rescale=Rescale.ORIGINAL_NORM, rank=8)
    w0 = (rng.standard_normal((256, 512)) * 0.02).astype(dtype)
    fast, recomputed = _merge(w0, update, dtype, True, monkeypatch)
    slow, _ = _merge(w0, update, dtype, False, monkeypatch)
    assert np.array_equal(fast.view(np.uint16), slow.view(np.uint16))
    # float16's cells are eight times finer than bfloat16's: eight times as many elements sit close
    assert 0 <= recomputed < (0.02 if dtype == bfloat16 else 0.15) * fast.size


def test_float32_path_leaves_cancelling_rows_to_float64(monkeypatch):
    rng = np.random.default_rng(5)
    terms = _factors(rng)
    update = ModuleUpdate("m", LayerKind.LINEAR, terms, rescale=Rescale.ORIGINAL_NORM, rank=RANK)
    w0 = (-_delta(terms) + rng.standard_normal((OUT, IN)) * 1e-9).astype(float32)  # V nearly zero
    monkeypatch.setattr(blocks, "FLOAT32_PRODUCTS", True)
    factors = prepare_factors(update, w0.dtype, bfloat16)
    block = merge_block(w0, update, factors, slice(0, OUT), bfloat16, "m")
    assert block.recomputed == -1  # the whole block went through float64
    assert correctly_rounded(_exact(w0, update), torch.from_numpy(block.value.view(np.int16)).view(torch.bfloat16)
                             ).all()


def test_flat_true_matches_flatnonzero():
    rng = np.random.default_rng(0)
    for size in (0, 7, 8, 9, 1000, 4099):
        mask = rng.random(size) < 0.01
        assert np.array_equal(blocks.flat_true(mask), np.flatnonzero(mask))


# ---------------------------------------------------------------- the pipeline, end to end

def _model(tmp_path, *, rank=4, layers=3, hidden=64, inter=96, seed=0):
    rng = np.random.default_rng(seed)
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16"}
    (base / "config.json").write_text(json.dumps(config))
    tensors, factors = {}, {}
    tensors["model.embed_tokens.weight"] = rng.standard_normal((128, hidden)).astype(bfloat16)
    for i in range(layers):
        for name, (o, n) in {"self_attn.q_proj": (hidden, hidden), "mlp.up_proj": (inter, hidden),
                             "mlp.down_proj": (hidden, inter)}.items():
            module = f"model.layers.{i}.{name}"
            tensors[f"{module}.weight"] = (rng.standard_normal((o, n)) * 0.02).astype(bfloat16)
            for sign in ("pos", "neg"):
                factors[f"base_model.model.{module}.lora_A_{sign}.weight"] = rng.standard_normal((rank, n)).astype(
                    np.float32) * 0.1
                factors[f"base_model.model.{module}.lora_B_{sign}.weight"] = rng.standard_normal((o, rank)).astype(
                    np.float32) * 0.01
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(hidden, bfloat16)
    tensors["model.norm.weight"] = np.ones(hidden, bfloat16)
    tensors["lm_head.weight"] = rng.standard_normal((128, hidden)).astype(bfloat16)
    names = list(tensors)
    save_file({k: tensors[k] for k in names[: len(names) // 2]}, base / "model-00001-of-00002.safetensors")
    save_file({k: tensors[k] for k in names[len(names) // 2:]}, base / "model-00002-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors"
                                            for i, k in enumerate(names)}}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "D2LORA", "r": rank, "lora_alpha": 2 * rank, "tau": 0.5, "norm_projection": True}))
    return base, adapter


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def test_pipeline_matches_whole_tensor_merge_with_tiny_blocks(tmp_path, monkeypatch):
    base, adapter = _model(tmp_path)
    reference = merge(adapter, base=base, out=tmp_path / "one", hash_inputs=False)
    monkeypatch.setattr(merging, "TASK_BYTES", 200)  # one or two rows per task
    monkeypatch.setattr(merging, "COPY_CHUNK", 64)
    monkeypatch.setattr(merging, "QUEUE_ITEMS", 2)
    monkeypatch.setattr(merging, "WORKERS", 3)
    result = merge(adapter, base=base, out=tmp_path / "two")
    assert _files(result.out) == _files(reference.out)
    assert {k: v.delta_norm for k, v in result.stats.items()} == pytest.approx(
        {k: v.delta_norm for k, v in reference.stats.items()}, rel=1e-12)
    monkeypatch.setattr(blocks, "FLOAT32_PRODUCTS", True)
    fast = merge(adapter, base=base, out=tmp_path / "three", hash_inputs=False)
    assert _files(fast.out) == _files(reference.out)


def test_pages_dropped_behind_while_views_are_in_flight_change_nothing(tmp_path, monkeypatch):
    base, adapter = _model(tmp_path)
    reference = merge(adapter, base=base, out=tmp_path / "one", hash_inputs=False)
    monkeypatch.setattr(merging, "TASK_BYTES", 200)
    monkeypatch.setattr(merging._Reader, "BEHIND", 4096)  # dropped while queued pieces still use them
    before = _files(base)
    result = merge(adapter, base=base, out=tmp_path / "two")
    assert _files(result.out) == _files(reference.out)
    assert _files(base) == before


def test_reader_maps_a_window_and_drops_a_finished_file(tmp_path):
    base, _ = _model(tmp_path, hidden=256, inter=512)
    files = sorted(p.name for p in base.glob("*.safetensors"))
    data = (base / files[0]).read_bytes()
    with merging._Reader(base, None) as reader:
        reader.BEHIND = 8192
        for offset in range(0, len(data) - 1000, 1000):
            assert reader.read(files[0], offset, 1000).tobytes() == data[offset:offset + 1000]
        first = reader._maps[files[0]]
        assert 0 < first.dropped < len(data) - 8192  # pages well behind are let go, recent ones kept
        reader.read(files[1], 0, 8)
        assert first.dropped == len(first.map)
        with pytest.raises(merging.D2ExportError, match="ends inside a tensor"):
            reader.read(files[1], (base / files[1]).stat().st_size - 4, 8)


def test_input_hashes_are_those_of_the_files(tmp_path, monkeypatch):
    base, adapter = _model(tmp_path)
    monkeypatch.setattr(merging, "COPY_CHUNK", 100)
    result = merge(adapter, base=base, out=tmp_path / "out")
    recorded = {e["file"]: e["sha256"] for e in result.report["base"]["files"] + result.report["adapter"]["files"]}
    assert len(recorded) == 4
    for file, digest in recorded.items():
        assert digest == hashlib.sha256(Path(file).read_bytes()).hexdigest(), file


def test_read_hashes_in_order_out_of_order_and_unread(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 5000, dtype=np.uint8).tobytes()
    paths = [tmp_path / name for name in ("a", "b", "c")]
    for path in paths:
        path.write_bytes(data)
    hashes = ReadHashes(paths, queue_depth=1)
    hashes.update(paths[0], 100, data[100:900])  # skips the start, then in order
    hashes.update(paths[0], 1200, data[1200:1300])
    hashes.update(paths[1], 1000, data[1000:2000])
    hashes.update(paths[1], 10, data[10:20])  # out of order: hashed whole at the end
    result = hashes.result()
    assert set(result.values()) == {hashlib.sha256(data).hexdigest()}


def test_adapter_factors_are_read_on_use(tmp_path):
    _, adapter = _model(tmp_path, rank=64, hidden=512, inter=640)  # factors above formats.stored.KEEP_BYTES
    spec = load_adapter(adapter)
    term = next(iter(spec.updates.values())).terms[0]
    assert isinstance(term.A, StoredTensor) and isinstance(term.B, StoredTensor)
    assert np.asarray(term.A).shape == term.A.shape and term.A.ndim == 2
    weights = adapter / "adapter_model.safetensors"
    assert spec.file_hashes[weights] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_worker_error_stops_the_merge_and_leaves_nothing(tmp_path, monkeypatch):
    base, adapter = _model(tmp_path)
    monkeypatch.setattr(merging, "TASK_BYTES", 200)
    monkeypatch.setattr(merging, "QUEUE_ITEMS", 1)

    def broken(*args, **kwargs):
        raise MergeError("m: row 3 of W0 + dW has zero norm")

    monkeypatch.setattr(blocks, "merge_block", broken)  # what every worker task calls
    with pytest.raises(MergeError, match="row 3"):
        merge(adapter, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_read_error_mid_tensor_stops_the_writer_and_leaves_nothing(tmp_path, monkeypatch):
    base, adapter = _model(tmp_path)
    monkeypatch.setattr(merging, "TASK_BYTES", 200)
    calls = []
    read = merging._Reader.read

    def failing(self, file, offset, size):
        calls.append(offset)
        if len(calls) == 6:  # inside a tensor whose first pieces are already queued
            raise merging.D2ExportError("disk gone")
        return read(self, file, offset, size)

    monkeypatch.setattr(merging._Reader, "read", failing)
    with pytest.raises(merging.D2ExportError, match="disk gone"):
        merge(adapter, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()
