"""The options objects (``d2export.options``): validated and normalised when made, frozen, and a
bad value is an :class:`OptionError` whose ``.option`` names the field."""

from __future__ import annotations

import dataclasses
import math

import pytest

from d2export.errors import D2ExportError, OptionError
from d2export.options import (
    BenchOptions,
    MergeOptions,
    OnnxOptions,
    Thresholds,
    VerifyOptions,
    help_of,
    parse_size,
    parse_sizes,
    with_settings,
)


def refused(option: str, make, match: str | None = None) -> OptionError:
    with pytest.raises(OptionError, match=match) as info:
        make()
    assert info.value.option == option
    assert str(info.value) == f"{option} {info.value.message}"
    return info.value


def test_option_error_is_a_d2export_error_naming_the_option():
    error = OptionError("max_shard_size", "must be positive")
    assert isinstance(error, D2ExportError)
    assert (error.option, error.message, str(error)) == ("max_shard_size", "must be positive",
                                                         "max_shard_size must be positive")


# --- MergeOptions --------------------------------------------------------------------------------------

def test_merge_defaults():
    options = MergeOptions()
    assert (options.dtype, options.compute_dtype, options.max_shard_size) == ("auto", "float64", None)
    assert options.out_dtype is None and options.hash_inputs and not options.force


@pytest.mark.parametrize(("given", "full"), [("bf16", "bfloat16"), ("BF16", "bfloat16"), ("fp16", "float16"),
                                             ("half", "float16"), ("fp32", "float32"), ("float32", "float32"),
                                             ("AUTO", "auto")])
def test_merge_dtype_short_names(given, full):
    options = MergeOptions(dtype=given)
    assert options.dtype == full
    assert options.out_dtype == (None if full == "auto" else full)


def test_merge_compute_dtype():
    assert MergeOptions(compute_dtype="fp32").compute_dtype == "float32"
    assert MergeOptions(compute_dtype="double").compute_dtype == "float64"
    refused("compute_dtype", lambda: MergeOptions(compute_dtype="bfloat16"), "float64, float32")
    refused("compute_dtype", lambda: MergeOptions(compute_dtype="auto"))


@pytest.mark.parametrize("bad", ["int8", "float64", "fp8", ""])
def test_merge_bad_dtype(bad):
    error = refused("dtype", lambda: MergeOptions(dtype=bad))
    assert "auto, bfloat16, float16, float32" in error.message and repr(bad) in error.message


@pytest.mark.parametrize(("given", "size"), [("200MB", 200 * 10**6), ("5GB", 5 * 10**9), ("1.5GB", 15 * 10**8),
                                             ("512MiB", 512 * 2**20), ("2gib", 2 * 2**30), (" 10 kb ", 10**4),
                                             ("4096", 4096), (1024, 1024)])
def test_merge_max_shard_size(given, size):
    assert MergeOptions(max_shard_size=given).max_shard_size == size
    assert parse_size(given) == size


@pytest.mark.parametrize("bad", ["lots", "5 XB", "-1GB", "0", 0, -5, "1e9"])
def test_merge_bad_max_shard_size(bad):
    refused("max_shard_size", lambda: MergeOptions(max_shard_size=bad))


def test_parse_size_names_the_option_it_is_given():
    refused("shard", lambda: parse_size("huge", "shard"), "is not a size")


def test_options_are_frozen_and_replace_revalidates():
    options = MergeOptions(dtype="bf16")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dtype = "float32"  # type: ignore[misc]
    assert dataclasses.replace(options, max_shard_size="1MB").max_shard_size == 10**6
    refused("dtype", lambda: dataclasses.replace(options, dtype="int4"))
    for cls in (BenchOptions, OnnxOptions, Thresholds, VerifyOptions):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(cls(), dataclasses.fields(cls)[0].name, None)


def test_with_settings_and_help():
    options = MergeOptions(dtype="float16")
    assert with_settings(MergeOptions, options, {}) is options
    assert with_settings(MergeOptions, None, {}) == MergeOptions()
    changed = with_settings(MergeOptions, options, {"max_shard_size": "2MB"})
    assert (changed.dtype, changed.max_shard_size) == ("float16", 2 * 10**6)
    assert with_settings(BenchOptions, None, {"batch_sizes": "2,3"}).batch_sizes == (2, 3)
    refused("dtype", lambda: with_settings(MergeOptions, None, {"dtype": "nope"}))
    with pytest.raises(TypeError):  # a keyword that is no option
        with_settings(MergeOptions, None, {"dtpye": "bf16"})
    assert help_of(MergeOptions, "dtype").startswith("Output dtype")
    assert "sha256" in help_of(MergeOptions, "hash_inputs")
    assert all(help_of(BenchOptions, f.name) for f in dataclasses.fields(BenchOptions))


# --- Thresholds and VerifyOptions ------------------------------------------------------------------------

def test_thresholds_valid_values():
    thresholds = Thresholds(max_units=4, atol=0.0, min_top1=1.0, max_task_gap_pp=0)
    assert thresholds.to_dict() == {"max_units": 4, "atol": 0.0, "min_top1": 1.0, "max_task_gap_pp": 0,
                                    "output_rtol": None}
    assert Thresholds().to_dict()["output_rtol"] == "per dtype" and Thresholds().max_task_gap_pp == 2.0


