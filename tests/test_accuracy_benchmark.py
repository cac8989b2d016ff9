"""The accuracy benchmarks' own parts: the PEFT peers' tuning, and ranking objects of any length (#17)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import load_script, tiny_bert
from factories import wordpiece_tokenizer
from peft import get_peft_model
from transformers import AutoModelForMaskedLM, AutoTokenizer

from peft_softmix.objects import object_tokens

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accuracy():
    return load_script(REPO_ROOT / "benchmarks" / "accuracy.py")


@pytest.fixture(scope="module")
def multi_token():
    return load_script(REPO_ROOT / "benchmarks" / "accuracy_multi_token.py")


@pytest.fixture(scope="module")
def subword_dir(tmp_path_factory) -> str:
    """A tiny BERT whose WordPiece vocabulary spells most objects in several pieces (single characters)."""
    path = wordpiece_tokenizer(tmp_path_factory.mktemp("subword"))
    tiny_bert(vocab_size=len(AutoTokenizer.from_pretrained(path))).save_pretrained(path)
    return path


def test_template_words_drop_the_slots_and_lone_punctuation(accuracy):
    assert accuracy.template_words("[X] is located in [Y] .") == "is located in"
    assert accuracy.template_words("The capital of [X] is [Y] .") == "The capital of is"


def test_prompt_tuning_text_start_is_the_manual_template_words_embeddings(accuracy, subword_dir):
    base = AutoModelForMaskedLM.from_pretrained(subword_dir)
    tokenizer = AutoTokenizer.from_pretrained(subword_dir)
    peer = next(p for p in accuracy.PEERS if p.init == "text")
    config = accuracy.peer_config(peer, 4, 32, "[X] is located in [Y] .", subword_dir)
    model = get_peft_model(base, config)
    prompt = model.get_prompt_embedding_to_save("default")
    ids = tokenizer("is located in")["input_ids"][:4]  # PEFT's TEXT start: the text's ids, cut to the length
    assert torch.allclose(prompt, base.get_input_embeddings().weight[ids])


def test_the_sweep_keeps_the_learning_rate_with_the_best_macro_dev_p1(accuracy):
    def run(dev_p1: float):
        return accuracy.TrainResult(1, dev_p1, 1, False, [], None, None)

    points = [
        accuracy.SweepPoint(1e-3, {"a": run(0.2), "b": run(0.4)}),  # macro 0.3
        accuracy.SweepPoint(1e-2, {"a": run(0.5), "b": run(0.3)}),  # macro 0.4
        accuracy.SweepPoint(1e-1, {"a": run(0.9), "b": None}),  # diverged on b: never kept
    ]
    assert math.isnan(points[2].dev_macro_p1) and points[2].diverged == ["b"]
    assert accuracy.best_point(points).learning_rate == 1e-2
    with pytest.raises(RuntimeError, match="diverged"):
        accuracy.best_point(points[2:])


def test_peer_scores_a_two_token_candidate_by_the_sum_of_its_mask_log_probs(accuracy, multi_token, subword_dir):
    """Oracle: the frozen model fed the prompt's vectors then the words' embeddings, by hand."""
    tokenizer = AutoTokenizer.from_pretrained(subword_dir)
    base = AutoModelForMaskedLM.from_pretrained(subword_dir).eval()
    peer = next(p for p in accuracy.PEERS if p.init == "sample_vocab")
    torch.manual_seed(0)
    model = get_peft_model(base, accuracy.peer_config(peer, 3, 32, "[X] was born in [Y] .", subword_dir)).eval()
    scorer = multi_token.PeerScorer(model, tokenizer, "[X] was born in [Y] .", 3, batch_size=2)
    candidates = ["Paris", "Rome", "Oslo"]
    tokens = [object_tokens(tokenizer, c) for c in candidates]
    assert len({len(t) for t in tokens}) > 1  # lengths differ: one forward per length
    scores = scorer.scores(["Dante", "Kant", "Bo"], candidates)
    prompt = model.get_prompt_embedding_to_save("default")
    for b, subject in enumerate(["Dante", "Kant", "Bo"]):
        for c, ids in enumerate(tokens):
            text = f"{subject} was born in " + " ".join([tokenizer.mask_token] * len(ids)) + " ."
            enc = tokenizer(text, return_tensors="pt")
            embeds = torch.cat([prompt[None], base.get_input_embeddings()(enc["input_ids"])], dim=1)
            with torch.no_grad():
                log_probs = base(inputs_embeds=embeds).logits.log_softmax(-1)[0, 3:]
            masks = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero().squeeze(1)
            expected = sum(float(log_probs[m, t]) for m, t in zip(masks, ids))
            assert float(scores[b, c]) == pytest.approx(expected, abs=1e-4)
    scorer.length_normalized = True  # log p(c|x) per token
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.float)
    assert torch.allclose(scorer.scores(["Dante", "Kant", "Bo"], candidates), scores / lengths, atol=1e-5)


def test_multi_token_benchmark_reports_every_row_split_by_object_length(multi_token, subword_dir, tmp_path):
    argv = [
        "--model_name_or_path", subword_dir, "--relations", "P36", "--max_train_samples", "12",
        "--max_eval_samples", "10", "--num_train_epochs", "1", "--batch_size", "8",
        "--peer_learning_rates", "0.01", "0.1", "--output_dir", str(tmp_path), "--both_scores",
    ]  # fmt: skip
    report = multi_token.main(argv)
    soft = [name for r in multi_token.SOFT_ROWS for name in (r.name, f"{r.name} (log p / n)")]
    rows = soft + ["xfactr_decoding"] + [p.name for p in multi_token.PEERS]
    assert list(report["methods"]) == rows
    facts = report["test_facts"]
    assert facts["multi"] > 0 and facts["single"] + facts["multi"] == facts["all"] == 10
    for name in rows:
        for subset in ("all", "single", "multi"):
            scores = report["methods"][name][subset]["overall"]
            assert 0.0 <= scores["macro_p@1"] <= scores["macro_p@10"] <= 1.0
    for name, sweep in report["peer_sweeps"].items():
        dev = {p["learning_rate"]: p["dev_macro_p@1"] for p in sweep["points"]}
        assert sweep["kept_learning_rate"] == max(dev, key=dev.__getitem__), name
        kept = next(p for p in sweep["points"] if p["learning_rate"] == sweep["kept_learning_rate"])
        assert report["methods"][name] == kept["test"]
    assert len(report["targets"]) == 4
    # the targets are the soft mixture's (shallow or deep) with the better dev P@1, against its own single-token twin
    mix = max(multi_token.MIXTURE_ROWS, key=report["dev_macro_p@1"].__getitem__)
    assert all(t["target"].split(": ")[1].startswith(f"{mix} ") for t in report["targets"])
    assert report["targets"][3]["target"].endswith(f"{mix}_single_token_train")
    assert (tmp_path / "accuracy_multi_token.json").is_file()


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 with a byte-level tokenizer: words outside its vocabulary are several tokens."""
    from test_causal import gpt2_style_tokenizer, tiny_causal

    path = gpt2_style_tokenizer(tmp_path_factory.mktemp("causal"), bos=True)
    tiny_causal("gpt2", len(AutoTokenizer.from_pretrained(path))).save_pretrained(path)
    return path


