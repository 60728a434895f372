"""What makes ``verify`` cheaper must not change what it says: the weight check on every core gives
the report one worker gives, the correctly rounded merge assembled from an exact folder's tensors is
the model the merge computes, and the faults still fail."""

from __future__ import annotations

import gc
import shutil
import threading
import time

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from support import tamper_tensor

from d2export import merging, verify
from d2export.arrays import bfloat16, finfo, float16, float32, float64
from d2export.job import prepare
from d2export.names import find_name
from d2export.reading import ModelFolder
from d2export.runtime import streaming
from d2export.runtime.calibration import config_batches
from d2export.runtime.models import load_model, merged_model, model_output, unmerged_model
from d2export.runtime.streaming import offload_hooks
from d2export.verification import weights
from d2export.verification.runs import one_thread
from d2export.verification.weights import check_weights, spacing


@pytest.mark.parametrize("dtype", [bfloat16, float16, float32, float64])
def test_spacing_is_the_power_of_two_frexp_gives(dtype):
    """Spacing from the exponent bits equals the frexp/ldexp formula, over the whole range (zeros,
    subnormals of the dtype, huge values, negative values, a 0-d array)."""
    rng = np.random.default_rng(0)
    values = rng.standard_normal(20_000) * 10.0 ** rng.integers(-50, 38, 20_000)
    values = np.concatenate([values, [0.0, -0.0, 1.0, -2.0, 0.75, 1e-300, 5e-324, 3.3e38]])
    info = finfo(dtype)
    _, exponent = np.frexp(np.maximum(np.abs(values), float(info.smallest_normal)))
    assert np.array_equal(spacing(values, dtype), np.ldexp(float(info.eps) / 2, exponent))
    assert spacing(np.float64(3.0), dtype).shape == ()


def test_weight_check_on_every_core_reports_what_one_worker_does(merged, tmp_path, monkeypatch):
    """The same figures, tensor by tensor and in plan order, on an exact folder and on one with an
    element moved by 8 units (which both fail, at the same element)."""
    folder, out = merged("d2lora-llama-bf16")
    bad = shutil.copytree(out, tmp_path / "bad")
    name = "model.layers.1.mlp.up_proj.weight"
    tamper_tensor(bad, name, lambda t: t.view(torch.int16)[5, 7].add_(8))
    assert weights.WORKERS > 1 or merging.WORKERS == 1
    with prepare(folder / "adapter", folder / "base") as job:
        for path, exact in ((out, True), (bad, False)):
            with ModelFolder.open(path, "merged") as stored:
                both = check_weights(job.plan, stored).to_dict()
                with monkeypatch.context() as patch:
                    patch.setattr(weights, "WORKERS", 1)
                    one = check_weights(job.plan, stored).to_dict()
            assert both == one
            assert both["summary"]["failed"] == (0 if exact else 1)
            if not exact:
                (failure,) = [t for t in both["tensors"] if not t["passed"]]
                assert failure["name"] == name and failure["worst"] == [5, 7] and failure["max_units"] > 3


@pytest.mark.parametrize("resident", [None, 1])
def test_the_merge_assembled_from_an_exact_folder_is_the_computed_merge(merged, resident):
    """The base with the folder's tensors read in gives bit-identical outputs to the base with every
    merged tensor computed again, whole or streamed."""
    folder, out = merged("dora-llama")
    with prepare(folder / "adapter", folder / "base") as job, ModelFolder.open(out, "merged") as stored:
        prefix = job.plan.arch.base_model_prefix
        batch = config_batches(job.base.config)[-1]
        computed = model_output(merged_model(job.plan, torch.float32, resident_bytes=resident), batch)
        read = merged_model(job.plan, torch.float32, resident_bytes=resident,
                            values=lambda t: stored.read(find_name(t.name, stored.tensors, prefix)))
        assert torch.equal(model_output(read, batch), computed)


