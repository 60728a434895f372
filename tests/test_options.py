"""Merge options and surfaces: dtype conversion, shard sizes, compute dtype, trainer folders,
factor orientation, DiffoRA precedence, base resolution, inspect, and the CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import correctly_rounded, expected_weight
from safetensors.torch import load_file, save_file
from support import load_model, model_output, read_all, tokens
from typer.testing import CliRunner

from d2export import inspect, load_adapter, merge
from d2export.cli import app
from d2export.formats.diffora import select_top

ROOT = Path(__file__).resolve().parent.parent


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_dtype_bfloat16_from_float32_base(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    result = merge(folder / "adapter", base=folder / "base", out=tmp_path / "m", dtype="bfloat16")
    out, base = read_all(result.out), read_all(folder / "base")
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    key = "model.layers.1.mlp.down_proj.weight"
    exact = expected_weight(folder / "adapter", key.removesuffix(".weight"), base[key])
    assert correctly_rounded(exact, out[key]).all()  # one rounding, from the exact float64 merge
    assert torch.equal(out["model.norm.weight"], base["model.norm.weight"].to(torch.bfloat16))
    config = json.loads((result.out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert load_model(result.out, dtype=torch.bfloat16) is not None


def test_max_shard_size_repacks_with_index(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    result = merge(folder / "adapter", base=folder / "base", out=tmp_path / "m", max_shard_size="100KB")
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in result.plan.tensors)
    assert read_all(result.out).keys() == read_all(folder / "base").keys()
    ids = tokens()
    single = merge(folder / "adapter", base=folder / "base", out=tmp_path / "single")
    assert torch.equal(model_output(load_model(result.out), ids), model_output(load_model(single.out), ids))


def test_compute_float32_is_close_to_float64(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    exact = read_all(merge(folder / "adapter", base=folder / "base", out=tmp_path / "a").out)
    fast = read_all(merge(folder / "adapter", base=folder / "base", out=tmp_path / "b", compute_dtype="float32").out)
    for key, value in exact.items():
        # float32 arithmetic: a few float32 ulps of the row scale, never more
        assert (value - fast[key]).abs().max() <= 8 * torch.finfo(torch.float32).eps * value.abs().max(), key


def test_trainer_checkpoint_folders(fixture, tmp_path):
    folder = fixture("lora-llama")
    run = tmp_path / "run"
    ckpt = run / "checkpoint-500"
    shutil.copytree(folder / "adapter", ckpt)
    (ckpt / "optimizer.pt").write_bytes(b"not a pickle: must never be opened")
    (ckpt / "trainer_state.json").write_text("{}")
    direct = merge(folder / "adapter", base=folder / "base", out=tmp_path / "direct")
    for source, name in ((ckpt, "from-ckpt"), (run, "from-run")):
        result = merge(source, base=folder / "base", out=tmp_path / name)
        assert result.shard_hashes == direct.shard_hashes
    shutil.copytree(folder / "adapter", run / "checkpoint-1000")
    res = CliRunner().invoke(app, ["merge", str(run), "--base", str(folder / "base"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "checkpoint-1000" in res.output


def test_d2lora_factors_stored_the_papers_way_round(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    adapter = tmp_path / "swapped"
    shutil.copytree(folder / "adapter", adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    swapped = {}
    for key, _value in tensors.items():  # paper notation: A [out, r], B [r, in], delta = A @ B
        if ".lora_A_" in key:
            swapped[key] = tensors[key.replace(".lora_A_", ".lora_B_")].contiguous()
        elif ".lora_B_" in key:
            swapped[key] = tensors[key.replace(".lora_B_", ".lora_A_")].contiguous()
    save_file(swapped, adapter / "adapter_model.safetensors")
    normal = merge(folder / "adapter", base=folder / "base", out=tmp_path / "a")
    result = merge(adapter, base=folder / "base", out=tmp_path / "b")
    assert result.shard_hashes == normal.shard_hashes
    # k_proj is 32x64 with r=4: unambiguous, so the swap is detected and reported
    assert all(m.get("factors_stored_swapped") for m in result.report["modules"])


def test_learned_tau_wins_over_config(fixture):
    spec = load_adapter(fixture("d2lora-llama-learned-tau") / "adapter")
    taus = {u.tau for u in spec.updates.values()}
    assert all(u.tau_learned for u in spec.updates.values())
    assert 0.3 not in taus  # the config's tau; training moved every learned tau away from it


def test_diffora_selected_grid_wins_over_scores(fixture, tmp_path):
    folder = fixture("d2lora-llama-diffora")
    adapter = tmp_path / "adapter"
    shutil.copytree(folder / "adapter", adapter)
    dam = json.loads((adapter / "diffora_dam.json").read_text())
    dam["selected"] = [[True, False, False, False]] + [[False] * 4] * 3
    (adapter / "diffora_dam.json").write_text(json.dumps(dam))
    result = merge(adapter, base=folder / "base", out=tmp_path / "m")
    assert result.report["tensors"]["merge"] == 1 and result.report["tensors"]["unselected"] == 15
    assert result.report["diffora_selection"]["source"] == "selected"


def test_select_top_rounds_half_up_and_breaks_ties_by_position():
    scores = ((0.9, 0.1, 0.5), (0.5, 0.2, 0.3))
    assert select_top(scores, 0.5) == ((True, False, True), (True, False, False))  # k = 3
    assert select_top(scores, 0.25) == ((True, False, True), (False, False, False))  # 1.5 -> 2, tie to layer 0
    assert sum(map(sum, select_top(scores, 1.0))) == 6


def test_base_from_adapter_config_and_default_output(tmp_path):
    demo = tmp_path / "demo"
    shutil.copytree(ROOT / "fixtures" / "demo", demo)
    before = tree_hash(demo)
    result = merge(demo / "adapter")  # base_model_name_or_path "../base", out <ckpt>-merged
    assert result.out == demo / "adapter-merged"
    assert (result.out / "model.safetensors").is_file()
    after = tree_hash(demo)
    assert {k: v for k, v in after.items() if not k.startswith("adapter-merged")} == before


def test_force_replaces_existing_output(fixture, tmp_path):
    folder = fixture("lora-llama")
    out = tmp_path / "m"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "config.json").write_text("{}")  # an earlier output: --force replaces only such a folder
    merge(folder / "adapter", base=folder / "base", out=out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left beside it


def test_inspect_reports_grid_and_plan(fixture):
    folder = fixture("d2lora-llama-diffora")
    info = inspect(folder / "adapter", base=folder / "base")
    assert info["method"] == "d2lora+diffora" and info["num_modules"] == 16 and info["num_selected"] == 8
    assert len(info["diffora"]["grid"]) == 4 and info["merge_plan"]["tensors"]["unselected"] == 8
    res = CliRunner().invoke(app, ["inspect", str(folder / "adapter"), "--base", str(folder / "base")])
    assert res.exit_code == 0 and "DiffoRA selection" in res.output
    res = CliRunner().invoke(app, ["inspect", str(folder / "adapter"), "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["diffora"]["num_selected"] == 8


def test_cli_merge_json_end_to_end(fixture, tmp_path):
    folder = fixture("dora-gpt2")
    proc = subprocess.run(
        [sys.executable, "-m", "d2export.cli", "merge", str(folder / "adapter"), "--base", str(folder / "base"),
         "--out", str(tmp_path / "m"), "--json"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["method"] == "dora" and report["tensors"]["merge"] == 6
    assert "merged dora into" in proc.stderr
    on_disk = json.loads((tmp_path / "m" / "d2export_report.json").read_text())
    assert on_disk["output"]["shards"] == report["output"]["shards"]


@pytest.mark.parametrize("name", ["lora-llama-bin"])
def test_bin_base_written_as_safetensors(fixture, tmp_path, name):
    folder = fixture(name)
    assert (folder / "base" / "pytorch_model.bin").is_file()
    result = merge(folder / "adapter", base=folder / "base", out=tmp_path / "m")
    assert (result.out / "model.safetensors").is_file() and not list(result.out.glob("*.bin"))


def test_single_shard_with_index_keeps_a_loadable_layout(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    base = tmp_path / "base"
    shutil.copytree(folder / "base", base)
    name = "model-00001-of-00001.safetensors"
    (base / "model.safetensors").rename(base / name)
    keys = read_all(base).keys()
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, name)}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    result = merge(folder / "adapter", base=base, out=tmp_path / "m")
    index = json.loads((result.out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {name}
    reference = merge(folder / "adapter", base=folder / "base", out=tmp_path / "ref")
    ids = tokens()
    assert torch.equal(model_output(load_model(result.out), ids), model_output(load_model(reference.out), ids))


def test_dry_run_checks_everything_and_writes_nothing(fixture, tmp_path):
    folder = fixture("d2lora-llama")
    adapter = tmp_path / "adapter"
    shutil.copytree(folder / "adapter", adapter)
    before = tree_hash(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(folder / "base"), "-o", str(tmp_path / "m"),
                                 "--dtype", "bf16", "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert "dry run: would merge d2lora" in result.stdout and "nothing written" in result.stdout
    assert tree_hash(tmp_path) == before and not (tmp_path / "m").exists()
    # the checks a real merge makes still run: an existing output without --force is refused
    (tmp_path / "m").mkdir()
    result = runner.invoke(app, ["merge", str(adapter), "--base", str(folder / "base"), "--out", str(tmp_path / "m"),
                                 "--dry-run"])
    assert result.exit_code == 2 and result.stderr.startswith("error: --force is not set")
    # ...and a folder it could not write in (a read-only file system, as statvfs reports it)
    import os

    real = os.statvfs
    readonly = tmp_path / "ro"
    readonly.mkdir()

    class ReadOnly:
        def __init__(self, path):
            self.result = real(path)

        def __getattr__(self, name):
            return self.result.f_flag | os.ST_RDONLY if name == "f_flag" else getattr(self.result, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "statvfs", lambda path: ReadOnly(path) if Path(path) == readonly else real(path))
        result = runner.invoke(app, ["merge", str(adapter), "--base", str(folder / "base"), "--out",
                                     str(readonly / "m"), "--dry-run"])
    assert result.exit_code == 2 and "cannot write in" in result.stderr and "read-only file system" in result.stderr


def test_python_dash_m_runs_the_command():
    proc = subprocess.run([sys.executable, "-m", "d2export", "--version"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("d2export ")


def test_trainer_run_checkpoint_choice(fixture, tmp_path):
    folder = fixture("lora-llama")
    run = tmp_path / "run"
    for step in (500, 1000, 50):
        shutil.copytree(folder / "adapter", run / f"checkpoint-{step}")
    (run / "checkpoint-1000" / "trainer_state.json").write_text(json.dumps(
        {"best_model_checkpoint": "/train/box/run/checkpoint-500", "global_step": 1000}))
    runner = CliRunner()

    def chosen(*flags: str) -> str:
        result = runner.invoke(app, ["inspect", str(run), "--base", str(folder / "base"), *flags, "--json"])
        assert result.exit_code == 0, result.stderr
        return Path(json.loads(result.stdout)["adapter"]).name

    assert chosen("--checkpoint", "latest") == "checkpoint-1000"  # by step, not as text
    assert chosen("--checkpoint", "best") == "checkpoint-500"
    assert chosen("--checkpoint", "50") == "checkpoint-50"
    result = runner.invoke(app, ["inspect", str(run), "--base", str(folder / "base")])
    assert result.exit_code == 2
    assert "--checkpoint is needed" in result.stderr
    assert "checkpoint-50, checkpoint-500, checkpoint-1000" in result.stderr
    result = runner.invoke(app, ["inspect", str(run), "--checkpoint", "7"])
    assert result.exit_code == 2 and "no checkpoint-7" in result.stderr


def test_trainer_state_of_the_wrong_shape_is_one_line(fixture, tmp_path):
    folder = fixture("lora-llama")
    run = tmp_path / "run"
    for step in (1, 2):
        shutil.copytree(folder / "adapter", run / f"checkpoint-{step}")
    for state in ('{"best_model_checkpoint": 5}', "[1, 2]", '{"best_model_checkpoint": null}'):
        (run / "checkpoint-2" / "trainer_state.json").write_text(state)
        before = tree_hash(tmp_path)
        result = CliRunner().invoke(app, ["inspect", str(run), "--checkpoint", "best"])
        assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "trainer_state.json" in result.stderr
        assert tree_hash(tmp_path) == before


def test_verify_takes_the_trainer_checkpoint_too(fixture, tmp_path):
    folder = fixture("lora-llama")
    run = tmp_path / "run"
    for step in (5, 10):
        shutil.copytree(folder / "adapter", run / f"checkpoint-{step}")
    out = merge(run / "checkpoint-10", base=folder / "base", out=tmp_path / "m").out
    result = CliRunner().invoke(app, ["verify", str(out), "--adapter", str(run), "--checkpoint", "latest",
                                      "--base", str(folder / "base"), "--weights-only"])
    assert result.exit_code == 0, result.stderr
    assert "checkpoint-10" in result.stdout and "PASSED" in result.stdout


def test_verbose_shows_the_libraries_log_and_the_default_does_not(merged):
    folder, out = merged("lora-llama")
    command = [sys.executable, "-m", "d2export", "verify", str(out), "--adapter", str(folder / "adapter"),
               "--base", str(folder / "base"), "-q", "--no-peft", "--resident", "1KiB"]  # streamed: accelerate logs
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    loud = subprocess.run([*command[:3], "-v", *command[3:]], capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "loading configuration file" in loud.stderr and "loading configuration file" not in quiet.stderr
    # accelerate's warning about the offload d2export asks for is dropped either way (it reads as a fault)
    assert "meta device" not in loud.stderr and "meta device" not in quiet.stderr
