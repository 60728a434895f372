"""End to end: every fixture format merged, loaded with transformers, and checked three ways:
weights against an independent float64 reference (correct rounding, bit-identity of untouched
tensors), outputs against the run-time adapter model, and (PEFT adapters) against PEFT's own
unmerged model."""

from __future__ import annotations

import json
import os
import stat
import warnings

import build
import pytest
import torch
from huggingface_hub import ModelCard
from reference import correctly_rounded, expected_weight, load_raw
from support import load_model, model_output, read_all, tokens

from d2export import load_adapter
from d2export.runtime.layers import inject_adapter

# fp32 logits: merged (x W'^T) and unmerged (g * (x W0^T + c (x A^T) B^T)) differ only in the order
# of float32 operations, i.e. by a few float32 ulps per layer of the logit scale. 1e-5 relative
# to the largest logit leaves ten times the largest gap seen and is far below any merge defect
# (a wrong tau or a missing rescale moves logits by 1e-2 and more on these fixtures).
FP32_LOGIT_RTOL = 1e-5
# A bf16 merged model holds W' rounded to bf16 (relative error up to 2^-9 per weight) while the
# reference computes with the exact fp32 W0 + dW, so its logits carry that rounding: a few bf16
# ulps of the logit scale. The bit-exact weight test above is the strict check for bf16.
LOGIT_RTOL = {torch.float32: FP32_LOGIT_RTOL, torch.bfloat16: 4 * 2.0**-8}

PEFT_FIXTURES = [n for n in build.FIXTURES if not n.startswith("d2lora")]
CONV1D_FIXTURES = {"d2lora-gpt2", "lora-gpt2-bias", "dora-gpt2"}


@pytest.mark.parametrize("name", build.FIXTURES)
def test_weights_match_independent_reference(merge_result, name):
    folder, result = merge_result(name)
    base, out = read_all(folder / "base"), read_all(result.out)
    spec = load_adapter(folder / "adapter")
    config, raw = load_raw(folder / "adapter")
    assert set(out) >= set(base)
    adapted = {u.weight_key: u for u in spec.updates.values()}
    for key, value in out.items():
        source = base.get(key, base.get("model.embed_tokens.weight"))  # untied lm_head starts from the embedding
        replaced = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if key in adapted and adapted[key].selected:
            module = key.removesuffix(".weight")
            w0 = raw.get(f"{module}.base_layer.weight", source.double())
            exact = expected_weight(folder / "adapter", module, w0, conv1d=name in CONV1D_FIXTURES)
            assert value.dtype == source.dtype
            assert correctly_rounded(exact, value).all(), f"{key} not the correctly rounded exact merge"
        elif key.endswith(".bias") and f"{key.removesuffix('.bias')}.lora_B.bias" in raw:
            module = key.removesuffix(".bias")
            start = raw.get(f"{module}.base_layer.bias", source.double())
            exact = start + config["lora_alpha"] / config["r"] * raw[f"{module}.lora_B.bias"]
            assert correctly_rounded(exact, value).all(), key
        elif key in raw or replaced in raw:
            assert torch.equal(value, raw.get(key, raw.get(replaced)).to(value.dtype)), key
        else:  # untouched, or left out by the DiffoRA selection: the base's exact bytes
            assert value.dtype == source.dtype and torch.equal(value.view(torch.uint8), source.view(torch.uint8)), key


