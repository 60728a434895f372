"""Hostile and careless inputs (issue 14), classes 1-4: JSON shape and type, adapter config
numbers and patterns, filesystem errors, output never silently wrong. Classes 5-8 are in
test_hostile_process.py.

Table-driven like test_bad_inputs.py: every case copies a small fixture into ``tmp_path``, breaks
the copy and runs the command in-process. The whole of ``tmp_path`` is hashed before and after,
which checks at once that the inputs are byte-identical and that no output, temporary folder or
lock file was left.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from support import Ctx, check_refused, cli, make_ctx, run_case, tree_state

PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


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
    assert "\\udcfe" in result.stdout  # the report names the folder, escaped
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
