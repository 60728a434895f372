"""Bad inputs: every one is refused cleanly.

The contract: exit code 2, exactly one line on stderr starting with ``error:`` that names the
offending file or tensor, no traceback, no output folder (and no ``.partial-`` temp folder) left
behind, and the inputs byte-for-byte unchanged. With ``--debug`` a traceback may be shown.

Each case copies a shared fixture into ``tmp_path`` and corrupts the copy; the whole of
``tmp_path`` is hashed before and after the command, which checks at once that the inputs are
unchanged, that an existing output is untouched and that nothing (output, temp folder, a file a
malicious pickle tried to create) was left behind.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support import tree_state
from typer.testing import CliRunner

from d2export import directio
from d2export import merging as merge_module
from d2export.cli import app
from d2export.errors import D2ExportError

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"  # a module adapted in both d2lora-llama and lora-llama
SAFE = "adapter_model.safetensors"


# --------------------------------------------------------------------------- helpers


def leftovers(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".partial-" in p.name or ".old-" in p.name or p.name.endswith("-merged"))


@dataclass
class Ctx:
    tmp: Path
    adapter: Path
    base: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def argv(self, *extra: str, adapter: Path | None = None, base: Path | None = None,
             out: Path | None = None) -> list[str]:
        return ["merge", str(adapter or self.adapter), "--base", str(base or self.base),
                "--out", str(out or self.out), "--no-hash", *extra]

    # --- editing the copies

    def config(self, edit: Callable[[dict], None]) -> None:
        path = self.adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        edit(config)
        path.write_text(json.dumps(config, indent=2))

    def weights(self, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        path = self.adapter / SAFE
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    def base_weights(self, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
        path = self.base / "model.safetensors"
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})

    def bin_adapter(self, extra: dict) -> Path:
        """Replace the safetensors adapter by a pickle ``adapter_model.bin`` holding ``extra`` too."""
        tensors: dict[str, object] = dict(load_file(self.adapter / SAFE))
        tensors.update(extra)
        (self.adapter / SAFE).unlink()
        path = self.adapter / "adapter_model.bin"
        torch.save(tensors, path)
        return path


def copy_fixture(fixture, name: str, tmp: Path) -> Ctx:
    src = fixture(name)
    shutil.copytree(src / "adapter", tmp / "adapter")
    shutil.copytree(src / "base", tmp / "base")
    return Ctx(tmp, tmp / "adapter", tmp / "base")


def check_refused(code: int, stdout: str, stderr: str, needles: list[str]) -> str:
    """The one-line refusal; returns the line."""
    assert "Traceback" not in stdout + stderr, stderr
    assert code == 2, f"exit code {code}\nstdout: {stdout}\nstderr: {stderr}"
    lines = stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    assert stdout == "", stdout
    return line


runner = CliRunner()


def cli(argv: list[str]):
    result = runner.invoke(app, argv)
    # A crash (anything but the CLI's own exit) shows up as result.exception.
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


# --------------------------------------------------------------------------- the cases
# Each case: (fixture name, setup(ctx) -> (argv, strings the error line must contain)).


class _MakesDir:
    """Pickles as a call to ``os.mkdir``: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _missing_adapter(c: Ctx):
    return c.argv(adapter=c.tmp / "no-such-adapter"), ["no-such-adapter"]


def _no_config(c: Ctx):
    (c.adapter / "adapter_config.json").unlink()
    return c.argv(), [str(c.adapter), "adapter_config.json"]


def _empty_folder(c: Ctx):
    (c.tmp / "empty").mkdir()
    return c.argv(adapter=c.tmp / "empty"), [str(c.tmp / "empty"), "adapter_config.json"]


def _several_checkpoints(c: Ctx):
    for n in (1, 2):
        shutil.copytree(c.adapter, c.tmp / "run" / f"checkpoint-{n}")
    return c.argv(adapter=c.tmp / "run"), ["checkpoint-1", "checkpoint-2"]


