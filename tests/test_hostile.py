"""Hostile and careless inputs (issue 14): each is refused with one line, leaves nothing behind and
changes no input.

Table-driven like test_bad_inputs.py: every case copies a small fixture into ``tmp_path``, breaks
the copy and runs the command in-process. The whole of ``tmp_path`` is hashed before and after,
which checks at once that the inputs are byte-identical and that no output, temporary folder or
lock file was left. The classes are the issue's: JSON shape and type (1), adapter config numbers
and patterns (2), filesystem errors (3), output never silently wrong (4), symlinks (5), signals
and races (6), bounded reading (7), unexpected exceptions and warnings (8).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from d2export import merging
from d2export.cli import app
from d2export.writing import atomic_output

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
runner = CliRunner()


def tree_state(root: Path) -> dict[str, str]:
    """Every file (sha256), folder and link under ``root``, by relative path."""
    state = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            state[rel] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            state[rel] = "dir"
        else:
            state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


@dataclass
class Ctx:
    tmp: Path
    adapter: Path
    base: Path
    mp: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def argv(self, *extra: str, out: Path | None = None, base: Path | None = None) -> list[str]:
        return ["merge", str(self.adapter), "--base", str(base or self.base), "--out", str(out or self.out),
                "--no-hash", "--quiet", *extra]

    def config(self, edit: Callable[[dict], None], folder: Path | None = None, name: str = "adapter_config.json"
               ) -> None:
        path = (folder or self.adapter) / name
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    def weights(self, edit: Callable[[dict], None], path: Path | None = None) -> None:
        path = path or self.adapter / "adapter_model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, str(path), metadata={"format": "pt"})

    def shard_base(self, parts: int = 2) -> dict:
        """The base split into ``parts`` shards with an index; returns the index."""
        tensors = load_file(self.base / "model.safetensors")
        (self.base / "model.safetensors").unlink()
        names = list(tensors)
        weight_map = {}
        for i in range(parts):
            file = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
            chunk = {n: tensors[n] for n in names[i::parts]}
            save_file(chunk, str(self.base / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(chunk, file))
        index = {"metadata": {}, "weight_map": weight_map}
        self.write_index(index)
        return index

    def write_index(self, index: dict) -> None:
        (self.base / "model.safetensors.index.json").write_text(json.dumps(index))


def make_ctx(fixture, name: str, tmp: Path, mp: pytest.MonkeyPatch) -> Ctx:
    src = fixture(name)
    shutil.copytree(src / "adapter", tmp / "adapter", symlinks=True)
    shutil.copytree(src / "base", tmp / "base", symlinks=True)
    return Ctx(tmp, tmp / "adapter", tmp / "base", mp)


def cli(argv: list[str]):
    result = runner.invoke(app, argv)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def check_refused(result, needles: list[str], code: int = 2) -> str:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert result.exit_code == code, f"exit {result.exit_code}: {out}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def run_case(fixture, tmp_path, monkeypatch, name: str, setup) -> None:
    ctx = make_ctx(fixture, name, tmp_path, monkeypatch)
    argv, needles = setup(ctx)
    before = tree_state(tmp_path)
    result = cli(argv)
    monkeypatch.undo()
    check_refused(result, needles)
    assert tree_state(tmp_path) == before, "an input changed or something was left behind"


def raw(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def nested(depth: int) -> str:
    return '{"model_type": "llama", "x": ' + "[" * depth + "]" * depth + "}"


# --------------------------------------------------------------------------- 1: JSON shape and type

JSON_CASES = {
    "config_is_array": lambda c: raw(c.base / "config.json", b"[1, 2]"),
    "config_not_utf8": lambda c: raw(c.base / "config.json", b'{"model_type": "ll\xffama"}'),
    "config_nested_deep": lambda c: raw(c.base / "config.json", nested(200).encode()),
    "config_nested_past_recursion": lambda c: raw(c.base / "config.json", nested(100_000).encode()),
    "config_model_type_number": lambda c: c.config(lambda d: d.update(model_type=7), c.base, "config.json"),
    "config_tie_as_string": lambda c: c.config(lambda d: d.update(tie_word_embeddings="false"), c.base,
                                               "config.json"),
    "config_architectures_object": lambda c: c.config(lambda d: d.update(architectures={"a": 1}), c.base,
                                                      "config.json"),
    "adapter_config_nan": lambda c: raw(c.adapter / "adapter_config.json", b'{"r": 4, "lora_alpha": NaN}'),
    "config_duplicate_key": lambda c: raw(c.base / "config.json", b'{"model_type": "llama", "model_type": "x"}'),
    "adapter_config_is_array": lambda c: raw(c.adapter / "adapter_config.json", b'[{"r": 4}]'),
    "adapter_config_peft_type_list": lambda c: c.config(lambda d: d.update(peft_type=["LORA"])),
    "adapter_config_rslora_string": lambda c: c.config(lambda d: d.update(use_rslora="yes")),
    "adapter_config_targets_number": lambda c: c.config(lambda d: d.update(target_modules=5)),
    "adapter_config_huge_number": lambda c: raw(c.adapter / "adapter_config.json",
                                                b'{"peft_type": "LORA", "r": 4, "lora_alpha": 1e400}'),
    "index_weight_map_list": lambda c: (c.shard_base(), c.write_index({"weight_map": ["a"]})),
    "index_weight_map_numbers": lambda c: (c.shard_base(), c.write_index({"weight_map": {"a": 1}})),
    "index_shard_outside": lambda c: (c.shard_base(), c.write_index({"weight_map": {"a": "../x.safetensors"}})),
    "modules_json_object": lambda c: raw(c.base / "modules.json", b'{"idx": 0}'),
    "modules_json_path_number": lambda c: raw(c.base / "modules.json", b'[{"idx": 0, "path": 3, "type": "x"}]'),
    "tokenizer_config_array": lambda c: raw(c.base / "tokenizer_config.json", b"[]"),
    "sentence_bert_config_string_length": lambda c: raw(c.base / "sentence_bert_config.json",
                                                        b'{"max_seq_length": "long"}'),
}
JSON_NEEDLES = {
    "config_is_array": ["config.json", "expected a JSON object, found a list"],
    "config_not_utf8": ["config.json", "not UTF-8"],
    "config_nested_deep": ["config.json", "nested more than"],
    "config_nested_past_recursion": ["config.json", "nested too deeply"],
    "config_model_type_number": ["config.json", "'model_type' must be a string, found an integer"],
    "config_tie_as_string": ["'tie_word_embeddings' must be true or false, found a string"],
    "config_architectures_object": ["'architectures' must be a list or null, found an object"],
    "adapter_config_nan": ["adapter_config.json", "NaN is not a JSON number"],
    "config_duplicate_key": ["config.json", "key 'model_type' appears twice"],
    "adapter_config_is_array": ["adapter_config.json", "expected a JSON object"],
    "adapter_config_peft_type_list": ["adapter_config.json", "'peft_type' must be a string"],
    "adapter_config_rslora_string": ["'use_rslora' must be true or false"],
    "adapter_config_targets_number": ["'target_modules' must be a string or a list or null"],
    "adapter_config_huge_number": ["adapter_config.json", "out of range"],
    "index_weight_map_list": ["model.safetensors.index.json", "'weight_map' must be an object"],
    "index_weight_map_numbers": ["'weight_map' must hold only strings, found an integer"],
    "index_shard_outside": ["'../x.safetensors' is not a file name in the folder"],
    "modules_json_object": ["modules.json", "expected a JSON list of modules"],
    "modules_json_path_number": ["modules.json", "module 0 'path' must be a string"],
    "tokenizer_config_array": ["tokenizer_config.json", "expected a JSON object"],
    "sentence_bert_config_string_length": ["'max_seq_length' must be an integer or null"],
}


@pytest.mark.parametrize("case", list(JSON_CASES))
def test_json_shape_and_type(fixture, tmp_path, monkeypatch, case):
    def setup(c: Ctx):
        JSON_CASES[case](c)
        return c.argv(), JSON_NEEDLES[case]

    run_case(fixture, tmp_path, monkeypatch, "lora-llama", setup)


# --------------------------------------------------------------------------- 2: numbers and patterns

def _set(**values):
    return lambda d: d.update(values)


NUMBER_CASES = [
    ("lora-llama", _set(r=0), ["'r' must be positive, got 0"]),
    ("lora-llama", _set(r=-4), ["'r' must be positive"]),
    ("lora-llama", _set(r=4.5), ["'r' must be a whole number"]),
    ("lora-llama", _set(r=10**30), ["'r' must be a whole number of at most"]),
    ("lora-llama", _set(r="4"), ["'r' must be a number, found a string"]),
    ("lora-llama", _set(r=True), ["'r' must be a number, found true or false"]),
    ("lora-llama", _set(lora_alpha="8"), ["'lora_alpha' must be"]),
    ("lora-llama", _set(lora_alpha=0), ["'lora_alpha' must be positive"]),
    ("lora-llama", _set(rank_pattern=["q_proj"]), ["'rank_pattern' must be an object or null"]),
    ("lora-llama", _set(rank_pattern={"q_proj(": 4}), ["rank_pattern key 'q_proj(' is not a valid regular"]),
    ("lora-llama", _set(rank_pattern={"q_proj": "8"}), ["rank_pattern['q_proj'] must be a number"]),
    ("lora-llama", _set(rank_pattern={"q_proj": 2.5}), ["rank_pattern['q_proj'] must be a whole number"]),
    ("lora-llama", _set(alpha_pattern={"q_proj": -1}), ["alpha_pattern['q_proj'] must be positive"]),
    ("lora-llama", _set(alpha_pattern={"q_proj": {"x": 1}}), ["alpha_pattern['q_proj'] must be a number"]),
    ("lora-llama", _set(rank_pattern={"(.*)*x": 4}), ["'(.*)*x'", "catastrophic backtracking"]),
    ("lora-llama", _set(alpha_pattern={"([a-z_]+)+z": 2}), ["catastrophic backtracking"]),
    ("d2lora-llama", _set(tau="0.5"), ["'tau' must be a number or null, found a string"]),
    ("d2lora-llama", _set(tau=[0.5]), ["'tau' must be"]),
    ("d2lora-llama", _set(r=2.5), ["'r' must be a whole number"]),
    ("d2lora-llama", _set(norm_projection="yes"), ["'norm_projection' must be true or false"]),
]


@pytest.mark.parametrize(("name", "edit", "needles"), NUMBER_CASES, ids=[f"{n}-{i}" for i, (n, *_) in
                                                                          enumerate(NUMBER_CASES)])
def test_adapter_config_numbers(fixture, tmp_path, monkeypatch, name, edit, needles):
    def setup(c: Ctx):
        c.config(edit)
        return c.argv(), ["adapter_config.json", *needles]

    run_case(fixture, tmp_path, monkeypatch, name, setup)


# --------------------------------------------------------------------------- 3: filesystem errors

def _fail_writes(c: Ctx, target: str, error: int = errno.ENOSPC) -> None:
    """Writing the file named ``target`` in the output fails with ``error`` (a full disk)."""
    original = Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name == target and ".partial-" in str(self.parent):
            raise OSError(error, os.strerror(error), str(self))
        return original(self, *args, **kwargs)

    c.mp.setattr(Path, "write_text", write_text)


def _full_disk_copying_side_files(c: Ctx):
    def copy2(src, dst, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))

    c.mp.setattr(shutil, "copy2", copy2)
    return c.argv(), ["generation_config.json", "No space left on device"]


def _read_only_parent(c: Ctx):
    def mkdtemp(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), kwargs.get("dir"))

    c.mp.setattr(tempfile, "mkdtemp", mkdtemp)
    return c.argv(), ["cannot create the output in", "Read-only file system"]


def _cwd(c: Ctx, out: str):
    work = c.tmp / "w" / "work"  # ".." is then tmp/w, which holds no input
    work.mkdir(parents=True)
    c.mp.chdir(work)
    return c.argv(out=Path(out), base=c.base.absolute()), ["--out", "current folder"]


FS_CASES = {
    "parent_is_a_file": lambda c: ((c.tmp / "f").write_text("x"), (c.argv(out=c.tmp / "f" / "out"),
                                                                   ["--out", "is not a folder"]))[1],
    "grandparent_is_a_file": lambda c: ((c.tmp / "f").write_text("x"), (c.argv(out=c.tmp / "f" / "a" / "out"),
                                                                        ["--out", "is not a folder"]))[1],
    "name_too_long": lambda c: (c.argv(out=c.tmp / ("o" * 300)), ["--out", "name is too long"]),
    "out_is_cwd": lambda c: _cwd(c, "."),
    "out_holds_cwd": lambda c: _cwd(c, ".."),
    "read_only_parent": _read_only_parent,
    "full_disk_config": lambda c: (_fail_writes(c, ".config.json.tmp"), (c.argv(), ["config.json", "No space"]))[1],
    "full_disk_report": lambda c: (_fail_writes(c, ".d2export_report.json.tmp"),
                                   (c.argv(), ["d2export_report.json", "No space"]))[1],
    "full_disk_card": lambda c: (_fail_writes(c, ".README.md.tmp"), (c.argv(), ["README.md", "No space"]))[1],
    "full_disk_index": lambda c: (_fail_writes(c, "model.safetensors.index.json"),
                                  (c.argv("--max-shard-size", "60KB"), ["index.json", "No space"]))[1],
    "full_disk_side_files": _full_disk_copying_side_files,
    "quota_config": lambda c: (_fail_writes(c, ".config.json.tmp", errno.EDQUOT),
                               (c.argv(), ["config.json", "quota"]))[1],
}


@pytest.mark.parametrize("case", list(FS_CASES))
def test_filesystem_errors(fixture, tmp_path, monkeypatch, case):
    run_case(fixture, tmp_path, monkeypatch, "lora-llama", FS_CASES[case])


def test_long_name_that_fits_is_written(fixture, tmp_path, monkeypatch):
    """A name that fits the file system but not with a temporary suffix appended still works."""
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    out = tmp_path / ("o" * 250)
    result = cli(c.argv(out=out))
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", "base", out.name])


def test_paths_that_are_not_utf8(fixture, tmp_path, monkeypatch):
    """Folder names with bytes that are not UTF-8: merged fine, and a refusal is still one line."""
    odd = os.fsdecode(b"ad\xffapter")
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    c.adapter = Path(shutil.move(c.adapter, tmp_path / odd))
    out = tmp_path / os.fsdecode(b"out\xfe")
    result = cli(c.argv(out=out))
    assert result.exit_code == 0, result.stderr
    assert (out / "model.safetensors").is_file() and "\\udcff" in (out / "README.md").read_text()
    shutil.rmtree(out)
    c.config(lambda d: d.update(r="x"))
    before = tree_state(tmp_path)
    check_refused(cli(c.argv(out=out)), ["\\udcff", "'r' must be"])
    assert tree_state(tmp_path) == before


# --------------------------------------------------------------------------- 4: never silently wrong

def _big_norm(c: Ctx):
    path = c.base / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = np.full(64, 1e6, np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return c.argv("--dtype", "float16"), ["model.norm.weight", "overflows float16"]


def _big_replacement(c: Ctx):
    c.weights(lambda t: t.update({PREFIX + "model.norm.weight": np.full(64, 3e5, np.float32)}))
    return c.argv("--dtype", "float16"), ["model.norm.weight", "magnitude 300000", "overflows float16"]


def _duplicate_module(c: Ctx):
    def edit(t):  # the same module once with and once without the base-model prefix
        for part in ("lora_A", "lora_B"):
            t[f"{PREFIX}layers.0.self_attn.q_proj.{part}.weight"] = t[f"{PREFIX}{Q0}.{part}.weight"] * 2
    c.weights(edit)
    return c.argv(), ["both resolve to the base tensor", f"{Q0}.weight"]


def _duplicate_full_tensor(c: Ctx):
    c.weights(lambda t: t.update({PREFIX + "model.norm.weight": np.ones(64, np.float32),
                                  PREFIX + "norm.weight": np.full(64, 2, np.float32)}))
    return c.argv(), ["both resolve to the base tensor model.norm.weight"]


def _index_wrong_file(c: Ctx):
    index = c.shard_base()
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "model-00002-of-00002.safetensors"
    c.write_index(index)
    return c.argv(), [f"the index puts tensor {name} in model-00002-of-00002.safetensors"]


def _index_omits_tensor(c: Ctx):
    index = c.shard_base()
    name = sorted(index["weight_map"])[-1]
    del index["weight_map"][name]
    c.write_index(index)
    return c.argv(), [f"tensor {name}", "is not in the index"]


def _index_omits_shard(c: Ctx):
    index = c.shard_base(3)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not v.startswith("model-00003")}
    c.write_index(index)
    return c.argv(), ["shard model-00003-of-00003.safetensors is not in model.safetensors.index.json"]


def _index_names_phantom_tensor(c: Ctx):
    index = c.shard_base()
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00002.safetensors"
    c.write_index(index)
    return c.argv(), ["tensor model.ghost.weight in model-00001-of-00002.safetensors, which does not hold it"]


WRONG_CASES = [_big_norm, _big_replacement, _duplicate_module, _duplicate_full_tensor, _index_wrong_file,
               _index_omits_tensor, _index_omits_shard, _index_names_phantom_tensor]


@pytest.mark.parametrize("setup", WRONG_CASES, ids=[s.__name__.strip("_") for s in WRONG_CASES])
def test_output_never_silently_wrong(fixture, tmp_path, monkeypatch, setup):
    run_case(fixture, tmp_path, monkeypatch, "lora-llama", setup)


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

def after_weights(c: Ctx, action: Callable[[], None]) -> None:
    """Run ``action`` once the weights are written, inside the run (the temporary folder exists)."""
    write_config = merging.write_config

    def hooked(plan, folder):
        action()
        return write_config(plan, folder)

    c.mp.setattr(merging, "write_config", hooked)


def test_sigterm_is_like_ctrl_c(fixture, tmp_path, monkeypatch):
    c = make_ctx(fixture, "lora-llama", tmp_path, monkeypatch)
    after_weights(c, lambda: os.kill(os.getpid(), signal.SIGTERM))
    before, handler = tree_state(tmp_path), signal.getsignal(signal.SIGTERM)
    result = cli(c.argv())
    monkeypatch.undo()
    check_refused(result, ["terminated (SIGTERM)", "no output was written"], code=128 + signal.SIGTERM)
    assert tree_state(tmp_path) == before
    assert signal.getsignal(signal.SIGTERM) == handler  # the command's handler does not outlive it


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