def test_an_exact_folder_is_verified_without_merging_twice(merged, monkeypatch):
    """Every tensor is the correctly rounded value, so the loading probe's reference is assembled
    from the folder's tensors: the merge's own ``produce`` never runs, and the verdict stands."""
    folder, out = merged("lora-llama")

    def refuse(*_args, **_kwargs):
        raise AssertionError("a merged tensor was computed again")

    monkeypatch.setattr(merging, "produce", refuse)
    report = verify(out, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    assert report.weights.all_exact
    loading = next(o for o in report.outputs if o.rung == "loading")
    assert loading.passed and loading.comparison.max_abs == 0.0


def test_a_tampered_folder_still_gets_the_computed_merge(merged, tmp_path, monkeypatch):
    """One element off: the folder is not the correctly rounded merge, so the reference is computed
    (never read from the folder it judges), and the weight check fails the element."""
    folder, out = merged("d2lora-llama-bf16")
    bad = shutil.copytree(out, tmp_path / "bad")
    tamper_tensor(bad, "model.layers.1.mlp.up_proj.weight", lambda t: t.view(torch.int16)[5, 7].add_(8))
    computed = []
    produce = merging.produce

    def counted(plan, t, *args):
        computed.append(t.name)
        return produce(plan, t, *args)

    monkeypatch.setattr(merging, "produce", counted)
    report = verify(bad, folder / "adapter", base=folder / "base")
    assert not report.passed and not report.weights.all_exact
    assert "model.layers.1.mlp.up_proj.weight" in computed


@pytest.mark.parametrize("name, tensor", [("d2lora-llama-bf16", "model.layers.1.mlp.up_proj.weight"),
                                          ("dora-gpt2", "transformer.h.0.attn.c_attn.weight")])  # Conv1D
def test_a_folder_a_unit_off_in_a_few_elements_is_corrected_not_merged_again(merged, tmp_path, monkeypatch,
                                                                              name, tensor):
    """Another tool's merge is off by a unit in a few elements: the weight check keeps their
    correctly rounded values, the correctly rounded merge is the folder's tensors with those set
    (``produce`` never runs), and every figure is what the computed merge gives."""
    folder, out = merged(name)
    bad = shutil.copytree(out, tmp_path / "bad")
    spots = [(0, 1), (2, 5), (3, 0)]

    def off_by_one(t):
        bits = t.view(torch.int16 if t.dtype in (torch.bfloat16, torch.float16) else torch.int32)
        for spot in spots:
            bits[spot] += 1

    tamper_tensor(bad, tensor, off_by_one)
    with prepare(folder / "adapter", folder / "base") as job, ModelFolder.open(bad, "merged") as stored, \
            ModelFolder.open(out, "merged") as right:
        check = next(t for t in check_weights(job.plan, stored).tensors if t.name == find_name(
            tensor, [t.name for t in job.plan.tensors], job.plan.arch.base_model_prefix))
        where, values = check.corrections
        columns = right.tensors[tensor].shape[1]
        assert sorted(where.tolist()) == sorted(r * columns + c for r, c in spots)
        corrected = np.array(stored.read(tensor))
        corrected.reshape(-1)[where] = values.astype(corrected.dtype)
        assert np.array_equal(corrected.view(np.uint8), np.asarray(right.read(tensor)).view(np.uint8))

    def refuse(*_args, **_kwargs):
        raise AssertionError("a merged tensor was computed again")

    with monkeypatch.context() as patch:
        patch.setattr(merging, "produce", refuse)
        corrected = verify(bad, folder / "adapter", base=folder / "base")
    assert corrected.weights.correctable and not corrected.weights.all_exact
    monkeypatch.setattr(weights, "MAX_CORRECTIONS", 0)  # nothing kept: the merge is computed
    monkeypatch.setattr(weights, "CORRECTION_SHARE", 2**62)
    computed = verify(bad, folder / "adapter", base=folder / "base")
    assert not computed.weights.correctable
    assert [o.to_dict() for o in corrected.outputs] == [o.to_dict() for o in computed.outputs]
    assert corrected.passed == computed.passed


def test_one_thread_restores_the_thread_count():
    threads = torch.get_num_threads()
    with one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == threads


def test_the_weight_check_beside_the_outputs_reports_what_it_reports_alone(merged, tmp_path):
    """With output checks, the weight check runs in the background: its report, and the note on a
    tensor the merge does not produce, are those of the weight check run alone; an extra tensor
    makes the folder not exact, so the correctly rounded merge is computed, not read."""
    folder, out = merged("lora-llama")
    extra = shutil.copytree(out, tmp_path / "extra")
    (file,) = extra.glob("*.safetensors")
    with safe_open(file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**tensors, "stray.weight": torch.zeros(3)}, file, metadata=metadata)
    alone = verify(extra, folder / "adapter", base=folder / "base", outputs=False)
    beside = verify(extra, folder / "adapter", base=folder / "base")
    assert beside.weights.to_dict() == alone.weights.to_dict()
    assert beside.weights.extra == ["stray.weight"] and not beside.weights.all_exact
    note = "tensors in the folder that the merge does not produce: stray.weight"
    assert note in alone.notes and note in beside.notes
    assert beside.passed, beside.failures  # an extra tensor is noted, not failed


