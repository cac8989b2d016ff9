"""Evaluation by ranking candidate objects (objects of any length): the rank of each fact's gold object among its
relation's candidates, across processes, in the facts' order, and P@1 / P@10 / MRR over all facts and split into
facts whose gold object is one token and facts whose gold object is several.

The candidates of a relation are by default every distinct object of its train, dev and test facts that the
tokenizer can write (`default_candidates`); a user may give a file of them instead (`load_candidates`). Scores come
from `peft_softmix.ranking.score_candidates`: one forward pass per distinct candidate length, whatever the number of
candidates. A gold object that is not among a user's candidates cannot be ranked among them: it is ranked last
(rank C + 1 of C candidates, so it never counts as a hit) and counted, never silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .batching import eval_dataloader, ranks_in_fact_order, subject_lengths
from .errors import DataFormatError
from .evaluation import EvalRanks, scores_from_metric
from .facts import Fact, FactSplit, filter_unknown_subjects
from .metrics import load_fact_retrieval
from .objects import object_tokens, read_candidates
from .ranking import score_candidates

__all__ = [
    "LENGTH_GROUPS",
    "NOT_A_CANDIDATE",
    "CandidateCollator",
    "candidate_ranks",
    "default_candidates",
    "evaluate_candidate_ranks",
    "evaluate_facts_among_candidates",
    "length_group",
    "load_candidates",
    "rank_facts",
    "scores_by_length",
]

# The gold column of a fact whose object is not among the candidates: it is ranked after all of them.
NOT_A_CANDIDATE = -1
# How facts are split: by the number of tokens of their gold object.
LENGTH_GROUPS = ("single_token", "multi_token")


def default_candidates(tokenizer: Any, facts: Iterable[Fact]) -> list[str]:
    """Every distinct object of ``facts`` (a relation's train, dev and test facts), in first-seen order, that
    ``tokenizer`` can write (an object with a piece it cannot write can be no answer of the model)."""
    objects = dict.fromkeys(fact.object.strip() for fact in facts if fact.object and fact.object.strip())
    return [obj for obj in objects if object_tokens(tokenizer, obj)]


def load_candidates(path: str | Path, tokenizer: Any) -> list[str]:
    """A candidates file (one object per line, `peft_softmix.objects.read_candidates`), each line checked against
    ``tokenizer``: a line it cannot write is a `DataFormatError` naming the file and the line."""
    candidates = read_candidates(path)
    bad = [c for c in candidates if not object_tokens(tokenizer, c)]
    if bad:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        number = next(i for i, line in enumerate(lines, 1) if line.strip() == bad[0])
        more = f" ({len(bad) - 1} more line(s) like it)" if len(bad) > 1 else ""
        raise DataFormatError(
            f"{path}, line {number}: {bad[0]!r} holds a piece that {type(tokenizer).__name__} cannot write (its "
            f"unknown token), so no answer of the model can be it{more}. Remove such lines or use a model whose "
            "vocabulary covers them."
        )
    return candidates


def length_group(tokenizer: Any, obj: str) -> str:
    """``"single_token"`` or ``"multi_token"``: how many tokens ``obj`` is when it fills ``[Y]``."""
    return LENGTH_GROUPS[0] if len(object_tokens(tokenizer, obj)) <= 1 else LENGTH_GROUPS[1]


class CandidateCollator:
    """Turns a list of fact positions into a batch to rank candidates for: ``index`` (the positions), ``gold`` (each
    fact's column among ``candidates``, `NOT_A_CANDIDATE` if it is none) and ``subjects`` (strings)."""

    def __init__(self, facts: Sequence[Fact], candidates: Sequence[str]) -> None:
        self.facts = list(facts)
        self.columns = {candidate.strip(): c for c, candidate in enumerate(candidates)}

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        facts = [self.facts[i] for i in indices]
        gold = [self.columns.get(f.object.strip(), NOT_A_CANDIDATE) for f in facts]
        return {
            "index": torch.tensor(indices, dtype=torch.long),
            "gold": torch.tensor(gold, dtype=torch.long),
            "subjects": [f.subject for f in facts],
        }


def candidate_ranks(scores: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``[B]`` the 1-based rank of each gold column among ``scores`` ``[B, C]``: 1 + the number of candidates scored
    strictly higher (ties go the gold's way, as `peft_softmix.metrics.rank_of_gold`); C + 1 for a gold of
    `NOT_A_CANDIDATE`."""
    gold = gold.to(scores.device)
    known = gold != NOT_A_CANDIDATE
    gold_scores = scores.gather(1, gold.clamp(min=0).unsqueeze(1))
    if torch.isnan(gold_scores[known]).any():
        raise ValueError("A gold candidate's score is NaN; the ranks would be meaningless.")
    ranks = (scores > gold_scores).sum(dim=1) + 1
    return torch.where(known, ranks, torch.full_like(ranks, scores.shape[1] + 1))


@torch.no_grad()
def evaluate_candidate_ranks(
    model: Any,
    dataloader: Iterable[Mapping[str, Any]],
    num_facts: int,
    candidates: Sequence[str],
    accelerator: Any = None,
    per_template: bool = False,
    length_normalized: bool = False,
    progress: bool = False,
    description: str = "eval",
) -> EvalRanks:
    """Rank every fact's gold object among ``candidates`` under ``model`` (a `PeftModelForSoftMixture` as it is; in
    ``disable_adapter()``, the hard templates as a uniform mixture), batches from `CandidateCollator`.

    Ranks are by log p(c|x), or by log p(c|x) / (c's number of tokens) with ``length_normalized``; ``per_template``
    also ranks under each template alone. As `peft_softmix.evaluation.evaluate_ranks`: gathered across processes
    with ``accelerator.gather_for_metrics`` and put back in the order of the batches' ``index`` (a fact missing or
    seen twice is an error). ``loss`` is the mean -log p(gold|x) over the facts whose gold is a candidate.
    """
    from tqdm.auto import tqdm

    indices, mixture, templates, nll = [], [], [], []
    for batch in tqdm(dataloader, desc=description, disable=not progress, leave=False):
        subjects = list(batch["subjects"])
        gold = batch["gold"].to(model.embedding_device)
        scored = score_candidates(
            model, subjects, candidates, batch_size=max(len(subjects), 1), return_template_log_probs=per_template
        )
        ranks = candidate_ranks(scored.scores(length_normalized), gold)
        gold_log_probs = scored.log_probs.gather(1, gold.clamp(min=0).unsqueeze(1)).squeeze(1)
        loss = torch.where(gold != NOT_A_CANDIDATE, -gold_log_probs.float(), torch.full_like(gold_log_probs, math.nan))
        per = ranks.unsqueeze(1)
        if per_template:
            assert scored.template_log_probs is not None  # asked for
            rows = scored.template_log_probs
            if length_normalized:
                rows = rows / scored.lengths
            K = rows.shape[0] // len(subjects)  # one adapter: every fact has the same K rows
            per = candidate_ranks(rows, gold.repeat_interleave(K)).view(-1, K)
        gathered = (batch["index"].to(ranks.device), ranks, loss, per)
        if accelerator is not None:
            gathered = accelerator.gather_for_metrics(gathered)
        indices.append(gathered[0].cpu())
        mixture.append(gathered[1].cpu())
        nll.append(gathered[2].cpu())
        templates.append(gathered[3].cpu())
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    if len(index) != num_facts or len(torch.unique(index)) != num_facts:
        raise RuntimeError(
            f"Evaluation gathered {len(index)} ranks ({len(torch.unique(index))} distinct facts) for {num_facts} "
            "facts; the evaluation data loader must be prepared by the same Accelerator that gathers."
        )
    order = torch.argsort(index)
    losses = torch.cat(nll)[order] if nll else torch.zeros(0)
    known = losses[~torch.isnan(losses)]
    return EvalRanks(
        mixture=torch.cat(mixture)[order],
        templates=torch.cat(templates)[order] if per_template else None,
        loss=float(known.mean()) if len(known) else math.nan,
    )


def scores_by_length(
    metric: Any, ranks: Sequence[int], groups: Sequence[str], relation: str
) -> dict[str, dict[str, float] | None]:
    """P@1, P@10, MRR and count of ``ranks`` over all facts (``"all"``) and over each of `LENGTH_GROUPS` (``groups``
    gives each fact's); None for a group without facts. The groups' counts add up to the whole's."""
    if len(ranks) != len(groups):
        raise ValueError(f"Got {len(ranks)} ranks and {len(groups)} length groups; give one of each per fact.")
    out: dict[str, dict[str, float] | None] = {"all": scores_from_metric(metric, ranks, relation) if ranks else None}
    for group in LENGTH_GROUPS:
        mine = [int(r) for r, g in zip(ranks, groups) if g == group]
        out[group] = scores_from_metric(metric, mine, relation) if mine else None
    return out


def rank_facts(
    model: Any,
    facts: Sequence[Fact],
    candidates: Sequence[str],
    batch_size: int = 64,
    length_normalized: bool = False,
    progress: bool = False,
) -> EvalRanks:
    """`evaluate_candidate_ranks` of ``facts`` on one process, batched by subject length, ranks in the order of
    ``facts`` (``progress``: a progress bar on stderr)."""
    loader, order = eval_dataloader(
        facts,
        lambda ordered: CandidateCollator(ordered, candidates),
        subject_lengths(model.tokenizer, facts),
        batch_size,
        pin_memory=False,
    )
    result = evaluate_candidate_ranks(
        model,
        loader,
        len(facts),
        candidates,
        length_normalized=length_normalized,
        progress=progress,
        description="rank",
    )
    return EvalRanks(ranks_in_fact_order(result.mixture, order), None, result.loss)


def evaluate_facts_among_candidates(
    model: Any,
    split: FactSplit,
    candidates_file: str | Path | None = None,
    batch_size: int = 64,
    length_normalized: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """P@1, P@10, MRR and count of ``model`` on a file's facts (a `FactSplit`), objects of any length ranked among
    the candidates of ``candidates_file`` (default: the file's distinct objects), over all facts and per length
    group (``single_token`` / ``multi_token``: None when the group has no fact). Facts that cannot be asked are
    counted in ``left_out``; gold objects that are no candidate are ranked last and counted."""
    tokenizer = model.tokenizer
    pool = load_candidates(candidates_file, tokenizer) if candidates_file else default_candidates(tokenizer, split)
    if not pool:
        raise DataFormatError(f"No object of {split.report.path} can be written by the tokenizer: nothing to rank.")
    facts = [fact for fact in split.facts if object_tokens(tokenizer, fact.object)]
    unwritable = len(split.facts) - len(facts)
    facts, unknown = filter_unknown_subjects(facts, tokenizer)
    too_long = 0
    limit = model.max_query_length
    if limit is not None and facts:
        longest = max(len(object_tokens(tokenizer, c)) for c in pool)
        lengths = model.query_lengths([f.subject for f in facts])
        fits = [n + max(len(object_tokens(tokenizer, f.object)), longest) - 1 <= limit for f, n in zip(facts, lengths)]
        too_long = fits.count(False)
        facts = [f for f, ok in zip(facts, fits) if ok]
    left_out = {"object_not_writable": unwritable, "unknown_subject": len(unknown), "query_too_long": too_long}
    if not facts:
        hint = f" The model takes at most {limit} tokens per query." if too_long else ""
        raise split.nothing_to_score(left_out, hint)
    ranks = rank_facts(model, facts, pool, batch_size, length_normalized, progress)
    groups = [length_group(tokenizer, fact.object) for fact in facts]
    scores = scores_by_length(load_fact_retrieval(), ranks.mixture.tolist(), groups, split.relation or "facts")

    def packed(s: Mapping[str, float] | None) -> dict[str, float] | None:
        return None if s is None else {"p@1": s["p@1"], "p@10": s["p@10"], "mrr": s["mrr"], "facts": int(s["count"])}

    known = {candidate.strip() for candidate in pool}
    return {
        **(packed(scores["all"]) or {}),
        "single_token": packed(scores["single_token"]),
        "multi_token": packed(scores["multi_token"]),
        "loss": ranks.loss,
        "read": len(split.facts),
        "candidates": len(pool),
        "gold_not_a_candidate": sum(fact.object.strip() not in known for fact in facts),
        "length_normalized": length_normalized,
        "left_out": left_out,
    }
