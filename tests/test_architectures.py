"""Every architecture the merge handles verifies, with LoRA and with DoRA (issue 12).

Each case is a tiny random model built from its transformers config (2 layers, hidden 32, a small
vocabulary; seeded), a PEFT adapter made by ``get_peft_model`` on the architecture's usual targets
(PEFT's default mapping where it has one, plus the modules each architecture is known for: fused
qkv, Conv1D, experts, embeddings), with every ``lora_B`` (and DoRA magnitude) set to seeded random
values large enough that the update matters. Then ``merge`` + ``verify`` must pass, and, on their
own, the merged folder as ``from_pretrained`` loads it must match PEFT's own unmerged forward in
float32 within the float32 round-off bound ``verify`` uses for its PEFT rung.
"""

from __future__ import annotations

import gc
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support import check_refused, cli, tamper_tensor

from d2export import merge, verify
from d2export.reading import read_config
from d2export.verification.peft_reading import read_by_peft
from d2export.verification.report import FP32_OUTPUT_RTOL

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


@dataclass(frozen=True)
class Arch:
    name: str
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict
    targets: list[str] | None = None  # None: PEFT's default mapping for the model type
    extra: list[str] = field(default_factory=list)  # added to PEFT's default
    peft: dict = field(default_factory=dict)  # other LoraConfig arguments
    family: str = "causal-lm"


DECODER = dict(SMALL, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
               eos_token_id=2)