def test_streamed_16_bit_weights_in_reused_buffers_compute_what_whole_ones_do(merged):
    """A bf16 folder run in float32 with its blocks streamed: read into reused buffers, the unmerged
    model and the folder give the outputs they give loaded whole, pass after pass."""
    folder, out = merged("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job:
        batches = config_batches(job.base.config)
        for make in (lambda r: load_model(out, torch.float32, resident_bytes=r),
                     lambda r: unmerged_model(job.base.path, job.spec, torch.float32, resident_bytes=r)):
            whole, streamed = make(None), make(1)
            reused = [h.weights_map for m in streamed.modules() for h in offload_hooks(m)
                      if isinstance(h.weights_map, streaming._Reused)]
            assert reused
            for _ in range(2):  # the second pass runs on the buffers the first one left
                for batch in batches:
                    assert torch.equal(model_output(whole, batch), model_output(streamed, batch))
            assert any(isinstance(k, tuple) and k[0] == "raw" for k in reused[0].pool)


def test_loading_a_streamed_model_leaves_its_offloaded_weights_unread(merged, monkeypatch):
    """transformers' loading gets only the weights kept in memory from a shard that also holds
    streamed ones (the tiny folder is one shard, as a 7B one of 5 GB shards is a few), and the
    model computes what it computes loaded whole."""
    from transformers import modeling_utils

    _, out = merged("d2lora-llama-bf16")
    assert len(list(out.glob("*.safetensors"))) == 1
    loaded: list[str] = []
    load = modeling_utils._load_state_dict_into_meta_model

    def recording(model, state_dict, *args, **kwargs):
        loaded.extend(state_dict)
        return load(model, state_dict, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "_load_state_dict_into_meta_model", recording)
    streamed = load_model(out, torch.float32, resident_bytes=1)
    resident = {name for name, p in streamed.named_parameters() if p.device.type != "meta"}
    assert loaded and set(loaded) == resident and not any(".layers." in name for name in loaded)
    whole = load_model(out, torch.float32)
    for batch in config_batches(whole.config.to_dict()):
        assert torch.equal(model_output(whole, batch), model_output(streamed, batch))


def test_a_reused_buffer_still_held_is_not_handed_out_again(merged):
    """While a tensor from the pool is held (a module's parameter, or anything else), the same weight
    asked for again comes in a fresh buffer; once released, the pooled one is used again."""
    _, out = merged("d2lora-llama-bf16")
    model = load_model(out, torch.float32, resident_bytes=1)
    weights_map = next(h.weights_map for m in model.modules() for h in offload_hooks(m)
                       if isinstance(h.weights_map, streaming._Reused) and h.weights_map._source("weight"))
    key = "weight"
    first = weights_map[key]
    held = torch.nn.Parameter(first, requires_grad=False)  # what accelerate makes of it
    second = weights_map[key]
    assert second.data_ptr() != held.data_ptr() and torch.equal(second, held)
    del first, held, second
    third = weights_map[key]
    assert third.data_ptr() == weights_map[key].data_ptr()  # nothing else holds it: reused


def _slow_weight_check(monkeypatch, seconds: float) -> list[str]:
    """Each tensor of the weight check takes ``seconds`` longer; the names of those begun."""
    started = []
    check_tensor = weights._check_tensor

    def slow(*args):
        started.append(args[-1].name)
        time.sleep(seconds)
        return check_tensor(*args)

    monkeypatch.setattr(weights, "_check_tensor", slow)
    return started


def test_an_error_in_the_output_checks_stops_the_weight_check_beside(merged, monkeypatch):
    """Ctrl-C or bad input during the output checks is not held up until every tensor is checked."""
    from d2export.verification import runner

    folder, out = merged("d2lora-llama-bf16")
    started = _slow_weight_check(monkeypatch, 0.05)

    def interrupted(*args):
        time.sleep(0.2)  # a few tensors into the weight check
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_check_outputs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        verify(out, folder / "adapter", base=folder / "base")
    with prepare(folder / "adapter", folder / "base") as job:
        assert 0 < len(started) < len(job.plan.tensors) / 2


def test_the_unmerged_model_and_the_folder_run_side_by_side(merged, monkeypatch):
    """Two models at once, each on its own thread, the folder following the unmerged model's greedy
    continuation; garbage collection is back to normal afterwards."""
    from d2export.verification import ladder, runs

    folder, out = merged("d2lora-llama-bf16")
    threads: dict[str, set[str]] = {"greedy": set(), "followed": set()}
    greedy, followed = runs._greedy, runs._followed

    def generating(*args):
        threads["greedy"].add(threading.current_thread().name)
        return greedy(*args)

    def following(*args):
        threads["followed"].add(threading.current_thread().name)
        return followed(*args)

    monkeypatch.setattr(runs, "_greedy", generating)
    monkeypatch.setattr(runs, "_followed", following)
    report = verify(out, folder / "adapter", base=folder / "base")
    assert report.passed, report.failures
    fidelity = next(o for o in report.outputs if o.rung == "fidelity")
    assert fidelity.generation is not None and fidelity.generation.steps == ladder.GENERATION_STEPS
    assert len(threads["greedy"]) == 1 and threads["followed"] and not threads["greedy"] & threads["followed"]
    assert gc.get_freeze_count() == 0


def test_the_correctly_rounded_merge_runs_in_two_parts_that_give_what_one_run_gives(merged, tmp_path,
                                                                                      monkeypatch):
    """A folder that is not the correctly rounded merge (here an element 8 units off: the reference
    is computed) gets that merge's full run as two runs on the model threads, the prompts' batch
    and the continuation in one; the outputs are those of one run over every batch."""
    from d2export.verification import ladder

    folder, out = merged("d2lora-llama-bf16")
    bad = shutil.copytree(out, tmp_path / "bad")
    tamper_tensor(bad, "model.layers.1.mlp.up_proj.weight", lambda t: t.view(torch.int16)[5, 7].add_(8))
    parts: list[tuple[frozenset | None, bool, str]] = []
    run_model = ladder.run_model

    def recorded(model, batches, **kwargs):
        run = run_model(model, batches, **kwargs)
        if kwargs.get("only") is not None:
            parts.append((kwargs["only"], run.followed is not None, threading.current_thread().name))
        return run

    monkeypatch.setattr(ladder, "run_model", recorded)
    split = verify(bad, folder / "adapter", base=folder / "base")
    # two runs on the model threads; whether the second lands on the other thread depends on which
    # is free first (on a tiny model the first part may end before the unmerged model does)
    assert len(parts) == 2 and all(thread.startswith("models") for *_, thread in parts)
    (first, followed, _), (second, _, _) = sorted(parts, key=lambda part: not part[1])
    assert followed and not first & second and len(first | second) == 3  # the default calibration's batches
    monkeypatch.setattr(ladder.Ladder, "_halves", lambda self: [None])
    whole = verify(bad, folder / "adapter", base=folder / "base")
    assert len(parts) == 2  # no parts this time
    assert [o.to_dict() for o in split.outputs] == [o.to_dict() for o in whole.outputs]
    assert not split.passed and split.failures == whole.failures


@pytest.mark.parametrize("fails", ["unmerged model", "merged folder"])
def test_an_error_in_one_model_is_raised_and_stops_the_other(merged, monkeypatch, fails):
    """Bad input met by one model's run is what verify raises, not the other's being stopped, and
    it does not wait for the other run to finish its batches."""
    from d2export.errors import D2ExportError
    from d2export.verification import ladder

    folder, out = merged("d2lora-llama-bf16")
    forwards = []
    run_model = ladder.run_model

    def slowed(model, batches, **kwargs):
        halt = kwargs["halt"]

        def slow_halt():
            time.sleep(0.3)
            halt()
            forwards.append(1)
        return run_model(model, batches, **{**kwargs, "halt": slow_halt})

    def broken(*_args, **_kwargs):
        time.sleep(0.1)
        raise D2ExportError(f"{fails}: cannot load")

    monkeypatch.setattr(ladder, "run_model", slowed)
    monkeypatch.setattr(ladder, "unmerged_model" if fails == "unmerged model" else "load_model", broken)
    with pytest.raises(D2ExportError, match=f"{fails}: cannot load"):
        verify(out, folder / "adapter", base=folder / "base")
    assert len(forwards) < 3  # the other model stopped: unstopped, it runs 3 batches (and 7 greedy steps)


@pytest.mark.parametrize("cut", [True, False])
def test_the_prompts_batch_carries_the_continuation(fixture, monkeypatch, cut):
    """The continuation generated from the calibration batch's own key/value cache, which keeps only
    the prompts' rows and length, is the greedy decoding of each prompt by full forwards (no cache),
    and a model teacher-forced along it picks it at every step; with a cache that cannot be cut
    (``cut`` False) the prompts run again, with the same tokens."""
    from d2export.runtime.models import greedy_tokens
    from d2export.verification import ladder, runs

    if not cut:
        monkeypatch.setattr(runs, "_cut_cache", lambda model, prompts: None)
        monkeypatch.setattr(runs, "_prompt_cache", lambda cache, prompts: None)
    cached, greedy = [], runs._greedy

    def generating(model, prompts, first, cache, *args):
        # the layers that kept only the cut as the forward went, not the whole batch's cache cut afterwards
        assert cache is None or all(type(layer) is runs._cut_layer_class() for layer in cache.layers)
        cached.append(None if cache is None else {tuple(layer.keys.shape) for layer in cache.layers})
        return greedy(model, prompts, first, cache, *args)

    monkeypatch.setattr(runs, "_greedy", generating)
    folder = fixture("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job:
        batches = config_batches(job.base.config)
        prompts = ladder.generation_prompts(batches, job.base.config)
        model = unmerged_model(job.base.path, job.spec, torch.float32)
    published = []
    run = runs.run_model(model, batches, prompts=prompts, steps=8, publish=published.append)
    (tokens,) = published
    # cut as the batch's forward makes it: only the prompts' rows and length are kept
    batch_size, batch_length = batches[prompts.batch].input_ids.shape
    assert prompts.rows.numel() < batch_size and prompts.length < batch_length
    heads, width = model.config.num_key_value_heads, model.config.head_dim
    assert cached == ([{(prompts.rows.numel(), heads, prompts.length, width)}] if cut else [None])
    assert tokens.shape == (3, 8) and run.followed is None
    assert [model_output(model, b).tolist() for b in batches] == [o.tolist() for o in run.outputs]
    for row, prompt in enumerate(prompts.tokens(batches)):
        assert greedy_tokens(model, prompt, 8).tolist() == tokens[row].tolist()
    follower = runs.run_model(model, batches, prompts=prompts, steps=8, follow=lambda: tokens)
    assert torch.equal(follower.followed, tokens)


def test_a_streamed_model_checks_for_a_stop_at_every_block(merged, monkeypatch):
    """A 7B forward takes many seconds: a streamed model's runs look for the stop whenever a block
    (every decoder layer) loads its weights, not only between forwards."""
    from d2export.verification import ladder

    folder, out = merged("d2lora-llama-bf16")
    calls = []
    halt = ladder.Ladder.halt

    def counted(self):
        calls.append(threading.current_thread().name)
        return halt(self)

    monkeypatch.setattr(ladder.Ladder, "halt", counted)
    report = verify(out, folder / "adapter", base=folder / "base", resident=1)
    assert report.passed, report.failures
    with prepare(folder / "adapter", folder / "base") as job:
        layers = job.base.config["num_hidden_layers"]
    # the unmerged model alone: three batches and seven greedy steps, each through every layer
    forwards = len(config_batches(job.base.config)) + ladder.GENERATION_STEPS - 1
    assert len(calls) >= forwards * layers


def test_a_folder_that_cannot_load_fails_without_waiting_for_the_weight_check(merged, monkeypatch):
    """The correctly rounded merge waits for the weight check's verdict, but a model run that fails
    meanwhile ends verify at once (at 7B the weight check takes minutes)."""
    from d2export.errors import D2ExportError
    from d2export.verification import ladder

    folder, out = merged("d2lora-llama-bf16")
    started = _slow_weight_check(monkeypatch, 0.5)

    def broken(*_args, **_kwargs):
        raise D2ExportError("merged folder: cannot load")

    monkeypatch.setattr(ladder, "load_model", broken)
    with pytest.raises(D2ExportError, match="merged folder: cannot load"):
        verify(out, folder / "adapter", base=folder / "base")
    with prepare(folder / "adapter", folder / "base") as job:
        assert len(started) < len(job.plan.tensors) / 2


AT_EXIT_MODULES = """
import atexit, sys
atexit.register(lambda: print("imported:", *sorted({"sklearn", "scipy", "torch", "transformers"} & set(sys.modules))))
from d2export.cli import run
sys.argv = ["d2export", "verify", *sys.argv[1:]]
run()
"""


def test_the_verify_command_runs_models_without_importing_sklearn_or_scipy(merged):
    """transformers imports scikit-learn and SciPy with a model's code where they are installed, for
    features verify never runs; the command keeps them out, and still
    passes."""
    import importlib.util
    import subprocess
    import sys

    folder, out = merged("lora-llama")
    proc = subprocess.run([sys.executable, "-c", AT_EXIT_MODULES, str(out), "--adapter", str(folder / "adapter"),
                           "--base", str(folder / "base"), "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported: torch transformers" in proc.stdout.splitlines()
    assert importlib.util.find_spec("sklearn") and importlib.util.find_spec("scipy")  # installed, and kept out


def test_the_weight_check_runs_without_torch(merged):
    """torch and transformers are imported only for the output checks, once the weight check has
    started beside them: ``--weights-only`` imports neither (bench/README.md has what that saves)."""
    import subprocess
    import sys

    folder, out = merged("lora-llama")
    proc = subprocess.run([sys.executable, "-c", AT_EXIT_MODULES, str(out), "--adapter", str(folder / "adapter"),
                           "--base", str(folder / "base"), "--weights-only", "-q"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "imported:" in proc.stdout.splitlines()


def test_the_factor_cache_is_emptied_once_every_module_has_been_read(merged, monkeypatch):
    """The cache of recent factor loads serves one module's blocks; the weight check and an
    unmerged model's construction read every module in turn and leave it full for the rest of the
    process (beside the models of the output checks) unless they empty it."""
    from d2export.formats import stored

    monkeypatch.setattr(stored, "KEEP_BYTES", 0)  # every factor read from the file on use, through the cache
    folder, out = merged("d2lora-llama-bf16")
    with prepare(folder / "adapter", folder / "base") as job, ModelFolder.open(out, "merged model") as folder_open:
        terms = [t.update.terms[0] for t in job.plan.tensors if t.update is not None]
        assert all(isinstance(term.A, stored.StoredTensor) for term in terms)
        check_weights(job.plan, folder_open)
        assert not stored._RECENT
        unmerged_model(job.base.path, job.spec, torch.float32)
        assert not stored._RECENT
        terms[0].A.load()
        assert stored._RECENT  # the cache itself still works
