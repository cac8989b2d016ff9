"""Training on all facts and evaluation by candidate ranking (#17): ranks against hand-ranked `score_candidates`,
split metrics, EM on whole objects, collators, candidates files, long objects and resume across settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch.utils.data import DataLoader

from peft_softmix import SoftMixtureConfig
from peft_softmix.batching import FactCollator, eval_dataloader, ranks_in_fact_order, subject_lengths
from peft_softmix.candidate_evaluation import (
    NOT_A_CANDIDATE,
    CandidateCollator,
    candidate_ranks,
    default_candidates,
    evaluate_candidate_ranks,
    evaluate_facts_among_candidates,
    length_group,
    load_candidates,
    scores_by_length,
)
from peft_softmix.em import em_object_posteriors, em_posteriors
from peft_softmix.errors import DataFormatError
from peft_softmix.facts import Fact, load_facts
from peft_softmix.hf_trainer import SoftMixtureDataCollator
from peft_softmix.metrics import load_fact_retrieval
from peft_softmix.training_args import TrainingArguments

TEMPLATES = ["[X] was born in [Y] .", "[X] is a citizen of [Y] ."]
CANDIDATES = ["Paris", "Rome", "India", "Italy", "Indias", "France"]
FACTS = [
    Fact("Dante", "India"),
    Fact("Ali", "Paris"),
    Fact("Bo Cy", "Rome"),
    Fact("Ed", "Indias"),
    Fact("Flo", "Italy"),
    Fact("Cy", "Florence"),  # not a candidate: ranked last
    Fact("Ali Bo Ed", "France"),
]


@pytest.fixture
def peft_model(base, tiny_dir):
    config = SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=str(tiny_dir))
    model = get_peft_model(base, config)
    with torch.no_grad():  # weights away from uniform, so that the mixture is not trivially a mean
        model.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.7, -0.4]))
        model.prompt_encoder["default"].soft_words.add_(
            0.3 * torch.randn_like(model.prompt_encoder["default"].soft_words)
        )
    return model.eval()


def hand_rank(scores: list[float], gold: int) -> int:
    """1 + the candidates scored strictly higher than the gold; after all of them for a gold that is none."""
    if gold == NOT_A_CANDIDATE:
        return len(scores) + 1
    return 1 + sum(score > scores[gold] for score in scores)


def candidate_loader(model, facts, batch_size=3):
    return eval_dataloader(
        facts, lambda ordered: CandidateCollator(ordered, CANDIDATES), subject_lengths(model.tokenizer, facts),
        batch_size, pin_memory=False,
    )  # fmt: skip


@pytest.mark.parametrize("length_normalized", [False, True])
def test_ranks_are_those_of_hand_ranked_candidate_scores(peft_model, length_normalized):
    loader, order = candidate_loader(peft_model, FACTS)
    result = evaluate_candidate_ranks(
        peft_model, loader, len(FACTS), CANDIDATES, per_template=True, length_normalized=length_normalized
    )
    mixture = ranks_in_fact_order(result.mixture, order)
    templates = ranks_in_fact_order(result.templates, order)

    scored = peft_model.score_candidates([f.subject for f in FACTS], CANDIDATES, return_template_log_probs=True)
    lengths = [len(t) for t in scored.tokens]
    assert lengths == [1, 1, 2, 1, 3, 1]  # "India" is Ind ##ia, "Indias" Ind ##ia ##s
    golds = [CANDIDATES.index(f.object) if f.object in CANDIDATES else NOT_A_CANDIDATE for f in FACTS]
    K = len(TEMPLATES)
    losses = []
    for b, gold in enumerate(golds):
        mixed = scored.log_probs[b].tolist()
        per_template = scored.template_log_probs.view(len(FACTS), K, -1)[b].tolist()
        if length_normalized:
            mixed = [s / n for s, n in zip(mixed, lengths)]
            per_template = [[s / n for s, n in zip(row, lengths)] for row in per_template]
        assert int(mixture[b]) == hand_rank(mixed, gold), FACTS[b]
        assert templates[b].tolist() == [hand_rank(row, gold) for row in per_template]
        if gold != NOT_A_CANDIDATE:
            losses.append(-float(scored.log_probs[b, gold]))
    assert int(mixture[FACTS.index(Fact("Cy", "Florence"))]) == len(CANDIDATES) + 1
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # over the facts with a candidate gold
    assert len(set(mixture.tolist())) > 1  # the ranks differ between facts: the comparison is not trivially true


def test_candidate_ranks_break_ties_for_the_gold_and_put_non_candidates_last():
    scores = torch.tensor([[0.0, 1.0, 1.0, -2.0], [3.0, 2.0, 1.0, 0.0]])
    assert candidate_ranks(scores, torch.tensor([2, NOT_A_CANDIDATE])).tolist() == [1, 5]
    assert candidate_ranks(scores, torch.tensor([3, 2])).tolist() == [4, 3]


def test_evaluation_refuses_missing_or_repeated_facts(peft_model):
    collate = CandidateCollator(FACTS, CANDIDATES)
    repeated = DataLoader(range(len(FACTS)), batch_sampler=[[0, 1, 2], [2, 3]], collate_fn=collate)
    with pytest.raises(RuntimeError, match="4 distinct facts"):
        evaluate_candidate_ranks(peft_model, repeated, len(FACTS), CANDIDATES)


def test_split_metrics_add_up_to_the_whole():
    metric = load_fact_retrieval(keep_in_memory=True)
    ranks = [1, 3, 1, 7, 2, 1, 12]
    groups = [
        "single_token",
        "multi_token",
        "single_token",
        "multi_token",
        "single_token",
        "single_token",
        "multi_token",
    ]
    scores = scores_by_length(metric, ranks, groups, "P19")
    single, multi, whole = scores["single_token"], scores["multi_token"], scores["all"]
    assert single["count"] + multi["count"] == whole["count"] == 7
    for key in ("p@1", "p@10", "mrr"):
        weighted = (single[key] * single["count"] + multi[key] * multi["count"]) / whole["count"]
        assert weighted == pytest.approx(whole[key])
    assert single["p@1"] == 0.75 and multi["p@1"] == 0.0 and multi["p@10"] == pytest.approx(2 / 3)
    assert scores_by_length(metric, [1, 2], ["single_token"] * 2, "P19")["multi_token"] is None
    with pytest.raises(ValueError, match="one of each per fact"):
        scores_by_length(metric, [1], [], "P19")


def test_length_groups_and_default_candidates_follow_the_tokenizer(tokenizer):
    assert [length_group(tokenizer, o) for o in ("Paris", "India", "Indias")] == [
        "single_token", "multi_token", "multi_token"
    ]  # fmt: skip
    facts = [Fact("a", "Paris"), Fact("b", "India"), Fact("c", "Paris "), Fact("d", "Zürich"), Fact("e", "Rome")]
    # distinct, in first-seen order; "Zürich" has a piece the tokenizer cannot write
    assert default_candidates(tokenizer, facts) == ["Paris", "India", "Rome"]


# -- training on all facts -------------------------------------------------------------------------------------


def test_collators_encode_objects_of_any_length_only_when_asked(peft_model):
    facts = FACTS[:3]
    single = FactCollator(peft_model, facts)([0, 1, 2])
    assert single["labels"].shape == (3,) and single["labels"][0] == -100  # "India" is not one token
    multi = FactCollator(peft_model, facts, multi_token=True)([0, 1, 2])
    expected = peft_model.encode([f.subject for f in facts], [f.object for f in facts], multi_token=True)
    for key, value in expected.items():
        assert torch.equal(multi[key], value) if torch.is_tensor(value) else multi[key] == value
    assert multi["labels"].shape == (3, 2) and multi["index"].tolist() == [0, 1, 2]
    rows = [{"subject": f.subject, "object": f.object} for f in facts]
    hf = SoftMixtureDataCollator(peft_model, multi_token=True)(rows)
    assert torch.equal(hf["labels"], expected["labels"]) and "target_positions" in hf
    assert SoftMixtureDataCollator(peft_model)(rows)["labels"].shape == (3,)
    with pytest.raises(ValueError, match="rows need objects"):
        SoftMixtureDataCollator(peft_model, multi_token=True)([{"subject": "Dante"}])


def test_em_posteriors_of_whole_objects_follow_bayes_rule(peft_model):
    batch = peft_model.encode(["Dante", "Ali", "Ed"], ["India", "Paris", "Indias"], multi_token=True)
    with torch.no_grad():
        out = peft_model(**batch)
    posterior = em_object_posteriors(out.template_object_log_probs, out.log_weights, batch["labels"])
    weights = peft_model.mixture_weights()
    rows = out.template_object_log_probs.view(3, 2).tolist()
    for b in range(3):
        joint = [w * math.exp(r) for w, r in zip(weights, rows[b])]
        assert posterior[b].tolist() == pytest.approx([j / sum(joint) for j in joint], rel=1e-5)
    # a fact without a usable label adds nothing
    labels = batch["labels"].clone()
    labels[1] = -100
    assert em_object_posteriors(out.template_object_log_probs, out.log_weights, labels)[1].tolist() == [0.0, 0.0]
    # single-token objects: the same posteriors as the single-token E-step
    subjects, objects = ["Ali", "Bo", "Cy"], ["Paris", "Rome", "Italy"]
    single = peft_model.encode(subjects, objects)
    multi = peft_model.encode(subjects, objects, multi_token=True)
    with torch.no_grad():
        a = peft_model(**single, return_template_log_probs=True)
        b = peft_model(**multi)
    expected = em_posteriors(a.template_log_probs, a.log_weights, single["labels"])
    got = em_object_posteriors(b.template_object_log_probs, b.log_weights, multi["labels"])
    assert torch.allclose(got, expected, atol=1e-6)


def test_training_arguments_take_the_multi_token_switches():
    assert TrainingArguments().multi_token is False
    args = TrainingArguments(multi_token=True, length_normalized=True)
    assert args.settings()["multi_token"] is True and "multi_token" in TrainingArguments.FIXED
    with pytest.raises(ValueError, match="--length_normalized .* --multi_token"):
        TrainingArguments(length_normalized=True)


# -- candidates files and facts files --------------------------------------------------------------------------


def test_a_candidates_file_line_the_tokenizer_cannot_write_is_named(tokenizer, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("Paris\nIndia\nParis\n\n", encoding="utf-8")
    assert load_candidates(good, tokenizer) == ["Paris", "India"]
    bad = tmp_path / "bad.txt"
    bad.write_text("Paris\nRome\nZürich\nIndia\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"bad.txt, line 3: 'Zürich' holds a piece"):
        load_candidates(bad, tokenizer)
    empty = tmp_path / "empty_line.txt"
    empty.write_text("Paris\n\nRome\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="line 2: an empty line"):
        load_candidates(empty, tokenizer)


def write_facts(path: Path, pairs: list[tuple[str, str]]) -> Path:
    path.write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in pairs), encoding="utf-8")
    return path


def test_a_facts_file_is_scored_over_all_facts_and_per_length(peft_model, tmp_path):
    pairs = [(f.subject, f.object) for f in FACTS] + [("Bo", "Zürich"), ("", "Rome")]
    split = load_facts(write_facts(tmp_path / "facts.jsonl", pairs))
    assert split.report.empty_lines == [9]  # the empty subject is named by its line
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(CANDIDATES) + "\n", encoding="utf-8")
    result = evaluate_facts_among_candidates(peft_model, split, candidates, batch_size=2)
    assert result["left_out"]["object_not_writable"] == 1  # Zürich
    assert result["facts"] == 7 and result["gold_not_a_candidate"] == 1 and result["candidates"] == 6
    assert result["single_token"]["facts"] + result["multi_token"]["facts"] == result["facts"]
    assert result["multi_token"]["facts"] == 2  # India, Indias
    # by default the candidates are the file's own objects: Florence is one, so no gold is ranked last
    default = evaluate_facts_among_candidates(peft_model, split, batch_size=2)
    assert default["candidates"] == 7 and default["gold_not_a_candidate"] == 0


def test_facts_whose_object_makes_the_query_too_long_are_left_out_naming_the_limit(peft_model, tmp_path):
    limit = peft_model.max_query_length
    long_object = " ".join(["Paris"] * limit)
    split = load_facts(write_facts(tmp_path / "long.jsonl", [("Dante", long_object)]))
    with pytest.raises(DataFormatError, match=f"1 query too long.*at most {limit} tokens"):
        evaluate_facts_among_candidates(peft_model, split)


def test_the_cli_evaluates_all_facts_by_candidate_ranking_split_by_length(peft_model, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from peft_softmix.cli import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    facts = write_facts(tmp_path / "facts.jsonl", [(f.subject, f.object) for f in FACTS])
    candidates = tmp_path / "candidates.txt"
    candidates.write_text("\n".join(CANDIDATES) + "\n", encoding="utf-8")

    def cli(*args):
        return CliRunner().invoke(app, ["evaluate", str(adapter), "--facts", str(facts), *map(str, args)])

    result = cli("--multi_token", "--candidates", candidates, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout)
    # the same ranks as hand-ranking the library's candidate scores
    scored = peft_model.score_candidates([f.subject for f in FACTS], CANDIDATES).log_probs.tolist()
    golds = [CANDIDATES.index(f.object) if f.object in CANDIDATES else NOT_A_CANDIDATE for f in FACTS]
    ranks = [hand_rank(row, gold) for row, gold in zip(scored, golds)]
    assert scores["p@1"] == pytest.approx(sum(r == 1 for r in ranks) / len(ranks))
    assert scores["mrr"] == pytest.approx(sum(1 / r for r in ranks) / len(ranks))
    multi = [r for r, f in zip(ranks, FACTS) if f.object in ("India", "Indias")]
    assert scores["multi_token"]["facts"] == 2 and scores["single_token"]["facts"] == 5
    assert scores["multi_token"]["mrr"] == pytest.approx(sum(1 / r for r in multi) / 2)
    assert scores["gold_not_a_candidate"] == 1

    text = cli("--multi_token", "--candidates", candidates, "--device", "cpu")
    assert text.exit_code == 0, text.output
    for label in ("any length", "one token", "several tokens", "among 6 candidates", "1 gold object(s) not among"):
        assert label in text.stdout

    refused = cli("--candidates", candidates)
    assert refused.exit_code == 1 and "add --multi_token" in refused.output
    candidates.write_text("Paris\nZürich\n", encoding="utf-8")
    bad = cli("--multi_token", "--candidates", candidates, "--device", "cpu")
    assert bad.exit_code == 1 and "line 2: 'Zürich'" in bad.output and "Traceback" not in bad.output


def test_a_facts_file_is_scored_over_the_vocabulary_counting_what_is_left_out(peft_model, tmp_path):
    # the single-token counterpart (what `peft-softmix evaluate` prints without --multi_token)
    from peft_softmix.file_evaluation import evaluate_facts

    pairs = [(f.subject, f.object) for f in FACTS]
    split = load_facts(write_facts(tmp_path / "facts.jsonl", pairs))
    result = evaluate_facts(peft_model, split, batch_size=2)
    single = [f for f in FACTS if len(peft_model.tokenizer.tokenize(" " + f.object)) == 1]
    assert result["left_out"]["object_not_one_token"] == len(FACTS) - len(single) > 0
    assert result["facts"] == len(single) and result["read"] == len(FACTS)
    # the same ranks as the model's own full-vocabulary distribution, fact by fact
    hits = 0
    for fact in single:
        log_probs = peft_model(**peft_model.encode([fact.subject], [fact.object])).log_probs[0]
        gold = peft_model.tokenizer.convert_tokens_to_ids(peft_model.tokenizer.tokenize(" " + fact.object))[0]
        hits += int((log_probs > log_probs[gold]).sum() == 0)
    assert result["p@1"] == pytest.approx(hits / len(single))
    only_long = load_facts(write_facts(tmp_path / "long.jsonl", [("Dante", "India"), ("Ed", "Indias")]))
    with pytest.raises(DataFormatError, match="No fact of .* can be scored .*2 object not one token"):
        evaluate_facts(peft_model, only_long)