@pytest.mark.parametrize("name", build.FIXTURES)
def test_merged_model_matches_run_time_adapter(merge_result, name):
    folder, result = merge_result(name)
    rtol = LOGIT_RTOL[next(iter(read_all(folder / "base").values())).dtype]
    merged_model = load_model(result.out)  # transformers' from_pretrained on our folder, run in fp32
    reference = inject_adapter(load_model(folder / "base"), load_adapter(folder / "adapter"))
    ids = tokens()
    a, b = model_output(merged_model, ids), model_output(reference, ids)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= rtol * b.abs().max()
    # ...and the adapter really changed the model, so the comparison above means something.
    base = model_output(load_model(folder / "base"), ids)
    assert (a - base).abs().max() > 5 * rtol * b.abs().max()


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_peft_adapters_match_peft_unmerged_model(merge_result, name):
    from peft import PeftModel

    folder, result = merge_result(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = PeftModel.from_pretrained(load_model(folder / "base"), folder / "adapter").eval()
    ids = tokens(seed=3)
    a, b = model_output(load_model(result.out), ids), model_output(peft_model, ids)
    assert (a - b).abs().max() <= FP32_LOGIT_RTOL * b.abs().max()


def test_bf16_merge_is_bit_identical_to_correctly_rounded_float64(merge_result):
    folder, result = merge_result("d2lora-llama-bf16")
    out, base = read_all(result.out), read_all(folder / "base")
    assert all(v.dtype == torch.bfloat16 for v in out.values())
    key = "model.layers.0.self_attn.q_proj.weight"
    exact = expected_weight(folder / "adapter", key.removesuffix(".weight"), base[key])
    assert correctly_rounded(exact, out[key]).all()
    assert not torch.equal(out[key], base[key])
    config = json.loads((result.out / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"


def test_diffora_unselected_modules_are_base_bytes(merge_result):
    folder, result = merge_result("d2lora-llama-diffora")
    spec = load_adapter(folder / "adapter")
    assert spec.method == "d2lora+diffora"
    unselected = [u for u in spec.updates.values() if not u.selected]
    selected = [u for u in spec.updates.values() if u.selected]
    assert len(unselected) == len(selected) == 8  # round(0.5 * 4 layers * 4 types)
    out, base = read_all(result.out), read_all(folder / "base")
    for u in unselected:
        assert torch.equal(out[u.weight_key], base[u.weight_key])
    for u in selected:
        assert not torch.equal(out[u.weight_key], base[u.weight_key])
    assert result.report["tensors"]["unselected"] == 8
    assert result.report["diffora_selection"]["num_selected"] == 8


def test_tied_embeddings_are_untied_not_merged_twice(merge_result):
    folder, result = merge_result("lora-llama-tied")
    config = json.loads((result.out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    out = read_all(result.out)
    assert "lm_head.weight" in out and "lm_head.weight" not in read_all(folder / "base")
    assert not torch.equal(out["lm_head.weight"], out["model.embed_tokens.weight"])
    assert any("untied" in n for n in result.report["notes"])


def test_sharded_base_keeps_its_layout(merge_result):
    folder, result = merge_result("rslora-llama-patterns")
    base_index = json.loads((folder / "base" / "model.safetensors.index.json").read_text())
    out_index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert out_index["weight_map"] == base_index["weight_map"]
    sizes = {m["module"]: m["rank"] for m in result.report["modules"]}
    assert sizes["model.layers.0.mlp.down_proj"] == 2 and sizes["model.layers.1.self_attn.q_proj"] == 6


def test_report_and_side_files(merge_result):
    _, result = merge_result("d2lora-llama")
    report = json.loads((result.out / "d2export_report.json").read_text())
    assert report["method"] == "d2lora" and report["tool"]["name"] == "d2export"
    assert all(len(f["sha256"]) == 64 for f in report["adapter"]["files"] + report["base"]["files"])
    module = report["modules"][0]
    assert module["rank"] == 4 and module["tau"] == 0.5
    assert module["coefficients"] == {"pos": 2.0, "neg": -1.0}
    assert module["delta_fro_norm"] > 0 and module["rescale_range"][0] > 0
    card = ModelCard.load(result.out / "README.md").data.to_dict()  # the base has no card: ours alone
    assert card["library_name"] == "transformers" and card["tags"] == ["d2export", "merged-adapter"]
    assert (result.out / "generation_config.json").is_file()
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(result.out.stat().st_mode) == 0o777 & ~umask  # not the temporary folder's 0700


@pytest.mark.parametrize("name", ["d2lora-llama", "lora-llama"])
def test_merge_and_inspect_never_import_torch(fixture, tmp_path, name):
    """The merge path is numpy only (d2export/arrays.py): importing torch would cost a merge process
    1.3 s and 224 MB before any work. (Architectures outside architecture.KNOWN_CAUSAL_LMS are
    probed on torch's meta device, so there torch is imported.)"""
    import subprocess
    import sys

    folder = fixture(name)
    script = (
        "import sys\n"
        "import d2export.cli as cli\n"
        f"for argv in (['inspect', {str(folder / 'adapter')!r}, '--base', {str(folder / 'base')!r}],\n"
        f"             ['merge', {str(folder / 'adapter')!r}, '--base', {str(folder / 'base')!r}, '--out', "
        f"{str(tmp_path / 'out')!r}]):\n"
        "    sys.argv = ['d2export', *argv]\n"
        "    try:\n"
        "        cli.run()\n"
        "    except SystemExit as exit:\n"
        "        assert not exit.code, exit.code\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout


@pytest.mark.parametrize("name", ["d2lora-llama-bf16", "dora-llama", "lora-llama"])
def test_merged_rows_are_the_rows_of_the_whole_merge(fixture, name):
    """Any run of rows of a merged tensor, merged from those rows of the base alone (what verify's
    correctly rounded merge computes at every pass), is the same rows of the whole merge, to the
    bit: each merged element depends on its own row, and is correctly rounded."""
    import numpy as np

    from d2export.job import prepare
    from d2export.merging import merged_rows, produce

    folder = fixture(name)
    with prepare(folder / "adapter", folder / "base") as job:
        merged = [(t, merged_rows(job.plan, t)) for t in job.plan.tensors]
        assert any(rows is not None for _, rows in merged)
        for t, rows in merged:
            if rows is None:
                continue
            whole = produce(job.plan, t)[0]
            for start, stop in ((0, 1), (3, 11), (whole.shape[0] - 5, whole.shape[0])):
                assert np.array_equal(rows(start, stop).view(np.uint8), whole[start:stop].view(np.uint8)), t.name


def test_a_single_file_beside_stale_shards_is_the_base_transformers_loads(fixture, tmp_path):
    """A base folder holding model.safetensors and, left over, shards with their index: transformers
    loads model.safetensors (it comes first in from_pretrained's order), so the merge starts from
    it too. It took the shards, and wrote a model on other weights, with exit 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    from d2export import merge

    folder = fixture("lora-llama")
    base = shutil.copytree(folder / "base", tmp_path / "base")
    assert (base / "model.safetensors").is_file() and not (base / "model.safetensors.index.json").exists()
    stale = {k: v + 1 for k, v in load_file(base / "model.safetensors").items()}
    names = sorted(stale)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in halves.items():
        save_file({k: stale[k] for k in keys}, base / file, metadata={"format": "pt"})
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}))
    out = merge(folder / "adapter", base=base, out=tmp_path / "merged", hash_inputs=False).out
    merged = load_file(out / "model.safetensors")
    original = load_file(folder / "base" / "model.safetensors")
    assert torch.equal(merged["model.norm.weight"], original["model.norm.weight"])  # not the stale shards'
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def test_a_sharded_bin_base_keeps_its_grouping_in_safetensors(fixture, tmp_path):
    """The default layout is the base's own: a .bin base's shards become safetensors shards of the
    same grouping (pytorch_model-00001-of-0000N.bin -> model-00001-of-0000N.safetensors)."""
    from d2export import merge

    folder = fixture("lora-llama")
    base = tmp_path / "base"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build._load(folder / "base").save_pretrained(base, safe_serialization=False, max_shard_size="60KB")
    index = json.loads((base / "pytorch_model.bin.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    out = merge(folder / "adapter", base=base, out=tmp_path / "merged", hash_inputs=False).out
    merged = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    renamed = {k: "model" + v.removeprefix("pytorch_model").removesuffix(".bin") + ".safetensors"
               for k, v in index.items()}
    assert merged == renamed


def test_the_report_names_every_path_absolute(fixture, tmp_path, monkeypatch):
    """Paths given relative to where the command ran are recorded absolute, as the base's were: the
    report is read from elsewhere."""
    import shutil
    from pathlib import Path

    from d2export import merge

    folder = fixture("lora-llama")
    shutil.copytree(folder, tmp_path / "case")
    monkeypatch.chdir(tmp_path / "case")
    report = merge("adapter", base="base", out="merged").report
    paths = [report["adapter"]["path"], report["output"]["path"], report["base"]["path"],
             *(f["file"] for f in report["adapter"]["files"] + report["base"]["files"])]
    assert all(Path(p).is_absolute() for p in paths), paths
    assert report["adapter"]["path"] == str(tmp_path / "case" / "adapter")
