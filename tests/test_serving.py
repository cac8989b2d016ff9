"""Serving conventions: mixed-adapter batches, readable answers, the fact-query pipeline, no silent drops, and the
PEFT/transformers forward conventions (loss None without labels, adapters off or deleted, unknown kwargs)."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model
from transformers import pipeline

from peft_softmix import DroppedObjectsWarning, FactQueryPipeline, PeftModelForSoftMixture, SoftMixtureConfig

# different K and template lengths per adapter
ADAPTERS = {
    "born": ["[X] was born in [Y] .", "[Y] is the city of [X] ."],
    "capital": ["the capital of [X] is [Y]", "[X] , from [Y] , of the city", "[X] is in [Y] ."],
    "one": ["[X] speaks [Y] ."],
}
SUBJECTS = ["Dante", "Indias", "Ali-Bo", "Paris Rome", "Ed", "Flo"]
NAMES = ["capital", "born", "one", "born", "capital", "one"]


def build(base, deep_for: tuple[str, ...] = ()) -> PeftModelForSoftMixture:
    model = None
    for i, (name, templates) in enumerate(ADAPTERS.items()):
        config = SoftMixtureConfig(
            templates=templates, template_weights=[float(k + 1) for k in range(len(templates))], deep=name in deep_for
        )
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        encoder = model.prompt_encoder[name]
        with torch.no_grad():  # away from the hard prompts, so that each adapter's own soft words matter
            encoder.soft_words.add_(torch.randn(encoder.soft_words.shape, generator=torch.Generator().manual_seed(i)))
            if encoder.deep_offsets is not None:
                encoder.deep_offsets.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("deep_for", [(), ("capital",)], ids=["shallow", "one-deep"])
def test_a_mixed_batch_equals_each_adapter_alone_in_one_forward_pass(base, deep_for):
    model = build(base, deep_for)
    objects = ["Paris", "Rome", "Indias", "Berlin", "Oslo", "French"]
    batch = model.encode(SUBJECTS, objects, adapter_names=NAMES)
    assert batch["encoded_for"] == tuple(NAMES)
    sizes = [len(ADAPTERS[n]) for n in NAMES]
    assert batch["fact_index"].tolist() == [b for b, k in enumerate(sizes) for _ in range(k)]
    calls = []
    handle = model.base_model.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        mixed = model(**batch, adapter_names=NAMES, return_template_log_probs=True)
    handle.remove()
    assert len(calls) == 1  # one forward pass of the frozen model for the whole batch
    row = 0
    for b, (subject, name) in enumerate(zip(SUBJECTS, NAMES)):
        model.set_adapter(name)
        with torch.no_grad():
            alone = model(**model.encode([subject]), return_template_log_probs=True)
        torch.testing.assert_close(mixed.log_probs[b], alone.log_probs[0], atol=1e-5, rtol=0)
        K = sizes[b]
        per_template = mixed.template_log_probs[row : row + K]
        torch.testing.assert_close(per_template, alone.template_log_probs, atol=1e-5, rtol=0)
        torch.testing.assert_close(mixed.log_weights[row : row + K], model.prompt_encoder[name].log_weights())
        row += K
    # the loss is the mean over the labelled facts ("Indias" is not one token) of each fact's own mixture
    labels = batch["labels"]
    keep = labels != -100
    gold = mixed.log_probs[keep].gather(1, labels[keep, None]).squeeze(1)
    torch.testing.assert_close(mixed.loss, -gold.mean(), atol=1e-5, rtol=0)


def test_a_mixed_batch_trains_every_adapter_in_it(base):
    model = build(base, ("capital",))
    model.train()
    for name in ADAPTERS:
        model.set_requires_grad(name, True)
    batch = model.encode(SUBJECTS[:4], ["Paris", "Rome", "Oslo", "Berlin"], adapter_names=NAMES[:4])
    model(**batch, adapter_names=NAMES[:4]).loss.backward()
    for name in ("born", "capital", "one"):
        encoder = model.prompt_encoder[name]
        assert encoder.soft_words.grad is not None and encoder.soft_words.grad.abs().sum() > 0, name
    assert model.prompt_encoder["capital"].deep_offsets.grad.abs().sum() > 0


def test_a_batch_runs_only_through_the_adapters_it_was_encoded_for(base):
    model = build(base)
    batch = model.encode(SUBJECTS, adapter_names=NAMES)
    with pytest.raises(ValueError, match=r"Fact 0 .* encoded for adapter 'capital' but would run through 'born'"):
        model(**batch)  # the active adapter ("born") for every fact
    swapped = ["born", *NAMES[1:]]
    with pytest.raises(ValueError, match="encoded for adapter 'capital'"):
        model(**batch, adapter_names=swapped)
    with pytest.raises(ValueError, match=r"Unknown adapter\(s\) \['nope'\]"):
        model.encode(["Dante"], adapter_names=["nope"])
    with pytest.raises(ValueError, match="1 name"):
        model.encode(["Dante", "Ed"], adapter_names=["born"])
    with pytest.raises(TypeError, match="list of adapter names"):
        model.encode(["Dante"], adapter_names="born")


def test_forward_refuses_unknown_keywords_and_follows_transformers_conventions(base):
    model = build(base)
    batch = model.encode(["Dante", "Ed"])
    with pytest.raises(TypeError, match=r"'return_template_probs' \(did you mean 'return_template_log_probs'\?\)"):
        model(**batch, return_template_probs=True)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(**batch, output_attentions=True)
    with torch.no_grad():
        out = model(**batch, output_attentions=False, output_hidden_states=None, num_items_in_batch=7)
        as_tuple = model(**batch, return_dict=False)
    # no labels: loss is None, so [0] is the first real output (transformers' convention)
    assert out.loss is None and isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.log_probs)
    with pytest.raises(ValueError, match=r"\[N, T\] batches"):
        model(**{**batch, "input_ids": batch["input_ids"][None]})


def test_the_base_model_takes_a_batch_and_adapters_off_or_deleted_answer_with_the_hard_templates(base, tiny_dir):
    model = build(base)
    batch = model.encode(SUBJECTS, adapter_names=NAMES)
    with torch.no_grad():
        logits = model.get_base_model()(**batch).logits  # the rows are the filled hard templates
        rows = torch.arange(len(logits))
        hard = torch.log_softmax(logits[rows, batch["mask_positions"]], -1)
        with model.disable_adapter():
            off = model(**batch, return_template_log_probs=True)
    torch.testing.assert_close(off.template_log_probs, hard, atol=1e-5, rtol=0)
    row = 0
    for b, name in enumerate(NAMES):
        K = len(ADAPTERS[name])
        expected = torch.logsumexp(hard[row : row + K], 0) - torch.log(torch.tensor(float(K)))
        torch.testing.assert_close(off.log_probs[b], expected, atol=1e-5, rtol=0)
        row += K
    for name in ADAPTERS:
        model.get_processor(name)
        model.delete_adapter(name)
        with pytest.raises(KeyError):  # its query encoder (tokenizer, caches) went with it
            model.get_processor(name)
    assert model.active_adapters == []
    with torch.no_grad():
        gone = model(**batch)
    torch.testing.assert_close(gone.log_probs, off.log_probs, atol=0, rtol=0)
    assert gone.loss is None


def test_query_answers_are_readable_and_mixed_queries_match_single_ones(base, tokenizer):
    model = build(base)
    mixed = model.query(SUBJECTS, top_k=3, adapter_names=NAMES, batch_size=4, return_template_probs=True)
    for subject, name, answer in zip(SUBJECTS, NAMES, mixed):
        model.set_adapter(name)
        alone = model.query([subject], top_k=3, return_template_probs=True)[0]
        assert answer["subject"] == subject and answer["adapter"] == name
        assert [p["token"] for p in answer["predictions"]] == [p["token"] for p in alone["predictions"]]
        assert [p["score"] for p in answer["predictions"]] == pytest.approx(
            [p["score"] for p in alone["predictions"]], abs=1e-6
        )
        for p in answer["predictions"]:
            assert set(p) == {"score", "token", "token_str", "template_shares"}
            assert len(p["template_shares"]) == len(ADAPTERS[name])
            assert sum(p["template_shares"]) == pytest.approx(1, abs=1e-5)
            assert not p["token_str"].startswith("##") and p["token_str"] == p["token_str"].strip()
        assert [t["template"] for t in answer["templates"]] == ADAPTERS[name]
        assert set(answer["templates"][0]["predictions"][0]) == {"score", "token", "token_str"}
    # a word piece reads as its text
    piece = tokenizer.convert_tokens_to_ids("##ia")
    from peft_softmix.answers import token_strings

    assert token_strings(tokenizer, [piece]) == ["ia"]
    with pytest.raises(ValueError, match="one adapter name per subject"):
        model.query(["Dante"], adapter_names=["born", "one"])


def test_the_fact_query_pipeline(base, tokenizer):
    model = build(base)
    ask = pipeline("fact-query", model=model, tokenizer=tokenizer)
    assert isinstance(ask, FactQueryPipeline)
    one = ask("Dante", top_k=2, adapter_names="capital")
    model.set_adapter("capital")
    assert one == model.query(["Dante"], top_k=2)[0]
    several = ask(["Dante", "Ed"], adapter_names=["born", "one"], top_k=1)
    assert [a["adapter"] for a in several] == ["born", "one"]
    restricted = ask("Dante", candidates=["Rome", "Paris", "Zzz"], top_k=5)
    assert {p["token_str"] for p in restricted["predictions"]} == {"Rome", "Paris"}  # no zero-probability fillers
    with pytest.raises(TypeError, match="unknown argument"):
        ask("Dante", topk=3)


def test_no_silent_drops(base):
    model = build(base)
    model.set_adapter("born")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = model.encode(["Dante", "Ed", "Flo"], ["Paris", "Indias", "Nowhere"])
        model.encode(["Dante", "Ed"], ["Paris", "Indias"])  # already reported: said once
    dropped = [w for w in caught if issubclass(w.category, DroppedObjectsWarning)]
    assert len(dropped) == 1
    assert "2 object(s)" in str(dropped[0].message) and "'Indias'" in str(dropped[0].message)
    assert dropped[0].filename == __file__  # points at the caller
    assert batch["labels"].tolist()[1:] == [-100, -100]
    with pytest.raises(ValueError, match="'Indias'"):
        model.encode(["Dante", "Ed"], ["Paris", "Indias"], strict=True)
    with pytest.raises(ValueError, match="no usable label"):
        model.encode(["Ed"], ["Indias"])
    for subject in ("Dante [MASK]", "[CLS] Ed", "Ed [SEP]"):
        with pytest.raises(ValueError, match="contains the special token"):
            model.encode([subject])
        with pytest.raises(ValueError, match="contains the special token"):
            model.query([subject])