ARCHS = [
    Arch("llama", "LlamaConfig", "LlamaForCausalLM", DECODER, extra=["down_proj", "lm_head"]),
    Arch("mistral", "MistralConfig", "MistralForCausalLM", dict(DECODER, sliding_window=None)),
    Arch("qwen2", "Qwen2Config", "Qwen2ForCausalLM", DECODER, extra=["gate_proj"]),
    Arch("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(DECODER, head_dim=8)),
    # Gemma scales its input embeddings by sqrt(hidden) and ties the head: an adapted embedding
    # must be merged into the embedding alone (the head keeps the base's weight, untied).
    Arch("gemma", "GemmaConfig", "GemmaForCausalLM", dict(DECODER, head_dim=8), extra=["embed_tokens"]),
    Arch("gemma2", "Gemma2Config", "Gemma2ForCausalLM", dict(DECODER, head_dim=8, sliding_window=16),
         extra=["up_proj"]),
    # Gemma3 scales its embedding in the embedding module's own forward (a ScaledWordEmbedding):
    # the run-time layer replacing that forward must scale the update too, as PEFT does
    Arch("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(DECODER, head_dim=8, sliding_window=16),
         extra=["embed_tokens"]),
    Arch("phi", "PhiConfig", "PhiForCausalLM", dict(SMALL, max_position_embeddings=128, pad_token_id=0)),
    Arch("phi3", "Phi3Config", "Phi3ForCausalLM", dict(DECODER, pad_token_id=0),  # fused qkv_proj, gate_up_proj
         targets=["qkv_proj", "gate_up_proj"]),
    Arch("gpt-neox", "GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SMALL, max_position_embeddings=128, rotary_pct=0.5,
                                                                  pad_token_id=0), extra=["dense_h_to_4h"]),
    Arch("falcon", "FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=2), extra=["dense_4h_to_h"]),
    # OPT's learned positions, offset by 2: a short table clips the calibration lengths.
    Arch("opt", "OPTConfig", "OPTForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, word_embed_proj_dim=32, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=40, pad_token_id=1, bos_token_id=2, eos_token_id=2),
         extra=["fc1"]),
    Arch("bloom", "BloomConfig", "BloomForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, pad_token_id=3, bos_token_id=1, eos_token_id=2)),
    Arch("gpt-j", "GPTJConfig", "GPTJForCausalLM", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128, bos_token_id=1,
        eos_token_id=2), extra=["fc_in"]),
    Arch("gpt-bigcode", "GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2),
         extra=["c_fc"]),
    # GPT-2: Conv1D weights stored [in, out], and a short learned position table (64).
    Arch("gpt2", "GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2),
         extra=["c_fc", "c_proj", "wte"], peft=dict(fan_in_fan_out=True)),  # wte: tied to the head
    # Mixtral: every expert's w1/w2/w3 adapted, the router left alone.
    Arch("mixtral", "MixtralConfig", "MixtralForCausalLM", dict(DECODER, num_local_experts=4, num_experts_per_tok=2),
         extra=["w1", "w2", "w3"]),
    Arch("bert", "BertConfig", "BertModel", dict(SMALL, max_position_embeddings=128),
         extra=["dense", "word_embeddings"], family="encoder"),
    Arch("roberta", "RobertaConfig", "RobertaForSequenceClassification", dict(
        SMALL, max_position_embeddings=130, num_labels=3, pad_token_id=1, bos_token_id=0, eos_token_id=2),
         family="encoder"),
    Arch("distilbert", "DistilBertConfig", "DistilBertModel", dict(
        vocab_size=VOCAB, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128),
         targets=["q_lin", "v_lin", "lin1"], family="encoder"),
    Arch("deberta-v2", "DebertaV2Config", "DebertaV2Model", dict(
        SMALL, max_position_embeddings=128, relative_attention=True, position_buckets=16,
        pos_att_type=["p2c", "c2p"]), extra=["key_proj"], family="encoder"),
    # ModernBERT: one fused Wqkv, gated Wi.
    Arch("modernbert", "ModernBertConfig", "ModernBertModel", dict(
        SMALL, max_position_embeddings=128, global_attn_every_n_layers=2, local_attention=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2), targets=["Wqkv", "Wo", "Wi"],
         family="encoder"),
    # DeBERTa (v1): one fused in_proj, without a bias of its own (q_bias and v_bias are separate).
    Arch("deberta", "DebertaConfig", "DebertaModel", dict(SMALL, max_position_embeddings=128),
         targets=["in_proj", "output.dense"], family="encoder"),
    Arch("t5", "T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0), extra=["wo"], family="seq2seq"),
    Arch("bart", "BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128),
         extra=["fc2"], family="seq2seq"),
    Arch("vit", "ViTConfig", "ViTForImageClassification", dict(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3), targets=["query", "value", "output.dense"], family="vision"),
    Arch("vit-model", "ViTConfig", "ViTModel", dict(  # no head: hidden states compared
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64), targets=["query", "value"], family="vision"),
]
# Heads beyond the causal LM / classifier: each loads with its own Auto class, so a head the merge
# changes (a tied MLM decoder untied by an adapted embedding, a saved classifier) is compared too.
HEADS = [
    Arch("bert-mlm", "BertConfig", "BertForMaskedLM", dict(SMALL, max_position_embeddings=128),
         extra=["word_embeddings"], family="encoder"),
    Arch("bert-token-cls", "BertConfig", "BertForTokenClassification", dict(
        SMALL, max_position_embeddings=128, num_labels=5), peft=dict(modules_to_save=["classifier"]), family="encoder"),
    Arch("bert-qa", "BertConfig", "BertForQuestionAnswering", dict(SMALL, max_position_embeddings=128),
         peft=dict(modules_to_save=["qa_outputs"]), family="encoder"),
    Arch("llama-cls", "LlamaConfig", "LlamaForSequenceClassification", dict(DECODER, num_labels=3),
         peft=dict(modules_to_save=["score"])),
    # a head verify loads as its bare model (AutoModel): PEFT's reference must still find the
    # adapter's keys, which carry the head class's prefix ("electra.")
    Arch("electra-pretraining", "ElectraConfig", "ElectraForPreTraining", dict(
        SMALL, max_position_embeddings=128, embedding_size=32), family="encoder"),
    Arch("t5-untied-head", "T5Config", "T5ForConditionalGeneration", dict(  # T5 v1.1 / Flan-T5 layout
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
        pad_token_id=0, tie_word_embeddings=False, feed_forward_proj="gated-gelu"), targets=["q", "wi_0", "lm_head"],
         family="seq2seq"),
]
BY_NAME = {a.name: a for a in ARCHS + HEADS}


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_settings():
    """Tiny models run fastest on one thread: with more, a busy machine spends most of each matmul
    waiting for threads (measured: verify 14.6 s -> 2.8 s on the shared 2-core machine). And the
    objects already alive (torch, transformers, the other modules' fixtures) are frozen out of
    the garbage collector, so the full collection ``verify`` runs after each model (worth it for
    real models) scans only what this module makes (0.55 s per collection otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)


def build_base(arch: Arch, folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, arch.config)(**arch.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch.model)(config).eval()
        model.save_pretrained(folder)  # safetensors
    return folder


def targets_of(arch: Arch, model_type: str) -> list[str]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    if arch.targets is not None:
        return arch.targets
    return [*DEFAULTS[model_type], *arch.extra]


def build_adapter(arch: Arch, base: Path, folder: Path, *, dora: bool) -> Path:
    """A PEFT adapter on the architecture's targets, with lora_B (and DoRA's magnitude) moved away
    from their initial values by seeded random amounts: a fresh LoRA's B = 0 hides every bug."""
    import transformers
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, arch.model).from_pretrained(base, dtype=torch.float32)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets_of(arch, model.config.model_type),
                            use_dora=dora, **arch.peft)
        peft = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1 + dora)
    with torch.no_grad():
        for name, param in sorted(peft.named_parameters()):
            if "lora_B" in name or "lora_embedding_B" in name:
                # |B A x| a good fraction of |W x|: the update moves outputs far beyond round-off
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "setting save_embedding_layers": as intended
        peft.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-bases")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = build_base(BY_NAME[name], root / name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def adapters(bases, tmp_path_factory):
    root = tmp_path_factory.mktemp("arch-adapters")
    made: dict[tuple[str, bool], Path] = {}

    def get(name: str, dora: bool) -> tuple[Path, Path]:
        if (name, dora) not in made:
            made[name, dora] = build_adapter(BY_NAME[name], bases(name), root / f"{name}-{dora}", dora=dora)
        return bases(name), made[name, dora]

    return get


