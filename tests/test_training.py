"""Unit tests of the training loop's parts: batching, EM, evaluation ranks and the results writers."""

from __future__ import annotations

import builtins
import math
import os
import stat
import sys

import pytest
import torch
from conftest import save_tiny_bert
from peft import get_peft_model
from torch.utils.data import BatchSampler, DataLoader
from transformers import BertForMaskedLM

import peft_softmix  # noqa: F401
from peft_softmix import SoftMixtureConfig
from peft_softmix.atomic import write_json_atomic
from peft_softmix.batching import FactCollator, FactDataset, LengthGroupedSampler, model_inputs, subject_lengths
from peft_softmix.em import em_mixture_logits, em_posteriors
from peft_softmix.evaluation import evaluate_ranks, precision_at_1
from peft_softmix.facts import Fact
from peft_softmix.metrics import rank_of_gold
from peft_softmix.results import plot_mixture_weights, results_markdown

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "was", "born", "in", "is", "from", ".", "the", "city", "of"]
NAMES = ["Anna", "Bruno", "Carla", "Dario", "Elena"]
CITIES = ["Paris", "Rome", "Milan"]
TEMPLATES = ["[X] was born in [Y] .", "[X] is from the city of [Y] ."]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_training")
    save_tiny_bert(folder, WORDS + NAMES + CITIES, dropout=0.0)
    return folder


def make_model(tiny):
    base = BertForMaskedLM.from_pretrained(str(tiny)).eval()
    return get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=str(tiny)))


def make_facts(n: int) -> list[Fact]:
    facts = []
    for i in range(n):
        words = [NAMES[(i + j) % len(NAMES)] for j in range(1 + i % 3)]  # subjects of 1 to 3 tokens
        facts.append(Fact(" ".join(words), CITIES[i % len(CITIES)], "P19"))
    return facts


# -- batching --------------------------------------------------------------------------------------------------


def test_length_grouped_sampler_is_a_seeded_permutation_with_homogeneous_batches():
    lengths = [(i * 7) % 13 + 1 for i in range(103)]
    sampler = LengthGroupedSampler(lengths, batch_size=8, shuffle=True, seed=3, group_batches=4)
    sampler.set_epoch(1)
    first = list(sampler)
    assert sorted(first) == list(range(103))
    assert list(sampler) == first  # same seed and epoch, same order (what a resumed run relies on)
    sampler.set_epoch(2)
    assert list(sampler) != first
    again = LengthGroupedSampler(lengths, batch_size=8, shuffle=True, seed=3, group_batches=4)
    again.set_epoch(1)
    assert list(again) == first

    batches = list(BatchSampler(first, 8, drop_last=False))
    assert all(len(b) == 8 for b in batches[:-1])
    # batches cut from length-sorted groups pad far less than random ones
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    generator = torch.Generator().manual_seed(0)
    random_order = torch.randperm(103, generator=generator).tolist()
    random_spread = sum(
        max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in BatchSampler(random_order, 8, False)
    )
    assert spread < random_spread / 2


def test_length_grouped_sampler_without_shuffle_sorts_by_length():
    lengths = [3, 1, 2, 1, 3]
    assert list(LengthGroupedSampler(lengths, batch_size=2, shuffle=False)) == [1, 3, 2, 0, 4]
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler(lengths, batch_size=0, shuffle=False)


