"""Scoring cloze answers: the rank of the gold object, and the ``fact_retrieval`` evaluate metric."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FACT_RETRIEVAL_SCRIPT = Path(__file__).parent / "fact_retrieval" / "fact_retrieval.py"
# The scores the metric gives per relation (and, prefixed with "micro_" / "macro_", overall), in table order.
METRIC_KEYS = ("p@1", "p@10", "mrr")


def load_fact_retrieval(**kwargs: Any):
    """Load the ``fact_retrieval`` metric from the copy installed with this package (no Hub access).

    Keyword arguments go to `evaluate.load` (e.g. ``experiment_id``, ``keep_in_memory``). Giving evaluate the
    script's own path, rather than a name, is what keeps it off the Hub, so this works under ``HF_HUB_OFFLINE=1``.
    """
    import evaluate  # imported here: it pulls in datasets and pandas, which the rest of the package does not need

    if not FACT_RETRIEVAL_SCRIPT.is_file():
        raise FileNotFoundError(
            f"The metric script {FACT_RETRIEVAL_SCRIPT} is missing from the installed package; reinstall "
            "peft-softmix (its package data includes metrics/**/*)."
        )
    return evaluate.load(str(FACT_RETRIEVAL_SCRIPT), **kwargs)


def rank_of_gold(
    log_probs: torch.Tensor, gold_ids: torch.Tensor, candidate_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The 1-based rank of each gold token among the candidates: ``1 + (number of candidates scored strictly
    higher)``.

    Ties are resolved in the gold token's favour: a candidate with exactly the gold score does not push it down.
    This makes the rank independent of token order, and a model that gives every candidate the same score gets
    rank 1 for every fact; with real-valued scores ties are rare, and LAMA's top-k listing can differ from this
    only on them.

    Args:
        log_probs: ``[B, V]`` scores (log-probabilities or logits: only their order matters).
        gold_ids: ``[B]`` gold token ids in ``[0, V)``.
        candidate_mask: Optional ``[V]`` or ``[B, V]`` boolean mask of the tokens that count as candidates (LAMA's
            common vocabulary); the others neither count nor can be the gold token. Scores already set to
            ``-inf`` outside the candidates give the same ranks without it, as long as the gold token is one.

    Returns:
        ``[B]`` int64 ranks on ``log_probs``'s device.
    """
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be [batch, vocab], got shape {tuple(log_probs.shape)}.")
    batch, vocab = log_probs.shape
    gold_ids = torch.as_tensor(gold_ids, device=log_probs.device)
    if gold_ids.shape != (batch,):
        raise ValueError(f"gold_ids must be [batch] = [{batch}], got shape {tuple(gold_ids.shape)}.")
    if gold_ids.dtype.is_floating_point or gold_ids.dtype == torch.bool:
        raise ValueError(f"gold_ids must be integer token ids, got dtype {gold_ids.dtype}.")
    bad = (gold_ids < 0) | (gold_ids >= vocab)
    if bad.any():
        raise ValueError(
            f"gold_ids must be token ids in [0, {vocab}); got {gold_ids[bad][:5].tolist()}. Facts whose object is "
            "not one token (label -100) have no rank: filter them out first (peft_softmix.facts.filter_single_token)."
        )
    gold_scores = log_probs.gather(1, gold_ids.long().unsqueeze(1))
    if torch.isnan(gold_scores).any():
        raise ValueError("log_probs is NaN at a gold token; the ranks would be meaningless.")
    higher = log_probs > gold_scores
    if candidate_mask is not None:
        candidate_mask = torch.as_tensor(candidate_mask, device=log_probs.device)
        if candidate_mask.dtype != torch.bool or candidate_mask.shape not in ((vocab,), (batch, vocab)):
            raise ValueError(
                f"candidate_mask must be a bool tensor of shape [{vocab}] or [{batch}, {vocab}], got "
                f"{candidate_mask.dtype} {tuple(candidate_mask.shape)}."
            )
        mask = candidate_mask.expand(batch, vocab)
        outside = ~mask.gather(1, gold_ids.long().unsqueeze(1)).squeeze(1)
        if outside.any():
            raise ValueError(
                f"{int(outside.sum())} gold token(s) are not candidates (e.g. id {gold_ids[outside][0].item()}); "
                "filter the facts to the candidate vocabulary first (peft_softmix.facts.facts_in_vocab)."
            )
        higher = higher & mask
    return higher.sum(dim=1) + 1


__all__ = ["FACT_RETRIEVAL_SCRIPT", "METRIC_KEYS", "load_fact_retrieval", "rank_of_gold"]
