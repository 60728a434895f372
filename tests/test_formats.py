"""Adapter readers (``d2export.formats.load_adapter``) on checkpoints written by hand: each format's
coefficients, ranks, rescaling and selection, and the options that cannot be merged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from support import write_adapter

from d2export.errors import D2ExportError, UnsupportedAdapterError
from d2export.formats import load_adapter
from d2export.spec import LayerKind, Rescale

ATTN = "model.layers.{layer}.self_attn.{kind}"
OUT, IN = 4, 6  # every module here is a [out=4, in=6] Linear


def factors(r: int, seed: int, *, out: int = OUT, inp: int = IN) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((r, inp)).astype(np.float32), rng.standard_normal((out, r)).astype(np.float32)


def lora_tensors(modules: dict[str, int]) -> dict[str, np.ndarray]:
    """PEFT LoRA factors for each ``module: rank``."""
    tensors = {}
    for seed, (module, r) in enumerate(modules.items()):
        tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"] = factors(r, seed)
    return tensors


def d2lora_tensors(modules: list[str], r: int) -> dict[str, np.ndarray]:
    tensors = {}
    for seed, module in enumerate(modules):
        for sign, offset in (("pos", 0), ("neg", 100)):
            tensors[f"{module}.lora_A_{sign}.weight"], tensors[f"{module}.lora_B_{sign}.weight"] = \
                factors(r, seed + offset)
    return tensors


def peft_config(**changes) -> dict:
    return {"peft_type": "LORA", "r": 2, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
            "base_model_name_or_path": "tiny-llama", **changes}


def d2lora_config(**changes) -> dict:
    return {"peft_type": "D2LORA", "r": 2, "lora_alpha": 4, "tau": 0.5, "target_modules": ["q_proj", "v_proj"],
            **changes}


def delta(update) -> np.ndarray:
    return sum(t.coefficient * (t.B.astype(np.float64) @ t.A.astype(np.float64)) for t in update.terms)


# --- PEFT LoRA, rsLoRA, DoRA ---------------------------------------------------------------------------

def test_peft_lora_coefficient_is_alpha_over_r(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = lora_tensors({q: 2})
    folder = write_adapter(tmp_path / "a", peft_config(), tensors)
    spec = load_adapter(folder)
    assert spec.method == "lora" and spec.path == folder
    assert spec.files == [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
    assert spec.base_model_name_or_path == "tiny-llama" and spec.selection is None
    assert list(spec.updates) == [q]  # the PEFT "base_model.model." prefix is gone
    update = spec.updates[q]
    assert (update.kind, update.rescale, update.rank, update.alpha) == (LayerKind.LINEAR, Rescale.NONE, 2, 8.0)
    assert update.weight_key == f"{q}.weight" and update.shape == (OUT, IN) and update.selected
    (term,) = update.terms
    assert term.coefficient == 4.0  # alpha / r = 8 / 2
    assert np.array_equal(term.A, tensors[f"{q}.lora_A.weight"])
    assert np.array_equal(term.B, tensors[f"{q}.lora_B.weight"])
    assert update.magnitude is None and update.bias_delta is None and update.tau is None
    assert spec.num_params == 2 * IN + OUT * 2


def test_rslora_coefficient_is_alpha_over_sqrt_r(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    spec = load_adapter(write_adapter(tmp_path / "a", peft_config(r=4, use_rslora=True), lora_tensors({q: 4})))
    assert spec.method == "rslora"
    assert spec.updates[q].terms[0].coefficient == 4.0  # 8 / sqrt(4), not 8 / 4


def test_rank_and_alpha_patterns(tmp_path):
    modules = {ATTN.format(layer=0, kind="q_proj"): 2, ATTN.format(layer=0, kind="v_proj"): 3,
               ATTN.format(layer=1, kind="q_proj"): 2, "model.layers.1.mlp.proj": 5}
    config = peft_config(r=2, lora_alpha=4, rank_pattern={"v_proj": 3, "mlp.proj": 5},
                         alpha_pattern={"layers.1.self_attn.q_proj": 12, "proj": 10})
    spec = load_adapter(write_adapter(tmp_path / "a", config, lora_tensors(modules)))
    got = {m: (u.rank, u.alpha, u.terms[0].coefficient) for m, u in spec.updates.items()}
    assert got == {
        ATTN.format(layer=0, kind="q_proj"): (2, 4.0, 2.0),  # "proj" matches whole components only
        ATTN.format(layer=0, kind="v_proj"): (3, 4.0, 4 / 3),
        ATTN.format(layer=1, kind="q_proj"): (2, 12.0, 6.0),
        "model.layers.1.mlp.proj": (5, 10.0, 2.0),
    }


def test_factors_that_miss_the_configured_rank(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    folder = write_adapter(tmp_path / "a", peft_config(r=3), lora_tensors({q: 2}))
    with pytest.raises(D2ExportError, match=r"do not have the configured rank r=3"):
        load_adapter(folder)


def test_incomplete_lora_pair(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = lora_tensors({q: 2})
    del tensors[f"{q}.lora_B.weight"]
    with pytest.raises(D2ExportError, match=f"module {q} has an incomplete LoRA pair"):
        load_adapter(write_adapter(tmp_path / "a", peft_config(), tensors))


def test_dora_magnitude_rescale(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = lora_tensors({q: 2})
    magnitude = np.linspace(0.5, 2.0, OUT, dtype=np.float32)
    spec = load_adapter(write_adapter(tmp_path / "a", peft_config(use_dora=True),
                                      {**tensors, f"{q}.lora_magnitude_vector": magnitude}))
    assert spec.method == "dora"
    update = spec.updates[q]
    assert update.rescale is Rescale.MAGNITUDE and np.array_equal(update.magnitude, magnitude)
    assert update.terms[0].coefficient == 4.0
    with pytest.raises(D2ExportError, match=r"use_dora is set but .* has no lora_magnitude_vector"):
        load_adapter(write_adapter(tmp_path / "b", peft_config(use_dora=True), tensors))
    with pytest.raises(D2ExportError, match=r"lora_magnitude_vector has shape \(3,\), expected \[4\]"):
        load_adapter(write_adapter(tmp_path / "c", peft_config(use_dora=True),
                                   {**tensors, f"{q}.lora_magnitude_vector": magnitude[:3]}))


def test_bias_embedding_and_full_tensors(tmp_path):
    q, embed = ATTN.format(layer=0, kind="q_proj"), "model.embed_tokens"
    rng = np.random.default_rng(5)
    bias = rng.standard_normal(OUT).astype(np.float32)
    embedding_A, embedding_B = rng.standard_normal((2, 32)).astype(np.float32), rng.standard_normal((8, 2))
    head = rng.standard_normal((3, 8)).astype(np.float32)
    base_copy = rng.standard_normal((32, 8)).astype(np.float32)
    tensors = {**lora_tensors({q: 2}), f"{q}.lora_B.bias": bias,
               f"{embed}.lora_embedding_A": embedding_A, f"{embed}.lora_embedding_B": embedding_B.astype(np.float32),
               "score.modules_to_save.default.weight": head, f"{embed}.base_layer.weight": base_copy}
    spec = load_adapter(write_adapter(tmp_path / "a", peft_config(lora_bias=True), tensors))
    assert np.array_equal(spec.updates[q].bias_delta, bias)
    update = spec.updates[embed]
    assert update.kind is LayerKind.EMBEDDING and update.shape == (8, 32)  # canonical [dim, vocab]
    assert np.array_equal(update.terms[0].A, embedding_A)
    assert sorted(spec.replacements) == ["model.embed_tokens.weight", "score.weight"]
    assert np.array_equal(spec.replacements["score.weight"], head)
    assert np.array_equal(spec.replacements["model.embed_tokens.weight"], base_copy)


def test_three_d_factor_is_refused(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = lora_tensors({q: 2})
    tensors[f"{q}.lora_A.weight"] = tensors[f"{q}.lora_A.weight"][..., None]
    with pytest.raises(D2ExportError, match="convolution adapters are not supported"):
        load_adapter(write_adapter(tmp_path / "a", peft_config(), tensors))


@pytest.mark.parametrize(("changes", "match"), [
    ({"layer_replication": [[0, 1], [0, 1]]}, "layer_replication is set"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' rewrote the base weights"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4"),
    ({"init_lora_weights": "olora"}, "olora"),
    ({"use_qalora": True}, "QA-LoRA"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported"),
])
def test_options_that_cannot_be_merged_are_refused(tmp_path, changes, match):
    tensors = lora_tensors({ATTN.format(layer=0, kind="q_proj"): 2})
    folder = write_adapter(tmp_path / "a", peft_config(**changes), tensors)
    with pytest.raises(UnsupportedAdapterError, match=match):
        load_adapter(folder)


def test_harmless_options_are_accepted(tmp_path):
    config = peft_config(init_lora_weights="gaussian", layer_replication=None, use_dora=False)
    spec = load_adapter(write_adapter(tmp_path / "a", config, lora_tensors({ATTN.format(layer=0, kind="q_proj"): 2})))
    assert spec.method == "lora"


def test_trainer_folder_with_one_checkpoint(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    inner = write_adapter(tmp_path / "run" / "checkpoint-10", peft_config(), lora_tensors({q: 2}))
    assert load_adapter(tmp_path / "run").path == inner
    write_adapter(tmp_path / "run" / "checkpoint-20", peft_config(), lora_tensors({q: 2}))
    with pytest.raises(D2ExportError, match=r"several trainer checkpoints .*checkpoint-10, checkpoint-20"):
        load_adapter(tmp_path / "run")


def test_non_finite_factor_is_refused(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = lora_tensors({q: 2})
    tensors[f"{q}.lora_B.weight"][1, 1] = np.nan
    with pytest.raises(D2ExportError, match=f"adapter tensor {q}.lora_B.weight contains NaN or Inf"):
        load_adapter(write_adapter(tmp_path / "a", peft_config(), tensors))


# --- D2-LoRA ----------------------------------------------------------------------------------------

def test_d2lora_coefficients_and_norm_projection(tmp_path):
    modules = [ATTN.format(layer=0, kind="q_proj"), ATTN.format(layer=0, kind="v_proj")]
    tensors = d2lora_tensors(modules, 2)
    spec = load_adapter(write_adapter(tmp_path / "a", d2lora_config(), tensors))
    assert spec.method == "d2lora" and sorted(spec.updates) == sorted(modules)
    for module in modules:
        update = spec.updates[module]
        assert [(t.name, t.coefficient) for t in update.terms] == [("pos", 2.0), ("neg", -1.0)]  # -tau * alpha / r
        assert update.rescale is Rescale.ORIGINAL_NORM
        assert (update.tau, update.tau_learned, update.swapped_factors, update.rank) == (0.5, False, False, 2)
        expected = 2.0 * (tensors[f"{module}.lora_B_pos.weight"].astype(np.float64)
                          @ tensors[f"{module}.lora_A_pos.weight"]) - 1.0 * (
            tensors[f"{module}.lora_B_neg.weight"].astype(np.float64) @ tensors[f"{module}.lora_A_neg.weight"])
        np.testing.assert_allclose(delta(update), expected, rtol=1e-12)


def test_d2lora_learned_tau_wins(tmp_path):
    q, v = ATTN.format(layer=0, kind="q_proj"), ATTN.format(layer=0, kind="v_proj")
    tensors = {**d2lora_tensors([q, v], 2), f"{q}.d2_tau": np.array([0.25], dtype=np.float32)}
    spec = load_adapter(write_adapter(tmp_path / "a", d2lora_config(), tensors))
    assert (spec.updates[q].tau, spec.updates[q].tau_learned) == (0.25, True)
    assert spec.updates[q].terms[1].coefficient == -0.5
    assert (spec.updates[v].tau, spec.updates[v].tau_learned) == (0.5, False)  # the config's tau elsewhere
    no_tau = {k: v for k, v in d2lora_config().items() if k != "tau"}
    spec = load_adapter(write_adapter(tmp_path / "b", no_tau, {k: t for k, t in tensors.items() if v not in k}))
    assert spec.updates[q].tau == 0.25
    with pytest.raises(D2ExportError, match=f"{v} has no learned d2_tau and adapter_config.json sets no 'tau'"):
        load_adapter(write_adapter(tmp_path / "c", no_tau, tensors))
    bad = {**tensors, f"{q}.d2_tau": np.array([0.1, 0.2], dtype=np.float32)}
    with pytest.raises(D2ExportError, match="d2_tau has shape \\(2,\\); a scalar was expected"):
        load_adapter(write_adapter(tmp_path / "d", d2lora_config(), bad))


def test_d2lora_rslora_and_no_projection(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    config = d2lora_config(r=4, lora_alpha=8, tau=0.75, use_rslora=True, norm_projection=False)
    spec = load_adapter(write_adapter(tmp_path / "a", config, d2lora_tensors([q], 4)))
    update = spec.updates[q]
    assert [t.coefficient for t in update.terms] == [4.0, -3.0]  # alpha / sqrt(r) = 4; -0.75 * 4
    assert update.rescale is Rescale.NONE
    with pytest.raises(D2ExportError, match="'norm_projection' must be true or false"):
        load_adapter(write_adapter(tmp_path / "b", d2lora_config(norm_projection="yes"), d2lora_tensors([q], 2)))


def test_d2lora_factors_stored_the_papers_way_round(tmp_path):
    """A [out, r] / B [r, in] (the paper's naming) is read as B [out, r] / A [r, in]."""
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = d2lora_tensors([q], 2)
    swapped = {}
    for sign in ("pos", "neg"):
        swapped[f"{q}.lora_A_{sign}.weight"] = tensors[f"{q}.lora_B_{sign}.weight"]  # [out, r]
        swapped[f"{q}.lora_B_{sign}.weight"] = tensors[f"{q}.lora_A_{sign}.weight"]  # [r, in]
    normal = load_adapter(write_adapter(tmp_path / "normal", d2lora_config(), tensors)).updates[q]
    update = load_adapter(write_adapter(tmp_path / "swapped", d2lora_config(), swapped)).updates[q]
    assert update.swapped_factors and not normal.swapped_factors
    assert update.shape == normal.shape == (OUT, IN)
    for a, b in zip(update.terms, normal.terms, strict=True):
        assert np.array_equal(a.A, b.A) and np.array_equal(a.B, b.B) and a.coefficient == b.coefficient


def test_d2lora_broken_modules(tmp_path):
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = d2lora_tensors([q], 2)
    missing = {k: v for k, v in tensors.items() if "B_neg" not in k}
    with pytest.raises(D2ExportError, match=f"module {q} lacks B_neg"):
        load_adapter(write_adapter(tmp_path / "a", d2lora_config(), missing))
    no_rank = {**tensors, f"{q}.lora_A_neg.weight": factors(3, 9)[0]}
    with pytest.raises(D2ExportError, match=r"neg branch: .* have no axis of the rank r=2"):
        load_adapter(write_adapter(tmp_path / "b", d2lora_config(), no_rank))
    other_shape = {**tensors, f"{q}.lora_B_neg.weight": factors(2, 9, out=5)[1]}
    with pytest.raises(D2ExportError, match=r"positive branch is \[4, 6\] but the negative branch is \[5, 6\]"):
        load_adapter(write_adapter(tmp_path / "c", d2lora_config(), other_shape))


def test_a_factor_that_is_not_float_is_refused_naming_its_file(tmp_path):
    module = ATTN.format(layer=0, kind="q_proj")
    tensors = d2lora_tensors([module], 2)
    tensors[f"{module}.lora_A_pos.weight"] = tensors[f"{module}.lora_A_pos.weight"].astype(np.int32)
    folder = write_adapter(tmp_path / "a", d2lora_config(), tensors)
    with pytest.raises(D2ExportError, match=r"adapter_model\.safetensors: .*lora_A_pos has dtype int32, not a float"):
        load_adapter(folder)


# --- DiffoRA --------------------------------------------------------------------------------------------

TYPES = ["q_proj", "v_proj"]
DIFFORA_MODULES = [ATTN.format(layer=layer, kind=kind) for layer in range(2) for kind in TYPES]


def diffora_adapter(folder: Path, dam: dict, extra: tuple[str, ...] = ()) -> Path:
    write_adapter(folder, d2lora_config(), d2lora_tensors(DIFFORA_MODULES + list(extra), 2))
    (folder / "diffora_dam.json").write_text(json.dumps({"module_types": TYPES, "num_layers": 2, **dam}))
    return folder


def selected(spec) -> set[str]:
    return {m for m, u in spec.updates.items() if u.selected}


def test_diffora_scores_select_the_top_k(tmp_path):
    o_proj = ATTN.format(layer=0, kind="o_proj")  # a type outside the DAM: always merged
    folder = diffora_adapter(tmp_path / "a", {"scores": [[0.9, 0.1], [0.5, 0.7]], "sample_rate": 0.5}, (o_proj,))
    spec = load_adapter(folder)
    assert spec.method == "d2lora+diffora"
    assert selected(spec) == {ATTN.format(layer=0, kind="q_proj"), ATTN.format(layer=1, kind="v_proj"), o_proj}
    assert spec.selection.source == "scores" and spec.selection.sample_rate == 0.5
    assert spec.selection.num_selected == 2  # round(0.5 * 2 layers * 2 types)
    assert spec.files[-1] == folder / "diffora_dam.json"
    unselected = spec.updates[ATTN.format(layer=0, kind="v_proj")]
    assert unselected.terms and unselected.tau == 0.5  # still read: only its merge is skipped


def test_diffora_ties_keep_the_earlier_cell_and_halves_round_up(tmp_path):
    spec = load_adapter(diffora_adapter(tmp_path / "a", {"scores": [[1, 1], [1, 1]], "sample_rate": 0.625}))
    # k = 0.625 * 4 = 2.5 rounds up to 3 (not to even): the first three cells in (layer, type) order
    assert selected(spec) == {ATTN.format(layer=0, kind="q_proj"), ATTN.format(layer=0, kind="v_proj"),
                              ATTN.format(layer=1, kind="q_proj")}


def test_diffora_explicit_selection_wins_over_scores(tmp_path):
    dam = {"selected": [[False, True], [False, False]], "scores": [[0.9, 0.1], [0.5, 0.7]], "sample_rate": 0.5}
    spec = load_adapter(diffora_adapter(tmp_path / "a", dam))
    assert selected(spec) == {ATTN.format(layer=0, kind="v_proj")}
    assert spec.selection.source == "selected" and spec.selection.sample_rate is None


@pytest.mark.parametrize(("dam", "match"), [
    ({"scores": [[0.9, 0.1]], "sample_rate": 0.5}, "'scores' must have num_layers=2 rows"),
    ({"scores": [[0.9, 0.1], [0.5]], "sample_rate": 0.5}, "'scores' row 1 must have 2 entries"),
    ({"scores": [[0.9, 0.1], [0.5, "x"]], "sample_rate": 0.5}, "'scores' row 1 has an invalid entry 'x'"),
    ({"scores": [[0.9, 0.1], [0.5, 0.7]], "sample_rate": 0}, r"'sample_rate' must be in \(0, 1\]"),
    ({"selected": [[1, 0], [0, 1]]}, "'selected' row 0 has an invalid entry 1"),
])
def test_diffora_bad_dam(tmp_path, dam, match):
    with pytest.raises(D2ExportError, match=match):
        load_adapter(diffora_adapter(tmp_path / "a", dam))


def test_diffora_selected_cells_need_the_adapters_factors(tmp_path):
    """A DAM that selects a module type the adapter has no factors for (misspelt, another model's)
    would merge nothing there: refused, naming the cells."""
    misspelt = {"module_types": ["q_proj", "v_prj"], "selected": [[False, True], [True, False]]}
    with pytest.raises(D2ExportError, match=r"the DAM selects modules the adapter has no factors for: layer 0 v_prj$"):
        load_adapter(diffora_adapter(tmp_path / "a", misspelt))
    unselected = {"module_types": ["q_proj", "v_prj"], "selected": [[True, False], [True, False]]}
    assert len(selected(load_adapter(diffora_adapter(tmp_path / "b", unselected)))) == 4  # v_prj never selected


def test_diffora_module_beyond_the_dam_layers(tmp_path):
    deep = ATTN.format(layer=2, kind="q_proj")
    folder = diffora_adapter(tmp_path / "a", {"scores": [[0.9, 0.1], [0.5, 0.7]], "sample_rate": 0.5}, (deep,))
    with pytest.raises(D2ExportError, match=f"module {deep} is in layer 2 but the DAM has 2 layers"):
        load_adapter(folder)


def test_coefficients_reproduce_the_documented_delta(tmp_path):
    """One D2-LoRA module against DESIGN.md's formula written out: (alpha/r)(B+A+ - tau B-A-)."""
    q = ATTN.format(layer=0, kind="q_proj")
    tensors = d2lora_tensors([q], 3)
    config = d2lora_config(r=3, lora_alpha=5, tau=0.3)
    update = load_adapter(write_adapter(tmp_path / "a", config, tensors)).updates[q]
    t = {k.rsplit(".", 2)[-2]: v.astype(np.float64) for k, v in tensors.items()}
    expected = (5 / 3) * (t["lora_B_pos"] @ t["lora_A_pos"] - 0.3 * t["lora_B_neg"] @ t["lora_A_neg"])
    np.testing.assert_allclose(delta(update), expected, rtol=1e-12)
    assert math.isclose(update.terms[1].coefficient, -0.3 * 5 / 3, rel_tol=1e-15)
