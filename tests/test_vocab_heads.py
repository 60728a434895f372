"""Adapters that add tokens or heads (issue 13 part 2), each built with PEFT's own recipe on the
tiny fixtures: added tokens (resize_token_embeddings + modules_to_save embed_tokens/lm_head, tied
and untied), LoRA on a resized embedding, trainable_token_indices, a SEQ_CLS head only the adapter
has over a BertModel base, and both forms PEFT saves whole modules in.

Every merge is checked against PEFT's own unmerged model (the trained PeftModel, in memory, float32),
through from_pretrained with no missing or unexpected keys, and by ``merge --verify``."""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import build  # fixtures/build.py (conftest puts fixtures/ on sys.path)
import pytest
import torch
from safetensors.numpy import load_file, save_file
from support import check_refused, cli, read_all

from d2export.verification.report import FP32_OUTPUT_RTOL

NEW_VOCAB = build.VOCAB + 4  # four added tokens


@dataclass
class Case:
    folder: Path
    tokens: torch.Tensor
    reference: torch.Tensor  # PEFT's unmerged logits on ``tokens``

    @property
    def adapter(self) -> Path:
        return self.folder / "adapter"

    @property
    def base(self) -> Path:
        return self.folder / "base"


def _lm_loss(vocab: int):
    """Next-token loss on tokens that include the added ones, so their rows train."""
    def loss(model, _tokens):
        tokens = torch.randint(3, vocab, (4, 16), generator=torch.Generator().manual_seed(1))
        logits = model(input_ids=tokens).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return loss


