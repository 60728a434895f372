"""ONNX export (``d2export.onnx``): merged fixtures exported through optimum, validated with ONNX
Runtime against PyTorch, and the report, file layout and error paths checked.

Exports are cached per module (tiny models export in about a second); every test reads one.
Where the module's own validation is the thing under test, the tests also check the ONNX files
independently (their own ONNX Runtime session or optimum ORT model against transformers).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import d2export.onnx as donnx
import d2export.onnx.export as onnx_export
import d2export.onnx.validate as onnx_validate
from d2export import D2ExportError, merge
from d2export.onnx import APPROXIMATE, FLOAT32, export_onnx, infer_task, resolve_task
from d2export.onnx.export import REPORT_NAME
from d2export.reading import ModelFolder
from d2export.runtime.models import load_model


@pytest.fixture(scope="module")
def merged_model(fixture, tmp_path_factory):
    """``merged_model(name)`` -> a merged model folder, merged once per module into a folder of this
    module's own, not conftest's shared ``merged``: tests here write ``<merged>-onnx`` beside it,
    which test_bench.py's bench would find beside a shared merge."""
    root = tmp_path_factory.mktemp("onnx-merged")
    done: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in done:
            folder = fixture(name)
            done[name] = merge(folder / "adapter", base=folder / "base", out=root / name, hash_inputs=False).out
        return done[name]

    return get


@pytest.fixture(scope="module")
def exported(merged_model, tmp_path_factory):
    """``exported(key, name, **options)`` -> OnnxResult, one export per key for the whole module."""
    root = tmp_path_factory.mktemp("onnx")
    done: dict[str, donnx.OnnxResult] = {}

    def get(key: str, name: str, **options) -> donnx.OnnxResult:
        if key not in done:
            done[key] = export_onnx(merged_model(name), root / key, **options)
        return done[key]

    return get


def graph_report(result, file: str = "model.onnx") -> dict:
    return result.report["validation"]["graphs"][file]


def assert_float32_exact(entry: dict) -> None:
    """The float32 tolerance of d2export.onnx, restated so a loosened constant shows up here."""
    assert entry["precision"] == "float32" and entry["passed"], entry["failures"]
    for comparison in entry["outputs"].values():
        assert comparison["positions"] > 0
        assert comparison["relative"] <= 1e-4
        assert comparison["top1"] in (None, 1.0)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(folder, torch.float32)(input_ids=ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 63, 12, 250]])


# --- task inference ------------------------------------------------------------------------------

@pytest.mark.parametrize(("arch", "past", "task"), [
    ("LlamaForCausalLM", True, "text-generation-with-past"),
    ("LlamaForCausalLM", False, "text-generation"),
    ("GPT2LMHeadModel", True, "text-generation-with-past"),
    ("MistralForCausalLM", True, "text-generation-with-past"),
    ("BertForSequenceClassification", True, "text-classification"),
    ("RobertaForTokenClassification", True, "token-classification"),
    ("BertForQuestionAnswering", True, "question-answering"),
    ("BertForMaskedLM", True, "fill-mask"),
    ("BertModel", True, "feature-extraction"),
    ("LlamaModel", True, "feature-extraction"),
])
def test_infer_task_from_architecture(arch, past, task):
    assert infer_task({"architectures": [arch]}, past) == task


@pytest.mark.parametrize("config", [{"architectures": ["BertForPreTraining"]}, {"architectures": []}, {}])
def test_infer_task_refuses_what_it_cannot_name(config):
    with pytest.raises(D2ExportError, match="task is needed"):
        infer_task(config)


def test_resolve_task_checks_optimum_support():
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    assert resolve_task(llama, None, True) == ("text-generation-with-past", [])
    assert resolve_task(llama, "causal-lm", True)[0] == "text-generation"  # optimum's synonym
    assert resolve_task(llama, "text-classification", True)[0] == "text-classification"
    with pytest.raises(D2ExportError, match="task 'text-generaton' is unknown"):
        resolve_task(llama, "text-generaton", True)
    with pytest.raises(D2ExportError, match="cannot export llama for fill-mask"):
        resolve_task(llama, "fill-mask", True)
    with pytest.raises(D2ExportError, match="contradicts past=False"):
        resolve_task(llama, "text-generation-with-past", False)
    with pytest.raises(D2ExportError, match="model type 'd2x-unknown'"):
        resolve_task({"architectures": ["D2xForCausalLM"], "model_type": "d2x-unknown"}, None, True)
    with pytest.raises(D2ExportError, match="no model_type"):
        resolve_task({"architectures": ["LlamaForCausalLM"]}, None, True)


