"""The fidelity gate: ``verify`` passes correct merges (ours, and PEFT's own) and catches each
kind of wrong merge, at the weight level and at the output level."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import build
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import tamper_tensor
from typer.testing import CliRunner

from d2export import merge, verify
from d2export.arrays import bfloat16, numpy_dtype
from d2export.cli import app
from d2export.runtime.calibration import random_batches
from d2export.runtime.comparison import OutputComparison
from d2export.verification import Thresholds
from d2export.verification.outputs import FOLDER, PEFT, ROUNDED, UNMERGED
from d2export.verification.weights import spacing

runner = CliRunner()


def copy_adapter(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    """A copy of an adapter with some config keys changed and/or its tensors edited in place."""
    shutil.copytree(src, dst)
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    if tensors:
        file = dst / "adapter_model.safetensors"
        values = load_file(file)
        tensors(values)
        save_file(values, file)
    return dst


def wrong_merge(fixture_folder: Path, tmp: Path, **adapter_changes) -> Path:
    """d2export's (correct) merge of a deliberately altered adapter: a stand-in for a buggy merge."""
    bad = copy_adapter(fixture_folder / "adapter", tmp / "bad-adapter", **adapter_changes)
    return merge(bad, base=fixture_folder / "base", out=tmp / "bad-merged").out


# ---------------------------------------------------------------- passes what is right


