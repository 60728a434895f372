"""Hostile and careless inputs (issue 14), classes 5-8: symlinks in the base, signals and races,
bounded reading, unexpected exceptions and warnings. Classes 1-4 are in test_hostile.py.

Table-driven like test_bad_inputs.py: every case copies a small fixture into ``tmp_path``, breaks
the copy and runs the command in-process. The whole of ``tmp_path`` is hashed before and after,
which checks at once that the inputs are byte-identical and that no output, temporary folder or
lock file was left.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from support import Ctx, after_weights, check_refused, cli, make_ctx, run_case, tree_state

from d2export.writing import atomic_output

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- 5: symlinks in the base

def _secret(c: Ctx) -> Path:
    secret = c.tmp / "secret"
    secret.mkdir()
    (secret / "id_rsa").write_text("private")
    return secret


LINK_CASES = {
    "file_link_out": lambda c: (c.base / "tokenizer.json").symlink_to(_secret(c) / "id_rsa"),
    "relative_file_link_out": lambda c: (_secret(c), (c.base / "vocab.txt").symlink_to("../secret/id_rsa")),
    "folder_link_out": lambda c: (c.base / "extra").symlink_to(_secret(c), target_is_directory=True),
    "nested_link_out": lambda c: ((c.base / "sub").mkdir(), (c.base / "sub" / "k").symlink_to(_secret(c) / "id_rsa")),
    "link_to_base_itself": lambda c: (c.base / "again").symlink_to(c.base, target_is_directory=True),
    "cycle_in_subfolder": lambda c: ((c.base / "sub").mkdir(), (c.base / "sub" / "up").symlink_to(
        "..", target_is_directory=True)),
}
LINK_NEEDLES = {"link_to_base_itself": "a loop", "cycle_in_subfolder": "a loop"}


@pytest.mark.parametrize("case", list(LINK_CASES))
def test_side_file_links(fixture, tmp_path, monkeypatch, case):
    def setup(c: Ctx):
        LINK_CASES[case](c)
        return c.argv(), [LINK_NEEDLES.get(case, "outside the base folder")]

    run_case(fixture, tmp_path, monkeypatch, "lora-llama", setup)


def test_hugging_face_cache_links_are_copied(fixture, tmp_path, monkeypatch):
    """A base in the Hugging Face cache: every file is a link into the model's blobs, allowed."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    repo = tmp_path / "hub" / "models--t--llama"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    for folder in (snapshot / "tok", blobs):
        folder.mkdir(parents=True)
    (c.base / "tok").mkdir()
    (c.base / "tok" / "vocab.txt").write_text("a b c")
    for item in [*c.base.glob("*.*"), c.base / "tok" / "vocab.txt"]:
        blob = blobs / hashlib.sha256(item.read_bytes()).hexdigest()
        shutil.copy(item, blob)
        (snapshot / item.relative_to(c.base)).symlink_to(os.path.relpath(blob, (snapshot / item.relative_to(
            c.base)).parent))
    (snapshot / "same.json").symlink_to("generation_config.json")  # a link inside the base: fine too
    result = cli(c.argv(base=snapshot))
    assert result.exit_code == 0, result.stderr
    copied = [c.out / "generation_config.json", c.out / "tok" / "vocab.txt", c.out / "same.json"]
    assert all(p.is_file() and not p.is_symlink() for p in copied)
    assert (c.out / "tok" / "vocab.txt").read_text() == "a b c"


# --------------------------------------------------------------------------- 6: signals and races

