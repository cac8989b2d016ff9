"""Open answers of any length (#17 item 3): the three decoding strategies by hand, exact scores, the answer format,
query / pipeline / CLI options, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import pipeline
from typer.testing import CliRunner

from peft_softmix import SoftMixtureConfig
from peft_softmix.cli import DEFAULT_STRATEGY as CLI_DEFAULT
from peft_softmix.cli import app
from peft_softmix.decoding import DEFAULT_STRATEGY, decode_answers
from peft_softmix.errors import QueryTooLongError
from peft_softmix.objects import object_tokens
from peft_softmix.ranking import score_candidates

TEMPLATES = ["[X] was born in [Y] .", "[X] is a citizen of [Y] ."]


@pytest.fixture(params=[False, True], ids=["shallow", "deep"])
def peft_model(request, base, tiny_dir):
    # a fresh adapter is the frozen model on the hard templates; weights away from uniform so the mixture matters
    config = SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=str(tiny_dir), deep=request.param)
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.7, -0.4]))
    return model.eval()


def hand_pass(templates, base, tokenizer, subject: str, n: int, filled: dict[int, int]) -> list[torch.Tensor]:
    """Per template: ``[n, V]`` log-probs at the n masks of the frozen model, with masks ``filled`` ({j: id})."""
    out = []
    for template in templates:
        text = template.replace("[X]", subject).replace("[Y]", " ".join([tokenizer.mask_token] * n))
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        masks = (ids[0] == tokenizer.mask_token_id).nonzero().squeeze(1)
        for j, token in filled.items():
            ids[0, masks[j]] = token
        with torch.no_grad():
            out.append(base(input_ids=ids).logits.log_softmax(-1)[0, masks])
    return out


def mix(per_template: list[torch.Tensor], log_weights: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.stack(per_template) + log_weights.view(-1, *[1] * per_template[0].dim()), dim=0)


def hand_decode(peft_model, tokenizer, subject: str, strategy: str, posterior: bool = True) -> tuple[list[int], float]:
    """A two-token answer decoded by hand from the frozen model, and its exact mixture score (``posterior=False``:
    the second token mixed with the prior weights instead, to show that the oracle tells the two apart)."""
    base, templates = peft_model.get_base_model(), peft_model.processor.templates
    log_pi = torch.tensor(peft_model.mixture_weights()).log()
    first = hand_pass(templates, base, tokenizer, subject, 2, {})
    mixed = mix(first, log_pi)  # [2, V] under pi_k
    if strategy == "independent":
        tokens = mixed.argmax(-1).tolist()
    else:
        j = 0 if strategy == "left_to_right" else int(mixed.max(-1).values.argmax())
        y = int(mixed[j].argmax())
        # the templates' posterior given y_j, under the model's score (read at the pass with both masks open)
        weights = log_pi + torch.stack([t[j, y] for t in first]) if posterior else log_pi
        other = 1 - j
        second = mix([t[other] for t in hand_pass(templates, base, tokenizer, subject, 2, {j: y})], weights)
        tokens = [0, 0]
        tokens[j], tokens[other] = y, int(second.argmax())
    exact = torch.logsumexp(log_pi + torch.stack([t[0, tokens[0]] + t[1, tokens[1]] for t in first]), dim=0)
    return tokens, float(exact)


@pytest.mark.parametrize("strategy", ["independent", "left_to_right", "confidence"])
def test_two_token_answers_are_decoded_as_by_hand(peft_model, tokenizer, strategy):
    for subject in ("Dante", "Ali"):
        expected, score = hand_decode(peft_model, tokenizer, subject, strategy)
        [found] = decode_answers(peft_model, [subject, "Bo"][:1], max_tokens=2, strategy=strategy, num_beams=1)
        two = [i for i, t in enumerate(found.tokens) if len(t) == 2]
        assert len(two) == 1 and len(found.tokens) == 2  # one answer per length with a beam of 1
        assert list(found.tokens[two[0]]) == expected
        assert float(found.log_probs[two[0]]) == pytest.approx(score, abs=1e-4)
        K = len(TEMPLATES)
        assert found.template_log_probs.shape == (2, K) and found.log_weights.shape == (K,)


def test_later_tokens_follow_the_templates_posterior(base, tiny_dir, tokenizer):
    # templates that disagree enough that the posterior given the first token picks another second token somewhere
    config = SoftMixtureConfig(
        templates=["[X] was born in [Y] .", "[X] plays at [Y] ."], tokenizer_name_or_path=str(tiny_dir)
    )
    model = get_peft_model(base, config).eval()
    with torch.no_grad():
        model.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.7, -0.4]))
    subjects = ["Dante", "Ali", "Bo", "Cy", "Ed", "Flo", "Paris", "Rome", "Milan", "Italy"]
    found = decode_answers(model, subjects, max_tokens=2, strategy="left_to_right", num_beams=1)
    differ = 0
    for subject, answers in zip(subjects, found):
        expected, _ = hand_decode(model, tokenizer, subject, "left_to_right")
        assert [list(t) for t in answers.tokens if len(t) == 2] == [expected]
        differ += expected != hand_decode(model, tokenizer, subject, "left_to_right", posterior=False)[0]
    assert differ >= 1


def test_the_strategies_differ_somewhere(peft_model, tokenizer):
    # the hand oracles above would pass trivially if the three strategies always agreed on this model
    subjects = ["Dante", "Ali", "Bo", "Cy", "Ed", "Flo"]
    decoded = {
        s: [hand_decode(peft_model, tokenizer, subject, s)[0] for subject in subjects]
        for s in ("independent", "left_to_right", "confidence")
    }
    assert len({json.dumps(v) for v in decoded.values()}) > 1


def test_scores_are_the_models_sequence_scores(peft_model, tokenizer):
    answers = peft_model.query(["Dante", "Ali"], top_k=10, max_tokens=3, strategy="left_to_right")
    checked = 0
    for item in answers:
        for answer in item["predictions"]:
            if object_tokens(tokenizer, answer["token_str"]) != tuple(answer["tokens"]):
                continue  # the text does not read back as these pieces: no candidate string is this answer
            scored = score_candidates(peft_model, [item["subject"]], [answer["token_str"]])
            assert answer["score"] == pytest.approx(float(scored.log_probs[0, 0].exp()), rel=1e-4, abs=1e-9)
            checked += len(answer["tokens"]) > 1
        assert sum(item["predictions"][0]["template_shares"]) == pytest.approx(1.0, abs=1e-5)
    assert checked >= 2  # some multi-token answers were checked


def test_one_token_is_todays_query(peft_model):
    subjects = ["Dante", "Ali", "Flo"]
    today = peft_model.query(subjects, top_k=4)
    assert peft_model.query(subjects, top_k=4, max_tokens=1, strategy="independent") == today
    for strategy in ("independent", "left_to_right", "confidence"):
        decoded = decode_answers(peft_model, subjects, max_tokens=1, strategy=strategy, num_beams=4)
        for item, found in zip(today, decoded):
            assert [t[0] for t in found.tokens] == [p["token"] for p in item["predictions"]]
            assert found.log_probs.exp().tolist() == pytest.approx([p["score"] for p in item["predictions"]], abs=1e-6)


def count_forwards(model):
    calls = []
    base = model.get_base_model()
    handle = base.register_forward_hook(
        lambda module, args, kwargs, output: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls, handle


@pytest.mark.parametrize(("strategy", "passes"), [("independent", 1), ("left_to_right", 3), ("confidence", 3)])
def test_one_batched_pass_per_step_for_all_subjects_and_lengths(peft_model, strategy, passes):
    subjects = ["Dante", "Ali", "Bo"]
    alone = [decode_answers(peft_model, [s], max_tokens=3, strategy=strategy, num_beams=2)[0] for s in subjects]
    calls, handle = count_forwards(peft_model)
    together = decode_answers(peft_model, subjects, max_tokens=3, strategy=strategy, num_beams=2)
    handle.remove()
    assert len(calls) == passes
    K, L, W = 2, 3, 2
    assert calls[0] == len(subjects) * K * L
    # step s runs every beam of every length with an open mask left: K W (L - s) rows per subject
    assert calls[1:] == [len(subjects) * K * W * (L - s) for s in range(1, passes)]
    for one, both in zip(alone, together):
        assert one.tokens == both.tokens
        torch.testing.assert_close(one.log_probs, both.log_probs, atol=1e-5, rtol=0)


def test_answers_of_any_length_are_readable(peft_model, tokenizer):
    [item] = peft_model.query(["Dante"], top_k=3, candidates=["India", "Rome", "Paris"])
    by_text = {p["token_str"]: p for p in item["predictions"]}
    assert set(by_text) == {"India", "Rome", "Paris"}
    india = by_text["India"]
    assert india["tokens"] == tokenizer.convert_tokens_to_ids(["Ind", "##ia"]) and "token" not in india
    assert by_text["Rome"]["token"] == by_text["Rome"]["tokens"][0] == tokenizer.convert_tokens_to_ids("Rome")
    assert india["candidate"] == "India"
    scores = score_candidates(peft_model, ["Dante"], ["India", "Rome", "Paris"], return_template_log_probs=True)
    expected = [["India", "Rome", "Paris"][c] for c in scores.log_probs[0].argsort(descending=True).tolist()]
    assert [p["token_str"] for p in item["predictions"]] == expected
    per_token = scores.scores(length_normalized=True)[0]
    [normalized] = peft_model.query(["Dante"], top_k=3, candidates=["India", "Rome", "Paris"], length_normalized=True)
    expected = [["India", "Rome", "Paris"][c] for c in per_token.argsort(descending=True).tolist()]
    assert [p["token_str"] for p in normalized["predictions"]] == expected
    # each template's share: pi_k p_k(y|x) / p(y|x)
    weights = scores.log_weights.exp()
    shares = weights * scores.template_log_probs[:, 0].exp() / scores.log_probs[0, 0].exp()
    assert india["template_shares"] == pytest.approx(shares.tolist(), abs=1e-5)


def test_length_normalised_decoding_ranks_by_score_per_token(peft_model):
    [item] = peft_model.query(["Dante"], top_k=10, max_tokens=3, length_normalized=True)
    per_token = [torch.tensor(p["score"]).log().item() / len(p["tokens"]) for p in item["predictions"]]
    assert per_token == sorted(per_token, reverse=True)
    assert {len(p["tokens"]) for p in item["predictions"]} != {1}


def test_the_pipeline_and_the_cli_pass_the_options(peft_model, tokenizer, tmp_path):
    assert CLI_DEFAULT == DEFAULT_STRATEGY
    ask = pipeline("fact-query", model=peft_model, tokenizer=tokenizer)
    options = {"max_tokens": 2, "strategy": "left_to_right", "top_k": 3}
    assert ask("Dante", **options) == peft_model.query(["Dante"], **options)[0]
    ranked = ask("Dante", max_tokens=2, candidates=["India", "Rome"], top_k=2)
    assert ranked == peft_model.query(["Dante"], candidates=["India", "Rome"], top_k=2)[0]
    with pytest.raises(TypeError, match="list of words"):
        ask("Dante", max_tokens=2, candidates=[5, 6])

    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("India\nRome\n", encoding="utf-8")
    args = ["ask", str(adapter), "Dante", "--max_tokens", "2", "--candidates", str(candidates), "--json"]
    result = CliRunner().invoke(app, [*args, "--base", str(peft_model.get_base_model().name_or_path)])
    assert result.exit_code == 0, result.output
    answers = json.loads(result.stdout)
    assert [p["token_str"] for p in answers[0]["predictions"]] == [p["token_str"] for p in ranked["predictions"]]
    bad = CliRunner().invoke(app, ["ask", str(adapter), "Dante", "--strategy", "beam"])
    assert bad.exit_code == 1 and "Unknown decoding strategy 'beam'" in bad.output


def test_bad_decoding_options_get_clear_errors(peft_model):
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match="max_tokens must be a whole number >= 1"):
            peft_model.query(["Dante"], max_tokens=bad)
    with pytest.raises(ValueError, match="Unknown decoding strategy 'beam'; choose one of independent"):
        peft_model.query(["Dante"], max_tokens=2, strategy="beam")
    with pytest.raises(ValueError, match="Unknown decoding strategy"):
        peft_model.query(["Dante"], strategy="beam")  # refused even when one token needs no strategy
    with pytest.raises(ValueError, match="num_beams must be"):
        decode_answers(peft_model, ["Dante"], max_tokens=2, num_beams=0)
    # the tiny model has 64 positions: 60 masks cannot fit
    with pytest.raises(QueryTooLongError, match=r"at most 64.*max_tokens=60"):
        peft_model.query(["Dante"], max_tokens=60)
    with pytest.raises(ValueError, match="candidate_ids restricts single-token answers"):
        peft_model.query(["Dante"], max_tokens=2, candidate_ids=[5])
    with pytest.raises(ValueError, match="return_template_probs"):
        peft_model.query(["Dante"], max_tokens=2, return_template_probs=True)
    with pytest.raises(ValueError, match="list of objects"):
        peft_model.query(["Dante"], candidates="Rome")
    assert peft_model.query([], max_tokens=2) == []


def test_the_decoding_benchmark_reports_every_strategy_and_reloads_its_adapters(tmp_path):
    from conftest import load_script

    script = load_script(Path(__file__).resolve().parents[1] / "benchmarks" / "decoding.py")
    argv = ["--relations", "P103", "--max_test", "6", "--epochs", "1", "--max_tokens", "2", "--device", "cpu"]
    argv += ["--adapters", str(tmp_path / "adapters"), "--output", str(tmp_path / "result.json")]
    trained = script.main(argv)
    assert (tmp_path / "adapters" / "P103" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "result.json").read_text())["strategies"] == trained["strategies"]
    assert trained["facts"]["single"] + trained["facts"]["multi"] == 6
    for strategy in ("independent", "left_to_right", "confidence"):
        row = trained["strategies"][strategy]
        assert 0.0 <= row["raw"]["all"] <= 1.0 and row["ms_per_fact"] > 0
    reloaded = script.main(argv)  # the saved adapters: the same answers
    for strategy in ("independent", "left_to_right", "confidence"):
        assert reloaded["per_relation"]["P103"][strategy]["hits"] == trained["per_relation"]["P103"][strategy]["hits"]


def test_subjects_of_adapters_with_other_k_decode_as_each_alone(peft_model, tiny_dir):
    peft_model.add_adapter("one", SoftMixtureConfig(templates=[TEMPLATES[1]], tokenizer_name_or_path=str(tiny_dir)))
    names = ["default", "one", "default"]
    subjects = ["Dante", "Ali", "Bo"]
    for strategy in ("independent", "confidence"):
        together = decode_answers(peft_model, subjects, 3, strategy, num_beams=2, adapter_names=names)
        for subject, name, both in zip(subjects, names, together):
            [alone] = decode_answers(peft_model, [subject], 3, strategy, num_beams=2, adapter_names=[name])
            assert alone.tokens == both.tokens
            torch.testing.assert_close(alone.log_probs, both.log_probs, atol=1e-5, rtol=0)
            assert both.log_weights.shape == (len(peft_model.peft_config[name].templates),)
