"""The write side (``d2export.writing``): a shard written tensor by tensor reads back exactly with
safetensors, its sha256 is the file's, and output folders appear whole or not at all."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

from d2export.arrays import bfloat16
from d2export.errors import D2ExportError, OptionError
from d2export.writing import ShardWriter, atomic_output, check_output_location, sha256_file, write_json, write_text


def sample_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.standard_normal((7, 5)).astype(bfloat16),
        "layer.0.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(3).astype(np.float16),
        "position_ids": np.arange(6, dtype=np.int64).reshape(1, 6),
        "mask": np.array([True, False, True]),
        "scale": np.array(2.5, dtype=np.float64),  # 0-d
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def entries(tensors: dict[str, np.ndarray]) -> list[tuple[str, np.dtype, tuple[int, ...]]]:
    return [(name, t.dtype, t.shape) for name, t in tensors.items()]


def read_back(path: Path) -> tuple[dict[str, np.ndarray], dict | None]:
    with safe_open(path, "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        assert got[name].dtype == value.dtype, name
        assert got[name].shape == value.shape, name
        assert got[name].tobytes() == value.tobytes(), name


def test_written_shard_reads_back_exactly(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "model.safetensors"
    writer = ShardWriter(path, entries(tensors), {"format": "pt", "by": "test"})
    for name, value in tensors.items():
        writer.write(name, value)
    digest = writer.close()
    got, metadata = read_back(path)
    assert_same(got, tensors)
    assert got["embed.weight"].dtype == bfloat16  # ml_dtypes' bfloat16, stored as BF16
    assert metadata == {"format": "pt", "by": "test"}
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest() == sha256_file(path)
    assert writer.nbytes == path.stat().st_size


def test_default_metadata_and_aligned_data(tmp_path):
    path = tmp_path / "one.safetensors"
    writer = ShardWriter(path, [("x", np.dtype(np.float32), (2,))])
    writer.write("x", np.array([1.0, -2.0], dtype=np.float32))
    writer.close()
    (size,) = np.frombuffer(path.read_bytes()[:8], dtype="<u8")
    assert (8 + int(size)) % 8 == 0  # the data section starts 8-byte aligned
    assert read_back(path)[1] == {"format": "pt"}


def test_non_contiguous_input_is_written_in_logical_order(tmp_path):
    value = np.arange(12, dtype=np.float32).reshape(3, 4).T  # a transposed view
    path = tmp_path / "t.safetensors"
    writer = ShardWriter(path, [("t", value.dtype, value.shape)])
    writer.write("t", value)
    writer.close()
    np.testing.assert_array_equal(read_back(path)[0]["t"], value)


def pieces(data: bytes, size: int):
    """``data`` in ``size``-byte chunks, produced lazily (write_raw reads them on its own thread)."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield view[start:start + size]


def test_write_raw_streams_chunks(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "raw.safetensors"
    writer = ShardWriter(path, entries(tensors))
    for name, value in tensors.items():
        writer.write_raw(name, value.dtype, value.shape, pieces(value.tobytes(), 5))  # odd-sized chunks
    digest = writer.close()
    assert_same(read_back(path)[0], tensors)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()


def test_write_raw_with_too_few_bytes_fails(tmp_path):
    writer = ShardWriter(tmp_path / "short.safetensors", [("x", np.dtype(np.float32), (4,))])
    writer.write_raw("x", np.dtype(np.float32), (4,), [b"\0" * 12])
    with pytest.raises(RuntimeError, match="12 bytes written, expected 16"):
        writer.close()


@pytest.mark.parametrize(("name", "dtype", "shape"), [
    ("b", np.float32, (2, 3)),  # out of order
    ("a", np.float16, (2, 3)),  # wrong dtype
    ("a", np.float32, (3, 2)),  # wrong shape
])
def test_undeclared_tensor_is_refused(tmp_path, name, dtype, shape):
    declared = [("a", np.dtype(np.float32), (2, 3)), ("b", np.dtype(np.float32), (1,))]
    writer = ShardWriter(tmp_path / "x.safetensors", declared)
    with pytest.raises(RuntimeError, match="shard writer expected a float32 \\(2, 3\\)"):
        writer.write(name, np.zeros(shape, dtype=dtype))
    writer.abort()


def test_missing_tensors_are_refused_at_close(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors", [("a", np.dtype(np.float32), (1,)),
                                                      ("b", np.dtype(np.float32), (1,))])
    writer.write("a", np.ones(1, dtype=np.float32))
    with pytest.raises(RuntimeError, match="1 tensors were never written"):
        writer.close()
    writer.abort()


