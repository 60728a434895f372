"""``d2export.names``: the one prefix-tolerant name lookup every side uses."""

from __future__ import annotations

import pytest

from d2export.names import find_name, name_variants


def test_variants_without_a_prefix_are_the_name_alone():
    assert name_variants("encoder.layer.0.attention.self.query.weight", "") == [
        "encoder.layer.0.attention.self.query.weight"]


def test_variants_order_given_then_stripped_then_prefixed():
    assert name_variants("bert.encoder.query.weight", "bert") == [
        "bert.encoder.query.weight", "encoder.query.weight", "bert.bert.encoder.query.weight"]
    # nothing to strip: no duplicate of the given name
    assert name_variants("encoder.query.weight", "bert") == ["encoder.query.weight", "bert.encoder.query.weight"]


def test_prefix_is_stripped_only_as_a_whole_component():
    assert name_variants("bertish.query.weight", "bert") == ["bertish.query.weight", "bert.bertish.query.weight"]
    assert find_name("bertish.query.weight", {"ish.query.weight", "query.weight"}, "bert") is None


@pytest.mark.parametrize(("name", "stored", "found"), [
    ("encoder.query.weight", {"bert.encoder.query.weight"}, "bert.encoder.query.weight"),  # BertModel -> BertFor...
    ("bert.encoder.query.weight", {"encoder.query.weight"}, "encoder.query.weight"),  # BertFor... -> BertModel
    ("model.layers.0.q_proj.weight", {"model.layers.0.q_proj.weight"}, "model.layers.0.q_proj.weight"),
])
def test_find_name_bridges_the_base_model_prefix(name, stored, found):
    prefix = "model" if name.startswith("model.") else "bert"
    assert find_name(name, stored, prefix) == found


def test_find_name_prefers_the_name_as_given():
    both = {"bert.pooler.weight", "pooler.weight"}
    assert find_name("pooler.weight", both, "bert") == "pooler.weight"
    assert find_name("bert.pooler.weight", both, "bert") == "bert.pooler.weight"


def test_find_name_takes_a_predicate_and_misses_with_none():
    asked: list[str] = []

    def holds(name: str) -> bool:
        asked.append(name)
        return name == "bert.embeddings.word_embeddings.weight"

    assert find_name("embeddings.word_embeddings.weight", holds, "bert") == "bert.embeddings.word_embeddings.weight"
    assert asked == ["embeddings.word_embeddings.weight", "bert.embeddings.word_embeddings.weight"]
    assert find_name("lm_head.weight", {"model.lm_head.weight"}) is None  # no prefix: no variants
    assert find_name("missing.weight", lambda n: False, "model") is None
