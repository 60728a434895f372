"""``d2export bench``: every model row is there and its figures agree with its timings, ratios come
from the rows, the outputs (table, JSON, PNG) are written, bad input exits 2, and the unmerged model
it times (norms in the model dtype) computes what the float64-norm reference computes.

Timings of tiny models are noise: nothing here asserts a speed, only that the figures are consistent.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from d2export import BenchOptions, OptionError, export_onnx
from d2export.bench import (
    BASE,
    MERGED,
    PAPER_MERGED_SPEEDUP,
    UNMERGED,
    UNMERGED_PEFT,
    BenchReport,
    Workload,
    run_bench,
)
from d2export.bench.inputs import bench_inputs, workloads
from d2export.cli import app
from d2export.formats import load_adapter
from d2export.reading import read_config
from d2export.runtime.calibration import Batch, special_ids
from d2export.runtime.layers import AdapterLayer
from d2export.runtime.models import model_output, unmerged_model
from d2export.spec import Rescale

FAST = {"warmup": 1, "repeats": 2, "batch_sizes": (1, 2), "seq_lens": (8, 16)}
FAST_ARGS = ["--warmup", "1", "--repeats", "2", "--batch-sizes", "1,2", "--seq-lens", "8,16"]
runner = CliRunner()


@pytest.fixture(scope="module")
def llama_report(merged) -> BenchReport:
    """D2-LoRA Llama with an int8 ONNX export at ``<merged>-onnx``, found without --onnx."""
    folder, out = merged("d2lora-llama")
    export_onnx(out, out.parent / f"{out.name}-onnx", quantize="int8")
    return run_bench(out, folder / "adapter", base=folder / "base", **FAST)


def assert_consistent(report: BenchReport, models: list[str]) -> None:
    """Every model x workload row, each with ``repeats`` timings that its figures come from."""
    assert report.models == models
    assert len(report.rows) == len(models) * len(report.workloads)
    for model in models:
        for w in report.workloads:
            row = report.row(model, w)
            assert row is not None, (model, w)
            assert len(row.times_ms) == report.repeats and all(t > 0 for t in row.times_ms)
            assert row.p50_ms == pytest.approx(statistics.median(row.times_ms), rel=1e-12)
            assert min(row.times_ms) <= row.p50_ms <= row.p95_ms <= max(row.times_ms)
            assert row.tokens_per_s > 0
            assert row.tokens_per_s == pytest.approx(w.batch * w.seq / (row.p50_ms / 1e3), rel=1e-12)


def assert_ratios_from_rows(report: BenchReport) -> None:
    assert report.ratios
    for ratio in report.ratios:
        assert [w for w, _ in ratio.per_workload] == report.workloads
        for w, value in ratio.per_workload:
            expected = report.row(ratio.numerator, w).tokens_per_s / report.row(ratio.denominator, w).tokens_per_s
            assert value == pytest.approx(expected, rel=1e-12)
        logs = [math.log(v) for _, v in ratio.per_workload]
        assert ratio.geomean == pytest.approx(math.exp(sum(logs) / len(logs)), rel=1e-12)


def test_d2lora_llama_rows_ratios_and_onnx(llama_report):
    report = llama_report
    assert report.workloads == [Workload(1, 8), Workload(1, 16), Workload(2, 8), Workload(2, 16)]
    assert report.onnx_dir is not None and report.onnx_dir.name == f"{report.merged.name}-onnx"
    # D2-LoRA is not a PEFT adapter: no PEFT row, ours only.
    assert_consistent(report, [UNMERGED, MERGED, BASE, "onnxruntime float32", "onnxruntime int8"])
    assert_ratios_from_rows(report)
    names = [r.name for r in report.ratios]
    assert names == [f"{MERGED} / {UNMERGED}", f"{MERGED} / {BASE}", f"onnxruntime float32 / {MERGED}",
                     f"onnxruntime int8 / {MERGED}"]
    assert str(PAPER_MERGED_SPEEDUP) in report.ratios[0].expected
    for row in report.rows:
        unmerged = report.row(UNMERGED, Workload(row.batch, row.seq))
        assert report.speedup(row) == pytest.approx(row.tokens_per_s / unmerged.tokens_per_s)
    assert report.threads == torch.get_num_threads()
    assert report.machine["cpu_count"] >= 1
    assert report.versions["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report.versions["onnxruntime"] and "peft" not in report.versions


def test_report_dict_is_json_and_matches_rows(llama_report):
    data = json.loads(json.dumps(llama_report.to_dict()))
    assert data["paper_merged_speedup"] == PAPER_MERGED_SPEEDUP
    assert len(data["rows"]) == len(llama_report.rows)
    for row in data["rows"]:
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq"] * 1e3 / row["p50_ms"])
    merged_unmerged = next(r for r in data["ratios"] if r["numerator"] == MERGED and r["denominator"] == UNMERGED)
    assert merged_unmerged["geomean"] == pytest.approx(llama_report.ratio(MERGED, UNMERGED).geomean)


def test_cli_peft_classifier_json_table_and_plot(merged, tmp_path):
    """A PEFT LoRA adapter on a BERT classifier: PEFT's own unmerged model is measured too."""
    folder, out = merged("lora-bert-cls")
    png = tmp_path / "bench.png"
    result = runner.invoke(app, ["bench", str(out), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), *FAST_ARGS, "--json", "--plot", str(png)])
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "sequence-classification" and data["method"] == "lora"
    assert data["models"] == [UNMERGED, UNMERGED_PEFT, MERGED, BASE]
    shapes = {(r["batch"], r["seq"]) for r in data["rows"]}
    for model in data["models"]:
        assert {(r["batch"], r["seq"]) for r in data["rows"] if r["model"] == model} == shapes == {
            (1, 8), (1, 16), (2, 8), (2, 16)}
    assert any(r["numerator"] == MERGED and r["denominator"] == UNMERGED_PEFT for r in data["ratios"])
    assert data["onnx_dir"] is None and any("no ONNX export" in n for n in data["notes"])
    # With --json the table goes to stderr, next to the paper's figure.
    assert "unmerged (PEFT)" in result.stderr and "tokens/s" in result.stderr and "1.91x" in result.stderr
    assert png.read_bytes().startswith(b"\x89PNG")