# --- causal LMs ------------------------------------------------------------------------------------

def test_llama_with_past(exported):
    stages: list[str] = []
    result = exported("llama", "d2lora-llama", quantize="int8",
                      progress=lambda stage, done, total: stages.append(stage))
    report = result.report
    assert result.passed and report["passed"]
    assert report["task"] == "text-generation-with-past" and report["dtype"] == "float32"
    assert report["opset"] >= 14 and report["external_data"] is False
    assert json.loads((result.out / REPORT_NAME).read_text()) == report
    assert {"exporting", "quantizing", "validating"} <= set(stages)

    names = {i.name for i in session(result.out / "model.onnx").get_inputs()}
    assert {"input_ids", "attention_mask", "position_ids", "past_key_values.0.key"} <= names
    entry = graph_report(result)
    assert_float32_exact(entry)
    # One decode step per calibration row, fed the graph's own present.* outputs.
    calibration = report["validation"]["calibration"]
    assert entry["decode_step"]["positions"] == calibration["batches"] * calibration["batch_size"]
    assert entry["decode_step"]["relative"] <= 1e-4 and entry["decode_step"]["top1"] == 1.0
    generate = entry["generate"]
    assert generate["class"] == "ORTModelForCausalLM" and generate["use_cache"] is True
    assert generate["identical"] and generate["onnx"] == generate["pytorch"]
    assert all(len(tokens) == generate["new_tokens"] for tokens in generate["pytorch"])