@pytest.mark.parametrize("peer_name", ["peft_prompt_tuning_vocab", "peft_p_tuning"])
def test_causal_peer_scores_are_the_chain_rule_of_one_full_pass(accuracy, multi_token, causal_dir, peer_name):
    """Oracle: PEFT's prompt, then the template's words up to [Y] and the candidate, in one pass by hand; the
    scores come from the prompts' key/value cache, and the training loss of one fact is minus its score."""
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(causal_dir)
    base = AutoModelForCausalLM.from_pretrained(causal_dir).eval()
    peer = next(p for p in accuracy.PEERS if p.name == peer_name)
    torch.manual_seed(0)
    template = "[X] was born in [Y] ."
    model = get_peft_model(base, accuracy.peer_config(peer, 3, 32, template, causal_dir)).eval()
    scorer = multi_token.CausalPeerScorer(model, tokenizer, template, 3, batch_size=2)
    candidates = ["Paris", "Rome", "Oslo", "Zqx"]
    tokens = [object_tokens(tokenizer, c, exact=True) for c in candidates]
    assert len({len(t) for t in tokens}) > 1  # lengths differ: one continuation per length
    subjects = ["Dante", "Immanuel Kant", "Bo"]  # prompts of different lengths: padded on the left
    scores = scorer.scores(subjects, candidates)
    with torch.no_grad():
        prompt = model.get_prompt(batch_size=1)
    for b, subject in enumerate(subjects):
        for c, ids in enumerate(tokens):
            prefix = tokenizer(f"{subject} was born in")["input_ids"]
            row = torch.tensor([prefix + list(ids)])
            embeds = torch.cat([prompt, base.get_input_embeddings()(row)], dim=1)
            with torch.no_grad():
                log_probs = base(inputs_embeds=embeds).logits.log_softmax(-1)[0, 3:]
            expected = sum(float(log_probs[len(prefix) - 1 + j, t]) for j, t in enumerate(ids))
            assert float(scores[b, c]) == pytest.approx(expected, abs=1e-4)
            fact = multi_token.Fact(subject=subject, object=candidates[c])
            with torch.no_grad():
                assert float(scorer.loss([fact])) == pytest.approx(-expected, abs=1e-4)
    with pytest.raises(ValueError, match="up to \\[Y\\]"):
        multi_token.CausalPeerScorer(model, tokenizer, "[Y] is where [X] was born .", 3, batch_size=2)