def test_encoder_hidden_states(merged):
    """Also the API's two ways of giving settings: an options object, and keywords overriding it."""
    folder, out = merged("d2lora-bert")
    calls = []
    options = BenchOptions(batch_sizes="1,2", seq_lens="8,16", warmup=1, repeats=3)
    report = run_bench(out, folder / "adapter", base=folder / "base", options=options, repeats=2,
                       progress=lambda *call: calls.append(call))
    assert report.kind == "encoder" and report.repeats == 2
    assert report.workloads == [Workload(1, 8), Workload(1, 16), Workload(2, 8), Workload(2, 16)]
    assert_consistent(report, [UNMERGED, MERGED, BASE])
    assert_ratios_from_rows(report)
    assert calls[-1] == ("done", 12, 12) and all(total == 12 for _, _, total in calls)
    # Library notes name no CLI flag (nor a parameter only the API has).
    assert any("ONNX Runtime is not timed (export one there first)" in n for n in report.notes)
    assert not any("--" in n or "onnx_dir" in n for n in report.notes)


def test_inputs_unpadded_seeded_and_clipped(fixture):
    config = read_config(fixture("d2lora-llama") / "base")
    ids, mask = bench_inputs(config, Workload(3, 40))
    assert ids.shape == (3, 40) and bool(mask.all())
    assert not torch.isin(ids, torch.tensor(special_ids(config))).any()
    assert torch.equal(ids, bench_inputs(config, Workload(3, 40))[0])
    found, notes = workloads(config, (1, 4), (8, 500, 128))
    assert found == [Workload(1, 8), Workload(1, 128), Workload(4, 8), Workload(4, 128)]
    assert notes == ["sequence length 500 clipped to the model's 128 positions"]


# --- the unmerged model the benchmark times computes the reference's outputs -------------------

def test_benchmark_unmerged_model_matches_reference(fixture):
    """D2-LoRA on every Llama linear layer: norms in float32 instead of float64 change the outputs
    by float32 round-off only (verify's float32 bound, 1e-5 of the output scale)."""
    folder = fixture("d2lora-llama")
    spec = load_adapter(folder / "adapter")
    ids, mask = bench_inputs(read_config(folder / "base"), Workload(2, 24))
    batch = Batch(ids, mask)
    timed = unmerged_model(folder / "base", spec, torch.float32, reference_norms=False)
    layers = [m for m in timed.modules() if isinstance(m, AdapterLayer)]
    assert len(layers) == 14 and not any(m.reference_norms for m in layers)
    assert all(m.rescale is Rescale.ORIGINAL_NORM for m in layers)
    got = model_output(timed, batch)
    del timed
    reference = unmerged_model(folder / "base", spec, torch.float32)
    assert all(m.reference_norms for m in reference.modules() if isinstance(m, AdapterLayer))  # default kept
    expected = model_output(reference, batch)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("rescale", [Rescale.ORIGINAL_NORM, Rescale.MAGNITUDE])
