"""Objects of any length (#17): n masks for n tokens, scores by hand, the mixture, candidates ranked by length."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_softmix import SoftMixtureConfig
from peft_softmix.errors import DataFormatError, QueryTooLongError
from peft_softmix.objects import object_tokens, read_candidates

TEMPLATES = ["[X] was born in [Y] .", "[X] is a citizen of [Y] ."]


@pytest.fixture(params=[False, True], ids=["shallow", "deep"])
def peft_model(request, base, tiny_dir):
    config = SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=str(tiny_dir), deep=request.param)
    model = get_peft_model(base, config)
    with torch.no_grad():  # weights away from uniform, so that the mixture is not trivially a mean
        model.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.7, -0.4]))
    return model.eval()


def hand_log_prob(base, tokenizer, template: str, subject: str, obj: str) -> float:
    """log p(obj) under the frozen model: the template filled with as many masks as obj has tokens, the gold token's
    log-probability at each mask, summed."""
    pieces = tokenizer.tokenize(" " + obj)
    text = template.replace("[X]", subject).replace("[Y]", " ".join([tokenizer.mask_token] * len(pieces)))
    enc = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        log_probs = base(**enc).logits.log_softmax(-1)[0]
    masks = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().squeeze(1).tolist()
    assert len(masks) == len(pieces)
    ids = tokenizer.convert_tokens_to_ids(pieces)
    return sum(float(log_probs[position, token]) for position, token in zip(masks, ids))


def test_two_token_object_is_the_product_of_its_mask_probabilities(peft_model, tokenizer, tiny_dir):
    # an adapter at its start (soft words = the template's embeddings) is the frozen model on the hard templates
    assert object_tokens(tokenizer, "India") == tuple(tokenizer.convert_tokens_to_ids(["Ind", "##ia"]))
    batch = peft_model.encode(["Dante", "Ali"], ["India", "Paris"], multi_token=True)
    assert batch["labels"].shape == (2, 2) and batch["target_positions"].shape == (4, 2)
    out = peft_model(**batch)
    base = peft_model.get_base_model()
    expected_rows = [
        hand_log_prob(base, tokenizer, template, subject, obj)
        for subject, obj in (("Dante", "India"), ("Ali", "Paris"))
        for template in TEMPLATES
    ]
    assert out.template_object_log_probs.tolist() == pytest.approx(expected_rows, abs=1e-4)
    weights = peft_model.mixture_weights()
    for b in range(2):
        mixture = math.log(sum(w * math.exp(expected_rows[2 * b + k]) for k, w in enumerate(weights)))
        assert float(out.object_log_probs[b].detach()) == pytest.approx(mixture, abs=1e-4)
    assert float(out.loss) == pytest.approx(-float(out.object_log_probs.mean()), abs=1e-6)


def test_single_token_objects_give_the_single_token_setting(peft_model):
    subjects, objects = ["Dante", "Ali", "Bo"], ["Paris", "Rome", "Italy"]
    single = peft_model.encode(subjects, objects)
    multi = peft_model.encode(subjects, objects, multi_token=True)
    for key in ("input_ids", "attention_mask", "roles", "mask_positions", "fact_index"):
        assert torch.equal(single[key], multi[key]), key
    assert torch.equal(multi["labels"][:, 0], single["labels"])
    a, b = peft_model(**single), peft_model(**multi)
    assert float(b.loss) == pytest.approx(float(a.loss), abs=1e-6)
    gold = a.log_probs.gather(1, single["labels"][:, None]).squeeze(1)
    assert torch.allclose(b.object_log_probs, gold, atol=1e-6)


def test_multi_token_training_moves_the_soft_words(peft_model):
    batch = peft_model.encode(["Dante", "Ali"], ["India", "Indias"], multi_token=True)
    peft_model.train()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = peft_model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        assert peft_model.prompt_encoder["default"].soft_words.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def count_forwards(model):
    calls = []
    handle = model.get_base_model().register_forward_pre_hook(lambda *args: calls.append(1))
    return calls, handle


def test_candidates_are_scored_one_forward_per_length(peft_model):
    candidates = ["India", "Paris", "Rome", "Indias", "Milan", "France", "Italy"]  # lengths 2, 1, 1, 3, 1, 1, 1
    subjects = ["Dante", "Ali", "Bo"]
    calls, handle = count_forwards(peft_model)
    try:
        scores = peft_model.score_candidates(subjects, candidates)
    finally:
        handle.remove()
    assert len(calls) == 3  # lengths 1, 2, 3: never one pass per candidate
    assert scores.log_probs.shape == (3, 7)
    # each column equals the candidate's score as the gold object of an encode(multi_token=True) batch
    for c, candidate in enumerate(candidates):
        out = peft_model(**peft_model.encode(subjects, [candidate] * 3, multi_token=True))
        assert torch.allclose(scores.log_probs[:, c], out.object_log_probs, atol=1e-5)
    lengths = torch.tensor([2, 1, 1, 3, 1, 1, 1])
    assert torch.allclose(scores.scores(length_normalized=True), scores.log_probs / lengths)


def test_mixed_adapters_score_like_each_alone(peft_model, tiny_dir):
    peft_model.add_adapter(
        "other", SoftMixtureConfig(templates=["[Y] is where [X] works ."], tokenizer_name_or_path=str(tiny_dir))
    )
    subjects, objects, names = ["Dante", "Ali"], ["India", "Paris"], ["default", "other"]
    batch = peft_model.encode(subjects, objects, adapter_names=names, multi_token=True)
    mixed = peft_model(**batch, adapter_names=names)
    for b, name in enumerate(names):
        peft_model.set_adapter(name)
        alone = peft_model(**peft_model.encode([subjects[b]], [objects[b]], multi_token=True))
        assert float(mixed.object_log_probs[b]) == pytest.approx(float(alone.object_log_probs[0]), abs=1e-5)


def test_bad_objects_and_candidates_get_clear_errors(peft_model, tmp_path):
    with pytest.raises(ValueError, match="empty"):
        peft_model.encode(["Dante"], [" "], multi_token=True)
    long_object = " ".join(["Paris"] * 70)
    with pytest.raises(QueryTooLongError, match="at most 64"):
        peft_model.encode(["Dante"], [long_object], multi_token=True)
    with pytest.raises(DataFormatError, match="candidate 2"):
        peft_model.score_candidates(["Dante"], ["Paris", "Zzyzx"])  # unknown to the tokenizer
    path = tmp_path / "candidates.txt"
    path.write_text("Paris\n\nRome\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2"):
        read_candidates(path)
    path.write_text("Paris\nRome\nParis\n", encoding="utf-8")
    assert read_candidates(path) == ["Paris", "Rome"]
    with pytest.raises(ValueError, match="candidate_mask"):
        batch = peft_model.encode(["Dante"], ["India"], multi_token=True)
        peft_model(**batch, candidate_mask=torch.ones(peft_model._vocab_size, dtype=torch.bool))
