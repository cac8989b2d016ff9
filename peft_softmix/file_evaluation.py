"""Scoring an adapter on one facts file, single-token objects ranked over the vocabulary: what
``peft-softmix evaluate`` prints. Objects of any length ranked among candidates are
`peft_softmix.candidate_evaluation.evaluate_facts_among_candidates`.

A fact the model cannot be asked is counted in ``left_out`` by why, never silently dropped: an object of several
tokens, a subject the tokenizer cannot write, an object outside the common vocabulary when one is given, a query
longer than the model's positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .batching import FactCollator, eval_dataloader, ranks_in_fact_order, subject_lengths
from .evaluation import evaluate_ranks, scores_from_metric
from .facts import FactSplit, facts_in_vocab, filter_single_token, filter_unknown_subjects
from .metrics import load_fact_retrieval
from .relations import candidate_mask

__all__ = ["evaluate_facts"]


def evaluate_facts(
    model: Any,
    split: FactSplit,
    common_vocab: str | Path | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, Any]:
    """P@1, P@10, MRR and count of ``model`` (a `PeftModelForSoftMixture`) on the single-token facts of ``split``,
    the gold object ranked over the vocabulary (or over the words of ``common_vocab``, one per line), with the
    ``loss``, the facts ``read`` and the ``left_out`` counts. A file of which no fact can be scored is a
    `DataFormatError` giving those counts. ``progress``: a progress bar on stderr."""
    tok = model.tokenizer
    facts, multi_token = filter_single_token(split.facts, tok)
    facts, unknown = filter_unknown_subjects(facts, tok)
    mask = None
    not_in_vocab: list[Any] = []
    if common_vocab is not None:
        words, mask, _ = candidate_mask(tok, common_vocab, model.word_embeddings.num_embeddings)
        facts, not_in_vocab = facts_in_vocab(facts, words)
    too_long = []
    if model.max_query_length is not None and facts:
        lengths = model.query_lengths([f.subject for f in facts])
        too_long = [f for f, n in zip(facts, lengths) if n > model.max_query_length]
        facts = [f for f, n in zip(facts, lengths) if n <= model.max_query_length]
    left_out = {
        "object_not_one_token": len(multi_token),
        "unknown_subject": len(unknown),
        "object_not_in_common_vocab": len(not_in_vocab),
        "query_too_long": len(too_long),
    }
    if not facts:
        raise split.nothing_to_score(left_out)
    loader, order = eval_dataloader(
        facts, lambda ordered: FactCollator(model, ordered), subject_lengths(tok, facts), batch_size, pin_memory=False
    )
    ranks = evaluate_ranks(model, loader, len(facts), candidate_mask=mask, progress=progress, description="evaluate")
    mixture = ranks_in_fact_order(ranks.mixture, order)
    scores = scores_from_metric(load_fact_retrieval(), mixture.tolist(), split.relation or "facts")
    return {
        "p@1": scores["p@1"],
        "p@10": scores["p@10"],
        "mrr": scores["mrr"],
        "facts": int(scores["count"]),
        "loss": ranks.loss,
        "read": len(split.facts),
        "left_out": left_out,
    }