def inputs(arch: Arch) -> dict[str, torch.Tensor]:
    """Seeded inputs clear of special ids, two rows, the second right-padded."""
    generator = torch.Generator().manual_seed(5)
    if arch.family == "vision":
        return {"pixel_values": torch.randn(2, 3, 32, 32, generator=generator)}
    ids = torch.randint(4, VOCAB, (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch.family == "seq2seq":
        out.update(decoder_input_ids=ids, decoder_attention_mask=mask)
    return out


@torch.no_grad()
def peft_vs_folder(arch: Arch, base: Path, adapter: Path, merged: Path) -> tuple[float, float, float]:
    """max |PEFT unmerged - merged folder| over real positions, the scale (max |PEFT unmerged|), and
    max |PEFT unmerged - base| (how much the adapter moves the model)."""
    import transformers
    from peft import PeftModel

    cls = getattr(transformers, arch.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).eval()
        folder = cls.from_pretrained(merged, dtype=torch.float32).eval()
    batch = inputs(arch)
    keep = batch["attention_mask"].bool() if "attention_mask" in batch else None

    def run(model):
        out = model(**batch)
        if getattr(out, "start_logits", None) is not None:
            y = torch.stack([out.start_logits, out.end_logits], dim=-1)
        else:
            y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        return y[keep] if keep is not None and y.dim() == 3 else y

    want = run(reference)
    with reference.disable_adapter():
        plain = run(reference)
    return float((want - run(folder)).abs().max()), float(want.abs().max()), float((want - plain).abs().max())


CASES = [pytest.param(a.name, dora, id=f"{a.name}-{'dora' if dora else 'lora'}") for a in ARCHS
         for dora in (False, True)] + [
    pytest.param(a.name, dora, id=f"{a.name}-{'dora' if dora else 'lora'}")
    for a, dora in zip(HEADS, (True, False, True, False, False, True), strict=True)]


@pytest.mark.parametrize(("name", "dora"), CASES)
def test_merge_verifies(adapters, tmp_path, name, dora):
    arch = BY_NAME[name]
    base, adapter = adapters(name, dora)
    result = merge(adapter, base=base, out=tmp_path / "merged")
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:  # every adapted module is merged
        assert result.report["tensors"]["merge"] == sum(".lora_A." in k or "lora_embedding_A" in k for k in f.keys())
    report = verify(result.out, adapter, base=base)
    assert report.passed, report.failures
    assert report.method == ("dora" if dora else "lora")
    assert report.weights.summary()["exact_fraction"] == 1.0
    assert {o.rung for o in report.outputs} == {"fidelity", "loading", "rounding cost", "references"}
    assert all(o.comparison.positions > 0 for o in report.outputs)
    # PEFT's reading of the adapter on an empty model, what verify compares where PEFT's model does not fit
    reading = read_by_peft(result.job)
    assert reading.error is None and reading.problems == [] and reading.modules == len(result.job.spec.updates)
    if arch.family == "vision":
        assert report.calibration.startswith("random images")
    # On its own: the folder through transformers against PEFT's own unmerged model.
    max_abs, scale, moved = peft_vs_folder(arch, base, adapter, result.out)
    assert max_abs <= FP32_OUTPUT_RTOL * scale, (max_abs, scale)
    # ...and the adapter really moves the model: the base is far from it.
    assert moved > 100 * FP32_OUTPUT_RTOL * scale, (moved, scale)
    if arch.family != "vision":
        # A learned position table shorter than the longest calibration length clips it (OPT: 40).
        config = read_config(base)
        limit = config.get("n_positions") or config.get("max_position_embeddings")
        lengths = json.loads(report.calibration.split("lengths ")[1].split("]")[0] + "]")
        assert lengths == [min(n, limit or n) for n in (8, 24, 64)]
    if name in TAMPER:
        # the output check sees a change to one decoder (or encoder) weight alone
        tamper_tensor(result.out, TAMPER[name], lambda w: w.mul_(1.05))
        tampered = verify(result.out, adapter, base=base, weights=False)
        assert not tampered.passed
        assert all(("max |dlogits|" if name != "vit-model" else "max |d(hidden states)|") in f
                   for f in tampered.failures), tampered.failures


@pytest.mark.parametrize("name", [a.name for a in ARCHS + HEADS])
def test_streamed_with_weights_read_by_rows_verifies(adapters, tmp_path, monkeypatch, name):
    """Every architecture streamed (a resident budget of one byte), its linear layers computed four
    weight rows at a time: it loads (BART's top-level final_logits_bias needs a place of its own in
    the device map), passes, and the folder's outputs equal the correctly rounded merge's to the bit."""
    from d2export.runtime import streaming

    base, adapter = adapters(name, False)
    result = merge(adapter, base=base, out=tmp_path / "merged")
    monkeypatch.setattr(streaming, "READ_CHUNK", 512)
    report = verify(result.out, adapter, base=base, resident=1)
    assert report.passed, report.failures
    loading = [o for o in report.outputs if o.rung == "loading"]
    assert loading and all(o.comparison.max_abs == 0.0 for o in loading)


TAMPER = {"t5": "decoder.block.1.layer.0.SelfAttention.q.weight",
          "bart": "model.decoder.layers.1.fc2.weight",
          "vit": "vit.encoder.layer.1.attention.attention.query.weight",
          "vit-model": "encoder.layer.1.attention.attention.query.weight"}


# One case per family through the command line: merge --verify exits 0 and records the verdict.
CLI_CASES = [("gpt2", True), ("modernbert", False), ("t5", True), ("vit", False)]


@pytest.mark.parametrize(("name", "dora"), CLI_CASES, ids=[f"{n}-{'dora' if d else 'lora'}" for n, d in CLI_CASES])
def test_cli_merge_verify(adapters, tmp_path, name, dora):
    base, adapter = adapters(name, dora)
    out = tmp_path / "merged"
    result = cli(["merge", str(adapter), "--base", str(base), "-o", str(out), "--verify", "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "d2export_report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["failures"] == []


@pytest.mark.parametrize(("name", "dora"), [("gemma", True), ("gpt2", False), ("t5", True)],
                         ids=["gemma-dora", "gpt2-lora", "t5-dora"])
def test_merge_into_another_dtype_verifies(adapters, tmp_path, name, dora):
    """A float32 base merged into bfloat16: every tensor, copied ones included, is the correctly
    rounded value, so the folder loads exactly as the correctly rounded merge held in memory."""
    base, adapter = adapters(name, dora)
    out = merge(adapter, base=base, out=tmp_path / "merged", dtype="bfloat16").out
    report = verify(out, adapter, base=base)
    assert report.passed, report.failures
    assert report.merged_dtype == "bfloat16"
    loading = next(o for o in report.outputs if o.rung == "loading")
    assert loading.rule.startswith("equal outputs") and loading.comparison.max_abs == 0.0


def test_a_vision_classifier_exports_to_onnx_validated_on_images(adapters, tmp_path):
    """ViT's classifier is exported for image-classification (inferred from the architecture) and
    validated with ONNX Runtime on random images of the config's size, as verify feeds it; a task
    the validator cannot check is exported only with --no-validate."""
    from d2export.onnx import export_onnx

    base, adapter = adapters("vit", False)
    merged = merge(adapter, base=base, out=tmp_path / "merged").out
    result = export_onnx(merged, tmp_path / "onnx")
    assert result.passed and result.report["task"] == "image-classification"
    assert result.report["validation"]["calibration"]["image"] == [3, 32, 32]
    logits = result.report["validation"]["graphs"]["model.onnx"]["outputs"]["logits"]
    assert logits["positions"] > 0 and logits["relative"] <= 1e-4 and logits["top1"] == 1.0
    command = ["onnx", str(merged), "--task", "masked-im", "-o", str(tmp_path / "masked")]
    check_refused(cli(command), ["cannot validate a masked-im export", "--no-validate exports it unchecked"])
    unchecked = cli([*command, "--no-validate", "--quiet"])
    assert unchecked.exit_code == 0, unchecked.output
    report = json.loads((tmp_path / "masked" / "onnx_report.json").read_text())
    assert report["task"] == "masked-im" and "not validated (validate=False)" in report["notes"]


@pytest.mark.parametrize("name", ["vit", "roberta"])
def test_a_classifier_trained_for_a_new_label_set_over_a_classifier_base(bases, tmp_path, name):
    """PEFT's recipe for a new label set over a classifier base (its image classification guide):
    the base loaded with the new num_labels and ignore_mismatched_sizes, the head trained whole as
    modules_to_save. The merge writes a classifier with the adapter's label count, which verify
    (PEFT's own model among the references) and PEFT's unmerged model agree with."""
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    arch = BY_NAME[name]
    base = bases(name)
    labels = json.loads((base / "config.json").read_text())["id2label"]
    new = len(labels) + 2
    cls = getattr(transformers, arch.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(base, num_labels=new, ignore_mismatched_sizes=True)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=targets_of(arch, model.config.model_type),
                            modules_to_save=["classifier"])
        peft = get_peft_model(model, config)
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for key, param in peft.named_parameters():
                if "lora_B" in key or "modules_to_save" in key:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.2)
        peft.save_pretrained(tmp_path / "adapter")
    merged = merge(tmp_path / "adapter", base=base, out=tmp_path / "merged")
    note = f"the base's {len(labels)} labels replaced by the adapter's {new}"
    assert any(n.startswith(note) for n in merged.plan.notes)
    assert len(read_config(merged.out)["id2label"]) == new
    report = verify(merged.out, tmp_path / "adapter", base=base, resident="all")
    assert report.passed, report.failures
    assert {o.rung for o in report.outputs} == {"fidelity", "loading", "rounding cost", "references"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(cls.from_pretrained(base, num_labels=new, ignore_mismatched_sizes=True),
                                              tmp_path / "adapter").eval()
        folder = cls.from_pretrained(merged.out).eval()
    batch = inputs(arch)
    with torch.no_grad():
        expected, got = reference(**batch).logits, folder(**batch).logits
    assert got.shape[-1] == new and (got - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_float32_moe_folder_run_in_bf16_is_judged_on_its_floor(adapters, tmp_path):
    """Mixtral's float32 merge run in bf16 (--dtypes bf16): the weights are rounded to bf16 as they
    load, and the routers flip experts on near-ties, so the correctly rounded merge is 0.36 from
    the unmerged model (0.78x the logit scale) where the fixed limit is 0.03: it failed. The merge
    nudged a unit of bf16 per element moves the outputs by 0.15, so the floor is rounding (within
    32x that), and the folder, the correctly rounded merge to the bit, passes."""
    base, adapter = adapters("mixtral", False)
    out = merge(adapter, base=base, out=tmp_path / "merged").out
    report = verify(out, adapter, base=base, dtypes="bf16", peft_reference=False)
    assert report.passed, report.failures
    rungs = {o.rung: o for o in report.outputs}
    fidelity, probe = rungs["fidelity"], rungs["rounding sensitivity"]
    fixed = 16 * 2.0**-8 * fidelity.comparison.scale  # a bf16 run's fixed limit
    assert fidelity.comparison.max_abs > 5 * fixed
    assert "rounding amplified by the model" in fidelity.rule
    assert probe.dtype == "bfloat16" and probe.comparison.max_abs * 32 >= fidelity.floor.max_abs


def test_a_model_transformers_cannot_run_in_the_dtype_asked_is_refused_in_one_line(adapters, tmp_path):
    """DeBERTa (v1) loaded in bfloat16 keeps its query and value biases in float32, and its
    attention then multiplies mixed dtypes: transformers' own forward fails, with no d2export code
    in it. verify --dtypes bf16 says so (exit 2, one line), not "unexpected RuntimeError"; the
    default float32 run passes."""
    from d2export.runtime.models import load_model

    base, adapter = adapters("deberta", False)
    try:
        load_model(base, torch.bfloat16)(**inputs(BY_NAME["deberta"]))
    except RuntimeError:
        pass
    else:
        pytest.skip("this transformers runs DeBERTa in bfloat16")
    merged = tmp_path / "merged"
    assert cli(["merge", str(adapter), "--base", str(base), "-o", str(merged), "--quiet"]).exit_code == 0
    command = ["verify", str(merged), "--adapter", str(adapter), "--base", str(base), "--quiet"]
    line = check_refused(cli([*command, "--dtypes", "bf16"]), ["transformers cannot run this model in bfloat16"])
    assert "unexpected" not in line
    assert cli(command).exit_code == 0


@pytest.mark.parametrize(("name", "tied", "why"), [
    ("t5", "shared", "only while they are tied"), ("t5", "lm_head", "only while they are tied"),
    ("t5-untied-head", "shared", "whatever config.json says")], ids=["shared", "lm_head", "untied-shared"])
def test_adapted_tied_t5_embedding_or_head_is_refused(bases, tmp_path, name, tied, why):
    """T5 scales its decoder output by d_model**-0.5 only while the head is tied to ``shared``, so
    the untied folder a merge into either would need computes another model (measured: logits 4x
    the scale away from PEFT's unmerged model, and verify's rounding floor, built with the same
    untied config, could not tell). Worse for ``shared``: it is tied to both stacks' embed_tokens,
    which PEFT leaves unwrapped, so PEFT's own model never applies that update at all. Refused,
    exit 2, nothing written. (T5 v1.1 / Flan-T5 checkpoints are untied: their head merges, below; their
    ``shared`` is still tied to both embed_tokens by T5's code, and the refusal says that instead.)"""
    base = bases(name)
    arch = Arch("t5-tied", "T5Config", "T5ForConditionalGeneration", BY_NAME[name].kwargs, targets=["q", tied],
                family="seq2seq")
    adapter = build_adapter(arch, base, tmp_path / "adapter", dora=False)
    result = cli(["merge", str(adapter), "--base", str(base), "-o", str(tmp_path / "merged"), "--verify", "--quiet"])
    check_refused(result, [f"{tied}.weight", why, "no untied folder computes the adapted model"])
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", [a.name for a in ARCHS if a.family == "causal-lm"])
def test_the_continuation_carried_by_the_batch_cache_is_greedy_decoding(bases, name):
    """verify generates the greedy continuation from the calibration batch's own key/value cache,
    cut to the prompts (or, where the cache cannot be cut, from the prompts again): for every
    causal architecture that is each prompt's greedy decoding by full forwards, and a model
    teacher-forced along it picks it at every step."""
    from d2export.runtime.calibration import config_batches
    from d2export.runtime.models import greedy_tokens, load_model
    from d2export.verification.ladder import GENERATION_STEPS, generation_prompts
    from d2export.verification.runs import run_model

    base = bases(name)
    config = read_config(base)
    model = load_model(base, torch.float32)
    batches = config_batches(config)
    prompts = generation_prompts(batches, config)
    published = []
    run_model(model, batches, prompts=prompts, steps=GENERATION_STEPS, publish=published.append)
    (tokens,) = published
    for row, prompt in enumerate(prompts.tokens(batches)):
        assert greedy_tokens(model, prompt, GENERATION_STEPS).tolist() == tokens[row].tolist()
    follower = run_model(model, batches, prompts=prompts, steps=GENERATION_STEPS, follow=lambda: tokens)
    assert torch.equal(follower.followed, tokens)