def test_abort_leaves_no_readable_file(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "aborted.safetensors"
    writer = ShardWriter(path, entries(tensors))
    writer.write("embed.weight", tensors["embed.weight"])
    writer.abort()
    if path.exists():
        with pytest.raises(SafetensorError):
            read_back(path)


def test_writer_opens_its_file_at_once(tmp_path):
    with pytest.raises(FileNotFoundError):  # the folder must exist: opened here, not later on the thread
        ShardWriter(tmp_path / "gone" / "x.safetensors", [("a", np.dtype(np.float32), (1,))])


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_full_disk_is_a_d2export_error():
    writer = ShardWriter(Path("/dev/full"), [("a", np.dtype(np.float32), (100_000,))])
    with pytest.raises(D2ExportError, match="No space left on device"):  # raised by either call
        writer.write("a", np.zeros(100_000, dtype=np.float32))
        writer.close()


# --- output folders -----------------------------------------------------------------------------------

def test_atomic_output_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with atomic_output(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out and not out.exists()
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial folder left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    out = tmp_path / "nested" / "out"
    with pytest.raises(ValueError, match="boom"), atomic_output(out) as tmp:
        (tmp / "half.safetensors").write_bytes(b"x")
        raise ValueError("boom")
    assert not out.exists()
    assert not (tmp_path / "nested").exists()  # nor the folder made for it


def test_atomic_output_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old folder is gone too


def test_atomic_output_keeps_an_existing_folder_on_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(out) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_location(tmp_path):
    adapter, base = tmp_path / "adapter", tmp_path / "base"
    adapter.mkdir()
    base.mkdir()
    check_output_location(tmp_path / "out", [adapter, base], force=False)  # fine: new, apart
    for overlapping in (adapter, base / "merged", tmp_path):
        with pytest.raises(OptionError, match="overlaps the input") as info:
            check_output_location(overlapping, [adapter, base], force=True)
        assert info.value.option == "out"
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OptionError, match="already exists") as info:
        check_output_location(existing, [adapter, base], force=False)
    assert info.value.option == "force"
    check_output_location(existing, [adapter, base], force=True)  # empty: fine
    (existing / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match="holds neither") as info:  # not a model folder: not deleted
        check_output_location(existing, [adapter, base], force=True)
    assert info.value.option == "force"
    (existing / "config.json").write_text("{}")  # an earlier output (or another tool's model folder)
    check_output_location(existing, [adapter, base], force=True)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(D2ExportError, match="is not a folder"):
        check_output_location(file, [adapter, base], force=True)


def test_write_json_and_text_replace_atomically(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})
    write_json(path, {"b": [1, 2]})
    assert path.read_text() == '{\n  "b": [\n    1,\n    2\n  ]\n}\n'
    write_text(tmp_path / "README.md", "hello")
    assert (tmp_path / "README.md").read_text() == "hello"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "report.json"]  # no .tmp files
    with pytest.raises(D2ExportError, match="cannot write"):
        write_text(tmp_path / "missing" / "x.txt", "x")


def test_failed_output_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(RuntimeError), atomic_output(out) as tmp:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(out) as tmp:  # on success they stay, holding the output
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").is_file()
