"""``d2export.plan.build_plan`` on tiny bases written by hand: what happens to every tensor, the
output dtype and shard layout, untying, and the mismatches refused before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from support import write_model

from d2export.architecture import Architecture
from d2export.arrays import bfloat16
from d2export.errors import D2ExportError
from d2export.options import MergeOptions
from d2export.plan import Action, build_plan
from d2export.reading import ModelFolder
from d2export.spec import AdapterSpec, LayerKind, LowRankTerm, ModuleUpdate

V, H, F = 16, 4, 6  # vocabulary, hidden size, MLP size
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}
UP, DOWN, Q = "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"


def base_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "model.embed_tokens.weight": rng.standard_normal((V, H)).astype(np.float32),
        f"{Q}.weight": rng.standard_normal((H, H)).astype(np.float32),
        f"{UP}.weight": rng.standard_normal((F, H)).astype(np.float32),  # [out, in]
        f"{DOWN}.weight": rng.standard_normal((H, F)).astype(np.float16),
        f"{DOWN}.bias": rng.standard_normal(H).astype(np.float16),
        "model.layers.0.input_layernorm.weight": np.ones(H, dtype=np.float32),
        "model.position_ids": np.arange(8, dtype=np.int64),
        "lm_head.weight": rng.standard_normal((V, H)).astype(np.float32),
    }


def base(tmp_path: Path, tensors=None, config: dict | None = None) -> ModelFolder:
    return ModelFolder.open(write_model(tmp_path / "base", tensors or base_tensors(), config or LLAMA))


def lora(module: str, out: int, inp: int, *, r: int = 2, kind: LayerKind = LayerKind.LINEAR, **changes
         ) -> ModuleUpdate:
    rng = np.random.default_rng(len(module))
    term = LowRankTerm("lora", 2.0, rng.standard_normal((out, r)).astype(np.float32),
                       rng.standard_normal((r, inp)).astype(np.float32))
    return ModuleUpdate(module=module, kind=kind, terms=(term,), rank=r, alpha=4.0, **changes)


def adapter(*updates: ModuleUpdate, replacements=None, config=None) -> AdapterSpec:
    return AdapterSpec(method="lora", path=Path("adapter"), files=[], config=config or {},
                       updates={u.module: u for u in updates}, replacements=replacements or {})


def by_name(plan) -> dict:
    return {t.name: t for t in plan.tensors}


# --- actions --------------------------------------------------------------------------------------------

def test_every_tensor_gets_its_action(tmp_path):
    folder = base(tmp_path)
    head = np.full((V, H), 0.5, dtype=np.float32)
    spec = adapter(lora(UP, F, H), lora(DOWN, H, F, bias_delta=np.ones(H, dtype=np.float32)),
                   lora(Q, H, H, selected=False), replacements={"lm_head.weight": head})
    plan = build_plan(spec, folder, MergeOptions())
    actions = {t.name: t.action for t in plan.tensors}
    assert actions == {
        "model.embed_tokens.weight": Action.COPY, f"{Q}.weight": Action.UNSELECTED, f"{UP}.weight": Action.MERGE,
        f"{DOWN}.weight": Action.MERGE, f"{DOWN}.bias": Action.BIAS,
        "model.layers.0.input_layernorm.weight": Action.COPY, "model.position_ids": Action.COPY,
        "lm_head.weight": Action.REPLACE,
    }
    assert [t.name for t in plan.tensors] == list(folder.tensors)  # the base's order, nothing added
    tensors = by_name(plan)
    assert tensors[f"{UP}.weight"].update is spec.updates[UP] and not tensors[f"{UP}.weight"].transposed
    assert tensors[f"{DOWN}.bias"].update is spec.updates[DOWN]
    assert tensors[f"{Q}.weight"].update is spec.updates[Q] and tensors[f"{Q}.weight"].replacement is None
    assert tensors["lm_head.weight"].replacement is head
    assert all(t.source == t.name for t in plan.tensors)
    assert tensors[f"{UP}.weight"].shape == (F, H) and tensors[f"{DOWN}.bias"].shape == (H,)
    assert plan.total_bytes == sum(info.nbytes for info in folder.tensors.values())
    assert plan.config_updates == {} and plan.notes == [] and plan.arch.known


def test_bias_of_an_unselected_module_stays_the_base(tmp_path):
    spec = adapter(lora(DOWN, H, F, bias_delta=np.ones(H, dtype=np.float32), selected=False))
    tensors = by_name(build_plan(spec, base(tmp_path)))
    assert tensors[f"{DOWN}.weight"].action is Action.UNSELECTED
    assert tensors[f"{DOWN}.bias"].action is Action.COPY


def test_negative_tau_merges_with_a_note(tmp_path):
    """A negative D2-LoRA tau (learned across zero, or a typo) merges as written, and says that the
    negative branch adds."""
    spec = adapter(lora(UP, F, H, tau=-0.25), lora(DOWN, H, F, tau=0.5), lora(Q, H, H, tau=-1.0))
    plan = build_plan(spec, base(tmp_path))
    assert by_name(plan)[f"{UP}.weight"].action is Action.MERGE
    assert plan.notes == [f"tau is negative in 2 module(s) ({UP}: -0.25): their negative branch adds to the "
                          "update instead of subtracting"]
    assert build_plan(adapter(lora(UP, F, H, tau=0.5)), base(tmp_path / "b")).notes == []


def test_further_adapters_in_subfolders_are_named(tmp_path):
    """PEFT saves a model with several adapters as the first at the top and each other in a
    subfolder named after it: the merge of the top one says the others are there."""
    import dataclasses

    folder = tmp_path / "adapter"
    (folder / "second").mkdir(parents=True)
    (folder / "second" / "adapter_config.json").write_text("{}")
    (folder / "logs").mkdir()
    spec = dataclasses.replace(adapter(lora(UP, F, H)), path=folder)
    assert build_plan(spec, base(tmp_path)).notes == [
        "the adapter's folder also holds the adapter(s) second in subfolders: this merges the one at its top; give "
        "a subfolder's path to merge another"]


def test_adapter_names_without_the_base_model_prefix(tmp_path):
    """An adapter saved from the bare ``LlamaModel`` (no ``model.``) matched to the causal LM."""
    spec = adapter(lora("layers.0.mlp.up_proj", F, H))
    tensors = by_name(build_plan(spec, base(tmp_path)))
    assert tensors[f"{UP}.weight"].action is Action.MERGE


def test_layout_from_shapes_when_the_architecture_is_unknown(tmp_path):
    tensors = base_tensors()
    tensors[f"{UP}.weight"] = np.ascontiguousarray(tensors[f"{UP}.weight"].T)  # stored [in, out] like Conv1D
    folder = base(tmp_path, tensors)
    plan = build_plan(adapter(lora(UP, F, H), lora(Q, H, H)), folder, arch=Architecture(problem="no such class"))
    assert plan.notes == ["architecture not instantiable (no such class); layouts inferred from shapes"]
    assert by_name(plan)[f"{UP}.weight"].transposed
    assert not by_name(plan)[f"{Q}.weight"].transposed  # square: the adapter's fan_in_fan_out (unset)
    square = build_plan(adapter(lora(Q, H, H), config={"fan_in_fan_out": True}), folder, arch=Architecture())
    assert by_name(square)[f"{Q}.weight"].transposed


# --- output dtype -----------------------------------------------------------------------------------------

def test_auto_dtype_keeps_each_tensors_own(tmp_path):
    folder = base(tmp_path)
    plan = build_plan(adapter(lora(UP, F, H)), folder, MergeOptions(dtype="auto"))
    assert plan.out_dtype is None
    assert {t.name: t.out_dtype for t in plan.tensors} == {n: i.dtype for n, i in folder.tensors.items()}
    assert plan.compute_dtype == np.float64


def test_out_dtype_applies_to_floating_tensors_only(tmp_path):
    folder = base(tmp_path)
    plan = build_plan(adapter(lora(UP, F, H)), folder, MergeOptions(dtype="bf16", compute_dtype="float32"))
    assert plan.out_dtype == "bfloat16" and plan.compute_dtype == np.float32
    dtypes = {t.name: t.out_dtype for t in plan.tensors}
    assert dtypes.pop("model.position_ids") == np.int64
    assert set(dtypes.values()) == {bfloat16}
    assert by_name(plan)[f"{UP}.weight"].nbytes == F * H * 2
    assert "torch_dtype" not in plan.config_updates and "dtype" not in plan.config_updates


# --- shard layout ---------------------------------------------------------------------------------------

def test_single_file_base_gives_a_single_file(tmp_path):
    folder = base(tmp_path)
    plan = build_plan(adapter(lora(UP, F, H)), folder)
    assert [(f, [t.name for t in ts]) for f, ts in plan.shards] == [("model.safetensors", list(folder.tensors))]
    assert sorted(folder.tensors) == sorted(base_tensors())


def test_sharded_base_keeps_its_layout(tmp_path):
    tensors = list(base_tensors().items())
    shards = [dict(tensors[:3]), dict(tensors[3:5]), dict(tensors[5:])]
    folder = ModelFolder.open(write_model(tmp_path / "base", shards, LLAMA))
    plan = build_plan(adapter(lora(UP, F, H)), folder, MergeOptions(dtype="bf16"))
    files = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert folder.files == files
    assert [f for f, _ in plan.shards] == files
    for (file, planned), shard in zip(plan.shards, shards, strict=True):
        assert sorted(t.name for t in planned) == sorted(shard)  # the same grouping...
        assert [t.name for t in planned] == [n for n, i in folder.tensors.items() if i.file == file]  # ...and order


@pytest.mark.parametrize("limit", [40, 100, 150, 10**6])
def test_max_shard_size_splits_greedily_in_order(tmp_path, limit):
    plan = build_plan(adapter(lora(UP, F, H)), base(tmp_path), MergeOptions(max_shard_size=limit))
    files = [f for f, _ in plan.shards]
    chunks = [ts for _, ts in plan.shards]
    assert [t for ts in chunks for t in ts] == plan.tensors  # every tensor once, in order
    if len(files) == 1:
        assert files == ["model.safetensors"] and plan.total_bytes <= limit
        return
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for i, ts in enumerate(chunks):
        size = sum(t.nbytes for t in ts)
        assert size <= limit or len(ts) == 1  # a tensor larger than the limit goes alone
        if i + 1 < n:
            assert size + chunks[i + 1][0].nbytes > limit  # the next tensor did not fit


def test_max_shard_size_counts_output_bytes(tmp_path):
    float32 = build_plan(adapter(lora(UP, F, H)), base(tmp_path), MergeOptions(max_shard_size=200))
    halved = build_plan(adapter(lora(UP, F, H)), base(tmp_path), MergeOptions(max_shard_size=200, dtype="bf16"))
    assert len(halved.shards) < len(float32.shards)
    assert halved.total_bytes < float32.total_bytes


# --- tied weights -----------------------------------------------------------------------------------------

def tied_base(tmp_path: Path) -> ModelFolder:
    tensors = base_tensors()
    del tensors["lm_head.weight"]  # tied: saved once
    return base(tmp_path, tensors, {**LLAMA, "tie_word_embeddings": True})


def test_tied_embedding_adapted_is_written_untied(tmp_path):
    folder = tied_base(tmp_path)
    embedding = lora("model.embed_tokens", H, V, kind=LayerKind.EMBEDDING)
    plan = build_plan(adapter(embedding), folder)
    tensors = by_name(plan)
    assert list(tensors) == [*folder.tensors, "lm_head.weight"]
    embed = tensors["model.embed_tokens.weight"]
    assert embed.action is Action.MERGE and embed.transposed  # stored [vocab, dim]
    head = tensors["lm_head.weight"]
    assert (head.action, head.source, head.shape) == (Action.COPY, "model.embed_tokens.weight", (V, H))
    assert plan.config_updates == {"tie_word_embeddings": False}
    assert len(plan.notes) == 1 and "written untied (tie_word_embeddings=false)" in plan.notes[0]


def test_adapted_lm_head_of_a_tied_model_starts_from_the_embedding(tmp_path):
    plan = build_plan(adapter(lora("lm_head", V, H)), tied_base(tmp_path))
    head = by_name(plan)["lm_head.weight"]
    assert (head.action, head.source) == (Action.MERGE, "model.embed_tokens.weight")
    assert by_name(plan)["model.embed_tokens.weight"].action is Action.COPY
    assert plan.config_updates == {"tie_word_embeddings": False}


def test_tied_weights_left_alone_stay_tied(tmp_path):
    folder = tied_base(tmp_path)
    plan = build_plan(adapter(lora(UP, F, H)), folder)
    assert [t.name for t in plan.tensors] == list(folder.tensors)
    assert plan.config_updates == {} and plan.notes == []


# --- refused -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "message"), [
    (adapter(lora(UP, F + 1, H)), f"{UP}.weight: base shape (6, 4) does not fit the adapter's update [out=7, in=4]"),
    (adapter(lora(UP, H, F)), f"{UP}.weight: base shape (6, 4) does not fit the adapter's update [out=4, in=6]"),
    (adapter(lora("model.layers.3.mlp.up_proj", F, H)),
     "adapter module model.layers.3.mlp.up_proj has no base tensor model.layers.3.mlp.up_proj.weight"),
    (adapter(lora(UP, F, H, bias_delta=np.ones(F, dtype=np.float32))),
     f"{UP} has a trained lora_bias but the base module has no bias"),
    (adapter(lora(UP, F, H), replacements={"lm_head.weight": np.zeros((V + 2, H), dtype=np.float32)}),
     "adapter tensor for lm_head.weight has shape (18, 4), the base has (16, 4)"),
    (adapter(lora(UP, F, H), replacements={"score.weight": np.zeros((3, H), dtype=np.float32)}),
     "adapter tensor score.weight has no base tensor score.weight"),
    (adapter(lora("model.layers.0.input_layernorm", H, 1)),
     "model.layers.0.input_layernorm.weight: base tensor has shape (4,); only 2-d weights"),
    (adapter(lora("model.embed_tokens", V, H)), "model.embed_tokens.weight: an embedding adapted with Linear-style"),
    (adapter(lora("model.embed_tokens", V, H, kind=LayerKind.EMBEDDING)),
     "model.embed_tokens.weight: embedding is (16, 4) but the adapter expects [vocab=4, dim=16]"),
])
def test_mismatches_are_refused_naming_the_tensor(tmp_path, spec, message):
    with pytest.raises(D2ExportError, match=re.escape(message)):
        build_plan(spec, base(tmp_path))


def test_base_bias_that_does_not_fit_the_module(tmp_path):
    tensors = base_tensors()
    tensors[f"{DOWN}.bias"] = np.zeros(H + 1, dtype=np.float16)
    spec = adapter(lora(DOWN, H, F, bias_delta=np.ones(H, dtype=np.float32)))
    with pytest.raises(D2ExportError, match=re.escape(f"{DOWN}.bias: base bias has shape (5,), lora_bias has [4]")):
        build_plan(spec, base(tmp_path, tensors))