def test_sigterm_is_like_ctrl_c(fixture, tmp_path, monkeypatch):
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    after_weights(c, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before, handler = tree_state(tmp_path), signal.getsignal(signal.SIGTERM)
    result = cli(c.argv())
    monkeypatch.undo()
    check_refused(result, ["terminated (SIGTERM)", "no output was written"], code=128 + signal.SIGTERM)
    assert tree_state(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) == handler  # the command's handler does not outlive it


@pytest.mark.parametrize(("step", "flag", "said"), [
    ("d2export.verification:verify", "--verify", "it was not verified"),
    ("d2export.onnx:export_onnx", "--onnx", "no ONNX export was written")])
def test_sigterm_after_the_merge_says_the_folder_was_written(fixture, tmp_path, monkeypatch, step, flag, said):
    """The merge is complete and published when verify or the ONNX export starts: a stop then leaves
    the folder (it is the merge's whole output), and the line says so, instead of the bare
    "terminated" or "no output was written"."""
    import importlib

    module, _, name = step.partition(":")
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(importlib.import_module(module), name, stopped)
    result = cli([*c.argv(), flag])
    monkeypatch.undo()
    assert result.exit_code == 128 + signal.SIGTERM and "Traceback" not in result.stderr
    text = " ".join(result.stderr.split())  # after the merge's summary, wrapped
    assert text.endswith(f"terminated (SIGTERM): the merged folder {c.out} was written; {said}")
    assert (c.out / "config.json").is_file()


KILLED = """
import os, signal, sys
from pathlib import Path
from d2export.writing import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    (tmp / "model.safetensors").write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_stale_partial_of_a_killed_run_is_removed(fixture, tmp_path, monkeypatch):
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    proc = subprocess.run([sys.executable, "-c", KILLED, str(c.out)], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
    foreign = [".out.partial-mine", ".out.partial-keep.this", ".out.partial-x.partial-abcdefgh"]
    for name in foreign:  # named otherwise than d2export names its temporary folders: not ours
        (tmp_path / name).mkdir()
    result = cli(c.argv())
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", "base", "out", *foreign])


KILLED_PUBLISHING = """
import os, signal, sys
from pathlib import Path
from d2export.writing import atomic_output
rename = os.replace
def killed_after_the_first(src, dst):  # the old output moved aside, the new one not yet in place
    rename(src, dst)
    if Path(dst).name == "previous":
        os.kill(os.getpid(), signal.SIGKILL)
os.replace = killed_after_the_first
with atomic_output(Path(sys.argv[1])) as tmp:
    (tmp / "config.json").write_text("new")
"""


def test_an_output_a_killed_run_had_moved_aside_is_put_back(fixture, tmp_path, monkeypatch):
    """Killed between publishing's two renames, a run leaves the output it was replacing in an
    ``.old-`` folder and none in place. The next run on that output puts it back before anything
    else, and removes both temporary folders; without --force it is then refused as existing."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    c.out.mkdir()
    (c.out / "config.json").write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_PUBLISHING, str(c.out)], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not c.out.exists()
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [
        ".out.lock", ".out.old", ".out.partial"]
    check_refused(cli(c.argv()), ["already exists"])
    assert (c.out / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
    old_only = tmp_path / ".out.old-abcd1234"  # killed after both renames: the output is the new one
    (old_only / "previous").mkdir(parents=True)
    assert cli(c.argv("--force")).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]
    assert (c.out / "config.json").read_text() != "old"


def test_second_run_on_the_same_output_is_refused(fixture, tmp_path, monkeypatch):
    """While one run writes ``out`` (holding its lock), another run on ``out`` is refused, with
    or without --force, and leaves the first one's work alone."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    with atomic_output(c.out) as first:
        (first / "config.json").write_text("{}")
        before = tree_state(tmp_path)
        for extra in ((), ("--force",)):
            check_refused(cli(c.argv(*extra)), ["another run is writing", "out"])
        assert tree_state(tmp_path) == before
    assert (c.out / "config.json").read_text() == "{}"
    check_refused(cli(c.argv()), ["--force is not set", "already exists"])


def test_output_created_meanwhile_is_not_replaced(fixture, tmp_path, monkeypatch):
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)

    def someone_else_writes_out():
        c.out.mkdir()
        (c.out / "theirs.txt").write_text("theirs")

    after_weights(c, someone_else_writes_out)
    check_refused(cli(c.argv()), ["appeared while this run was writing"])
    assert [p.name for p in c.out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


def test_two_processes_on_one_new_output(fixture, tmp_path, monkeypatch):
    """Two real runs at once, no --force: exactly one succeeds."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "d2export.cli", *c.argv()], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert len(refused.splitlines()) == 1 and ("another run" in refused or "already exists" in refused), refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "out"]


# --------------------------------------------------------------------------- 7: bounded reading

def _header_claims(c: Ctx, path: Path, length: int) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", length) + data[8:])


def _huge_tensor_header(path: Path, name: str = "model.norm.weight", shape=(2**32, 4)) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, 16 * 2**30]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)


BOUNDED_CASES = {
    "base_header_16GiB": lambda c: (_header_claims(c, c.base / "model.safetensors", 16 * 2**30),
                                    ["model.safetensors", "header length 17179869184"]),
    "base_tensor_16GiB": lambda c: (_huge_tensor_header(c.base / "model.safetensors"),
                                    ["model.safetensors", "not a valid safetensors file"]),
    "base_tensor_name_control": lambda c: (_huge_tensor_header(c.base / "model.safetensors", "a\nb", (1,)),
                                           ["control characters"]),
    "adapter_header_16GiB": lambda c: (_header_claims(c, c.adapter / "adapter_model.safetensors", 16 * 2**30),
                                       ["adapter_model.safetensors", "cannot read adapter weights"]),
    "adapter_tensor_16GiB": lambda c: (_huge_tensor_header(c.adapter / "adapter_model.safetensors"),
                                       ["adapter_model.safetensors", "cannot read adapter weights"]),
}


