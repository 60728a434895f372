"""Finding the base (docs/design.md §5, issue 13): the adapter's ``revision`` picks its snapshot in
the local Hugging Face cache, never ``refs/main`` when another is asked; a relative base name is
looked for beside the adapter first and refused when it names two model folders; the merge and
verify reports say which base they used. Also the trainer-run message for several checkpoints.

The cache is built by hand in the layout huggingface_hub writes (``models--org--name/`` with
``refs/main``, ``snapshots/<commit>/`` of links into ``blobs/``), holding two snapshots of a tiny
Llama with different weights; the adapter is trained by PEFT against the one that is not main.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import build  # fixtures/build.py
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from support import check_refused, cli, read_all, write_adapter

REPO = "org/tiny-llama"
MAIN = hashlib.sha1(b"main snapshot").hexdigest()  # what refs/main points at
OLD = hashlib.sha1(b"older snapshot").hexdigest()  # what the adapter was trained on
MISSING = hashlib.sha1(b"never downloaded").hexdigest()
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A Hugging Face cache with two snapshots of ``REPO`` and, beside it, ``adapter/`` trained on
    the ``OLD`` one and naming it by ``base_model_name_or_path`` + ``revision``."""
    root = tmp_path_factory.mktemp("hub")
    cache = root / "cache"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for commit, seed in ((MAIN, 0), (OLD, 1)):
            _snapshot(build.llama_base(root / f"plain-{seed}", seed=seed), repo, commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(MAIN)
        adapter = build.peft_adapter(root / "plain-1", root / "adapter", r=4, lora_alpha=8,
                                     target_modules=["q_proj", "v_proj"], seed=3)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config.get("revision") is None  # PEFT writes the key; the training run sets it
    config.update(base_model_name_or_path=REPO, revision=OLD)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return root


def _snapshot(model: Path, repo: Path, commit: str) -> None:
    """``model``'s files as huggingface_hub stores them: blobs by content, linked from the snapshot."""
    snapshot, blobs = repo / "snapshots" / commit, repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir(exist_ok=True)
    for item in model.iterdir():
        blob = blobs / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copy(item, blob)
        (snapshot / item.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def cache(hub, monkeypatch) -> Path:
    """``hub``'s cache as the one in use. huggingface_hub reads HF_HUB_CACHE once, when imported,
    so the in-process tests set its constant too (test_env_var_alone_in_a_fresh_process does not)."""
    folder = hub / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(folder))
    return folder


def snapshot(cache: Path, commit: str) -> Path:
    return cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit


def merge(adapter: Path, out: Path, *extra: str) -> dict:
    result = cli(["merge", str(adapter), "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / "d2export_report.json").read_text())


def test_revision_picks_its_snapshot_not_main(hub, cache, tmp_path):
    report = merge(hub / "adapter", tmp_path / "by-revision")
    merged = read_all(tmp_path / "by-revision")
    assert same(merged, read_all(merge_into(hub, snapshot(cache, OLD), tmp_path / "given")))
    # the test can fail: the main snapshot's merge differs
    assert not same(merged, read_all(merge_into(hub, snapshot(cache, MAIN), tmp_path / "main")))
    base = report["base"]
    assert (base["repo_id"], base["revision"], base["snapshot"], base["found"]) == (REPO, OLD, OLD, "hub cache")
    assert base["path"] == str(snapshot(cache, OLD).resolve()) and Path(base["path"]).is_absolute()
    for entry in base["files"]:
        assert entry["sha256"] == hashlib.sha256(Path(entry["file"]).read_bytes()).hexdigest()
    assert base["config_sha256"] == hashlib.sha256((snapshot(cache, OLD) / "config.json").read_bytes()).hexdigest()
    card = (tmp_path / "by-revision" / "README.md").read_text()
    assert f"`{REPO}` (snapshot `{OLD}`)" in card
    assert ModelCard(card).data.to_dict()["base_model"] == REPO


def merge_into(hub: Path, base: Path, out: Path) -> Path:
    merge(hub / "adapter", out, "--base", str(base), "--no-hash")
    return out


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_revision_option_overrides_the_adapters(hub, cache, tmp_path):
    report = merge(hub / "adapter", tmp_path / "out", "--revision", "main", "--no-hash")
    assert (report["base"]["revision"], report["base"]["snapshot"]) == ("main", MAIN)
    report = merge(hub / "adapter", tmp_path / "out2", "--base", REPO, "--no-hash")  # a model id as --base
    assert report["base"]["snapshot"] == OLD  # the adapter's own base: its revision still holds


def test_a_damaged_cache_still_lists_its_snapshots(hub, tmp_path, monkeypatch):
    """huggingface_hub's cache scan leaves out a whole repo with a ref to a missing snapshot (an
    interrupted download): the refusal still lists the snapshot folders there are, not "no complete
    snapshot"."""
    damaged = shutil.copytree(hub / "cache", tmp_path / "cache", symlinks=True)
    repo = damaged / ("models--" + REPO.replace("/", "--"))
    (repo / "refs" / "main").write_text(MISSING)
    monkeypatch.setenv("HF_HUB_CACHE", str(damaged))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(damaged))
    command = ["merge", str(hub / "adapter"), "--out", str(tmp_path / "o"), "--revision", "main"]
    check_refused(cli(command), [f"{MAIN} (may be incomplete)", f"{OLD} (may be incomplete)"])


def test_revision_not_in_the_cache_is_one_line(hub, cache, tmp_path):
    line = check_refused(cli(["merge", str(hub / "adapter"), "--out", str(tmp_path / "o"), "--revision", MISSING]),
                         [REPO, MISSING, f"{MAIN} (main)", OLD, str(cache)])
    assert not (tmp_path / "o").exists(), line
    check_refused(cli(["merge", str(hub / "adapter"), "--out", str(tmp_path / "o"), "--revision", "v2.0"]),
                  ["revision v2.0 of the base model", REPO])
    # a plain folder has no revisions
    check_refused(cli(["merge", str(hub / "adapter"), "--out", str(tmp_path / "o"), "--revision", "main",
                       "--base", str(snapshot(cache, OLD))]), ["--revision main", "local folder"])


def test_every_command_takes_the_revision(hub, cache, tmp_path):
    merge(hub / "adapter", tmp_path / "m", "--no-hash")
    for command in (["verify", str(tmp_path / "m"), "--adapter"], ["bench", str(tmp_path / "m"), "--adapter"]):
        check_refused(cli([*command, str(hub / "adapter"), "--revision", MISSING, "--quiet"]), [MISSING, REPO])
    result = cli(["inspect", str(hub / "adapter"), "--revision", MISSING, "--json"])
    plan = json.loads(result.stdout)["merge_plan"]
    assert result.exit_code == 0 and not plan["available"] and MISSING in plan["reason"]


def test_verify_names_its_base_and_a_different_snapshot(hub, cache, tmp_path):
    merge(hub / "adapter", tmp_path / "m", "--no-hash")
    result = cli(["verify", str(tmp_path / "m"), "--adapter", str(hub / "adapter"), "--weights-only", "--json",
                  "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["base_source"]["snapshot"] == OLD
    assert report["base"] == str(snapshot(cache, OLD).resolve())
    assert f"on the base {REPO}@{OLD} at " in " ".join(result.stderr.split())
    # checked against main instead: the weights fail, and a note says why
    result = cli(["verify", str(tmp_path / "m"), "--adapter", str(hub / "adapter"), "--weights-only", "--json",
                  "--quiet", "--revision", "main"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["base_source"]["snapshot"] == MAIN and report["failures"]
    assert any(f"merged into {REPO}@{OLD}" in n for n in report["notes"])


def test_inspect_and_dry_run_name_the_snapshot(hub, cache, tmp_path):
    result = cli(["inspect", str(hub / "adapter"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["merge_plan"]["base_source"]["snapshot"] == OLD
    result = cli(["merge", str(hub / "adapter"), "--out", str(tmp_path / "o"), "--dry-run"])
    assert result.exit_code == 0 and f"{REPO}@{OLD}" in " ".join(result.stdout.split())


def test_env_var_alone_in_a_fresh_process(hub, tmp_path):
    """HF_HUB_CACHE as a user sets it, read by huggingface_hub in a process of its own."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub / "cache"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-m", "d2export", "inspect", str(hub / "adapter"), "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["merge_plan"]["base_source"]["snapshot"] == OLD


# --------------------------------------------------------------------------- relative base paths

@pytest.fixture
def relative(fixture, tmp_path) -> Path:
    """``run/adapter`` naming its base ``../base``, which sits at ``run/base``."""
    folder = fixture("lora-llama")
    run = tmp_path / "run"
    shutil.copytree(folder / "base", run / "base")
    shutil.copytree(folder / "adapter", run / "adapter")
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "../base"}))
    return run


def test_relative_base_is_found_beside_the_adapter(relative, tmp_path, monkeypatch):
    elsewhere = tmp_path / "a" / "b"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # ../base from here is tmp_path/a/base: not there
    report = merge(relative / "adapter", tmp_path / "out", "--no-hash")
    assert report["base"]["path"] == str((relative / "base").resolve())
    assert (report["base"]["found"], report["base"]["name"], report["base"]["snapshot"]) == (
        "adapter folder", "../base", None)
    monkeypatch.chdir(relative / "adapter")  # both readings are the same folder: not ambiguous
    assert merge(relative / "adapter", tmp_path / "out2", "--no-hash")["base"]["path"] == report["base"]["path"]


def test_relative_base_naming_two_models_is_refused(relative, fixture, tmp_path, monkeypatch):
    here = tmp_path / "x" / "y"
    here.mkdir(parents=True)
    shutil.copytree(fixture("lora-llama") / "base", tmp_path / "x" / "base")  # ../base from here: another model
    monkeypatch.chdir(here)
    check_refused(cli(["merge", str(relative / "adapter"), "--out", str(tmp_path / "o")]),
                  ["ambiguous", str((relative / "adapter" / "../base").absolute()),
                   str((here / "../base").absolute()), "--base"])
    assert not (tmp_path / "o").exists()
    # a folder that is no model does not make the name ambiguous
    shutil.rmtree(tmp_path / "x" / "base")
    (tmp_path / "x" / "base").mkdir()
    assert merge(relative / "adapter", tmp_path / "o", "--no-hash")["base"]["found"] == "adapter folder"


def test_relative_base_under_the_current_directory_only(relative, tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    shutil.move(str(relative / "base"), str(tmp_path / "models" / "base"))
    monkeypatch.chdir(tmp_path / "models" / "base")  # ../base from here is the base; beside the adapter: nothing
    report = merge(relative / "adapter", tmp_path / "out", "--no-hash")
    assert (report["base"]["found"], report["base"]["path"]) == (
        "current directory", str((tmp_path / "models" / "base").resolve()))


# --------------------------------------------------------------------------- trainer runs

def test_several_trainer_checkpoints_are_listed_by_step(fixture, tmp_path):
    adapter = fixture("lora-llama") / "adapter"
    run = tmp_path / "run"
    for step in (500, 1000, 20):
        shutil.copytree(adapter, run / f"checkpoint-{step}")
    check_refused(cli(["merge", str(run), "--dry-run"]),
                  ["--checkpoint is needed", "(checkpoint-20, checkpoint-500, checkpoint-1000)", "latest, best"])
    write_adapter(run / "final", {}, {})  # another adapter beside the checkpoints
    check_refused(cli(["merge", str(run), "--dry-run"]),
                  ["several adapters (checkpoint-20, checkpoint-500, checkpoint-1000, final)",
                   "--checkpoint latest, best or a step number"])
