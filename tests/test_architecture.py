"""The architecture table used without building a model agrees with the meta-device probe."""

import pytest
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from d2export.architecture import KNOWN_CAUSAL_LMS, _known_causal_lm, probe_meta


@pytest.mark.parametrize("model_type", sorted(KNOWN_CAUSAL_LMS))
@pytest.mark.parametrize("tie", [True, False, None], ids=["tied", "untied", "default"])
def test_known_causal_lm_table_matches_meta_probe(model_type, tie):
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, pad_token_id=0)
    if tie is not None:
        small["tie_word_embeddings"] = tie
    config = transformers.AutoConfig.for_model(model_type, **small).to_diff_dict()  # as save_pretrained writes
    config["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    fast, meta = _known_causal_lm(config), probe_meta(config)
    assert fast is not None and meta.known, meta.problem
    assert (fast.conv1d, fast.embeddings, fast.base_model_prefix) == (meta.conv1d, meta.embeddings,
                                                                      meta.base_model_prefix)
    assert sorted(map(sorted, fast.tied)) == sorted(map(sorted, meta.tied))


def test_other_architectures_are_probed():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2).to_dict()
    config["architectures"] = ["GPT2LMHeadModel"]
    assert _known_causal_lm(config) is None
    assert probe_meta(config).conv1d  # GPT-2's Conv1D layers are found