def _invalid_json(c: Ctx):
    (c.adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4,')
    return c.argv(), [str(c.adapter / "adapter_config.json")]


def _config_not_object(c: Ctx):
    (c.adapter / "adapter_config.json").write_text("[1, 2, 3]")
    return c.argv(), [str(c.adapter / "adapter_config.json")]


def _unsupported_peft_type(c: Ctx):
    c.config(lambda cfg: cfg.update(peft_type="IA3"))
    return c.argv(), [str(c.adapter), "IA3"]


def _missing_weights(c: Ctx):
    (c.adapter / SAFE).unlink()
    return c.argv(), [str(c.adapter), "adapter_model"]


def _truncated_safetensors(c: Ctx):
    path = c.adapter / SAFE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return c.argv(), [str(path)]


def _garbage_safetensors(c: Ctx):
    (c.adapter / SAFE).write_bytes(b"\x00" * 3)
    return c.argv(), [str(c.adapter / SAFE)]


def _nan_tensor(c: Ctx):
    def edit(t):
        t[f"{PREFIX}{Q0}.lora_A.weight"][1, 2] = math.nan

    c.weights(edit)
    return c.argv(), [str(c.adapter / SAFE), f"{Q0}.lora_A.weight"]


def _unsupported_adapter_dtype(c: Ctx):
    def edit(t):
        key = f"{PREFIX}{Q0}.lora_A.weight"
        t[key] = t[key].to(torch.uint16)

    c.weights(edit)
    return c.argv(), [str(c.adapter / SAFE), f"{Q0}.lora_A.weight", "unsupported dtype U16"]


def _inf_tensor_d2(c: Ctx):
    def edit(t):
        t[f"{PREFIX}{Q0}.lora_B_neg.weight"][0, 0] = math.inf

    c.weights(edit)
    return c.argv(), [str(c.adapter / SAFE), f"{Q0}.lora_B_neg.weight"]


def _missing_lora_b(c: Ctx):
    c.weights(lambda t: t.pop(f"{PREFIX}{Q0}.lora_B.weight"))
    return c.argv(), [Q0]


def _d2_missing_negative_branch(c: Ctx):
    def edit(t):
        del t[f"{PREFIX}{Q0}.lora_A_neg.weight"], t[f"{PREFIX}{Q0}.lora_B_neg.weight"]

    c.weights(edit)
    return c.argv(), [Q0, "neg"]


def _d2_no_tau(c: Ctx):
    c.config(lambda cfg: cfg.pop("tau"))
    return c.argv(), ["d2_tau", "tau"]


def _rank_mismatch(c: Ctx):
    c.config(lambda cfg: cfg.update(r=8))
    return c.argv(), [Q0, "r=8"]


def _d2_rank_mismatch(c: Ctx):
    c.config(lambda cfg: cfg.update(r=8))
    return c.argv(), [str(c.adapter), "model.layers.0.mlp.down_proj", "r=8"]


def _module_not_in_base(c: Ctx):
    def edit(t):
        for part in ("A", "B"):
            t[f"{PREFIX}model.layers.7.self_attn.q_proj.lora_{part}.weight"] = t.pop(f"{PREFIX}{Q0}.lora_{part}.weight")

    c.weights(edit)
    return c.argv(), ["model.layers.7.self_attn.q_proj", "no base tensor"]


def _unknown_full_tensor(c: Ctx):
    c.weights(lambda t: t.update({f"{PREFIX}model.extra_head.weight": torch.ones(3, 3)}))
    return c.argv(), ["model.extra_head.weight"]


def _shape_conflict(c: Ctx):
    # lora_A with in-dimension 32 for q_proj, whose base weight is [64, 64]
    c.weights(lambda t: t.update({f"{PREFIX}{Q0}.lora_A.weight": torch.randn(4, 32)}))
    return c.argv(), [f"{Q0}.weight", "(64, 64)"]


def _branch_shape_conflict_d2(c: Ctx):
    c.weights(lambda t: t.update({f"{PREFIX}{Q0}.lora_A_neg.weight": torch.randn(4, 32)}))
    return c.argv(), [Q0]


def _base_without_config(c: Ctx):
    (c.base / "config.json").unlink()
    return c.argv(), [str(c.base), "config.json"]


def _base_invalid_config(c: Ctx):
    (c.base / "config.json").write_text("{oops")
    return c.argv(), [str(c.base / "config.json")]


def _base_missing(c: Ctx):
    return c.argv(base=c.tmp / "no-such-base"), ["no-such-base"]


def _base_without_weights(c: Ctx):
    (c.base / "model.safetensors").unlink()
    return c.argv(), [str(c.base)]


def _base_corrupt_weights(c: Ctx):
    path = c.base / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    return c.argv(), [str(path)]


def _output_exists(c: Ctx):
    c.out.mkdir()
    (c.out / "keep.txt").write_text("not yours")
    return c.argv(), [str(c.out), "--force"]


def _output_is_a_file(c: Ctx):
    c.out.write_text("a file")
    return c.argv("--force"), [str(c.out)]


def _output_is_base(c: Ctx):
    return c.argv("--force", out=c.base), [str(c.base)]


def _output_is_adapter(c: Ctx):
    return c.argv("--force", out=c.adapter), [str(c.adapter)]


def _output_inside_adapter(c: Ctx):
    return c.argv("--force", out=c.adapter / "merged"), [str(c.adapter / "merged")]


def _output_inside_base(c: Ctx):
    return c.argv("--force", out=c.base / "sub" / "merged"), [str(c.base / "sub" / "merged")]


def _output_is_parent_of_inputs(c: Ctx):
    return c.argv("--force", out=c.tmp), [str(c.tmp)]


def _zero_norm_row(c: Ctx):
    # W0 row 0 and dW row 0 both zero: the D2-LoRA row-norm projection is 0/0.
    c.base_weights(lambda t: t[f"{Q0}.weight"][0].zero_())

    def edit(t):
        t[f"{PREFIX}{Q0}.lora_B_pos.weight"][0].zero_()
        t[f"{PREFIX}{Q0}.lora_B_neg.weight"][0].zero_()

    c.weights(edit)
    return c.argv(), [f"{Q0}.weight", "row 0"]


def _magnitude_without_dora(c: Ctx):
    # PEFT reads the config and runs plain LoRA, ignoring the vectors: merging them would be DoRA
    c.config(lambda cfg: cfg.update(use_dora=False))
    return c.argv(), ["lora_magnitude_vector", "use_dora"]


def _unknown_variant(c: Ctx):
    c.config(lambda cfg: cfg.update(use_newfangled_lora=True, newvariant_config={"k": 1}))
    return c.argv(), ["newvariant_config, use_newfangled_lora", "does not know"]


def _kasa(c: Ctx):
    c.config(lambda cfg: cfg.update(kasa_config={"rank": 4}))
    return c.argv(), ["kasa_config", "KaSA"]


def _bias_value(c: Ctx):
    c.config(lambda cfg: cfg.update(bias="sometimes"))
    return c.argv(), ["'bias' must be one of", "sometimes"]


def _pissa(c: Ctx):
    c.config(lambda cfg: cfg.update(init_lora_weights="pissa"))
    return c.argv(), ["init_lora_weights", "pissa"]


def _pissa_niter(c: Ctx):
    c.config(lambda cfg: cfg.update(init_lora_weights="pissa_niter_16"))
    return c.argv(), ["init_lora_weights", "pissa_niter_16"]


def _layer_replication(c: Ctx):
    c.config(lambda cfg: cfg.update(layer_replication=[[0, 2], [1, 2]]))
    return c.argv(), ["layer_replication"]


def _lora_bias_without_base_bias(c: Ctx):
    # Llama q_proj has no bias; PEFT refuses lora_bias there and so must we.
    c.config(lambda cfg: cfg.update(lora_bias=True))
    c.weights(lambda t: t.update({f"{PREFIX}{Q0}.lora_B.bias": torch.randn(64)}))
    return c.argv(), [Q0, "lora_bias"]


def _bad_dtype(c: Ctx):
    return c.argv("--dtype", "float8"), ["--dtype", "float8"]


def _bad_compute_dtype(c: Ctx):
    return c.argv("--compute-dtype", "float16"), ["--compute-dtype", "float16"]


def _bad_shard_size(c: Ctx):
    return c.argv("--max-shard-size", "lots"), ["lots"]


def _zero_shard_size(c: Ctx):
    return c.argv("--max-shard-size", "0MB"), ["0MB"]


def _negative_shard_size(c: Ctx):
    return c.argv("--max-shard-size", "-5GB"), ["-5GB"]


def _pickle_runs_code(c: Ctx):
    marker = c.tmp / "pwned"
    path = c.bin_adapter({f"{PREFIX}evil": _MakesDir(str(marker))})
    return c.argv(), [str(path)]


def _pickle_non_tensor(c: Ctx):
    path = c.bin_adapter({f"{PREFIX}note": "hello"})
    return c.argv(), [str(path), "note"]


def _pickle_truncated(c: Ctx):
    path = c.bin_adapter({})
    path.write_bytes(path.read_bytes()[:500])
    return c.argv(), [str(path)]


CASES = [
    ("lora-llama", _missing_adapter),
    ("lora-llama", _no_config),
    ("lora-llama", _empty_folder),
    ("lora-llama", _several_checkpoints),
    ("lora-llama", _invalid_json),
    ("lora-llama", _config_not_object),
    ("lora-llama", _unsupported_peft_type),
    ("lora-llama", _missing_weights),
    ("lora-llama", _truncated_safetensors),
    ("lora-llama", _garbage_safetensors),
    ("lora-llama", _nan_tensor),
    ("lora-llama", _unsupported_adapter_dtype),
    ("d2lora-llama", _inf_tensor_d2),
    ("lora-llama", _missing_lora_b),
    ("d2lora-llama", _d2_missing_negative_branch),
    ("d2lora-llama", _d2_no_tau),
    ("lora-llama", _rank_mismatch),
    ("d2lora-llama", _d2_rank_mismatch),
    ("lora-llama", _module_not_in_base),
    ("lora-llama", _unknown_full_tensor),
    ("lora-llama", _shape_conflict),
    ("d2lora-llama", _branch_shape_conflict_d2),
    ("lora-llama", _base_without_config),
    ("lora-llama", _base_invalid_config),
    ("lora-llama", _base_missing),
    ("lora-llama", _base_without_weights),
    ("lora-llama", _base_corrupt_weights),
    ("lora-llama", _output_exists),
    ("lora-llama", _output_is_a_file),
    ("lora-llama", _output_is_base),
    ("lora-llama", _output_is_adapter),
    ("lora-llama", _output_inside_adapter),
    ("lora-llama", _output_inside_base),
    ("lora-llama", _output_is_parent_of_inputs),
    ("d2lora-llama", _zero_norm_row),
    ("dora-llama", _magnitude_without_dora),
    ("lora-llama", _unknown_variant),
    ("lora-llama", _kasa),
    ("lora-llama", _bias_value),
    ("lora-llama", _pissa),
    ("lora-llama", _pissa_niter),
    ("lora-llama", _layer_replication),
    ("lora-llama", _lora_bias_without_base_bias),
    ("lora-llama", _bad_dtype),
    ("lora-llama", _bad_compute_dtype),
    ("lora-llama", _bad_shard_size),
    ("lora-llama", _zero_shard_size),
    ("lora-llama", _negative_shard_size),
    ("lora-llama", _pickle_runs_code),
    ("lora-llama", _pickle_non_tensor),
    ("lora-llama", _pickle_truncated),
]


@pytest.mark.parametrize(("name", "setup"), [pytest.param(n, s, id=s.__name__.strip("_")) for n, s in CASES])
def test_bad_input_is_refused(fixture, tmp_path, name, setup):
    ctx = copy_fixture(fixture, name, tmp_path)
    argv, needles = setup(ctx)
    before = tree_state(tmp_path)
    result = cli(argv)
    check_refused(result.exit_code, result.stdout, result.stderr, needles)
    assert tree_state(tmp_path) == before, "inputs changed or something was left behind"
    assert not leftovers(tmp_path)


# --------------------------------------------------------------------------- message fidelity


def _bracketed_path(c: Ctx):
    return c.argv(adapter=c.tmp / "ckpt[best]"), ["ckpt[best]"]


@pytest.mark.parametrize(("name", "setup"), [
    pytest.param("lora-llama", _shape_conflict, id="shape_conflict"),
    pytest.param("lora-llama", _bracketed_path, id="bracketed_path"),
])
def test_error_line_is_the_message_verbatim(fixture, tmp_path, name, setup):
    ctx = copy_fixture(fixture, name, tmp_path)
    argv, _ = setup(ctx)
    adapter, base, out = argv[1], argv[3], argv[5]
    with pytest.raises(D2ExportError) as caught:
        merge_module.merge(adapter, base=base, out=out, hash_inputs=False)
    result = cli(argv)
    assert result.stderr.strip() == f"error: {caught.value}"


# --------------------------------------------------------------------------- end to end


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "COLUMNS": "60"}
    return subprocess.run([sys.executable, "-m", "d2export.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


@pytest.mark.parametrize(("name", "setup"), [
    pytest.param("lora-llama", _missing_adapter, id="missing_adapter"),
    pytest.param("lora-llama", _nan_tensor, id="nan_tensor"),
    pytest.param("d2lora-llama", _zero_norm_row, id="zero_norm_row"),  # fails mid-write
])
def test_bad_input_end_to_end(fixture, tmp_path, name, setup):
    ctx = copy_fixture(fixture, name, tmp_path)
    argv, needles = setup(ctx)
    before = tree_state(tmp_path)
    proc = run_cli(*argv)
    check_refused(proc.returncode, proc.stdout, proc.stderr, needles)
    assert tree_state(tmp_path) == before
    assert not leftovers(tmp_path)


def test_debug_shows_traceback(tmp_path):
    proc = run_cli("--debug", "merge", str(tmp_path / "no-such-adapter"), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_debug_still_writes_nothing(tmp_path):
    """Whatever --debug prints, a refused merge leaves nothing behind."""
    proc = run_cli("--debug", "merge", str(tmp_path / "no-such-adapter"), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "no-such-adapter" in proc.stderr
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize(("name", "setup"), [
    pytest.param("lora-llama", _missing_adapter, id="missing_adapter"),
    pytest.param("lora-llama", _invalid_json, id="invalid_json"),
    pytest.param("lora-llama", _unsupported_peft_type, id="unsupported_peft_type"),
    pytest.param("d2lora-llama", _d2_no_tau, id="d2_no_tau"),
])
def test_inspect_refuses_bad_adapter(fixture, tmp_path, name, setup):
    ctx = copy_fixture(fixture, name, tmp_path)
    argv, needles = setup(ctx)
    before = tree_state(tmp_path)
    result = cli(["inspect", argv[1], "--base", str(ctx.base)])
    check_refused(result.exit_code, result.stdout, result.stderr, needles)
    assert tree_state(tmp_path) == before


# --------------------------------------------------------------------------- interrupted writes


class Interrupt:
    """A progress callback that raises after ``after`` tensors have been written."""

    def __init__(self, exc: type[BaseException], after: int = 1):
        self.exc, self.after, self.seen = exc, after, []

    def __call__(self, name: str, done: int, total: int) -> None:
        self.seen.append(name)
        if len(self.seen) >= self.after:
            raise self.exc("stop")


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("name", ["lora-llama", "d2lora-llama"])
def test_interrupt_while_writing_leaves_no_output(fixture, tmp_path, name, exc):
    ctx = copy_fixture(fixture, name, tmp_path)
    before = tree_state(tmp_path)
    stop = Interrupt(exc)
    with pytest.raises(exc):
        merge_module.merge(ctx.adapter, base=ctx.base, out=ctx.out, hash_inputs=False, progress=stop)
    assert len(stop.seen) == 1  # it really stopped in the middle of writing
    assert not ctx.out.exists()
    assert not leftovers(tmp_path)
    assert tree_state(tmp_path) == before


def test_full_disk_while_writing_is_one_error_and_leaves_no_output(fixture, tmp_path, monkeypatch):
    """Shards are written on a thread of their own: its failure reaches the caller as one error."""
    ctx = copy_fixture(fixture, "d2lora-llama", tmp_path)
    before = tree_state(tmp_path)
    opened = []
    real_pwrite = os.pwrite

    def pwrite_fills_the_disk(fd, data, offset):
        """Files take 4 kB and then find the disk full."""
        opened.append(fd)
        if offset + len(data) > 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(directio.os, "pwrite", pwrite_fills_the_disk)
    with pytest.raises(D2ExportError, match="No space left on device"):
        merge_module.merge(ctx.adapter, base=ctx.base, out=ctx.out, hash_inputs=False)
    assert opened  # the writer really went through the failing file
    assert not ctx.out.exists()
    assert not leftovers(tmp_path)
    assert tree_state(tmp_path) == before


def test_interrupt_with_force_keeps_previous_output(fixture, tmp_path):
    """--force replaces an existing output only once the new one is complete."""
    ctx = copy_fixture(fixture, "lora-llama", tmp_path)
    ctx.out.mkdir()
    (ctx.out / "model.safetensors").write_bytes(b"previous result")
    before = tree_state(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        merge_module.merge(ctx.adapter, base=ctx.base, out=ctx.out, force=True, hash_inputs=False,
                           progress=Interrupt(KeyboardInterrupt, after=3))
    assert tree_state(tmp_path) == before
    assert not leftovers(tmp_path)


def test_cli_interrupt_exits_130_and_writes_nothing(fixture, tmp_path, monkeypatch):
    ctx = copy_fixture(fixture, "d2lora-llama", tmp_path)
    real = merge_module._feed  # queues each tensor's work, on the main thread, once per tensor
    calls = []

    def feed(plan, t, *args):
        calls.append(t.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, t, *args)

    monkeypatch.setattr(merge_module, "_feed", feed)
    before = tree_state(tmp_path)
    result = cli(ctx.argv())
    assert result.exit_code == 130
    assert "Traceback" not in result.output
    assert "interrupted" in result.stderr
    assert len(calls) == 2
    assert tree_state(tmp_path) == before
    assert not leftovers(tmp_path)


def test_refused_merge_api_raises_d2export_error(fixture, tmp_path):
    """The Python API raises the same D2ExportError (the CLI's exit 2) and writes nothing."""
    ctx = copy_fixture(fixture, "d2lora-llama", tmp_path)
    _zero_norm_row(ctx)
    before = tree_state(tmp_path)
    with pytest.raises(D2ExportError, match=r"row 0"):
        merge_module.merge(ctx.adapter, base=ctx.base, out=ctx.out, hash_inputs=False)
    assert tree_state(tmp_path) == before
    assert not leftovers(tmp_path)
