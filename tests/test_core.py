"""The adapter's forward pass, training and querying against hand computations on the bare model."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForMaskedLM

from peft_softmix import PeftModelForSoftMixture, SoftMixtureConfig, TemplateError
from peft_softmix.peft_model import IGNORE_INDEX

TEMPLATES = [
    "[X] was born in [Y] .",
    "[Y] is the city of [X] .",  # object before subject
    "the capital of [X] is [Y]",  # words before the first slot, none after the last
    "[X] , from [Y] , of the city",  # several stretches, repeated words
]
# one-token, multi-token and punctuated subjects
SUBJECTS = ["Dante", "Indias", "Paris Rome", "Ali-Bo"]
FACTS = [("Dante", "Florence"), ("Ali", "Rome"), ("Bo", "Paris"), ("Cy", "Berlin"), ("Ed", "Madrid")]


def make(base, templates=TEMPLATES, **kwargs) -> PeftModelForSoftMixture:
    return get_peft_model(base, SoftMixtureConfig(templates=templates, **kwargs))


@torch.no_grad()
def hard_log_probs(model, tokenizer, template: str, subject: str) -> torch.Tensor:
    """log p(. | filled template) from the bare model, tokenised the plain way."""
    text = template.replace("[X]", subject).replace("[Y]", tokenizer.mask_token)
    enc = tokenizer(text, return_tensors="pt")
    (position,) = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0]
    return torch.log_softmax(model(**enc).logits[0, position].float(), dim=-1)


@pytest.fixture
def bare(tiny_dir):
    """A second copy of the base that is never wrapped: the reference."""
    return AutoModelForMaskedLM.from_pretrained(str(tiny_dir)).eval()


@pytest.mark.parametrize("deep", [False, True, 1], ids=["shallow", "deep-all", "deep-1"])
def test_template_init_is_the_hard_prompt(base, bare, tokenizer, deep):
    pm = make(base, deep=deep).eval()
    if deep:
        assert pm.prompt_encoder["default"].deep_offsets is not None
        assert pm.peft_config["default"].num_deep_layers == (2 if deep is True else 1)
    with torch.no_grad():
        out = pm(**pm.encode(SUBJECTS), return_template_log_probs=True)
    # one row per (fact, template), a fact's rows together
    assert out.template_log_probs.shape == (len(SUBJECTS) * len(TEMPLATES), len(tokenizer))
    per = out.template_log_probs.view(len(SUBJECTS), len(TEMPLATES), -1)
    for b, subject in enumerate(SUBJECTS):
        for k, template in enumerate(TEMPLATES):
            expected = hard_log_probs(bare, tokenizer, template, subject)
            torch.testing.assert_close(per[b, k], expected, atol=1e-5, rtol=0)
    # the templates really disagree, so the per-template check above is not vacuous
    assert (per[0, 0] - per[0, 1]).abs().max() > 1e-2


def test_soft_words_sit_on_template_words(base, tokenizer):
    pm = make(base)
    batch = pm.encode(["Dante"])
    encoder = pm.prompt_encoder["default"]
    seen: list[int] = []
    for k, template in enumerate(TEMPLATES):
        ids, roles = batch["input_ids"][k], batch["roles"][k]
        words = ids[roles >= 0]
        # roles number the template words as rows of soft_words: each starts at the embedding of the token it replaces
        torch.testing.assert_close(encoder.soft_words[roles[roles >= 0]], pm.word_embeddings.weight[words])
        assert tokenizer.decode(ids[roles == -2]) == "Dante"
        assert ids[batch["mask_positions"][k]] == tokenizer.mask_token_id
        n_words = len(tokenizer.tokenize(template.replace("[X]", "").replace("[Y]", "")))
        assert int((roles >= 0).sum()) == n_words
        seen += roles[roles >= 0].tolist()
    # template after template, every soft word exactly once
    assert seen == list(range(encoder.soft_words.shape[0]))


def test_mixture_is_logsumexp_of_weighted_templates(base, bare, tokenizer):
    weights = [1.0, 2.0, 5.0, 0.5]
    pm = make(base, template_weights=weights).eval()
    subjects, objects = ["Dante", "Indias", "Ali"], ["Florence", "Paris", "Rome"]
    batch = pm.encode(subjects, objects)
    with torch.no_grad():
        out = pm(**batch)
    log_pi = torch.log(torch.tensor(weights) / sum(weights))
    torch.testing.assert_close(out.log_weights, log_pi.repeat(len(subjects)))  # each row's weight
    gold = []
    for b, subject in enumerate(subjects):
        per_template = torch.stack([hard_log_probs(bare, tokenizer, t, subject) for t in TEMPLATES])
        expected = torch.logsumexp(log_pi[:, None] + per_template, dim=0)
        torch.testing.assert_close(out.log_probs[b], expected, atol=1e-5, rtol=0)
        # the weights matter: the uniform mixture is measurably different
        uniform = torch.logsumexp(per_template, dim=0) - math.log(len(TEMPLATES))
        assert (uniform - expected).abs().max() > 1e-3
        gold.append(expected[tokenizer.convert_tokens_to_ids(objects[b])])
    torch.testing.assert_close(out.loss, -torch.stack(gold).mean(), atol=1e-5, rtol=0)
    assert out.log_probs.exp().sum(-1).sub(1).abs().max() < 1e-4


def test_candidate_mask_renormalises_each_template(base, bare, tokenizer):
    pm = make(base, templates=TEMPLATES[:2], template_weights=[3.0, 1.0]).eval()
    candidates = torch.zeros(len(tokenizer), dtype=torch.bool)
    candidates[tokenizer.convert_tokens_to_ids(["Paris", "Rome", "Florence", "Berlin"])] = True
    with torch.no_grad():
        out = pm(**pm.encode(["Dante"]), candidate_mask=candidates)
    per_template = []
    for template in TEMPLATES[:2]:
        full = hard_log_probs(bare, tokenizer, template, "Dante")
        per_template.append(torch.log_softmax(full.masked_fill(~candidates, float("-inf")), -1))
    expected = torch.logsumexp(torch.log(torch.tensor([0.75, 0.25]))[:, None] + torch.stack(per_template), 0)
    assert torch.isneginf(out.log_probs[0, ~candidates]).all()
    torch.testing.assert_close(out.log_probs[0, candidates], expected[candidates], atol=1e-5, rtol=0)


def train(pm, steps: int = 8, lr: float = 0.05) -> tuple[float, float]:
    """A few Adam steps on FACTS; the loss before and after."""
    batch = pm.encode(*zip(*FACTS))
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    pm.eval()
    with torch.no_grad():
        losses = [pm(**batch).loss.item()]
    pm.train()
    for _ in range(steps):
        loss = pm(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    pm.eval()
    with torch.no_grad():
        losses.append(pm(**batch).loss.item())
    return losses[0], losses[1]


def adapter_tensors(pm, name="default") -> dict[str, torch.Tensor]:
    encoder = pm.prompt_encoder[name]
    tensors = {"soft_words": encoder.soft_words, "mixture_logits": encoder.mixture_logits}
    if encoder.deep_offsets is not None:
        tensors["deep_offsets"] = encoder.deep_offsets
    return {k: v.detach().clone() for k, v in tensors.items()}


def test_training_moves_only_the_adapter(base):
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    pm = make(base, deep=True)
    trainable = {name for name, p in pm.named_parameters() if p.requires_grad}
    assert trainable == {
        "prompt_encoder.default.soft_words",
        "prompt_encoder.default.deep_offsets",
        "prompt_encoder.default.mixture_logits",
    }
    start = adapter_tensors(pm)
    assert not start["deep_offsets"].any()
    losses = train(pm)
    assert losses[1] < losses[0] - 0.1, losses
    end = adapter_tensors(pm)
    for name in ("soft_words", "deep_offsets", "mixture_logits"):
        assert not torch.equal(start[name], end[name]), f"{name} did not move"
    state = base.state_dict()
    assert state.keys() == frozen.keys()
    assert all(torch.equal(frozen[k], state[k]) for k in frozen), "a base weight changed"


def test_train_prompts_false_moves_only_weights(base):
    pm = make(base, deep=True, train_prompts=False)
    start = adapter_tensors(pm)
    losses = train(pm)
    end = adapter_tensors(pm)
    assert torch.equal(start["soft_words"], end["soft_words"])
    assert torch.equal(start["deep_offsets"], end["deep_offsets"])
    assert not torch.equal(start["mixture_logits"], end["mixture_logits"])
    assert losses[1] < losses[0], losses


def test_train_weights_false_keeps_the_uniform_mixture(base):
    pm = make(base, train_weights=False)
    start = adapter_tensors(pm)
    train(pm)
    end = adapter_tensors(pm)
    assert not torch.equal(start["soft_words"], end["soft_words"])
    assert torch.equal(start["mixture_logits"], end["mixture_logits"])
    assert pm.mixture_weights() == pytest.approx([1 / len(TEMPLATES)] * len(TEMPLATES), abs=1e-7)


def test_random_init_is_reproducible_and_not_the_template(base, tiny_dir):
    pm = make(base, init="random", seed=3)
    other = make(AutoModelForMaskedLM.from_pretrained(str(tiny_dir)), init="random", seed=3)
    words = pm.prompt_encoder["default"].soft_words
    torch.testing.assert_close(words, other.prompt_encoder["default"].soft_words)
    ids = torch.tensor(pm.peft_config["default"].template_token_ids[0][1])
    assert not torch.allclose(words[: len(ids)], pm.word_embeddings.weight[ids])


def test_disable_adapter_is_the_uniform_hard_mixture(base, bare, tokenizer):
    pm = make(base, deep=True, template_weights=[4.0, 1.0, 1.0, 1.0])
    train(pm, steps=3, lr=0.2)
    batch = pm.encode(["Dante", "Indias"])
    with torch.no_grad():
        adapted = pm(**batch).log_probs
        with pm.disable_adapter():
            hard = pm(**batch)
        after = pm(**batch).log_probs
    torch.testing.assert_close(hard.log_weights.exp(), torch.full((2 * len(TEMPLATES),), 1 / len(TEMPLATES)))
    for b, subject in enumerate(["Dante", "Indias"]):
        per_template = torch.stack([hard_log_probs(bare, tokenizer, t, subject) for t in TEMPLATES])
        expected = torch.logsumexp(per_template, 0) - math.log(len(TEMPLATES))
        torch.testing.assert_close(hard.log_probs[b], expected, atol=1e-5, rtol=0)
    assert (adapted - hard.log_probs).abs().max() > 1e-3  # the trained adapter differs from the hard prompts
    torch.testing.assert_close(after, adapted, atol=0, rtol=0)  # and is back afterwards
    with pytest.raises(RuntimeError, match="inside"), pm.disable_adapter():
        raise RuntimeError("inside")
    with torch.no_grad():  # as `adapted` was computed (a forward with a gradient mixes in log space: equal to ~1e-7)
        torch.testing.assert_close(pm(**batch).log_probs, adapted, atol=0, rtol=0)


def test_query_top_k_and_per_template(base, tokenizer):
    pm = make(base, template_weights=[1.0, 3.0, 1.0, 1.0])
    results = pm.query(["Dante", "Indias"], top_k=5, return_template_probs=True)
    with torch.no_grad():
        out = pm(**pm.encode(["Dante", "Indias"]), return_template_log_probs=True)
    assert [r["subject"] for r in results] == ["Dante", "Indias"]
    per = out.template_log_probs.view(2, len(TEMPLATES), -1)
    weights = pm.mixture_weights()
    for b, result in enumerate(results):
        assert result["adapter"] == "default"
        ids = [p["token"] for p in result["predictions"]]
        probs = [p["score"] for p in result["predictions"]]
        assert len(ids) == 5 and probs == sorted(probs, reverse=True)
        assert 0 < sum(probs) <= 1 + 1e-6
        expected = out.log_probs[b].exp().topk(5)
        assert ids == expected.indices.tolist()
        assert [p["token_str"] for p in result["predictions"]] == [
            tokenizer.decode([i]).strip().removeprefix("##") for i in ids
        ]
        assert probs == pytest.approx(expected.values.tolist(), abs=1e-6)
        for p in result["predictions"]:
            # each template's share pi_k p_k(y|x) / p(y|x) of the answer
            shares = [weights[k] * float(per[b, k, p["token"]].exp()) / p["score"] for k in range(len(TEMPLATES))]
            assert p["template_shares"] == pytest.approx(shares, abs=1e-5)
            assert sum(p["template_shares"]) == pytest.approx(1, abs=1e-5)
        assert [t["template"] for t in result["templates"]] == TEMPLATES
        assert sum(t["weight"] for t in result["templates"]) == pytest.approx(1)
        assert result["templates"][1]["weight"] == pytest.approx(0.5)
        for k, per_template in enumerate(result["templates"]):
            assert [p["token"] for p in per_template["predictions"]] == per[b, k].topk(5).indices.tolist()
            assert sum(p["score"] for p in per_template["predictions"]) <= 1 + 1e-6
    assert "templates" not in pm.query(["Dante"], top_k=2)[0]
    candidates = tokenizer.convert_tokens_to_ids(["Paris", "Rome", "Florence"])
    restricted = pm.query(["Dante"], top_k=10, candidate_ids=candidates)[0]["predictions"]
    assert {p["token_str"] for p in restricted if p["score"] > 0} == {"Paris", "Rome", "Florence"}
    assert sum(p["score"] for p in restricted) == pytest.approx(1, abs=1e-5)
    # query switches dropout off for itself only
    pm.train()
    pm.query(["Dante"], top_k=1)
    assert pm.training and pm.base_model.training


# -- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("[X] was born in Paris .", r"no \[Y\] slot"),
        ("born in [Y] .", r"no \[X\] slot"),
        ("[X] and [X] in [Y]", r"2 \[X\] slots"),
        ("[X] in [Y] or [Y]", r"2 \[Y\] slots"),
        ("", "empty"),
    ],
)
def test_bad_template_is_named(template, message):
    with pytest.raises(TemplateError, match=message) as info:
        SoftMixtureConfig(templates=["[X] is from [Y] .", template])
    if template:
        assert repr(template) in str(info.value)


def test_template_without_words(base):
    with pytest.raises(TemplateError, match="no words besides"):
        make(base, templates=["[X] [Y]"])


def test_no_templates():
    with pytest.raises(ValueError, match="K=0"):
        SoftMixtureConfig(templates=[])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"template_weights": [1.0]}, "one per template"),
        ({"template_weights": [1.0, 0.0]}, "positive"),
        ({"init": "zeros"}, "'template' or 'random'"),
        ({"deep": -1}, "deep must be"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SoftMixtureConfig(templates=["[X] is from [Y] .", "[X] was born in [Y] ."], **kwargs)


def test_deep_beyond_the_model(base):
    with pytest.raises(ValueError, match="more layers"):
        make(base, deep=5)


def test_multi_token_objects_are_labelled_and_reported(base, tokenizer):
    pm = make(base)
    objects = ["Paris", "Indias", "Nowhere", " Rome", "Rome"]
    batch = pm.encode(["Dante"] * len(objects), objects)
    paris, rome = tokenizer.convert_tokens_to_ids(["Paris", "Rome"])
    assert batch["labels"].tolist() == [paris, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, rome]
    assert pm.object_ids(objects) == [paris, None, None, None, rome]
    with pytest.raises(ValueError, match="'Indias'") as info:
        pm.object_ids(objects, strict=True)
    assert "'Nowhere'" in str(info.value) and "'Paris'" not in str(info.value)
    assert pm.object_ids(["Paris", "Rome"], strict=True) == [paris, rome]
    # a batch whose every object is unknown has no usable label: refused, never a silent loss of 0
    with pytest.raises(ValueError, match="no usable label"):
        pm.encode(["Dante"], ["Indias"])
    batch = pm.encode(["Dante"], ["Paris"])
    batch["labels"][:] = IGNORE_INDEX  # as a hand-made batch could have it
    with pytest.raises(ValueError, match="silent 0"):
        pm(**batch)


@pytest.mark.parametrize("k", [1, len(TEMPLATES)])
def test_unlabelled_facts_change_neither_loss_nor_gradients(base, k):
    pm = make(base, templates=TEMPLATES[:k], template_weights=[float(i + 1) for i in range(k)], deep=2)
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        # away from the start, so that every tensor gets a gradient that the unlabelled rows could disturb
        encoder.deep_offsets.normal_(0, 0.1)

    def loss_and_grads(subjects, objects):
        encoder.zero_grad(set_to_none=True)
        loss = pm(**pm.encode(subjects, objects)).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    labelled, grads = loss_and_grads(["Dante", "Ali"], ["Florence", "Rome"])
    # "Indias" is no single token: its row is left out of the mean and of every gradient
    mixed, mixed_grads = loss_and_grads(["Dante", "Ali", "Dante"], ["Florence", "Rome", "Indias"])
    torch.testing.assert_close(mixed, labelled)
    assert set(mixed_grads) == set(grads) and (k == 1 or "mixture_logits" in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0 or name == "mixture_logits", name
        torch.testing.assert_close(mixed_grads[name], grad, msg=name)
    # with uneven weights the mixture of an unlabelled row is 0 only up to rounding: it must add exactly nothing
    alone, _ = loss_and_grads(["Ali"], ["Rome"])
    with_unlabelled, _ = loss_and_grads(["Indias", "Ali", "Dante"], ["Indias", "Rome", "Indias"])
    torch.testing.assert_close(alone, with_unlabelled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [1, 4])
def test_a_step_without_log_probs_has_the_same_loss_and_gradients(base, k):
    pm = make(base, templates=TEMPLATES[:k], template_weights=[float(i + 1) for i in range(k)], deep=2)
    encoder = pm.prompt_encoder["default"]
    with torch.no_grad():
        encoder.deep_offsets.normal_(0, 0.1)
    batch = pm.encode(["Dante", "Ali", "Dante"], ["Florence", "Rome", "Indias"])

    def step(**kwargs):
        encoder.zero_grad(set_to_none=True)
        out = pm(**batch, **kwargs)
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    full, grads = step(return_template_log_probs=True)
    lean, lean_grads = step(return_log_probs=False, return_template_log_probs=True)
    assert full.log_probs is not None and full.log_probs.shape == (3, full.template_log_probs.shape[-1])
    assert lean.log_probs is None
    # the loss, its gradients and what EM reads (each template's distribution) are those of the full forward
    assert torch.equal(lean.loss, full.loss) and torch.equal(lean.template_log_probs, full.template_log_probs)
    assert set(lean_grads) == set(grads) and (k == 1 or "mixture_logits" in grads)
    for name, grad in grads.items():
        assert torch.equal(lean_grads[name], grad), name


def test_a_batch_of_another_adapters_templates_is_refused(base):
    # the same K, more template words: the K check alone cannot tell the batches apart
    pm = get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES[2:4]), adapter_name="long")
    # no tokenizer_name_or_path: a later adapter finds the from_pretrained base's tokenizer as the first one does
    pm.add_adapter("short", SoftMixtureConfig(templates=["[X] in [Y] .", "[Y] of [X]"]))
    assert pm.peft_config["short"].base_model_name_or_path == pm.peft_config["long"].base_model_name_or_path
    pm.set_adapter("long")
    batch = pm.encode(["Dante", "Ali"], ["Florence", "Rome"])
    assert torch.isfinite(pm(**batch).loss)
    pm.set_adapter("short")
    with pytest.raises(ValueError, match=r"encoded for adapter 'long' but would run through 'short'"):
        pm(**batch)
    # a batch that does not say what it was encoded for is still checked by its shape
    del batch["encoded_for"]
    with pytest.raises(ValueError, match=r"template words, more than"):
        pm(**batch)


def test_template_words_that_tokenise_with_the_subject_keep_their_hard_embeddings(base, bare, tokenizer):
    # "s" glued to the subject comes out as "##s", not the template's own token: that stretch stays hard, so the
    # batch holds fewer soft positions than the adapter has soft words, and the mixture starts at the hard prompt
    template = "[X]s was born in [Y] ."
    pm = make(base, templates=[template, TEMPLATES[0]], deep=True).eval()
    batch = pm.encode(["Dante", "Ali"], ["Florence", "Rome"])
    assert int((batch["roles"] >= 0).sum()) < 2 * pm.prompt_encoder["default"].num_soft_words
    out = pm(**batch, return_template_log_probs=True)
    assert torch.isfinite(out.loss)
    for b, subject in enumerate(["Dante", "Ali"]):
        for k, text in enumerate([template, TEMPLATES[0]]):
            expected = hard_log_probs(bare, tokenizer, text, subject)
            torch.testing.assert_close(out.template_log_probs[2 * b + k], expected, atol=1e-5, rtol=0)


def test_encode_reuses_the_queries_that_query_lengths_tokenised(base, tiny_dir, monkeypatch):
    import peft_softmix.processing as processing_module

    calls = []
    real = processing_module.encode_queries

    def counting(tokenizer, queries):
        calls.extend((layout.template, subject) for layout, subject in queries)
        return real(tokenizer, queries)

    monkeypatch.setattr(processing_module, "encode_queries", counting)
    pm = make(base)
    calls.clear()  # setting the adapter up tokenises a probe query
    lengths = pm.query_lengths(SUBJECTS)
    assert len(calls) == len(SUBJECTS) * len(TEMPLATES)
    batch = pm.encode(SUBJECTS, ["Florence"] * len(SUBJECTS))
    assert len(calls) == len(SUBJECTS) * len(TEMPLATES)  # every query was tokenised once
    assert lengths == batch["attention_mask"].sum(-1).view(len(SUBJECTS), -1).max(-1).values.tolist()
    # and the batch is what a model that never ran query_lengths encodes
    fresh = make(AutoModelForMaskedLM.from_pretrained(str(tiny_dir)))
    for name, value in fresh.encode(SUBJECTS, ["Florence"] * len(SUBJECTS)).items():
        assert torch.equal(batch[name], value) if isinstance(value, torch.Tensor) else batch[name] == value, name