@pytest.mark.parametrize("name", build.FIXTURES)
def test_every_fixture_format_passes(merged, name):
    folder, out = merged(name)
    report = verify(out, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    summary = report.weights.summary()
    assert summary["exact_fraction"] == 1.0 and summary["max_units"] <= 0.5  # ours: correctly rounded
    assert summary["copies_identical"] == summary["copied_tensors"]
    assert {o.dtype for o in report.outputs} == {"float32"}  # one dtype unless asked
    assert all(o.comparison.positions > 0 for o in report.outputs)
    rungs = {o.rung for o in report.outputs}
    assert rungs == ({"fidelity", "loading", "rounding cost"}
                     | ({"references"} if report.method in ("lora", "rslora", "dora") else set()))
    loading = next(o for o in report.outputs if o.rung == "loading")
    assert loading.rule.startswith("equal outputs") and loading.comparison.max_abs == 0.0


@pytest.mark.parametrize("name", ["lora-llama", "dora-llama", "dora-gpt2", "lora-bert-cls"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peft_merge_and_unload_folder_passes_and_is_compared_with_ours(fixture, tmp_path, name, dtype):
    folder = fixture(name)
    base = folder / "base"
    if dtype is torch.bfloat16:  # a bf16 base, as users deploy
        base = tmp_path / "base-bf16"
        build._load(folder / "base").to(dtype).save_pretrained(base)
    out = build.peft_merged(base, folder / "adapter", tmp_path / "peft-merged", dtype=dtype)
    report = verify(out, folder / "adapter", base=base)
    assert report.passed, report.failures
    assert report.merged_by == "unknown"
    assert report.merged_dtype == str(dtype).removeprefix("torch.")
    assert {(o.rung, o.candidate, o.reference) for o in report.outputs} == {
        ("fidelity", FOLDER, UNMERGED), ("loading", FOLDER, ROUNDED), ("rounding cost", ROUNDED, UNMERGED),
        ("references", PEFT, UNMERGED)}
    # equal outputs are required only where every tensor is the correctly rounded value
    loading = next(o for o in report.outputs if o.rung == "loading")
    assert loading.rule.startswith("equal outputs" if report.weights.all_exact else "not judged")
    assert loading.judged == report.weights.all_exact == loading.to_dict()["judged"]
    assert not next(o for o in report.outputs if o.rung == "rounding cost").judged
    # PEFT's float32 merge rounds several times; it is within the float32 limit but not exact.
    assert 0.0 < report.weights.summary()["max_units"] <= 32


def test_minilm_real_weights_end_to_end_with_task_gap(merged):
    folder, out = merged("d2lora-minilm")
    report = verify(out, folder / "adapter", base=folder / "base", task_data=build.TASK)
    assert report.passed, report.failures
    assert [r.dtype for r in report.task] == ["float32", "bfloat16", "float16"]
    for result in report.task:
        assert result.examples == 160 and result.scoring == "nearest centroid"
        assert abs(result.gap_pp) <= 2.0
    # the adapter learned the task: the merged model beats the base on it by a margin
    base_report = verify(folder / "base", folder / "adapter", base=folder / "base", weights=False,
                         outputs=False, task_data=build.TASK)
    assert base_report.task[0].merged_accuracy + 0.1 < report.task[0].merged_accuracy
    assert report.outputs[0].output == "hidden states" and report.outputs[0].comparison.top1 is None


@pytest.mark.parametrize(("rows", "needle"), [
    ([("a", "pos", "train"), ("b", "pos", "test")], "one label (pos)"),
    ([("a", "pos", "train"), ("  ", "neg", "test")], ":2: text must be a non-empty string"),
    ([("a", "pos", "train"), ("b", "neg", "test")], "none for neg"),
], ids=["one-label", "empty-text", "label-without-train-examples"])
def test_task_data_that_proves_nothing_is_refused_before_any_model_runs(merged, tmp_path, monkeypatch, rows, needle):
    """A set whose accuracy is 100% for any model, or a class without a centroid (NaN scores), is
    bad input (exit 2, one line), found before the models load."""
    from d2export.runtime import models

    folder, out = merged("d2lora-minilm")
    data = tmp_path / "task.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y, "split": s}) for t, y, s in rows))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    result = runner.invoke(app, ["verify", str(out), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), "--task-data", str(data)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.output
    assert needle in result.stderr


def test_a_folder_without_the_buffers_transformers_rebuilds_passes_with_a_note(merged, tmp_path):
    """all-MiniLM-L6-v2 stores ``embeddings.position_ids``; transformers' save_pretrained no longer
    writes it, so PEFT's merged folders lack it: not a failure (transformers builds the same values
    when loading), but a note. A real weight missing still fails."""
    from safetensors.torch import load_file, save_file

    folder, out = merged("d2lora-minilm")
    copy = tmp_path / "m"
    shutil.copytree(out, copy)
    tensors = load_file(copy / "model.safetensors")
    assert "embeddings.position_ids" in tensors
    del tensors["embeddings.position_ids"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    report = verify(copy, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    assert "with the base's values: embeddings.position_ids" in " ".join(report.notes)
    del tensors["embeddings.LayerNorm.bias"]
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    report = verify(copy, folder / "adapter", base=folder / "base", outputs=False)
    assert [t.name for t in report.weights.failures] == ["embeddings.LayerNorm.bias"]


def test_text_calibration_with_the_models_tokenizer(merged, tmp_path):
    folder, out = merged("d2lora-minilm")
    text = tmp_path / "calibration.txt"
    text.write_text("A short line.\n\nA much longer line of text, so that the batch really needs padding here.\n"
                    "Third.\n")
    report = verify(out, folder / "adapter", base=folder / "base", weights=False, calibration=text)
    assert report.passed
    assert report.outputs[0].comparison.positions == sum(report_tokens(out, text))
    assert report.calibration == f"{text} (1 batch, each line cut to 128 tokens)"
    long = tmp_path / "long.txt"
    long.write_text("word " * 2000 + "\n")  # cut, as the report says
    report = verify(out, folder / "adapter", base=folder / "base", weights=False, calibration=long)
    assert report.passed and report.outputs[0].comparison.positions == 128


def report_tokens(folder: Path, text: Path) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [len(tokenizer(line)["input_ids"]) for line in text.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- catches what is wrong


def test_one_bf16_element_moved_by_8_ulps_fails(merged, tmp_path):
    folder, out = merged("d2lora-llama-bf16")
    bad = shutil.copytree(out, tmp_path / "bad")
    name = "model.layers.1.mlp.up_proj.weight"

    def move(t: torch.Tensor) -> None:
        bits = t.view(torch.int16)
        bits[5, 7] += 8 if bits[5, 7] >= 0 else -8  # 8 ulps further from zero

    tamper_tensor(bad, name, move)
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert not report.passed
    (failure,) = report.failures
    assert name in failure and "[5, 7]" in failure
    check = next(t for t in report.weights.tensors if t.name == name)
    # 8 ulps of the element itself; counted in units at the operands' (larger or equal) scale
    ulp = float(spacing(np.float64(load_file(out / "model.safetensors")[name][5, 7].double()), bfloat16))
    assert 7.5 * ulp <= check.max_abs <= 8.5 * ulp
    assert check.max_units > 3
    assert check.exact_fraction == 1 - 1 / check.elements


def test_one_ulp_is_within_the_default_limit(merged, tmp_path):
    folder, out = merged("d2lora-llama-bf16")
    bad = shutil.copytree(out, tmp_path / "bad")
    tamper_tensor(bad, "model.layers.0.self_attn.q_proj.weight", lambda t: t.view(torch.int16)[0, :4].add_(1))
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert report.passed
    assert 0.5 < report.weights.summary()["max_units"] <= 1.5


def _rounded_from_float32(values: torch.Tensor, rounding: str) -> torch.Tensor:
    """float32 values to bfloat16 by their bits: toward zero (truncation), down, or to nearest with
    ties away from zero."""
    bits = values.contiguous().view(torch.int32)
    inexact = (bits & 0xFFFF) != 0
    if rounding == "toward zero":
        bits = bits & ~0xFFFF
    elif rounding == "down":  # sign and magnitude: a negative value rounds down by growing
        bits = (bits & ~0xFFFF) + ((values < 0) & inexact).to(torch.int32) * 0x10000
    else:
        bits = (bits + 0x8000) & ~0xFFFF
    return bits.view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize(("rounding", "fails"), [("toward zero", "rounded toward zero"),
                                                 ("down", "rounded down"),
                                                 ("ties away", None)])
def test_a_folder_rounded_one_way_fails_though_within_a_unit(merged, tmp_path, rounding, fails):
    """The float32 merge rounded to bf16 toward zero (truncated) or down stays within one unit of
    the correct rounding, inside the weight bound, but leans one way in every row: the weight check
    fails it. Rounded to nearest with ties away from zero after that first rounding to float32 (a
    double rounding and another tie-break), it is off only at near-ties, both ways, and passes."""
    folder, out = merged("d2lora-llama-bf16")
    f32 = load_file(merge(folder / "adapter", base=folder / "base", out=tmp_path / "f32", dtype="float32").out
                    / "model.safetensors")
    bad = shutil.copytree(out, tmp_path / "bad")
    save_file({k: _rounded_from_float32(v, rounding) for k, v in f32.items()}, bad / "model.safetensors",
              metadata={"format": "pt"})  # the base's tensors are bf16 values: every rounding keeps them
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    summary = report.weights.summary()
    assert summary["max_units"] <= 1.0 and summary["copies_identical"] == summary["copied_tensors"]
    if fails is None:
        assert report.passed, report.failures
        assert 0.99 < summary["exact_fraction"] < 1.0
        return
    assert not report.passed and summary["exact_fraction"] < 0.75
    assert report.failures and all(fails in f and "not to nearest" in f for f in report.failures)
    assert len(report.failures) >= len([t for t in report.weights.tensors if t.action == "merge"]) // 2


def test_wrong_tau_fails(merged, tmp_path):
    folder, _ = merged("d2lora-llama")
    bad = wrong_merge(folder, tmp_path, config={"tau": 0.6})
    report = verify(bad, folder / "adapter", base=folder / "base")
    assert not report.passed
    assert sum(f.startswith("weights:") for f in report.failures) == 14  # every adapted tensor
    assert any(f.startswith("outputs:") for f in report.failures)


def test_dropped_negative_branch_fails(merged, tmp_path):
    folder, _ = merged("d2lora-llama")

    def drop(values):
        for key in values:
            if "lora_B_neg" in key:
                values[key] = torch.zeros_like(values[key])

    bad = wrong_merge(folder, tmp_path, tensors=drop)
    report = verify(bad, folder / "adapter", base=folder / "base")
    assert not report.passed and len(report.weights.failures) == 14
    assert min(t.max_units for t in report.weights.failures) > 100


def test_missing_norm_rescaling_fails(merged, tmp_path):
    folder, _ = merged("d2lora-llama")
    bad = wrong_merge(folder, tmp_path, config={"norm_projection": False})
    report = verify(bad, folder / "adapter", base=folder / "base")
    assert not report.passed and len(report.weights.failures) == 14
    assert any(f.startswith("outputs:") for f in report.failures)


def test_changed_diffora_unselected_module_fails(merged, tmp_path):
    folder, _ = merged("d2lora-llama-diffora")
    # Without its DAM file the adapter merges every module: the 8 the DAM left out now change.
    bad_adapter = copy_adapter(folder / "adapter", tmp_path / "no-dam")
    (bad_adapter / "diffora_dam.json").unlink()
    bad = merge(bad_adapter, base=folder / "base", out=tmp_path / "bad").out
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    unselected = [t for t in report.weights.tensors if t.action == "unselected"]
    assert len(unselected) == 8 and all(not t.passed and t.identical is False for t in unselected)
    assert all("DiffoRA" in t.problem for t in unselected)
    assert len(report.failures) == 8


def test_one_bit_in_an_untouched_tensor_fails(merged, tmp_path):
    folder, out = merged("d2lora-llama")
    bad = shutil.copytree(out, tmp_path / "bad")
    tamper_tensor(bad, "model.norm.weight", lambda t: t.view(torch.int32)[3].add_(1))
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert report.failures == ["weights: model.norm.weight: not adapted but differs from the base (1.56% of elements)"]


def test_a_changed_replaced_tensor_fails_against_the_adapters_tensor(merged, tmp_path):
    """A tensor the adapter replaces whole (a modules_to_save classifier) is judged against the
    adapter's own values, and the failure says so, not "the exact merge"."""
    folder, out = merged("lora-bert-cls")
    bad = shutil.copytree(out, tmp_path / "bad")
    tamper_tensor(bad, "classifier.weight", lambda t: t[0, 1].add_(0.5))
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert len(report.failures) == 1
    assert report.failures[0].startswith("weights: classifier.weight: element [0, 1] is ")
    assert " off the adapter's tensor (limit " in report.failures[0]


def test_peft_merge_with_wrong_scale_fails(fixture, tmp_path):
    folder = fixture("lora-llama")
    wrong = copy_adapter(folder / "adapter", tmp_path / "alpha", config={"lora_alpha": 9})  # scale 2.25, not 2
    out = build.peft_merged(folder / "base", wrong, tmp_path / "peft-merged")
    report = verify(out, folder / "adapter", base=folder / "base")
    assert not report.passed
    assert len(report.weights.failures) == 4  # q_proj and v_proj in both layers
    assert any(f.startswith("outputs: fidelity: merged folder vs unmerged model") for f in report.failures)
    # ...while PEFT's unmerged model and d2export's agree: the adapter itself is read the same way
    assert all(o.passed for o in report.outputs if o.rung == "references")


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_a_config_declaring_a_narrower_dtype_than_the_weights_fails(merged, tmp_path, key):
    """verify runs the folder in the dtypes it names, so the config's dtype changes no figure; but
    ``from_pretrained(dtype="auto")`` reads it, and a float32 folder declared bfloat16 loads as
    another model. A 16-bit folder declared float32 loads as the same weights: a note."""
    folder, out = merged("d2lora-llama")
    config = json.loads((out / "config.json").read_text())
    assert config.get(key, "float32") == "float32"
    bad = shutil.copytree(out, tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({**config, key: "bfloat16"}))
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert report.failures == [f'config: config.json declares "{key}": "bfloat16" but the weights are float32: '
                               'from_pretrained(dtype="auto") and serving stacks that read it load the model rounded '
                               'to bfloat16, not the float32 model verified; set it to "float32"']
    result = runner.invoke(app, ["verify", str(bad), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), "--weights-only"])
    assert result.exit_code == 1, result.output
    folder16, out16 = merged("d2lora-llama-bf16")
    wide = shutil.copytree(out16, tmp_path / "wide")
    (wide / "config.json").write_text(json.dumps({**json.loads((out16 / "config.json").read_text()),
                                                  key: "torch.float32"}))
    report = verify(wide, folder16 / "adapter", base=folder16 / "base", outputs=False)
    assert report.passed
    assert any(note.startswith(f'config.json declares "{key}": "float32" but the weights are bfloat16')
               for note in report.notes)
    assert verify(out16, folder16 / "adapter", base=folder16 / "base", outputs=False).notes == []


def test_an_adapter_d2export_reads_wrongly_is_caught_by_peft_s_own_model(fixture, tmp_path, monkeypatch):
    """If d2export misread an adapter (here: rsLoRA's alpha/sqrt(r) taken as alpha/r), its merge,
    its unmerged reference and its weight check would all share the mistake and agree: only PEFT's
    own model, which shares no code with d2export, sees it. The references rung fails."""
    from d2export.formats.common import Scaling

    folder = fixture("rslora-llama-patterns")
    of = Scaling.of

    def misread(self, module):
        r, alpha, _ = of(self, module)
        return r, alpha, alpha / r

    monkeypatch.setattr(Scaling, "of", misread)
    out = merge(folder / "adapter", base=folder / "base", out=tmp_path / "misread", hash_inputs=False).out
    report = verify(out, folder / "adapter", base=folder / "base", resident="all")
    assert report.weights.passed
    assert [o.rung for o in report.outputs if not o.passed] == ["references"]
    assert report.failures[0].startswith("outputs: references: PEFT unmerged vs unmerged model (float32)")
    # a model too large for PEFT's whole model in memory: PEFT's reading of the adapter catches it
    streamed = verify(out, folder / "adapter", base=folder / "base", resident=1, weights=False)
    assert all(o.passed for o in streamed.outputs) and not any(o.rung == "references" for o in streamed.outputs)
    assert streamed.peft_reading.modules == len(streamed.failures) == 14
    assert streamed.failures[0] == ("references: PEFT's reading of the adapter: model.layers.0.mlp.down_proj: PEFT "
                                    "reads rank 2, scale 5.65685; d2export rank 2, scale 4")


def test_peft_s_reading_of_the_adapter_agrees_where_its_model_does_not_fit(fixture, tmp_path, monkeypatch, caplog):
    """Every PEFT adapter format the fixtures have (rsLoRA with patterns, DoRA, GPT-2's Conv1D, a
    classifier head, a tied head) is read by PEFT's layers on an empty model as d2export reads it;
    where PEFT cannot build them, a note says so and nothing fails. The streamed models log no
    accelerate warning about the offload d2export asks for (a library caller would see it)."""
    import peft

    for name in ("rslora-llama-patterns", "dora-gpt2", "lora-bert-cls", "lora-llama-tied"):
        folder = fixture(name)
        result = merge(folder / "adapter", base=folder / "base", out=tmp_path / name, hash_inputs=False)
        report = verify(result.out, folder / "adapter", base=folder / "base", resident=1, weights=False)
        assert report.passed, report.failures
        assert report.peft_reading.problems == []
        assert report.peft_reading.modules == len(result.job.spec.updates) > 0
    assert not [r for r in caplog.records if "meta device" in r.getMessage()]

    def fails(*args, **kwargs):
        raise ValueError("no layers here")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", fails)
    report = verify(result.out, folder / "adapter", base=folder / "base", resident=1, weights=False)
    assert report.passed and report.peft_reading.error == "ValueError: no layers here"
    assert "PEFT's reading of the adapter not compared: PEFT could not build its layers on an empty model " \
           "(ValueError: no layers here)" in report.notes


def test_missing_tensor_and_output_thresholds(merged, tmp_path):
    folder, out = merged("d2lora-llama-bf16")
    strict = verify(out, folder / "adapter", base=folder / "base", weights=False, thresholds=Thresholds(atol=1e-6))
    assert not strict.passed and all("bfloat16" in f or "float32" in f for f in strict.failures)
    assert all("worst at batch " in f and " row " in f and " position " in f for f in strict.failures)
    top1 = verify(out, folder / "adapter", base=folder / "base", weights=False, thresholds=Thresholds(min_top1=1.0),
                  dtypes="bf16")  # bf16 logits of bf16 weights: some top-1 differ on these inputs
    assert any("top-1 agreement" in f for f in top1.failures)
    bad = shutil.copytree(out, tmp_path / "bad")
    file = bad / "model.safetensors"
    values = load_file(file)
    del values["model.norm.weight"]
    save_file(values, file)
    report = verify(bad, folder / "adapter", base=folder / "base", outputs=False)
    assert report.failures == ["weights: model.norm.weight: missing from the merged folder"]


# ---------------------------------------------------------------- pieces


def test_padded_positions_are_not_compared():
    batch = random_batches(50, lengths=(6,), batch_size=3)[0]
    # seeded, and multiples of 1/64: adding 0.5 (or 100) below is exact in float32, so the
    # differences found are exactly the ones put there
    reference = torch.randn(3, 6, 10, generator=torch.Generator().manual_seed(0)).mul(64).round().div(64)
    candidate = reference.clone()
    candidate[batch.attention_mask == 0] += 100.0  # garbage where the mask says pad
    result = OutputComparison()
    result.add(reference, candidate, batch.attention_mask)
    assert result.max_abs == 0.0 and result.positions == batch.num_tokens < 18 and result.top1 == 1.0
    candidate[2, 1, 3] += 0.5  # a real position: found, and located
    result.add(reference, candidate, batch.attention_mask)
    assert result.max_abs == 0.5 and result.worst == [1, 2, 1] and result.where() == "batch 1 row 2 position 1"


def test_figures_do_not_depend_on_how_many_positions_are_compared_at_once(monkeypatch):
    from d2export.runtime import comparison

    batch = random_batches(51, lengths=(7,), batch_size=3)[0]
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(3, 7, 10, generator=generator)
    candidate = reference + 0.01 * torch.randn(3, 7, 10, generator=generator)
    candidate[0, 2, 4] = float("nan")  # a real position
    figures, agreements = [], []
    for elements in (comparison.COMPARE_ELEMENTS, 10, 25):  # all at once, one position, two and a half
        monkeypatch.setattr(comparison, "COMPARE_ELEMENTS", elements)
        result = OutputComparison()
        result.add(reference, candidate, batch.attention_mask)
        figures.append(result.to_dict())
        agreements.append(result.agreement())
        # one agreement tensor per batch, not one per chunk (kept chunk by chunk, they fragmented the heap)
        assert len(result.top1_hits) == 1
    assert figures[0]["max_abs"] == float("inf") and figures[0]["worst"] == [0, 0, 2]
    assert all(torch.equal(a, agreements[0]) for a in agreements) and agreements[0].numel() == batch.num_tokens
    for other in figures[1:]:
        assert other.keys() == figures[0].keys()
        for key, value in other.items():
            assert value == pytest.approx(figures[0][key], rel=1e-12, nan_ok=True), key


def test_batches_compared_apart_and_assembled_give_the_figures_of_one_comparison():
    """verify compares each batch as both models have it, in whatever order they come, and
    assembles the figures in one order: the same figures, where they are, and the same per-position
    agreement, as one comparison of the batches in that order (sums up to rounding)."""
    generator = torch.Generator().manual_seed(2)
    batches = random_batches(52, lengths=(5, 9, 3), batch_size=2)
    outputs = []
    for batch in batches:
        reference = torch.randn(2, batch.input_ids.shape[1], 10, generator=generator)
        outputs.append((reference, reference + 0.05 * torch.randn(reference.shape, generator=generator)))
    outputs[1][1][1, 2, 7] += 3.0  # the worst difference, in the middle batch
    order = [2, 0, 1]
    whole = OutputComparison()
    for i in order:
        whole.add(*outputs[i], batches[i].attention_mask, batch=i)
    parts = {}
    for i in (1, 2, 0):  # as they come
        parts[i] = OutputComparison()
        parts[i].add(*outputs[i], batches[i].attention_mask, batch=i)
    assembled = OutputComparison()
    for i in order:
        assembled.extend(parts[i])
    a, b = assembled.to_dict(), whole.to_dict()
    assert a.pop("worst") == b.pop("worst") == [1, 1, 2]
    assert a == pytest.approx(b, rel=1e-12) and assembled.batches == whole.batches == 3
    assert torch.equal(assembled.agreement(), whole.agreement())


def test_spacing_matches_nextafter():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x = torch.tensor([1.0, 0.75, 3e-3, -2.5, 1e3], dtype=dtype)
        gap = (torch.nextafter(x.abs(), torch.full_like(x, float("inf"))) - x.abs()).double()
        assert torch.equal(torch.from_numpy(spacing(x.double().numpy(), numpy_dtype(dtype))), gap)


# ---------------------------------------------------------------- the command line


def test_cli_verify_json_and_exit_codes(merged, tmp_path):
    folder, out = merged("d2lora-llama")
    ok = runner.invoke(app, ["verify", str(out), "--adapter", str(folder / "adapter"), "--base", str(folder / "base"),
                             "--json"])
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["passed"] and data["weights"]["summary"]["exact_fraction"] == 1.0
    assert data["outputs"][0]["generation"]["prompts"] == 3

    bad = wrong_merge(folder, tmp_path, config={"tau": 0.6})
    failed = runner.invoke(app, ["verify", str(bad), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), "--weights-only"])
    assert failed.exit_code == 1
    assert "FAIL weights: model.layers.0.mlp.down_proj.weight: element" in failed.output
    # the summary line does not read as all well above the failures
    assert re.search(r"; [1-9]\d* failed \(below\)", " ".join(failed.output.split()))
    assert "FAILED" in failed.output
    table = runner.invoke(app, ["verify", str(bad), "--adapter", str(folder / "adapter"), "--base",
                                str(folder / "base")])
    assert table.exit_code == 1
    rows = {line.split()[0]: line for line in table.output.splitlines() if line.startswith(" ") and line.split()}
    # the loading rung of a folder whose tensors are not all exact has no verdict: no "ok" beside it
    assert rows["loading"].split()[-1] not in ("ok", "FAIL") and rows["fidelity"].split()[-1] == "FAIL"

    missing = runner.invoke(app, ["verify", str(tmp_path / "nope"), "--adapter", str(folder / "adapter")])
    assert missing.exit_code == 2 and "merged model folder not found" in missing.output
    calibration = runner.invoke(app, ["verify", str(out), "--adapter", str(folder / "adapter"), "--base",
                                      str(folder / "base"), "--calibration", str(tmp_path / "missing.txt")])
    assert calibration.exit_code == 2 and "calibration" in calibration.output


def test_folder_of_another_architecture_is_bad_input(fixture):
    """A BERT folder checked against a Llama adapter's base: the arguments do not belong together
    (exit 2, one line), not a merge that failed (every tensor would read "missing")."""
    llama, bert = fixture("lora-llama"), fixture("lora-bert-cls")
    result = runner.invoke(app, ["verify", str(bert / "base"), "--adapter", str(llama / "adapter"), "--base",
                                 str(llama / "base")])
    assert result.exit_code == 2, result.output
    assert len(result.stderr.splitlines()) == 1 and "a bert model" in result.stderr and "a llama model" in result.stderr


def test_models_whose_inputs_the_output_checks_cannot_make_are_named():
    """Audio models and text-and-image models are refused by the output checks in one line (they
    ended in a transformers error about a missing input, read as an unexpected exception)."""
    from d2export.runtime.models import inputs_problem

    assert inputs_problem({"architectures": ["Wav2Vec2ForCTC"]}) == "Wav2Vec2ForCTC takes audio samples (input_values)"
    assert inputs_problem({"architectures": ["WhisperForConditionalGeneration"]}) == (
        "WhisperForConditionalGeneration takes audio features (input_features)")
    assert inputs_problem({"architectures": ["CLIPModel"], "text_config": {}, "vision_config": {}}) == (
        "CLIPModel takes text and images together")
    for fed in ("LlamaForCausalLM", "ViTForImageClassification", "T5ForConditionalGeneration", "NoSuchModel"):
        assert inputs_problem({"architectures": [fed]}) is None


def test_verify_leaves_a_host_process_as_it_found_it(merged):
    """Inside a serving pipeline: a host's frozen heap stays frozen (verify froze and then unfroze
    everything), and transformers' progress bars stay on."""
    import gc

    from transformers.utils import logging as transformers_logging

    folder, out = merged("d2lora-llama")
    transformers_logging.enable_progress_bar()
    gc.freeze()
    frozen = gc.get_freeze_count()
    try:
        assert verify(out, folder / "adapter", base=folder / "base", resident=1, weights=False).passed
        assert gc.get_freeze_count() >= frozen > 0
        assert transformers_logging.is_progress_bar_enabled()
    finally:
        gc.unfreeze()


def test_cli_merge_verify_records_figures(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    result = runner.invoke(app, ["merge", str(folder / "adapter"), "--base", str(folder / "base"), "--out",
                                 str(tmp_path / "m"), "--verify"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "m" / "d2export_report.json").read_text())
    assert report["verification"]["passed"] and report["verification"]["merged_by"] == "d2export"
    assert "verification passed" in (tmp_path / "m" / "README.md").read_text()
    # every command's report goes to stdout (stderr only with --json, which keeps stdout for the JSON)
    assert "merged d2lora into" in result.stdout and "PASSED" in result.stdout


def test_adapter_from_bare_encoder_onto_classifier_base(fixture, tmp_path):
    """Adapter keys without the base-model prefix (trained on ``BertModel``) merged into a
    ``BertForSequenceClassification`` base whose tensors carry ``bert.``: resolved, and verified."""
    adapter, base = fixture("d2lora-bert") / "adapter", fixture("lora-bert-cls") / "base"
    result = merge(adapter, base=base, out=tmp_path / "m")
    assert result.report["tensors"]["merge"] == 11
    assert all(m["tensor"].startswith("bert.") for m in result.report["modules"])
    report = verify(result.out, adapter, base=base)
    assert report.passed, report.failures
    assert report.outputs[0].output == "logits" and report.weights.summary()["exact_fraction"] == 1.0


def test_generation_prompts_fit_a_short_position_table():
    from d2export.verification.ladder import GENERATION_STEPS, generation_prompts

    batches = random_batches(100, lengths=(8, 24, 64))
    # the three longest rows (64, 56 and 48 real tokens), cut to one length; with the steps they fit the table
    prompts = generation_prompts(batches, {})
    assert prompts.batch == 2 and prompts.rows.tolist() == [0, 1, 2]
    assert tuple(prompts.tokens(batches).shape) == (3, 48)
    assert generation_prompts(batches, {"n_positions": 20}).length + GENERATION_STEPS == 20


# Encoder-decoders (teacher-forced) and vision models (random images) verify in
# tests/test_architectures.py, with every other architecture.


def test_rounding_floor_passes_a_correct_merge_the_fixed_limits_fail(merged, tmp_path, monkeypatch):
    """With fixed limits tighter than the rounding floor of this model (near-tied logits do that
    at real sizes), a correctly rounded merge still passes: it is exactly as far from the unmerged
    model as the correctly rounded merge is. A wrong folder fails still."""
    import d2export.verification.ladder as ladder_module

    folder, out = merged("d2lora-llama-bf16")
    monkeypatch.setattr(ladder_module, "MIN_TOP1", {"float32": 1.0, "bfloat16": 1.0, "float16": 1.0})
    monkeypatch.setattr(ladder_module, "output_rtol", lambda run, merged_dtype: 1e-9)
    report = verify(out, folder / "adapter", weights=False)
    assert report.passed, report.failures
    folder_checks = [o for o in report.outputs if o.rung == "fidelity"]
    assert all(o.floor is not None and o.comparison.max_abs == o.floor.max_abs for o in folder_checks)
    assert any("the rounding of the output dtype, not the merge" in note for note in report.notes)
    assert report.to_dict()["outputs"][0]["rounding_floor"] is not None
    assert report.to_dict()["rounding_cost"]["outputs"]["float32"]["top1"] is not None
    # explicit limits are final: no floor is consulted
    assert not verify(out, folder / "adapter", weights=False, thresholds=Thresholds(min_top1=1.0)).passed
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        tamper_tensor(bad, name, lambda w: w.mul_(1.05))  # 5% on two tensors: a few rounding floors
    failed = verify(bad, folder / "adapter", weights=False)
    assert not failed.passed and any(o.floor is not None for o in failed.outputs)


def test_the_share_of_correctly_rounded_elements_reads_100_percent_only_when_it_is():
    from d2export.cli.render import share

    assert share(1.0) == "100.00%" and share(0.5) == "50.00%"
    assert share(1 - 1 / 600_000) == "> 99.99%"  # one element off in a model's worth
