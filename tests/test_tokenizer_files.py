"""The tokenizer, chat template, generation config and processor trained with the adapter travel
with the merged model (d2export/tokenizer_files.py); the base's where the adapter side has none.

Cases are real recipes: the lora-llama fixture (a PEFT adapter trained on a tiny Llama), a tiny
word-level tokenizer saved beside the base, and a tokenizer with added special tokens and a chat
template saved beside the adapter by ``tokenizer.save_pretrained`` as a training script does. The
added tokens take ids inside the model's vocabulary (resized embeddings are another test's job).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast

from d2export import merging
from d2export.errors import D2ExportError
from d2export.merging import merge

WORDS = [f"w{i}" for i in range(200)]
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3: the fixture config's pad 0, bos 1, eos 2
ADDED = ["<|user|>", "<|assistant|>"]  # ids 204, 205: inside the model's 256 rows
BASE_TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"
ADAPTER_TEMPLATE = ("{% for m in messages %}{{ '<|' + m.role + '|>' }} {{ m.content }} {% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CHAT = [{"role": "user", "content": "w5 w7"}, {"role": "assistant", "content": "w9"}]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json"}


def base_tokenizer(template: str | None = BASE_TEMPLATE) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def adapter_tokenizer() -> PreTrainedTokenizerFast:
    """The base's tokenizer as a chat fine-tune leaves it: role tokens added, its own template."""
    tokenizer = base_tokenizer(ADAPTER_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ADDED})
    return tokenizer


@pytest.fixture(scope="module")
def recipe(fixture, tmp_path_factory):
    """``recipe(name)`` -> (base, adapter): fresh copies of the lora-llama fixture, the base with its
    word-level tokenizer and a chat template, the adapter bare."""
    source = fixture("lora-llama")
    root = tmp_path_factory.mktemp("tokenizer-files")

    def make(name: str) -> tuple[Path, Path]:
        base, adapter = root / name / "base", root / name / "adapter"
        shutil.copytree(source / "base", base)
        shutil.copytree(source / "adapter", adapter)
        base_tokenizer().save_pretrained(base)
        return base, adapter

    return make


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def load(folder: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoTokenizer.from_pretrained(folder)


def test_adapter_tokenizer_and_template_survive_the_merge(recipe, tmp_path):
    base, adapter = recipe("full")
    adapter_tokenizer().save_pretrained(adapter)
    out = merge(adapter, base=base, out=tmp_path / "out").out

    merged, trained = load(out), load(adapter)
    assert [merged.convert_tokens_to_ids(t) for t in ADDED] == [204, 205]
    assert merged.additional_special_tokens == ADDED
    assert merged.get_vocab() == trained.get_vocab()
    text = merged.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text == trained.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|user|> w5 w7 <|assistant|> w9")
    assert merged.apply_chat_template(CHAT) == trained.apply_chat_template(CHAT)
    assert merged("<|user|> w5")["input_ids"] == [204, 9]
    # the adapter's files replace the base's whole: no second template, nothing of the base's left
    assert files(out) & TOKENIZER_FILES == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "chat_template.jinja"}
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not files(out) & {"adapter_config.json", "adapter_model.safetensors"}
    for file in out.iterdir():  # neither the scratch folder nor the adapter is named in the tokenizer's files
        if file.suffix in (".json", ".jinja") and file.name != "d2export_report.json":
            assert "d2export-tokenizer-" not in file.read_text() and str(adapter) not in file.read_text()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
        result = generate("w5 w7", max_new_tokens=3, min_new_tokens=3, do_sample=False, return_tensors=True)
    generated = list(result[0]["generated_token_ids"])
    assert generated[:2] == [9, 11] and len(generated) == 5


def test_base_tokenizer_kept_when_the_adapter_has_none(recipe, tmp_path):
    base, adapter = recipe("bare")
    out = merge(adapter, base=base, out=tmp_path / "out").out
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert load(out).apply_chat_template(CHAT, tokenize=False) == "w5 w7w9"


@pytest.mark.parametrize("kept", ["chat_template.jinja", "chat_template.json", "tokenizer_config.json"])
def test_chat_template_survives_wherever_it_is_kept(recipe, tmp_path, kept):
    """transformers writes chat_template.jinja; older versions kept it in tokenizer_config.json, and
    processors in chat_template.json (which AutoTokenizer does not read)."""
    base, adapter = recipe(f"kept-{kept}")
    adapter_tokenizer().save_pretrained(adapter, save_jinja_files=kept == "chat_template.jinja")
    if kept == "chat_template.json":
        config = json.loads((adapter / "tokenizer_config.json").read_text())
        template = config.pop("chat_template")
        (adapter / "tokenizer_config.json").write_text(json.dumps(config))
        (adapter / kept).write_text(json.dumps({"chat_template": template}))
    out = merge(adapter, base=base, out=tmp_path / "out").out
    assert load(out).apply_chat_template(CHAT, tokenize=False).startswith("<|user|> w5 w7 <|assistant|> w9")
    assert load(out).additional_special_tokens == ADDED