@pytest.mark.parametrize("case", list(BOUNDED_CASES))
def test_bounded_reading(fixture, tmp_path, monkeypatch, case):
    """A header's claims are checked before any allocation: no buffer beyond 64 MiB is asked for."""
    empty = np.empty

    def bounded_empty(shape, *args, **kwargs):
        assert np.prod(shape) * np.dtype(kwargs.get("dtype", args[0] if args else float)).itemsize < 2**26
        return empty(shape, *args, **kwargs)

    def setup(c: Ctx):
        needles = BOUNDED_CASES[case](c)[1]
        c.mp.setattr(np, "empty", bounded_empty)
        return c.argv(), needles

    run_case(fixture, tmp_path, monkeypatch, "lora-llama", setup)


# --------------------------------------------------------------------------- 8: unexpected exceptions

def _argv_for(command: str, c: Ctx) -> list[str]:
    return {
        "inspect": ["inspect", str(c.adapter), "--base", str(c.base)],
        "merge": c.argv(),
        "verify": ["verify", str(c.base), "--adapter", str(c.adapter), "--base", str(c.base), "--quiet"],
        "onnx": ["onnx", str(c.base), "--out", str(c.out), "--quiet"],
        "bench": ["bench", str(c.base), "--adapter", str(c.adapter), "--base", str(c.base), "--quiet"],
    }[command]


CRASH_POINTS = {"inspect": ("d2export.job", "build_plan"), "merge": ("d2export.merging", "write_config"),
                "verify": ("d2export.verification.runner", "verify"), "onnx": ("d2export.onnx", "export_onnx"),
                "bench": ("d2export.bench", "run_bench")}


@pytest.mark.parametrize("command", list(CRASH_POINTS))
@pytest.mark.parametrize("exc", [RuntimeError("kaboom"), KeyError("kaboom"), RecursionError("kaboom")],
                         ids=["runtime", "key", "recursion"])
def test_unexpected_exception_is_one_line_exit_2(fixture, tmp_path, monkeypatch, command, exc):
    module_name, attr = CRASH_POINTS[command]
    module = pytest.importorskip(module_name)

    def crash(*args, **kwargs):
        raise exc

    def setup(c: Ctx):
        c.mp.setattr(module, attr, crash)
        if command == "verify":
            c.mp.setattr("d2export.verification.verify", crash)
        return _argv_for(command, c), [f"unexpected {type(exc).__name__}", "kaboom", "rerun with --debug"]

    run_case(fixture, tmp_path, monkeypatch, "lora-llama", setup)


NOISY = """
import sys, warnings
import numpy as np
from d2export import merging
from d2export.cli import run

write_config = merging.write_config

def noisy(plan, folder):
    warnings.warn("noise from a library", UserWarning, stacklevel=1)
    np.float16(6e4) * np.float16(2)  # numpy's overflow RuntimeWarning
    return write_config(plan, folder)

merging.write_config = noisy
sys.argv = ["d2export", *sys.argv[1:]]
run()
"""


def test_warnings_during_a_merge_stay_off_the_terminal(fixture, tmp_path, monkeypatch):
    """In a process of its own, as a user runs it (pytest would capture the warnings itself)."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "always"}
    proc = subprocess.run([sys.executable, "-c", NOISY, *c.argv()], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr and "noise" not in proc.stderr, proc.stderr
    assert (c.out / "model.safetensors").is_file()
    proc = subprocess.run([sys.executable, "-c", NOISY, "--debug", *c.argv("--force")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "noise from a library" in proc.stderr, proc.stderr  # --debug shows them


EXIT = """
import atexit, sys, tempfile
from pathlib import Path
import torch  # once torch is imported, the command exits without tearing the interpreter down
from d2export.cli import _exit

spill = Path(tempfile.mkdtemp())
atexit.register(lambda: (spill / "cleaned").write_text("yes"))
sys.stdout.write(str(spill))  # buffered, no newline: must still reach the pipe
sys.stderr.write("last words")
_exit(int(sys.argv[1]))
"""


@pytest.mark.parametrize("code", [0, 1, 2])
def test_the_quick_exit_keeps_the_exit_code_runs_atexit_and_flushes(code):
    result = subprocess.run([sys.executable, "-c", EXIT, str(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == code, result.stderr
    assert result.stderr == "last words"
    assert (Path(result.stdout) / "cleaned").read_text() == "yes"
    shutil.rmtree(result.stdout)