def test_llama_without_past(exported, merged_model):
    result = exported("llama-nopast", "d2lora-llama", past=False)
    assert result.passed and result.report["task"] == "text-generation"
    sess = session(result.out / "model.onnx")
    assert not [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    entry = graph_report(result)
    assert_float32_exact(entry)
    assert "decode_step" not in entry
    assert entry["generate"]["identical"] and entry["generate"]["use_cache"] is False
    # Independently of the module's validator: the graph against transformers on fresh tokens.
    feeds = {"input_ids": IDS.numpy(), "attention_mask": np.ones_like(IDS.numpy()),
             "position_ids": np.arange(IDS.shape[1])[None]}
    logits = sess.run(["logits"], feeds)[0]
    reference = torch_logits(merged_model("d2lora-llama"), IDS).numpy()
    assert np.abs(logits - reference).max() <= 1e-4 * np.abs(reference).max()


def test_gpt2(exported):
    result = exported("gpt2", "d2lora-gpt2")
    assert result.passed and result.report["task"] == "text-generation-with-past"
    entry = graph_report(result)
    assert_float32_exact(entry)
    assert entry["decode_step"]["top1"] == 1.0 and entry["generate"]["identical"]


def test_int8_reports_its_own_error(exported):
    result = exported("llama", "d2lora-llama", quantize="int8")
    assert (result.out / "model.onnx").is_file() and (result.out / "model_quantized.onnx").is_file()
    files = result.report["files"]
    assert files["model_quantized.onnx"] < files["model.onnx"] / 1.5
    ops = {n.op_type for n in onnx.load(str(result.out / "model_quantized.onnx")).graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}
    entry = graph_report(result, "model_quantized.onnx")
    assert entry["precision"] == "int8"
    assert entry["tolerance"] == APPROXIMATE.to_dict()
    logits = entry["outputs"]["logits"]
    # Really quantised (far outside float32 round-off), so not judged by it: reported, and passed.
    assert logits["relative"] > 10 * FLOAT32.max_relative
    assert logits["mean_relative"] <= APPROXIMATE.mean_relative
    assert APPROXIMATE.min_top1 <= logits["top1"] <= 1.0 and logits["mean_kl"] is not None
    assert entry["passed"] and result.passed
    assert "generate" in entry and "decode_step" in entry


def test_fp16(exported):
    result = exported("llama-fp16", "d2lora-llama", fp16=True)
    assert result.passed and result.report["dtype"] == "float16"
    sess = session(result.out / "model.onnx")
    assert {o.type for o in sess.get_outputs()} == {"tensor(float16)"}
    entry = graph_report(result)
    assert entry["precision"] == "float16" and entry["tolerance"] == APPROXIMATE.to_dict()
    assert 0 < entry["outputs"]["logits"]["relative"] <= 1e-2  # half precision, not float32 round-off
    assert entry["outputs"]["logits"]["top1"] >= 0.9


def test_bf16_model_exports_float32_with_note(exported):
    result = exported("bf16", "d2lora-llama-bf16")
    report = result.report
    assert report["source_dtype"] == "bfloat16" and report["dtype"] == "float32"
    assert "model is bfloat16; exported float32 (ONNX Runtime has no bf16 CPU kernels)" in report["notes"]
    model = onnx.load(str(result.out / "model.onnx"))
    types = {t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.BFLOAT16 not in types and onnx.TensorProto.FLOAT in types
    assert result.passed
    assert_float32_exact(graph_report(result))


# --- encoders ------------------------------------------------------------------------------------------

def test_bert_feature_extraction(exported):
    result = exported("bert", "d2lora-bert")
    assert result.passed and result.report["task"] == "feature-extraction"
    entry = graph_report(result)
    assert_float32_exact(entry)
    assert list(entry["outputs"]) == ["last_hidden_state"] and entry["outputs"]["last_hidden_state"]["top1"] is None
    assert "generate" not in entry


def test_bert_classifier(exported):
    result = exported("bert-cls", "lora-bert-cls")
    assert result.passed and result.report["task"] == "text-classification"
    entry = graph_report(result)
    assert_float32_exact(entry)
    calibration = result.report["validation"]["calibration"]
    # One logit vector per sequence, every sequence compared.
    assert entry["outputs"]["logits"]["positions"] == calibration["batches"] * calibration["batch_size"]
    assert entry["outputs"]["logits"]["top1"] == 1.0


def test_real_minilm(exported):
    """all-MiniLM-L6-v2 with real weights (and a D2-LoRA merged in), float32 and int8."""
    result = exported("minilm", "d2lora-minilm", quantize="int8")
    assert result.passed and result.report["task"] == "feature-extraction"
    assert (result.out / "tokenizer.json").is_file()  # optimum copies the tokenizer for serving
    assert_float32_exact(graph_report(result))
    int8 = graph_report(result, "model_quantized.onnx")
    assert int8["precision"] == "int8" and int8["passed"]
    states = int8["outputs"]["last_hidden_state"]
    assert states["relative"] > 10 * FLOAT32.max_relative and states["mean_relative"] <= APPROXIMATE.mean_relative


def test_optimize_o2_fuses_and_stays_exact(exported):
    result = exported("bert-o2", "d2lora-bert", optimize="o2")
    assert result.passed and result.report["optimize"] == "O2"
    ops = {n.op_type for n in onnx.load(str(result.out / "model.onnx")).graph.node}
    assert {"Attention", "SkipLayerNormalization"} <= ops  # ONNX Runtime's transformer fusions ran
    assert_float32_exact(graph_report(result))


# --- external data ----------------------------------------------------------------------------------

def test_forced_external_data(exported, merged_model, tmp_path):
    result = exported("llama-ext", "d2lora-llama", external_data=True, quantize="int8")
    assert result.passed and result.report["external_data"] is True
    files = result.report["files"]
    assert {"model.onnx", "model.onnx_data", "model_quantized.onnx", "model_quantized.onnx_data"} <= set(files)
    assert files["model.onnx_data"] > 4 * files["model.onnx"]  # the weights moved out
    proto = onnx.load(str(result.out / "model.onnx"), load_external_data=False)
    locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx_data"}

    moved = tmp_path / "moved"  # the data file is found relative to the model, wherever it lives
    shutil.copytree(result.out, moved)
    sess = session(moved / "model.onnx")
    assert sess.get_inputs()[0].name == "input_ids"

    from optimum.onnxruntime import ORTModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ORTModelForCausalLM.from_pretrained(moved, file_name="model.onnx", use_cache=True)
        logits = model(input_ids=IDS, attention_mask=torch.ones_like(IDS)).logits
    reference = torch_logits(merged_model("d2lora-llama"), IDS)
    assert (logits - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_external_data_automatic_past_limit(merged_model, tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_export, "PROTOBUF_LIMIT", 10_000)  # the tiny BERT "passes 2 GiB"
    result = export_onnx(merged_model("d2lora-bert"), tmp_path / "auto")
    assert result.passed and result.report["external_data"] is True
    assert (tmp_path / "auto" / "model.onnx_data").is_file()
    with pytest.raises(D2ExportError, match=r"more than one \.onnx file can hold"):
        export_onnx(merged_model("d2lora-bert"), tmp_path / "never", external_data=False)
    assert not (tmp_path / "never").exists()


# --- a failing validation -----------------------------------------------------------------------------

def test_wrong_model_fails_validation(merged_model, tmp_path, monkeypatch):
    """The ONNX graph of one adapter checked against a model merged with another: passed is False,
    no exception, the folder is still written and the report says why."""
    other = load_model(merged_model("lora-llama"), torch.float32)  # same base, different adapter
    monkeypatch.setattr(onnx_validate, "load_reference", lambda model_dir, config, task: other)
    result = export_onnx(merged_model("d2lora-llama"), tmp_path / "wrong", past=False)
    assert result.passed is False
    report = json.loads((tmp_path / "wrong" / REPORT_NAME).read_text())
    assert report["passed"] is False and report["validation"]["passed"] is False
    entry = report["validation"]["graphs"]["model.onnx"]
    assert any(f.startswith("logits: max |diff|") for f in entry["failures"])
    assert entry["outputs"]["logits"]["relative"] > FLOAT32.max_relative
    assert any("VALIDATION FAILED" in note for note in report["notes"])
    assert (tmp_path / "wrong" / "model.onnx").is_file()


def test_small_defect_fails_float32_tolerance(exported, merged_model, monkeypatch):
    """A reference off by 0.1% (the final norm's gain scaled by 1.001, what one wrong rounding of a
    merged tensor can do) is caught by the float32 bound even where every arg-max still agrees."""
    result = exported("llama-nopast", "d2lora-llama", past=False)
    reference = load_model(merged_model("d2lora-llama"), torch.float32)
    with torch.no_grad():
        reference.model.norm.weight.mul_(1.001)
    monkeypatch.setattr(onnx_validate, "load_reference", lambda model_dir, config, task: reference)
    with ModelFolder.open(merged_model("d2lora-llama")) as model:
        validation = donnx.validate_export(result.out, model, "text-generation")
    assert validation.passed is False
    logits = validation.checks[0].outputs["logits"]
    assert FLOAT32.max_relative < logits.relative < 1e-2
    assert validation.checks[0].failures[0].startswith("logits: max |diff|")


# --- errors and atomic output -----------------------------------------------------------------------

def test_not_a_model_folder(tmp_path):
    with pytest.raises(D2ExportError, match="model folder not found"):
        export_onnx(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(D2ExportError, match="model folder not found"):
        export_onnx(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(D2ExportError, match=r"no config\.json"):
        export_onnx(empty)
    (empty / "config.json").write_text("{not json")
    with pytest.raises(D2ExportError, match="invalid JSON"):
        export_onnx(empty)
    (empty / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(D2ExportError, match="no model weights"):
        export_onnx(empty)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file.txt"]  # nothing written


def test_unsupported_architecture(merged_model, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(merged_model("d2lora-llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="d2x-custom", architectures=["D2xCustomForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(D2ExportError, match="optimum cannot export model type 'd2x-custom'"):
        export_onnx(folder)
    assert not (tmp_path / "custom-onnx").exists()


def test_bad_options(merged_model, tmp_path):
    model = merged_model("d2lora-llama")
    cases = [
        ({"task": "text-generaton"}, "is unknown"),
        ({"task": "question-answering"}, "cannot export llama for question-answering"),
        ({"optimize": "O7"}, "optimize must be O1, O2 or O3"),
        ({"optimize": "O4"}, "needs a CUDA GPU"),
        ({"quantize": "int4"}, "quantize must be int8"),
        ({"quantize": "int8", "fp16": True}, "cannot be combined with fp16"),
        ({"opset": 99}, "opset 99 is not one"),
    ]
    for options, message in cases:
        with pytest.raises(D2ExportError, match=message):
            export_onnx(model, tmp_path / "out", **options)
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_force(merged_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(D2ExportError, match="already exists"):
        export_onnx(merged_model("d2lora-bert"), out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(D2ExportError, match="holds neither"):  # --force replaces only an earlier output
        export_onnx(merged_model("d2lora-bert"), out, force=True, validate=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "model.onnx").write_bytes(b"an earlier export")
    result = export_onnx(merged_model("d2lora-bert"), out, force=True, validate=False)
    assert (out / "model.onnx").stat().st_size > 100 and not (out / "keep.txt").exists()
    assert "not validated (validate=False)" in result.report["notes"]
    with pytest.raises(D2ExportError, match="overlaps the input"):
        export_onnx(merged_model("d2lora-bert"), merged_model("d2lora-bert") / "onnx")


def test_failed_export_leaves_nothing(merged_model, tmp_path, monkeypatch):
    # An opset without scaled_dot_product_attention: torch refuses, with a message naming the opset.
    with pytest.raises(D2ExportError, match="opset version 11"):
        export_onnx(merged_model("d2lora-llama"), tmp_path / "old-opset", opset=11)

    def broken(source, target):
        raise RuntimeError("disk full")

    monkeypatch.setattr(onnx_export, "quantize_int8", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_onnx(merged_model("d2lora-bert"), tmp_path / "half", quantize="int8")
    assert not list(tmp_path.iterdir())  # no output, no .partial folder


def test_default_output_beside_model(merged_model):
    model = merged_model("lora-bert-cls")
    result = export_onnx(model, validate=False)
    try:
        assert result.out == model.parent / f"{model.name}-onnx"
        assert (result.out / "model.onnx").is_file() and (result.out / REPORT_NAME).is_file()
        umask = os.umask(0o022)
        os.umask(umask)
        assert stat.S_IMODE(result.out.stat().st_mode) == 0o777 & ~umask  # not the temporary folder's 0700
    finally:
        shutil.rmtree(result.out)


# --- the command line ------------------------------------------------------------------------------

def test_cli_onnx_exit_codes(merged_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from d2export.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["onnx", str(merged_model("d2lora-bert")), "--out", str(tmp_path / "ok"), "--json"])
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["passed"] is True and "ONNX export validated" in ok.output
    bad = runner.invoke(app, ["onnx", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "model folder not found" in bad.output and not (tmp_path / "x").exists()
    other = load_model(merged_model("lora-llama"), torch.float32)
    monkeypatch.setattr(onnx_validate, "load_reference", lambda model_dir, config, task: other)
    failed = runner.invoke(app, ["onnx", str(merged_model("d2lora-llama")), "--out", str(tmp_path / "f"), "--no-past"])
    assert failed.exit_code == 1 and "ONNX validation FAILED" in failed.output and "FAIL logits" in failed.output


def test_cli_merge_then_onnx(fixture, tmp_path):
    from typer.testing import CliRunner

    from d2export.cli import app

    folder = fixture("d2lora-gpt2")
    result = CliRunner().invoke(app, ["merge", str(folder / "adapter"), "--base", str(folder / "base"), "--out",
                                      str(tmp_path / "m"), "--verify", "--onnx"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m-onnx" / REPORT_NAME).read_text())
    assert report["passed"] and report["task"] == "text-generation-with-past"
    assert "PASSED" in result.output and "ONNX export validated" in result.output


def test_a_classifier_over_a_sentence_transformers_base_exports_without_its_modules(merged_model, tmp_path):
    """A classifier merged over a sentence-transformers base keeps the base's modules.json (it still
    loads as embeddings with SentenceTransformer), but the classifier's graph has no
    last_hidden_state for SentenceTransformer(backend="onnx"): the export leaves the modules out and
    says how to get an embedding graph, instead of failing a check that could never pass."""
    folder = shutil.copytree(merged_model("lora-bert-cls"), tmp_path / "cls")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                    "pooling_mode_mean_tokens": True}))
    result = export_onnx(folder, tmp_path / "cls-onnx")
    assert result.passed and result.report["task"] == "text-classification"
    assert "sentence_transformers" not in result.report and "sentence_transformers" not in result.report["validation"]
    assert not (result.out / "modules.json").exists()
    assert any(n.startswith("sentence-transformers modules not carried: the graph is text-classification")
               for n in result.report["notes"])


def test_the_export_shows_no_progress_bar_of_transformers(merged_model, tmp_path, capfd):
    """optimum loads a sharded folder with transformers' "Loading checkpoint shards" bar: d2export
    shows its own progress, and says the libraries' output is silenced."""
    from transformers.utils import logging as hf_logging

    folder = merged_model("rslora-llama-patterns")
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    hf_logging.enable_progress_bar()
    capfd.readouterr()
    export_onnx(folder, tmp_path / "onnx", validate=False)
    assert "Loading checkpoint shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # put back as it was