def test_dtype_norms_layer_matches_float64_norms(rescale):
    """One layer (D2-LoRA's fixed norms and DoRA's learned magnitude): the row scale in float32
    agrees with the float64 one to float32 round-off, and in bfloat16 is computed in bfloat16."""
    torch.manual_seed(0)
    base = nn.Linear(48, 32)
    layers = {}
    for reference in (True, False):
        layer = AdapterLayer(base, rank=4, scale=2.0, branches=("pos", "neg"), rescale=rescale, tau=0.5,
                             reference_norms=reference)
        torch.manual_seed(1)
        with torch.no_grad():
            for b in layer.branches:
                layer.A[b].normal_()
                layer.B[b].normal_(std=0.1)
            if layer.magnitude is not None:
                layer.magnitude.uniform_(0.5, 2.0)
        layers[reference] = layer
    x = torch.randn(5, 48)
    with torch.no_grad():
        exact, timed = layers[True].row_scale(), layers[False].row_scale()
        assert exact.dtype == timed.dtype == torch.float32
        assert (timed - exact).abs().max() <= 4 * 2**-24 * exact.abs().max()
        assert (exact - 1).abs().max() > 1e-3  # the rescale does something: the check above has teeth
        y_exact, y_timed = layers[True](x), layers[False](x)
        assert (y_timed - y_exact).abs().max() <= 1e-5 * y_exact.abs().max()
        half = layers[False].to(torch.bfloat16)
        assert half.row_scale().dtype == torch.bfloat16
        assert (half.row_scale().float() - exact).abs().max() <= 4 * 2**-8 * exact.abs().max()


# --- bad input: one line, exit 2 ----------------------------------------------------------------

def _bad_cases(llama: Path, llama_out: Path, bert: Path, bert_out: Path, tmp: Path) -> list[tuple[list[str], str]]:
    ok = [str(llama_out), "--adapter", str(llama / "adapter"), "--base", str(llama / "base")]
    return [
        ([str(tmp / "nope"), "--adapter", str(llama / "adapter")], "merged model folder not found"),
        ([str(llama_out), "--adapter", str(tmp / "nope")], "not found"),
        ([str(llama_out), "--adapter", str(bert / "adapter"), "--base", str(llama / "base")], "no base tensor"),
        ([str(bert_out), "--adapter", str(llama / "adapter"), "--base", str(llama / "base")], "BertModel"),
        ([*ok, "--batch-sizes", "1,x"], "--batch-sizes"),
        ([*ok, "--seq-lens", "0"], "not positive"),
        ([*ok, "--repeats", "0"], "--repeats must be positive"),
        ([*ok, "--warmup", "-1"], "--warmup"),
        ([*ok, "--threads", "0"], "--threads must be positive"),
        ([*ok, "--dtype", "float16"], "--dtype"),
        ([*ok, "--onnx", str(tmp / "nope")], "ONNX folder not found"),
        ([*ok, "--onnx", str(llama / "base")], "no model.onnx"),
    ]


@pytest.mark.parametrize(("settings", "option"), [
    ({"batch_sizes": "1,x"}, "batch_sizes"), ({"seq_lens": (0,)}, "seq_lens"), ({"repeats": 0}, "repeats"),
    ({"warmup": -1}, "warmup"), ({"threads": 0}, "threads"), ({"dtype": "float16"}, "dtype")])
def test_bad_settings_name_the_parameter(merged, settings, option):
    """The library names the parameter (the CLI turns it into the flag), before loading anything."""
    folder, out = merged("d2lora-llama")
    with pytest.raises(OptionError) as raised:
        run_bench(out, folder / "adapter", base=folder / "base", **settings)
    assert raised.value.option == option and str(raised.value).startswith(f"{option} ")
    assert "--" not in str(raised.value)


def test_bad_inputs_exit_2_with_one_line(merged, tmp_path):
    llama, llama_out = merged("d2lora-llama")
    bert, bert_out = merged("d2lora-bert")
    for argv, needle in _bad_cases(llama, llama_out, bert, bert_out, tmp_path):
        result = runner.invoke(app, ["bench", *argv])
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code == 2, (argv, result.stderr)
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (argv, result.stderr)
        assert result.stdout == ""


def test_plot_without_matplotlib_fails_before_timing(merged, tmp_path, monkeypatch):
    folder, out = merged("d2lora-llama")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec -> None: "not installed"
    result = runner.invoke(app, ["bench", str(out), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "pip install 'd2export[plot]'" in result.stderr
    assert not (tmp_path / "x.png").exists()


def test_a_plot_in_a_missing_folder_fails_before_timing(merged, tmp_path, monkeypatch):
    import d2export.bench as bench

    def timed(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "run_bench", timed)
    folder, out = merged("d2lora-llama")
    result = runner.invoke(app, ["bench", str(out), "--adapter", str(folder / "adapter"), "--base",
                                 str(folder / "base"), "--plot", str(tmp_path / "nowhere" / "x.png")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: --plot") and "does not exist" in result.stderr
