"""`SoftMixtureProcessor`: the per-adapter query encoder, its bounded caches, and the model's public levers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import get_peft_model

import peft_softmix.processing as processing
from peft_softmix import PeftModelForSoftMixture, SoftMixtureConfig, SoftMixtureProcessor
from peft_softmix.architectures import ProbeResult
from peft_softmix.processing import BoundedCache

TEMPLATES = ["[X] was born in [Y] .", "[Y] is the city of [X] ."]
SUBJECTS = ["Dante", "Ali", "Bo", "Cy", "Ed", "Flo", "Paris Rome", "Indias"]
OBJECTS = ["Florence", "Rome", "Paris", "Berlin", "Madrid", "Oslo", "Lisbon", "Vienna"]


def make(base, templates=TEMPLATES, **kwargs) -> PeftModelForSoftMixture:
    return get_peft_model(base, SoftMixtureConfig(templates=templates, **kwargs))


def test_bounded_cache_drops_the_least_recently_used():
    cache: BoundedCache[str, int] = BoundedCache(2)
    cache["a"], cache["b"] = 1, 2
    assert cache["a"] == 1  # "a" is now the most recent
    cache["c"] = 3
    assert len(cache) == 2 and "b" not in cache and cache.get("a") == 1 and cache.get("c") == 3
    with pytest.raises(ValueError, match="at least 1"):
        BoundedCache(0)


def test_processor_caches_stay_bounded_and_evicted_queries_come_back_identical(tokenizer, monkeypatch):
    calls = []
    real = processing.encode_queries

    def counting(tok, queries):
        calls.extend(subject for _, subject in queries)
        return real(tok, queries)

    monkeypatch.setattr(processing, "encode_queries", counting)
    small = SoftMixtureProcessor(tokenizer, TEMPLATES, cache_size=3)
    first = small.encode(SUBJECTS[:2], OBJECTS[:2])
    for start in range(0, len(SUBJECTS), 2):
        small.encode(SUBJECTS[start : start + 2], OBJECTS[start : start + 2])
        info = small.cache_info()
        assert info["queries"] <= 3 and info["objects"] <= 3 and info["max_size"] == 3
    calls.clear()
    again = small.encode(SUBJECTS[:2], OBJECTS[:2])
    assert calls  # the first batch's queries had been dropped and were tokenised again ...
    for name, tensor in first.items():  # ... into exactly the same batch
        assert torch.equal(again[name], tensor), name
    assert "encoded_for" not in first  # a processor of no named adapter
    roomy = SoftMixtureProcessor(tokenizer, TEMPLATES)
    assert roomy.cache_size == processing.DEFAULT_CACHE_SIZE
    for name, tensor in roomy.encode(SUBJECTS[:2], OBJECTS[:2]).items():
        assert torch.equal(again[name], tensor), name


def test_model_delegates_to_the_active_adapters_processor(base):
    pm = make(base)
    tokenizer_path = pm.tokenizer.name_or_path
    pm.add_adapter(
        "other", SoftMixtureConfig(templates=["the capital of [X] is [Y]"], tokenizer_name_or_path=tokenizer_path)
    )
    assert isinstance(pm.processor, SoftMixtureProcessor) and pm.processor is pm.get_processor("default")
    assert pm.get_processor("other").templates == ["the capital of [X] is [Y]"]
    assert pm.tokenizer is pm.processor.tokenizer
    assert pm.max_query_length == pm.processor.max_query_length == 64
    batch = pm.encode(SUBJECTS, OBJECTS)
    assert batch["encoded_for"] == ("default",) * len(SUBJECTS)
    for name, value in pm.processor(SUBJECTS, OBJECTS).items():
        assert torch.equal(batch[name], value) if isinstance(value, torch.Tensor) else batch[name] == value, name
    assert pm.query_lengths(SUBJECTS) == pm.processor.query_lengths(SUBJECTS)
    assert pm.object_ids(OBJECTS) == pm.processor.object_ids(OBJECTS)
    pm.set_adapter("other")
    assert pm.processor is pm.get_processor("other")
    other = pm.encode(SUBJECTS)
    # K = 1: the other adapter's templates, one row per fact
    assert other["input_ids"].shape[0] == len(SUBJECTS) and other["fact_index"].tolist() == list(range(len(SUBJECTS)))


def test_public_levers_report_the_layers_and_the_head(base):
    shallow = make(base)
    assert shallow.transformer_layers == [] and shallow.mask_only_head is True
    batch = shallow.encode(SUBJECTS, OBJECTS)
    with torch.no_grad():
        gathered = shallow(**batch)
        shallow.mask_only_head = False  # the full head: same answers, only slower
        full = shallow(**batch)
    assert shallow.mask_only_head is False
    torch.testing.assert_close(full.log_probs, gathered.log_probs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full.loss, gathered.loss, atol=1e-5, rtol=1e-5)
    shallow.mask_only_head = True
    assert shallow.mask_only_head is True
    shallow._gather_exact = False  # as for an architecture whose probe found the mask-only head inexact
    with pytest.raises(ValueError, match="not exact"):
        shallow.mask_only_head = True

    deep = make(type(base)(base.config), deep=True)
    layers = deep.transformer_layers
    assert layers == list(deep.base_model.bert.encoder.layer) and len(layers) == 2
    layers.clear()  # a copy: the model's own list is untouched
    assert len(deep.transformer_layers) == 2


def test_probe_is_typed(base):
    pm = make(base, deep=True)
    layout = pm.processor.layouts[0]
    probe = pm._probe(pm.base_model, pm.tokenizer, layout, want_layers=True)
    assert isinstance(probe, ProbeResult) and dataclasses.is_dataclass(probe)
    assert probe.depth == 2 and probe.hidden_size == 32 and probe.gather_ok is True
    assert pm._probe(pm.base_model, pm.tokenizer, layout, want_layers=False).layers is None