@pytest.mark.parametrize("kept", ["chat_template.jinja", "chat_template.json"])
def test_template_alone_goes_with_the_base_tokenizer(recipe, tmp_path, kept):
    base, adapter = recipe(f"alone-{kept}")
    text = ADAPTER_TEMPLATE if kept.endswith(".jinja") else json.dumps({"chat_template": ADAPTER_TEMPLATE})
    (adapter / kept).write_text(text)
    out = merge(adapter, base=base, out=tmp_path / "out").out
    merged = load(out)
    assert merged.get_vocab() == load(base).get_vocab()
    assert merged.apply_chat_template(CHAT, tokenize=False) == "<|user|> w5 w7 <|assistant|> w9 "
    assert files(out) & TOKENIZER_FILES == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                            "chat_template.jinja"}


def test_generation_config_from_the_adapter_side_wins(recipe, tmp_path):
    base, adapter = recipe("generation")
    assert GenerationConfig.from_pretrained(base).max_new_tokens is None
    # as some trainers leave it: a temperature without sampling, which GenerationConfig.save_pretrained refuses
    trained = {"bos_token_id": 1, "eos_token_id": [2, 205], "pad_token_id": 0, "max_new_tokens": 7,
               "temperature": 0.6, "transformers_version": "4.44.0"}
    (adapter / "generation_config.json").write_text(json.dumps(trained))
    out = merge(adapter, base=base, out=tmp_path / "out").out
    assert json.loads((out / "generation_config.json").read_text()) == trained
    merged = GenerationConfig.from_pretrained(out)
    assert (merged.max_new_tokens, merged.eos_token_id, merged.temperature) == (7, [2, 205], 0.6)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()  # the base's tokenizer


def test_trainer_run_folder_tokenizer_checkpoint_first(recipe, tmp_path):
    """The trainer saves the tokenizer into each checkpoint-N and, at the end, the run folder."""
    base, adapter = recipe("trainer")
    run = tmp_path / "run"
    checkpoint = run / "checkpoint-20"
    shutil.copytree(adapter, checkpoint)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json"):
        (checkpoint / name).write_bytes(b"{}")  # the trainer's own files: never opened, never carried
    (run / "runs").mkdir()
    (run / "runs" / "events.out.tfevents").write_bytes(b"x")
    adapter_tokenizer().save_pretrained(run)
    GenerationConfig(eos_token_id=2, max_new_tokens=5).save_pretrained(run)

    out = merge(checkpoint, base=base, out=tmp_path / "from-run").out
    assert load(out).additional_special_tokens == ADDED
    assert GenerationConfig.from_pretrained(out).max_new_tokens == 5
    assert files(out) == {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                          "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                          "d2export_report.json", "README.md"}  # none of the trainer's own files

    only_template = base_tokenizer("{{ messages[0].content }}!")  # the checkpoint's own tokenizer wins
    only_template.save_pretrained(checkpoint)
    out = merge(run, base=base, out=tmp_path / "from-checkpoint").out
    assert load(out).apply_chat_template(CHAT, tokenize=False) == "w5 w7!"
    assert load(out).additional_special_tokens == []


def test_stale_vocabulary_files_of_the_base_are_dropped(recipe, tmp_path):
    """A GPT-2 style base tokenizer (vocab.json, merges.txt beside tokenizer.json) and an adapter
    whose tokenizer is only tokenizer.json: no base vocabulary file stays beside it."""
    base, adapter = recipe("stale")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (base / name).unlink()
    backend = Tokenizer(models.BPE({"<unk>": 0, "w": 1, "1": 2, "w1": 3}, [("w", "1")], unk_token="<unk>"))
    transformers.GPT2TokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(base)
    assert {"vocab.json", "merges.txt"} <= files(base)
    adapter_tokenizer().save_pretrained(adapter)
    out = merge(adapter, base=base, out=tmp_path / "out").out
    assert not files(out) & {"vocab.json", "merges.txt"}
    assert load(out).get_vocab() == load(adapter).get_vocab()


def test_symlink_out_of_the_adapter_is_refused(recipe, tmp_path):
    base, adapter = recipe("link")
    adapter_tokenizer().save_pretrained(adapter)
    outside = tmp_path / "elsewhere.json"
    (adapter / "tokenizer.json").rename(outside)
    os.symlink(outside, adapter / "tokenizer.json")
    with pytest.raises(D2ExportError, match="outside"):
        merge(adapter, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("file", "what"), [("tokenizer.json", "tokenizer"),
                                           ("generation_config.json", "generation_config.json")])
def test_unreadable_part_is_refused_before_writing(recipe, tmp_path, monkeypatch, file, what):
    base, adapter = recipe(f"broken-{file}")
    adapter_tokenizer().save_pretrained(adapter)
    (adapter / file).write_text("{not json")
    monkeypatch.setattr(merging, "write_weights", lambda *a: pytest.fail("weights written before the check"))
    with pytest.raises(D2ExportError, match=f"{what} cannot be loaded"):
        merge(adapter, base=base, out=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_feature_extractor_from_the_adapter_side(recipe, tmp_path):
    """preprocessor_config.json goes through transformers' feature extractor save, the base's is
    replaced; the tokenizer stays the base's."""
    base, adapter = recipe("processor")
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000).save_pretrained(base)
    transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=8000).save_pretrained(adapter)
    out = merge(adapter, base=base, out=tmp_path / "out").out
    assert transformers.AutoFeatureExtractor.from_pretrained(out).sampling_rate == 8000
    assert load(out).get_vocab() == load(base).get_vocab()
    assert load(out).apply_chat_template(CHAT, tokenize=False) == "w5 w7w9"