def _train_and_save(model, folder: Path, lora: dict, vocab: int, loss=None) -> Case:
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora))
        build.train(peft_model, [p for p in peft_model.parameters() if p.requires_grad], loss=loss)
        peft_model.save_pretrained(folder / "adapter")
    tokens = torch.randint(3, vocab, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = peft_model(input_ids=tokens).logits
    return Case(folder, tokens, reference)


ADDED = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def _tokenizer(folder: Path):
    """A word-level tokenizer over the fixture vocabulary (``t0`` .. ``t255``), saved with the base."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(build.VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0", bos_token="t1",
                                        eos_token="t2")
    tokenizer.save_pretrained(folder)
    return tokenizer


def _llama_case(folder: Path, *, tie: bool, resize: bool, **lora) -> Case:
    build.llama_base(folder / "base", tie=tie)
    tokenizer = _tokenizer(folder / "base")
    torch.manual_seed(0)
    model = build._load(folder / "base")
    vocab = build.VOCAB
    if resize:  # the chat recipe: new special tokens, then resize_token_embeddings
        tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
        vocab = len(tokenizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.resize_token_embeddings(vocab)
    case = _train_and_save(model, folder, lora, vocab, _lm_loss(vocab))
    if resize:
        tokenizer.save_pretrained(case.adapter)  # as trainers do: the tokenizer goes with the adapter
    return case


def _bert_head_case(folder: Path, task: str) -> Case:
    import transformers

    build.bert_base(folder / "base")  # a plain BertModel: no classifier in the checkpoint
    torch.manual_seed(0)
    auto = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}[task]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, auto).from_pretrained(folder / "base", num_labels=3)
    loss = None if task == "SEQ_CLS" else lambda m, tokens: m(input_ids=tokens).logits.square().mean()
    return _train_and_save(model, folder, {"task_type": task, "target_modules": ["query", "value"]}, build.VOCAB,
                           loss)


MTS = {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["embed_tokens", "lm_head"]}
CASES = {
    "tokens-untied": lambda f: _llama_case(f, tie=False, resize=True, **MTS),
    "tokens-tied": lambda f: _llama_case(f, tie=True, resize=True, **MTS),
    "lora-resized-embedding": lambda f: _llama_case(
        f, tie=False, resize=True, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]),
    # the chat recipe on a tied model (Llama 3.2 1B, Qwen2.5 0.5B): the head is the embedding's saved
    # base_layer, the very parameter PEFT's LoRA wraps, resized rows included
    "lora-resized-tied-embedding": lambda f: _llama_case(
        f, tie=True, resize=True, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    "trainable-untied": lambda f: _llama_case(
        f, tie=False, resize=False, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 5, 7]),
    "trainable-tied": lambda f: _llama_case(
        f, tie=True, resize=False, target_modules=["q_proj", "v_proj"], trainable_token_indices=[3, 5, 7]),
    # rows on a tied lm_head alone: PEFT ties the head to the embedding's adapter, never the reverse
    "trainable-head-tied": lambda f: _llama_case(
        f, tie=True, resize=False, target_modules=["q_proj"], trainable_token_indices={"lm_head": [3, 5]}),
    "trainable-tied-resized": lambda f: _llama_case(
        f, tie=True, resize=True, target_modules=["q_proj"], trainable_token_indices=[3, 257, 258]),
    "save-untied": lambda f: _llama_case(f, tie=False, resize=False, **MTS),
    "SEQ_CLS": lambda f: _bert_head_case(f, "SEQ_CLS"),
    "TOKEN_CLS": lambda f: _bert_head_case(f, "TOKEN_CLS"),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    made: dict[str, Case] = {}
    root = tmp_path_factory.mktemp("vocab")

    def get(name: str) -> Case:
        if name not in made:
            made[name] = CASES[name](root / name)
        return made[name]

    return get


def _merge_verified(c: Case, out: Path, *extra: str) -> Path:
    result = cli(["merge", str(c.adapter), "--base", str(c.base), "--out", str(out), "--verify", "--no-hash",
                  "--quiet", *extra])
    assert result.exit_code == 0, result.stdout + result.stderr
    return out


def _loads_and_matches(c: Case, out: Path) -> dict:
    """The merged folder loads with no missing/unexpected keys and computes PEFT's unmerged logits."""
    config = json.loads((out / "config.json").read_text())
    import transformers

    cls = getattr(transformers, config["architectures"][0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = cls.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        logits = model.eval()(input_ids=c.tokens).logits
    assert logits.shape == c.reference.shape
    scale = float(c.reference.abs().max())
    # the float32 floor: kernel-order round-off, measured ~3e-7 of the scale here; a dropped row
    # or head moves logits by a good part of the scale
    assert float((logits - c.reference).abs().max()) <= FP32_OUTPUT_RTOL * scale
    return config


def _adapter_keys(c: Case) -> set[str]:
    return set(load_file(c.adapter / "adapter_model.safetensors"))


@pytest.mark.parametrize("name", ["tokens-untied", "tokens-tied"])
def test_added_tokens_with_modules_to_save(case, tmp_path, name):
    c = case(name)
    keys = _adapter_keys(c)  # PEFT 0.21 saves a resized module three times: plain, wrapped, original
    for form in ("lm_head.weight", "lm_head.modules_to_save.weight", "lm_head.original_module.weight"):
        assert f"base_model.model.{form}" in keys
    config = _loads_and_matches(c, _merge_verified(c, tmp_path / "out"))
    assert config["vocab_size"] == NEW_VOCAB
    assert config["tie_word_embeddings"] is False  # two trained copies: the tie cannot hold
    tensors = read_all(tmp_path / "out")
    assert tensors["model.embed_tokens.weight"].shape == (NEW_VOCAB, 64) == tensors["lm_head.weight"].shape
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")  # the adapter's: it knows the added tokens
    assert len(tokenizer) == NEW_VOCAB
    assert tokenizer("t7 <|assistant|> t9")["input_ids"] == [7, build.VOCAB + 1, 9]


@pytest.mark.parametrize("name", ["lora-resized-embedding", "lora-resized-tied-embedding"])
def test_lora_on_resized_embedding(case, tmp_path, name):
    c = case(name)
    keys = _adapter_keys(c)
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys
    config = _loads_and_matches(c, _merge_verified(c, tmp_path / "out"))
    assert config["vocab_size"] == NEW_VOCAB
    if name == "lora-resized-tied-embedding":  # refused before: "resizes the vocabulary ... but not lm_head"
        assert not any(k.startswith("base_model.model.lm_head") for k in keys)
        assert config["tie_word_embeddings"] is False


@pytest.mark.parametrize("name", ["trainable-untied", "trainable-tied", "trainable-head-tied",
                                  "trainable-tied-resized"])
def test_trainable_tokens(case, tmp_path, name):
    c = case(name)
    config = _loads_and_matches(c, _merge_verified(c, tmp_path / "out"))
    adapter = json.loads((c.adapter / "adapter_config.json").read_text())
    merged, base = read_all(tmp_path / "out"), read_all(c.base)
    rows = adapter["trainable_token_indices"]
    embed = merged["model.embed_tokens.weight"]
    if name == "trainable-head-tied":
        assert torch.equal(embed, base["model.embed_tokens.weight"])  # the embedding keeps its rows
        assert not torch.equal(merged["lm_head.weight"][rows["lm_head"]], embed[rows["lm_head"]])
        return
    if name == "trainable-tied-resized":
        assert config["vocab_size"] == NEW_VOCAB and embed.shape[0] == NEW_VOCAB
        return
    assert "vocab_size" not in config or config["vocab_size"] == build.VOCAB
    other = [i for i in range(build.VOCAB) if i not in rows]
    original = base["model.embed_tokens.weight"]
    assert torch.equal(embed[other], original[other])  # only the trained rows move
    assert not torch.equal(embed[rows], original[rows])
    if name == "trainable-tied":  # PEFT ties lm_head to the embedding's token adapter: same rows
        assert torch.equal(merged["lm_head.weight"], embed)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS"])
def test_task_head_only_in_adapter(case, tmp_path, task):
    c = case(task)
    base_config = json.loads((c.base / "config.json").read_text())
    assert base_config["architectures"] == ["BertModel"]
    config = _loads_and_matches(c, _merge_verified(c, tmp_path / "out"))
    head = {"SEQ_CLS": "BertForSequenceClassification", "TOKEN_CLS": "BertForTokenClassification"}[task]
    assert config["architectures"] == [head]
    assert config["id2label"] == {str(i): f"LABEL_{i}" for i in range(3)}
    tensors = read_all(tmp_path / "out")
    assert tensors["classifier.weight"].shape == (3, 64)
    assert all(k.startswith(("bert.", "classifier.")) for k in tensors)  # a head model's own names
    # a token classifier has no pooler: the base's is left out, as the head model's own save does
    assert any(k.startswith("bert.pooler.") for k in tensors) == (task == "SEQ_CLS")


def test_modules_to_save_without_resize(case, tmp_path):
    """No resize: PEFT saves the trained copies in the plain ``X.weight`` form only (as older PEFT always did)."""
    c = case("save-untied")
    keys = {k for k in _adapter_keys(c) if "lora_" not in k}
    assert keys == {"base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"}
    config = _loads_and_matches(c, _merge_verified(c, tmp_path / "out"))
    assert config.get("vocab_size", build.VOCAB) == build.VOCAB


def _rewrite(c: Case, tmp_path: Path, edit) -> Case:
    folder = tmp_path / "edited"
    shutil.copytree(c.adapter, folder / "adapter")
    path = folder / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    (folder / "base").symlink_to(c.base, target_is_directory=True)
    return Case(folder, c.tokens, c.reference)


def _only(form: str):
    """Keep one of PEFT's forms of each whole module: ``plain`` (``X.weight``), ``wrapped``
    (``X.modules_to_save.weight``) or ``named`` (``X.modules_to_save.default.weight``)."""
    def edit(tensors):
        for key in [k for k in tensors if k.endswith(".weight") and "lora_" not in k]:
            value = tensors.pop(key)
            if ".original_module." in key or ".modules_to_save." in key:
                continue
            module = key.removesuffix(".weight")
            tensors[{"plain": key, "wrapped": f"{module}.modules_to_save.weight",
                     "named": f"{module}.modules_to_save.default.weight"}[form]] = value
    return edit


@pytest.fixture(scope="module")
def tokens_merged(case, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The tensors of the resized modules_to_save adapter's merge, as PEFT saved it (all forms at once)."""
    c, out = case("tokens-untied"), tmp_path_factory.mktemp("tokens") / "out"
    assert cli(["merge", str(c.adapter), "--base", str(c.base), "--out", str(out), "--no-hash", "--quiet"]
               ).exit_code == 0
    return read_all(out)


@pytest.mark.parametrize("form", ["plain", "wrapped", "named"])
def test_each_key_form_merges_alike(case, tokens_merged, tmp_path, form):
    """Any one of the forms alone gives the same merge. (Only the plain form is one PEFT loads by
    itself, and test_modules_to_save_without_resize verifies it end to end.)"""
    c = case("tokens-untied")
    edited = _rewrite(c, tmp_path, _only(form))
    out = tmp_path / "out"
    assert cli(["merge", str(edited.adapter), "--base", str(c.base), "--out", str(out), "--no-hash",
                "--quiet"]).exit_code == 0
    merged = read_all(out)
    assert merged.keys() == tokens_merged.keys()
    assert all(torch.equal(merged[k], tokens_merged[k]) for k in merged)
    _loads_and_matches(c, out)


def test_disagreeing_copies_refused(case, tmp_path):
    c = case("tokens-untied")
    key = "base_model.model.lm_head.modules_to_save.weight"
    edited = _rewrite(c, tmp_path, lambda t: t.__setitem__(key, t[key] + 1))
    out = tmp_path / "out"
    result = cli(["merge", str(edited.adapter), "--base", str(c.base), "--out", str(out), "--no-hash", "--quiet"])
    check_refused(result, ["lm_head.weight", "twice with different values"])
    assert not out.exists()


def test_token_index_outside_vocabulary_refused(case, tmp_path):
    c = case("trainable-untied")
    edited = _rewrite(c, tmp_path, lambda t: None)
    config = json.loads((edited.adapter / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [3, 5, build.VOCAB + 10]
    (edited.adapter / "adapter_config.json").write_text(json.dumps(config))
    result = cli(["merge", str(edited.adapter), "--base", str(c.base), "--out", str(tmp_path / "out"), "--no-hash",
                  "--quiet"])
    check_refused(result, ["trainable tokens", "do not fit"])


def test_non_vocabulary_resize_refused(case, tmp_path):
    """Only the vocabulary dimension may change shape: a full tensor of another shape is an error."""
    c = case("save-untied")

    def widen(tensors):
        key = "base_model.model.lm_head.weight"
        tensors[key] = torch.zeros(build.VOCAB, 65).numpy()

    edited = _rewrite(c, tmp_path, widen)
    result = cli(["merge", str(edited.adapter), "--base", str(c.base), "--out", str(tmp_path / "out"), "--no-hash",
                  "--quiet"])
    check_refused(result, ["lm_head.weight", "only a resized vocabulary"])


@pytest.mark.parametrize("name", ["tokens-tied", "trainable-tied-resized"])
def test_bfloat16_output(case, tmp_path, name):
    """Resized and row-replaced tensors are rounded once into the output dtype like any other:
    the folder verifies, and its vocabulary is the adapter's."""
    c = case(name)
    out = _merge_verified(c, tmp_path / "out", "--dtype", "bfloat16")
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == NEW_VOCAB and config["dtype"] == "bfloat16"
    assert read_all(out)["lm_head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(("name", "streams"), [("trainable-untied", True), ("save-untied", True),
                                               ("trainable-tied", False), ("lora-resized-embedding", False)])
def test_embeddings_and_heads_streamed_compute_what_resident_ones_do(case, tmp_path, name, streams):
    """With a resident budget of one byte the embedding and head stream too, except a tied pair and
    a vocabulary resized after loading (``streams``: whether the unmerged model's embedding does).
    The unmerged model, with the adapter's replaced rows and modules, gives the outputs it gives
    loaded whole, and so does the merged folder."""
    from d2export.job import prepare
    from d2export.runtime.calibration import config_batches
    from d2export.runtime.models import load_model, model_output, unmerged_model
    from d2export.runtime.streaming import is_streamed

    c = case(name)
    out = _merge_verified(c, tmp_path / "out")
    with prepare(c.adapter, c.base) as job:
        batch = config_batches(job.base.config)[-1]
        unmerged = [unmerged_model(job.base.path, job.spec, torch.float32, resident_bytes=r) for r in (None, 1)]
        folder = [load_model(out, torch.float32, resident_bytes=r) for r in (None, 1)]
    embeddings = unmerged[1].get_input_embeddings()
    assert is_streamed(getattr(embeddings, "base", embeddings)) == streams  # under the adapter's layer, if any
    for whole, streamed in (unmerged, folder):
        assert not any(is_streamed(m) for m in whole.modules())
        assert any(is_streamed(m) for m in streamed.modules())
        assert torch.equal(model_output(whole, batch), model_output(streamed, batch))


@pytest.mark.parametrize("name", ["lora-resized-embedding", "trainable-untied"])
def test_weights_read_by_rows_keep_the_folder_equal_to_the_correctly_rounded_merge(case, tmp_path, monkeypatch,
                                                                                   name):
    """Streamed with row blocks of a few rows, the folder's embedding and head are read from its
    files while the correctly rounded merge's are in memory (a vocabulary resized after loading
    keeps them resident) or replaced: every linear layer is computed in the same blocks in both, so
    the loading rung still finds their outputs equal to the bit."""
    from d2export import verify
    from d2export.runtime import streaming

    c = case(name)
    out = _merge_verified(c, tmp_path / "out")
    monkeypatch.setattr(streaming, "READ_CHUNK", 512)
    report = verify(out, c.adapter, base=c.base, resident=1)
    loading = [o for o in report.outputs if o.rung == "loading"]
    assert report.passed, report.failures
    assert loading and all(o.comparison.max_abs == 0.0 for o in loading)