def test_the_benchmark_takes_a_causal_model_with_the_same_flags(multi_token, causal_dir, tmp_path):
    argv = [
        "--model_name_or_path", causal_dir, "--relations", "P36", "--max_train_samples", "12",
        "--max_eval_samples", "10", "--num_train_epochs", "1", "--batch_size", "8",
        "--peer_learning_rates", "0.01", "--output_dir", str(tmp_path), "--paraphrase_mixture",
    ]  # fmt: skip
    report = multi_token.main(argv)
    rows = [r.name for r in multi_token.SOFT_ROWS if r.name not in multi_token.MASKED_ONLY]
    rows.append("soft_mixture_paraphrase")
    assert list(report["methods"]) == rows + [p.name for p in multi_token.PEERS]
    assert report["settings"]["causal"] and report["test_facts"]["all"] == 10
    trained = ["manual_soft", "manual_soft_deep", "soft_mixture", "soft_mixture_deep", "soft_mixture_paraphrase"]
    assert sorted(report["dev_macro_p@1"]) == sorted(trained)  # what picks among them without the test facts
    assert all(0.0 <= p1 <= 1.0 for p1 in report["dev_macro_p@1"].values())
    for name, by_subset in report["methods"].items():
        scores = by_subset["all"]["overall"]
        assert 0.0 <= scores["macro_p@1"] <= scores["macro_p@10"] <= 1.0, name
    assert [t["target"].split(" (")[0] for t in report["targets"]] == [
        f"{mixture} >= {goal}"
        for mixture in ("soft_mixture", "soft_mixture_paraphrase")
        for goal in ("1.5 x manual", "best tuned PEFT peer", "best single soft prompt")
    ]


def test_the_single_token_benchmark_hands_a_causal_model_to_candidate_ranking(accuracy, causal_dir, tmp_path):
    argv = [
        "--model_name_or_path", causal_dir, "--relations", "P36", "--max_train_samples", "12",
        "--max_eval_samples", "10", "--num_train_epochs", "1", "--batch_size", "8",
        "--peer_learning_rates", "0.01", "--peers_only", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    macro = accuracy.main(argv)
    assert sorted(macro) == sorted(p.name for p in accuracy.PEERS)  # --peers_only: the soft rows left out
    assert all(0.0 <= p1 <= 1.0 for p1 in macro.values())
    assert (tmp_path / "accuracy_multi_token.json").is_file()
    with pytest.raises(SystemExit, match="common vocabulary"):
        accuracy.main([*argv, "--common_vocab"])
