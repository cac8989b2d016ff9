import json
import os
import subprocess
import sys

import pytest
import torch

from peft_softmix.metrics import FACT_RETRIEVAL_SCRIPT, load_fact_retrieval, rank_of_gold


@pytest.fixture(scope="module")
def metric():
    return load_fact_retrieval()


def test_micro_and_macro_by_hand(metric):
    # P19 ranks 1, 2, 11; P20 rank 1. Micro weighs the four facts, macro the two relations.
    scores = metric.compute(ranks=[1, 2, 11, 1], relations=["P19", "P19", "P19", "P20"])
    mrr_p19 = (1 + 1 / 2 + 1 / 11) / 3
    assert scores["micro_p@1"] == pytest.approx(2 / 4)
    assert scores["micro_p@10"] == pytest.approx(3 / 4)
    assert scores["micro_mrr"] == pytest.approx((1 + 1 / 2 + 1 / 11 + 1) / 4)
    assert scores["macro_p@1"] == pytest.approx((1 / 3 + 1) / 2)
    assert scores["macro_p@10"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["macro_mrr"] == pytest.approx((mrr_p19 + 1) / 2)
    assert scores["per_relation"]["P19"] == pytest.approx({"p@1": 1 / 3, "p@10": 2 / 3, "mrr": mrr_p19, "count": 3})
    assert scores["per_relation"]["P20"] == pytest.approx({"p@1": 1.0, "p@10": 1.0, "mrr": 1.0, "count": 1})
    assert (scores["num_facts"], scores["num_relations"]) == (4, 2)


def test_rank_ten_counts_for_p_at_10(metric):
    scores = metric.compute(ranks=[10, 11], relations=["r", "r"])
    assert scores["micro_p@10"] == 0.5 and scores["micro_p@1"] == 0.0


def test_add_batch_accumulates(metric):
    metric.add_batch(ranks=[1, 4], relations=["a", "a"])
    metric.add_batch(ranks=[2], relations=["b"])
    scores = metric.compute()
    assert scores["per_relation"]["a"]["count"] == 2 and scores["macro_p@1"] == pytest.approx(0.25)


@pytest.mark.parametrize("ranks", [[0, 1], [-3, 2]])
def test_rejects_ranks_below_one(metric, ranks):
    with pytest.raises(ValueError, match="1-based"):
        metric.compute(ranks=ranks, relations=["r", "r"])


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and evaluate
def test_loads_offline_from_the_package(tmp_path):
    # A fresh HF_HOME proves nothing was cached before; the offline flags prove the Hub is never asked.
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    code = (
        "import json; from peft_softmix.metrics import load_fact_retrieval; "
        "m = load_fact_retrieval(); print(json.dumps([m.name, m.compute(ranks=[1, 3], relations=['x', 'y'])]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    name, scores = json.loads(out.stdout.strip().splitlines()[-1])
    assert name == "fact_retrieval" and scores["macro_mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert FACT_RETRIEVAL_SCRIPT.is_file()


def test_rank_of_gold_strict_ties_favour_gold():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.1, 0.5, 0.3, 0.5], [2.0, 1.0, 0.0, -1.0]])
    ranks = rank_of_gold(scores, torch.tensor([2, 1, 3]))
    assert ranks.tolist() == [3, 1, 4]  # 0.3 is behind two 0.5s; 0.5 ties with 0.5 and stays first
    assert ranks.dtype == torch.int64


def test_rank_of_gold_matches_sorting():
    generator = torch.Generator().manual_seed(0)
    log_probs = torch.randn(16, 50, generator=generator).log_softmax(-1)
    gold = torch.randint(0, 50, (16,), generator=generator)
    order = log_probs.argsort(dim=1, descending=True)
    expected = (order == gold.unsqueeze(1)).nonzero()[:, 1] + 1
    assert torch.equal(rank_of_gold(log_probs, gold), expected)


def test_rank_of_gold_candidate_mask():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.05], [0.9, 0.8, 0.1, 0.05]])
    candidates = torch.tensor([False, True, True, True])
    assert rank_of_gold(scores, torch.tensor([2, 1]), candidates).tolist() == [2, 1]
    per_row = torch.tensor([[True, True, True, False], [False, False, True, True]])
    assert rank_of_gold(scores, torch.tensor([2, 3]), per_row).tolist() == [3, 2]
    # -inf outside the candidates gives the same ranks without a mask
    masked = scores.masked_fill(~candidates, float("-inf"))
    assert rank_of_gold(masked, torch.tensor([2, 1])).tolist() == [2, 1]
    with pytest.raises(ValueError, match="not candidates"):
        rank_of_gold(scores, torch.tensor([0, 1]), candidates)


@pytest.mark.parametrize(
    ("scores", "gold", "problem"),
    [
        (torch.zeros(2, 4), torch.tensor([1, -100]), r"token ids in \[0, 4\).*-100"),
        (torch.zeros(2, 4), torch.tensor([1, 4]), r"token ids in \[0, 4\)"),
        (torch.zeros(2, 4), torch.tensor([1.0, 2.0]), "integer token ids"),
        (torch.zeros(2, 4), torch.tensor([1, 2, 3]), r"gold_ids must be \[batch\]"),
        (torch.zeros(4), torch.tensor([1]), r"\[batch, vocab\]"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([1]), "NaN"),
    ],
)
def test_rank_of_gold_bad_input(scores, gold, problem):
    with pytest.raises(ValueError, match=problem):
        rank_of_gold(scores, gold)