@pytest.mark.parametrize(("field", "bad"), [
    ("max_units", 0), ("max_units", -1.0), ("max_units", math.inf), ("max_units", True), ("max_units", "2"),
    ("atol", -1e-6), ("atol", math.nan), ("atol", "abc"),
    ("min_top1", 1.5), ("min_top1", -0.1), ("min_top1", "0.9"),
    ("max_task_gap_pp", -2.0), ("max_task_gap_pp", math.nan),
])
def test_thresholds_bad_values(field, bad):
    error = refused(field, lambda: Thresholds(**{field: bad}))
    if isinstance(bad, str | bool):  # not "must be 0 or more; got 'abc'"
        assert error.message.startswith("must be a number")


def test_verify_options(tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text("a line\n")
    options = VerifyOptions(calibration=str(text), thresholds=Thresholds(atol=1e-3))
    assert options.calibration == text and options.task_data is None
    assert options.thresholds.atol == 1e-3 and VerifyOptions().thresholds == Thresholds()
    refused("calibration", lambda: VerifyOptions(calibration=tmp_path / "missing.txt"), "file not found")
    refused("task_data", lambda: VerifyOptions(task_data=tmp_path), "is a folder; give a file")
    refused("seed", lambda: VerifyOptions(seed="3"))
    refused("seed", lambda: VerifyOptions(seed=True))
    assert VerifyOptions(seed=7).seed == 7
    assert VerifyOptions(resident="all").resident is None and VerifyOptions(resident="1KiB").resident == 1024
    refused("resident", lambda: VerifyOptions(resident="lots"), "or 'all' to load whole")


# --- OnnxOptions ----------------------------------------------------------------------------------------

def test_onnx_options():
    assert OnnxOptions(optimize="o2").optimize == "O2"
    assert OnnxOptions().optimize is None and OnnxOptions().past and OnnxOptions().validate
    assert OnnxOptions(quantize="int8", opset=17).opset == 17
    refused("optimize", lambda: OnnxOptions(optimize="O7"), "must be O1, O2 or O3")
    refused("optimize", lambda: OnnxOptions(optimize="o4"), "needs a CUDA GPU")
    refused("quantize", lambda: OnnxOptions(quantize="int4"), "must be int8")
    refused("quantize", lambda: OnnxOptions(quantize="int8", fp16=True), "cannot be combined with fp16")
    refused("opset", lambda: OnnxOptions(opset="14"))
    refused("opset", lambda: OnnxOptions(opset=True))


# --- BenchOptions ---------------------------------------------------------------------------------------

def test_bench_options_normalise():
    options = BenchOptions(batch_sizes="1,4", seq_lens=" 16, 8 ,16", dtype="bf16")
    assert options.batch_sizes == (1, 4)
    assert options.seq_lens == (16, 8)  # order kept, the duplicate dropped
    assert options.dtype == "bfloat16"
    assert BenchOptions(batch_sizes=[4, 1]).batch_sizes == (4, 1)
    assert BenchOptions() == BenchOptions(batch_sizes=(1, 4), seq_lens="32,128")
    assert BenchOptions(warmup=0).warmup == 0
    assert parse_sizes("3", "seq_lens") == (3,)


@pytest.mark.parametrize(("field", "bad"), [
    ("batch_sizes", "1,x"), ("batch_sizes", "0"), ("batch_sizes", ""), ("batch_sizes", ()), ("batch_sizes", (1, -2)),
    ("batch_sizes", (True,)), ("batch_sizes", (1.5,)),
    ("seq_lens", "8;16"), ("seq_lens", (0,)),
    ("warmup", -1), ("warmup", 1.5), ("repeats", 0), ("repeats", 2.0), ("threads", 0), ("threads", "4"),
    ("dtype", "float16"), ("dtype", "int8"),
])
def test_bench_options_bad_values(field, bad):
    refused(field, lambda: BenchOptions(**{field: bad}))


def test_api_keywords_are_the_options_fields_and_verify_s_limits():
    """``verify(..., atol=1e-3)`` as ``--atol 1e-3``: the limits live in ``thresholds`` but are flags
    of the command, so keywords too. Options of another command are refused naming the class."""
    from d2export.options import with_settings

    options = with_settings(VerifyOptions, None, {"atol": 1e-3, "seed": 3})
    assert options.thresholds == Thresholds(atol=1e-3) and options.seed == 3
    given = VerifyOptions(thresholds=Thresholds(min_top1=0.9))
    assert with_settings(VerifyOptions, given, {"atol": 1e-3}).thresholds == Thresholds(atol=1e-3, min_top1=0.9)
    with pytest.raises(TypeError, match="'atoll' is not an option of VerifyOptions"):
        with_settings(VerifyOptions, None, {"atoll": 1e-3})
    with pytest.raises(TypeError, match="'atol' is not an option of MergeOptions"):
        with_settings(MergeOptions, None, {"atol": 1e-3})
    refused("options", lambda: with_settings(VerifyOptions, MergeOptions(), {}), "must be a VerifyOptions")
