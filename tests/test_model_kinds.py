"""Masked or causal, decided from the model itself; the models neither path serves get one clear error each.

Issue #18's first finding: a tiny GPT2LMHeadModel with a tokenizer that has <mask> was accepted, and training ran on
the causal logits at the <mask> position (text after [Y] could not matter). It now goes to the causal path, which
scores the object's own tokens by the chain rule (tests/test_causal.py).
"""

from __future__ import annotations

import pytest
import torch
from factories import bpe_tokenizer, special_token_ids, tiny_config, tiny_model
from peft import get_peft_model
from torch import nn
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertLMHeadModel,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    T5Config,
    T5ForConditionalGeneration,
    XLMConfig,
    XLMWithLMHeadModel,
)

from peft_softmix import SoftMixtureConfig, UnsupportedArchitectureError
from peft_softmix.architectures import check_supported, model_kind

SMALL = {"vocab_size": 64}
GPT2_SMALL = {**SMALL, "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32}
BERT_SMALL = {**SMALL, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}


@pytest.fixture(scope="module")
def bpe_with_mask(tmp_path_factory) -> str:
    return bpe_tokenizer(tmp_path_factory.mktemp("bpe"))


def test_a_causal_lm_with_a_mask_token_is_served_by_the_causal_path_not_trained_at_the_mask(bpe_with_mask):
    tokenizer = AutoTokenizer.from_pretrained(bpe_with_mask)
    assert tokenizer.mask_token == "<mask>"  # the trap of the issue: the template tokenises fine
    base = GPT2LMHeadModel(GPT2Config(**{**GPT2_SMALL, "vocab_size": len(tokenizer)}))
    config = SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=bpe_with_mask)
    model = get_peft_model(base, config)
    assert model.processor.causal
    batch = model.encode(["Dante"], ["Florence"])
    assert tokenizer.mask_token_id not in batch["input_ids"][0].tolist()
    # the object's token is read from the position before it, not from a mask
    assert batch["target_ids"][0, 0] == batch["input_ids"][0, batch["target_positions"][0, 0] + 1]


def test_a_masked_lm_and_a_fill_mask_seq2seq_model_are_masked(bpe_with_mask):
    assert model_kind(BertForMaskedLM(BertConfig(**BERT_SMALL))) == "masked"
    tokenizer = AutoTokenizer.from_pretrained(bpe_with_mask)
    # BART's fill-mask class is an AutoModelForMaskedLM (the masked matrix serves it)
    bart = tiny_model(tiny_config("bart", len(tokenizer), **special_token_ids(tokenizer)))
    assert model_kind(bart) == "masked"
    assert check_supported(bart, deep=True) == "masked"


def test_causal_lms_are_causal_including_subclasses_and_encoder_decoders_made_decoders():
    gpt2 = GPT2LMHeadModel(GPT2Config(**GPT2_SMALL))
    assert model_kind(gpt2) == "causal" and check_supported(gpt2, deep=True) == "causal"

    class MyGPT2(GPT2LMHeadModel):  # a user's subclass
        pass

    assert model_kind(MyGPT2(GPT2Config(**GPT2_SMALL))) == "causal"
    assert model_kind(BertLMHeadModel(BertConfig(**BERT_SMALL, is_decoder=True))) == "causal"


@pytest.mark.parametrize(
    "make", [lambda: BertModel(BertConfig(**BERT_SMALL)), lambda: GPT2Model(GPT2Config(**GPT2_SMALL))]
)
def test_a_model_without_an_lm_head_gets_a_clear_error(make):
    base = make()
    with pytest.raises(UnsupportedArchitectureError, match="has no language-model head") as caught:
        check_supported(base, deep=False)
    assert type(base).__name__ in str(caught.value) and "AutoModelForCausalLM" in str(caught.value)


def test_an_encoder_decoder_model_is_refused_with_the_reason():
    config = T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0)
    with pytest.raises(UnsupportedArchitectureError, match="is an encoder-decoder model") as caught:
        model_kind(T5ForConditionalGeneration(config))
    assert "T5ForConditionalGeneration" in str(caught.value) and "sentinel" in str(caught.value)


def test_an_encoders_causal_lm_class_that_attends_both_ways_is_refused():
    base = BertLMHeadModel(BertConfig(**BERT_SMALL, is_decoder=False))
    with pytest.raises(UnsupportedArchitectureError, match="is_decoder=True"):
        model_kind(base)
    # the reason is real: with is_decoder=False a later token changes an earlier position's logits
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])
    with torch.no_grad():
        logits = base.eval()(input_ids=ids).logits
    assert not torch.allclose(logits[0, :-1], logits[1, :-1])


def test_xlm_is_causal_when_its_config_says_so():
    small = {**SMALL, "emb_dim": 16, "n_layers": 1, "n_heads": 2}
    assert model_kind(XLMWithLMHeadModel(XLMConfig(**small))) == "masked"
    assert model_kind(XLMWithLMHeadModel(XLMConfig(**small, causal=True))) == "causal"


class Wrapped(nn.Module):
    """A class transformers does not list: its kind comes from its head, its config and a probe forward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.inner.get_output_embeddings()

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_an_unlisted_class_is_told_apart_by_a_probe_forward():
    gpt2 = Wrapped(GPT2LMHeadModel(GPT2Config(**GPT2_SMALL)))
    bert = Wrapped(BertForMaskedLM(BertConfig(**BERT_SMALL)))
    gpt2.train()
    assert model_kind(gpt2) == "causal" and gpt2.training  # the probe leaves the training mode as it was
    assert model_kind(bert) == "masked"
    with pytest.raises(UnsupportedArchitectureError, match="has no language-model head"):
        model_kind(Wrapped(BertModel(BertConfig(**BERT_SMALL))))