def test_named_chat_templates_survive(recipe, tmp_path):
    """Several templates: transformers keeps the extra ones in additional_chat_templates/."""
    base, adapter = recipe("named")
    tokenizer = adapter_tokenizer()
    tokenizer.chat_template = {"default": ADAPTER_TEMPLATE, "tool_use": "{{ messages[0].content }} tools"}
    tokenizer.save_pretrained(adapter)
    assert (adapter / "additional_chat_templates" / "tool_use.jinja").is_file()
    out = merge(adapter, base=base, out=tmp_path / "out").out
    merged = load(out)
    assert merged.apply_chat_template(CHAT, tokenize=False, chat_template="tool_use") == "w5 w7 tools"
    assert merged.apply_chat_template(CHAT, tokenize=False).startswith("<|user|> w5 w7")


def test_base_named_templates_do_not_outlive_the_adapter_template(recipe, tmp_path):
    base, adapter = recipe("named-base")
    base_tokenizer({"default": BASE_TEMPLATE, "tool_use": "base tools"}).save_pretrained(base)
    adapter_tokenizer().save_pretrained(adapter)
    out = merge(adapter, base=base, out=tmp_path / "out").out
    assert (base / "additional_chat_templates").is_dir() and not (out / "additional_chat_templates").exists()
    assert load(out).chat_template == ADAPTER_TEMPLATE


def test_sentence_transformers_model_keeps_its_modules(fixture, tmp_path):
    """A sentence-transformers base (modules.json, 1_Pooling/, a BERT vocab.txt) whose adapter was
    saved with its tokenizer: the modules stay, the tokenizer is the adapter side's, and
    sentence-transformers loads the result and embeds as the merge without it does."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    source = fixture("d2lora-bert")
    bert, base, adapter = tmp_path / "bert", tmp_path / "base", tmp_path / "adapter"
    shutil.copytree(source / "base", bert)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(bert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = Transformer(str(bert))
        SentenceTransformer(modules=[module, Pooling(module.get_word_embedding_dimension())]).save(str(base))
    shutil.copytree(source / "adapter", adapter)
    trained = load(base)
    trained.chat_template = "{{ messages[0].content }}"
    trained.save_pretrained(adapter)

    out = merge(adapter, base=base, out=tmp_path / "out").out
    plain = merge(source / "adapter", base=base, out=tmp_path / "plain").out
    assert {"modules.json", "1_Pooling", "sentence_bert_config.json", "vocab.txt"} <= files(out)
    pooling = "1_Pooling/config.json"
    assert (out / pooling).read_bytes() == (base / pooling).read_bytes()
    assert load(out).chat_template == "{{ messages[0].content }}" and load(plain).chat_template is None
    texts = ["w1 w2 w3", "w4 w5"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        embedded = SentenceTransformer(str(out), device="cpu").encode(texts)
        expected = SentenceTransformer(str(plain), device="cpu").encode(texts)
    assert abs(embedded - expected).max() == 0