def test_collator_pads_each_batch_to_its_own_longest_query(tiny):
    model = make_model(tiny)
    facts = make_facts(9)
    lengths = subject_lengths(model.tokenizer, facts)
    assert lengths[:3] == [1, 2, 3]
    collate = FactCollator(model, facts)
    short = collate([i for i in range(9) if lengths[i] == 1])
    long = collate([i for i in range(9) if lengths[i] == 3])
    assert short["input_ids"].shape[0] == 3 * 2 and short["fact_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert long["input_ids"].shape[1] == short["input_ids"].shape[1] + 2
    assert short["index"].tolist() == [0, 3, 6]
    assert set(model_inputs(short)) == {
        "input_ids", "attention_mask", "roles", "mask_positions", "fact_index", "labels", "encoded_for"
    }  # fmt: skip


# -- EM --------------------------------------------------------------------------------------------------------


def test_em_posteriors_follow_bayes_rule_and_skip_unlabelled_rows():
    # two facts, two templates, three tokens; gold tokens 2 and (ignored) -100
    p = torch.tensor([[[0.2, 0.2, 0.6], [0.5, 0.4, 0.1]], [[0.3, 0.3, 0.4], [0.3, 0.3, 0.4]]])
    log_weights = torch.log(torch.tensor([0.25, 0.75]))
    posterior = em_posteriors(p.log(), log_weights, torch.tensor([2, -100]))
    joint = torch.tensor([0.25 * 0.6, 0.75 * 0.1])
    assert posterior[0].tolist() == pytest.approx((joint / joint.sum()).tolist())
    assert posterior[1].tolist() == [0.0, 0.0]


def test_em_recovers_the_mixture_that_generated_the_answers():
    # each fact's answer comes from template 0 with probability 0.7, else template 1; each template puts 0.9 of
    # its mass on its own token, so EM over many facts must find weights near (0.7, 0.3)
    generator = torch.Generator().manual_seed(0)
    n, vocab = 4000, 6
    own = torch.randint(0, 3, (n,), generator=generator)
    template_probs = torch.full((n, 2, vocab), 0.1 / (vocab - 1))
    template_probs[torch.arange(n), 0, own] = 0.9
    template_probs[torch.arange(n), 1, own + 3] = 0.9
    from_first = torch.rand(n, generator=generator) < 0.7
    labels = torch.where(from_first, own, own + 3)
    logits = torch.zeros(2)
    for _ in range(30):
        posterior = em_posteriors(template_probs.log(), torch.log_softmax(logits, 0), labels)
        logits = em_mixture_logits(posterior.sum(0))
    weights = logits.exp()
    assert weights.sum().item() == pytest.approx(1.0)
    assert weights[0].item() == pytest.approx(from_first.float().mean().item(), abs=0.02)


def test_em_m_step_needs_posterior_mass():
    with pytest.raises(ValueError, match="no posterior mass"):
        em_mixture_logits(torch.zeros(3))


# -- evaluation ------------------------------------------------------------------------------------------------


def test_evaluate_ranks_matches_a_direct_forward_in_fact_order(tiny):
    model = make_model(tiny)
    facts = make_facts(11)
    loader = DataLoader(
        FactDataset(facts),
        batch_sampler=BatchSampler(LengthGroupedSampler(subject_lengths(model.tokenizer, facts), 4, False), 4, False),
        collate_fn=FactCollator(model, facts),
    )
    result = evaluate_ranks(model, loader, num_facts=len(facts), per_template=True)

    batch = model.encode([f.subject for f in facts], [f.object for f in facts])
    with torch.no_grad():
        out = model(**batch, return_template_log_probs=True)
    assert result.mixture.tolist() == rank_of_gold(out.log_probs, batch["labels"]).tolist()
    for k in range(len(TEMPLATES)):
        per = out.template_log_probs.view(len(facts), len(TEMPLATES), -1)
        expected = rank_of_gold(per[:, k], batch["labels"]).tolist()
        assert result.templates[:, k].tolist() == expected
    gold = out.log_probs.gather(1, batch["labels"][:, None]).squeeze(1)
    assert result.loss == pytest.approx(-gold.mean().item(), rel=1e-5)
    assert precision_at_1(result.mixture) == pytest.approx((result.mixture == 1).float().mean().item())

    # a candidate mask of three tokens bounds every rank by 3
    mask = torch.zeros(model.word_embeddings.num_embeddings, dtype=torch.bool)
    mask[model.tokenizer.convert_tokens_to_ids(CITIES)] = True
    restricted = evaluate_ranks(model, loader, num_facts=len(facts), candidate_mask=mask)
    assert restricted.mixture.max().item() <= 3
    assert (restricted.mixture <= result.mixture).all()


def test_evaluate_ranks_refuses_missing_or_repeated_facts(tiny):
    model = make_model(tiny)
    facts = make_facts(6)
    repeated = DataLoader(
        FactDataset(facts), batch_sampler=[[0, 1, 2], [2, 3, 4]], collate_fn=FactCollator(model, facts)
    )
    with pytest.raises(RuntimeError, match="5 distinct facts"):
        evaluate_ranks(model, repeated, num_facts=6)


# -- results ---------------------------------------------------------------------------------------------------


def results_fixture() -> dict:
    def scores(p1, p10, mrr, count):
        return {"p@1": p1, "p@10": p10, "mrr": mrr, "count": count}

    return {
        "rows": {"hard_first": "hard, template 1", "soft": "soft"},
        "relations": {
            "P19": {"test": {"hard_first": scores(0.1, 0.5, 0.2, 10), "soft": scores(0.4, 0.9, 0.55, 10)}},
            "P20": {"test": {"hard_first": scores(0.0, 0.25, 0.1, 4), "soft": scores(0.5, 1.0, 0.625, 4)}},
        },
        "overall": {
            "test": {
                row: {
                    "micro_p@1": m[0],
                    "micro_p@10": m[1],
                    "micro_mrr": m[2],
                    "macro_p@1": m[3],
                    "macro_p@10": m[4],
                    "macro_mrr": m[5],
                    "num_facts": 14,
                }
                for row, m in {
                    "hard_first": (1 / 14, 6 / 14, 0.1714, 0.05, 0.375, 0.15),
                    "soft": (6 / 14, 13 / 14, 0.5714, 0.45, 0.95, 0.5875),
                }.items()
            }
        },
    }


def test_results_markdown_has_a_line_per_relation_and_averages():
    text = results_markdown(results_fixture())
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| relation | facts | hard, template 1 | soft |"
    assert lines[2] == "| P19 | 10 | 10.0 / 50.0 / 20.0 | 40.0 / 90.0 / 55.0 |"
    assert lines[3] == "| P20 | 4 | 0.0 / 25.0 / 10.0 | 50.0 / 100.0 / 62.5 |"
    assert lines[4].startswith("| **micro** | 14 | 7.1 / 42.9 / 17.1 |")
    assert lines[5] == "| **macro** | 14 | 5.0 / 37.5 / 15.0 | 45.0 / 95.0 / 58.8 |"


def test_plot_mixture_weights_writes_a_png_or_skips_without_matplotlib(tmp_path, monkeypatch):
    path = tmp_path / "w.png"
    assert plot_mixture_weights(path, {"P19": [0.7, 0.3], "P20": [0.2, 0.5, 0.3]})
    assert path.read_bytes()[:4] == b"\x89PNG"

    real_import = builtins.__import__

    def without_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "matplotlib", raising=False)
    monkeypatch.setattr(builtins, "__import__", without_matplotlib)
    other = tmp_path / "skipped.png"
    assert plot_mixture_weights(other, {"P19": [1.0]}) is False
    assert not other.exists()


def test_write_json_atomic_leaves_an_ordinary_file(tmp_path):
    path = tmp_path / "sub" / "results.json"
    write_json_atomic(path, {"loss": math.nan, "rows": [1, 2]})
    assert path.read_text() == '{\n  "loss": NaN,\n  "rows": [\n    1,\n    2\n  ]\n}\n'
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_the_old_import_path_still_gives_the_same_objects():
    # peft_softmix.training held these before the loop's parts got modules of their own; code importing them from
    # there keeps working
    from peft_softmix import atomic, batching, evaluation, training

    assert training.FactCollator is batching.FactCollator
    assert training.evaluate_ranks is evaluation.evaluate_ranks
    assert training.write_json_atomic is atomic.write_json_atomic
