"""Every masked-LM type in transformers, end to end: a tiny random model of each, shallow and deep.

The check itself lives in `architecture_check.check_architecture` (a test helper, the same one that writes
docs/supported-architectures.md); these tests run it for every type and hold it to the support tables.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from architecture_check import PADDING_SENSITIVE, check_architecture
from factories import (
    BPE,
    TOKENIZER_FAMILY,
    UNIGRAM,
    WORDPIECE,
    build_tokenizers,
    special_token_ids,
    tiny_config,
    tiny_model,
)
from packaging.version import Version
from peft import get_peft_model
from transformers import AutoTokenizer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

import peft_softmix  # noqa: F401  (registers the method with PEFT)
from peft_softmix import SoftMixtureConfig, UnsupportedArchitectureError
from peft_softmix.architectures import DEEP_UNSUPPORTED, UNSUPPORTED, unsupported_reason

ALL_TYPES = sorted(MODEL_FOR_MASKED_LM_MAPPING_NAMES)

# The architectures issue 2 names, each with the tokenizer family its checkpoints ship with.
NAMED = {
    "bert": WORDPIECE,
    "roberta": BPE,
    "distilbert": WORDPIECE,
    "albert": UNIGRAM + "_bracket",
    "electra": WORDPIECE,
    "deberta-v2": UNIGRAM + "_bracket",
    "xlm-roberta": UNIGRAM,
    "modernbert": BPE,
}


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory) -> dict[str, str]:
    return build_tokenizers(tmp_path_factory.mktemp("tokenizers"))


def _tokenizer_path(tokenizers: dict[str, str], model_type: str) -> str:
    return tokenizers[TOKENIZER_FAMILY[model_type]]


def _factory(model_type: str, tokenizer_path: str, **overrides):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = tiny_config(model_type, len(tokenizer), **special_token_ids(tokenizer), **overrides)
    return lambda: tiny_model(config)


def test_every_masked_lm_type_has_a_tokenizer_family():
    missing = sorted(set(ALL_TYPES) - set(TOKENIZER_FAMILY))
    assert not missing, f"add these new masked-LM types to tests/factories.py TOKENIZER_FAMILY: {missing}"
    assert set(UNSUPPORTED) <= set(ALL_TYPES) and set(DEEP_UNSUPPORTED) <= set(ALL_TYPES)


@pytest.mark.parametrize("family", [WORDPIECE, BPE, UNIGRAM, UNIGRAM + "_bracket"])
def test_tokenizer_fixtures_keep_words_whole(tokenizers, family):
    tokenizer = AutoTokenizer.from_pretrained(tokenizers[family])
    text = f"Dante was born in {tokenizer.mask_token} ."
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])
    assert pieces.count(tokenizer.mask_token) == 1
    assert [p.lstrip("Ġ▁") for p in pieces if p.lstrip("Ġ▁") in ("was", "born", "in")] == ["was", "born", "in"]
    # an unknown word still tokenises, into pieces, without the unknown token
    unknown = tokenizer(" Zxq", add_special_tokens=False)["input_ids"]
    assert len(unknown) > 1 and tokenizer.unk_token_id not in unknown


@pytest.mark.arch_matrix
@pytest.mark.parametrize("deep", [False, True], ids=["shallow", "deep"])
@pytest.mark.parametrize("model_type", ALL_TYPES)
def test_architecture(tokenizers, model_type, deep):
    path = _tokenizer_path(tokenizers, model_type)
    result = check_architecture(_factory(model_type, path), path, deep=deep)
    reason = unsupported_reason(model_type, deep)
    if reason is not None:
        assert result.unsupported, f"{model_type} is listed as unsupported ({reason}) but get_peft_model accepted it"
        assert model_type in result.error and reason in result.error
    else:
        assert result.ok, f"{model_type} ({'deep' if deep else 'shallow'}) fails at {result.stage}: {result.error}"
        assert result.details["init_gap"] <= 1e-5 and result.details["reload_gap"] <= 1e-5
        if model_type not in PADDING_SENSITIVE:
            # each filled template on its own, unpadded, through the bare model: the same distribution
            assert result.details["unpadded_gap"] <= 1e-5, f"{model_type} reads padding: list it in PADDING_SENSITIVE"


@pytest.mark.parametrize("model_type", sorted(NAMED))
def test_named_architectures_use_their_own_tokenizer_family_and_are_supported(model_type):
    assert TOKENIZER_FAMILY[model_type] == NAMED[model_type]
    assert unsupported_reason(model_type, deep=True) is None


@pytest.mark.parametrize(
    "model_type, deep", [(t, False) for t in sorted(UNSUPPORTED)] + [(t, True) for t in sorted(DEEP_UNSUPPORTED)]
)
def test_unsupported_types_raise_one_clear_error(tokenizers, model_type, deep):
    path = _tokenizer_path(tokenizers, model_type)
    base = _factory(model_type, path)()
    config = SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=path, deep=deep)
    with pytest.raises(UnsupportedArchitectureError) as caught:
        get_peft_model(base, config)
    message = str(caught.value)
    assert repr(model_type) in message and type(base).__name__ in message
    assert (UNSUPPORTED.get(model_type) or DEEP_UNSUPPORTED[model_type]) in message


def test_generated_docs_cover_every_type_and_agree_with_the_tables():
    path = Path(__file__).resolve().parents[1] / "docs" / "architectures.json"
    if not path.exists():
        pytest.skip("docs/architectures.json not generated (scripts/architecture_matrix.py)")
    generated = json.loads(path.read_text(encoding="utf-8"))
    table = generated["architectures"]
    if Version(transformers.__version__) < Version(generated["transformers_version"]):
        # an older transformers of the supported window (scripts/compat_matrix.py): the docs describe the newest,
        # which knows every type this one knows, and maybe more
        missing = sorted(set(ALL_TYPES) - set(table))
        assert not missing, f"docs/architectures.json lacks {missing}: rerun scripts/architecture_matrix.py"
    else:
        assert sorted(table) == ALL_TYPES, "docs are stale: rerun scripts/architecture_matrix.py"
    for model_type in UNSUPPORTED:
        assert table[model_type]["shallow"]["unsupported"] and table[model_type]["deep"]["unsupported"]
    for model_type in DEEP_UNSUPPORTED:
        assert table[model_type]["deep"]["unsupported"], f"docs are stale for {model_type}: rerun the script"
    for model_type in NAMED:
        assert table[model_type]["shallow"]["ok"] and table[model_type]["deep"]["ok"]


def test_shared_layer_gets_one_offset_per_call(tokenizers):
    # ALBERT runs one shared block num_hidden_layers times: depth is counted in calls, not modules
    path = tokenizers[TOKENIZER_FAMILY["albert"]]
    base = _factory("albert", path, num_hidden_layers=3)()
    assert len(base.albert.encoder.albert_layer_groups) == 1
    model = get_peft_model(
        base, SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=path, deep=True)
    )
    offsets = model.prompt_encoder["default"].deep_offsets
    assert offsets.shape[0] == 3
    batch = model.encode(["Dante"], ["Florence"])
    model(**batch).loss.backward()
    # every call's offset gets its own gradient
    assert all(offsets.grad[depth].abs().sum() > 0 for depth in range(3))


def test_seq2seq_deep_prompts_enter_the_encoder(tokenizers):
    # the factory gives BART one more decoder layer than encoder layers
    path = tokenizers[TOKENIZER_FAMILY["bart"]]
    base = _factory("bart", path)()
    assert base.config.decoder_layers != base.config.encoder_layers
    config = SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=path, deep=True)
    model = get_peft_model(base, config)
    assert model.prompt_encoder["default"].deep_offsets.shape[0] == base.config.encoder_layers


def test_deep_prompts_pick_the_text_layers_beside_a_larger_vision_tower(tokenizers):
    path = tokenizers[TOKENIZER_FAMILY["modernvbert"]]
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = tiny_config("modernvbert", len(tokenizer), **special_token_ids(tokenizer))
    config.vision_config.num_hidden_layers, config.vision_config.intermediate_size = 5, 256
    base = tiny_model(config)
    text_layers, vision_layers = base.model.text_model.layers, base.model.vision_model.encoder.layers
    assert sum(p.numel() for p in vision_layers.parameters()) > sum(p.numel() for p in text_layers.parameters())
    templates = ["[X] was born in [Y] ."]
    model = get_peft_model(base, SoftMixtureConfig(templates=templates, tokenizer_name_or_path=path, deep=True))
    assert model.prompt_encoder["default"].deep_offsets.shape[0] == len(text_layers)


def test_scaled_embeddings_scale_the_soft_words_too(tokenizers):
    # mBART multiplies its embedding lookups by sqrt(d_model): a soft word moved off its token must be scaled alike
    path = tokenizers[TOKENIZER_FAMILY["mbart"]]
    base = _factory("mbart", path)()
    assert base.get_input_embeddings().embed_scale != 1.0
    model = get_peft_model(base, SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=path))
    model.eval()
    batch = model.encode(["Dante"])
    encoder = model.prompt_encoder["default"]
    with torch.no_grad():
        # replace the soft words by another token's embedding; the result must equal that hard token
        other = AutoTokenizer.from_pretrained(path).convert_tokens_to_ids("▁Rome")
        encoder.soft_words[0] = model.word_embeddings.weight[other]
        soft = model(**batch).log_probs
        ids = batch["input_ids"].clone()
        ids[batch["roles"] == 0] = other
        hard = base(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        hard = torch.log_softmax(hard[0, batch["mask_positions"][0]], -1)
    assert torch.allclose(soft[0], hard, atol=1e-5)
