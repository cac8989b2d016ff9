"""Causal-LM types at the architecture level: soft words and deep offsets act causally, the cache path is exact.

`causal_architecture_check.check_causal_architecture` (a test helper, the same one behind the "Causal LMs" table of
docs/supported-architectures.md) runs here on the key types; ``scripts/architecture_matrix.py --kind causal`` runs it
on every `AutoModelForCausalLM` type.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers
from causal_architecture_check import SOFT_POSITION, check_causal_architecture
from causal_factories import tiny_causal_config, tiny_causal_model
from packaging.version import Version
from transformers import BertConfig, BertLMHeadModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peft_softmix.causal_architectures import CAUSAL_DEEP_UNSUPPORTED, CAUSAL_UNSUPPORTED

# The types issue #18 names: each must take soft words and deep offsets, and score from its cache exactly.
KEY_TYPES = (
    *("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"),
    *("phi", "phi3", "opt", "gpt_neox", "falcon", "bloom"),
)


@pytest.mark.parametrize("model_type", KEY_TYPES)
def test_key_causal_types_take_soft_words_and_deep_offsets_causally(model_type):
    config = tiny_causal_config(model_type)
    result = check_causal_architecture(lambda: tiny_causal_model(config))
    assert result.kind == "causal"
    assert result.shallow and result.deep, f"{model_type} fails at {result.stage}: {result.error}"
    assert result.layers == config.get_text_config().num_hidden_layers
    # the hard-initialised soft word and zero offsets reproduce the frozen model; earlier positions never move
    assert result.gaps["hard"] == 0 and result.gaps["zero_offsets"] == 0
    assert result.gaps["before_p_soft"] == 0 and result.gaps["before_p_deep"] == 0
    assert result.cache == "exact" and result.cache_argument == "past_key_values", result.cache_error


def test_the_check_fails_where_it_should():
    # an encoder's causal-LM class that attends both ways: refused at the kind
    refused = check_causal_architecture(
        lambda: BertLMHeadModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    )
    assert not refused.shallow and refused.stage == "model kind" and "is_decoder" in refused.error
    # a model whose later tokens reach earlier positions fails the causality stage (BERT as a decoder made
    # bidirectional after model_kind has seen it)
    config = tiny_causal_config("bert")

    def bidirectional():
        model = tiny_causal_model(config)
        for module in model.modules():
            if hasattr(module, "is_causal"):
                module.is_causal = False
        model.config.is_decoder = True  # model_kind still sees a decoder
        return model

    leaky = check_causal_architecture(bidirectional)
    assert not leaky.shallow and leaky.stage == "soft word causality", leaky.error
    assert f"at position {SOFT_POSITION} changes earlier positions" in leaky.error


def test_support_tables_name_real_causal_types():
    assert set(CAUSAL_UNSUPPORTED) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert set(CAUSAL_DEEP_UNSUPPORTED) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert not set(KEY_TYPES) & (set(CAUSAL_UNSUPPORTED) | set(CAUSAL_DEEP_UNSUPPORTED))


def test_generated_causal_docs_cover_every_type_meet_the_targets_and_agree_with_the_tables():
    path = Path(__file__).resolve().parents[1] / "docs" / "architectures_causal.json"
    if not path.exists():
        pytest.skip("docs/architectures_causal.json not generated (scripts/architecture_matrix.py --kind causal)")
    generated = json.loads(path.read_text(encoding="utf-8"))
    table, counts = generated["architectures"], generated["counts"]
    if Version(transformers.__version__) >= Version(generated["transformers_version"]):
        assert sorted(table) == sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES), "docs are stale: rerun the script"
    assert counts["types"] == len(table)
    assert counts["shallow_ok"] >= 0.85 * counts["types"] and counts["deep_ok"] >= 0.75 * counts["types"]
    for model_type, entry in table.items():
        if model_type in CAUSAL_UNSUPPORTED:
            assert entry["unsupported"] and CAUSAL_UNSUPPORTED[model_type] in entry["unsupported"]
        if model_type in CAUSAL_DEEP_UNSUPPORTED:
            assert entry["deep_unsupported"] and CAUSAL_DEEP_UNSUPPORTED[model_type] in entry["deep_unsupported"]
        if entry["checked"] and not entry["unsupported"]:
            # a checked type that fails must be listed with its reason
            assert entry["shallow"], f"{model_type} fails ({entry['error']}): list it in CAUSAL_UNSUPPORTED"
            if not entry["deep_unsupported"]:
                assert entry["deep"], f"{model_type} deep fails ({entry['error']}): list it in CAUSAL_DEEP_UNSUPPORTED"
    for model_type in KEY_TYPES:
        assert table[model_type]["shallow"] and table[model_type]["deep"] and table[model_type]["cache"] == "exact"
