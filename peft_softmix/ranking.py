"""Ranking candidate objects of any length, one forward pass per candidate *length*.

For each distinct length n among the candidates, every (fact, template) row runs once with n masks (objects.py).
Its ``[n, V]`` distributions at the masks then score every candidate of that length by gathering,
log p_k(c|x) = sum_j log p_k(c_j|x), and each fact's rows are mixed, log p(c|x) = logsumexp_k(log pi_k + log p_k(c|x)).
The cost of the model grows with the number of distinct candidate lengths, never with the number of candidates;
the gathering costs O(rows x candidates x n).

Ranking by log p(c|x) favours short candidates (every token multiplies in a probability below 1);
``length_normalized`` ranks by log p(c|x) / n instead. docs/multi-token.md measures both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .causal_architectures import CAUSAL_CACHE_UNUSABLE
from .causal_ranking import score_causal_candidates
from .errors import DataFormatError
from .inputs import check_query_options, check_subjects
from .mixture import FactGroups, mix_rows
from .model_kinds import model_type
from .objects import encode_objects, object_tokens

__all__ = ["CandidateScores", "candidate_tokens", "score_candidates"]


@dataclass
class CandidateScores:
    """Scores of C candidate objects for B subjects.

    Args:
        candidates: the candidates, in the order of the columns.
        tokens: each candidate's token ids.
        log_probs: ``[B, C]`` log p(c|x) under each subject's adapter (the mixture).
        template_log_probs: ``[N, C]`` log p_k(c|x) of each (subject, template) row, when asked for.
        log_weights: ``[N]`` each row's log pi_k, when ``template_log_probs`` are asked for.
    """

    candidates: list[str]
    tokens: list[tuple[int, ...]]
    log_probs: torch.Tensor
    template_log_probs: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """``[C]`` each candidate's number of tokens."""
        return torch.tensor([len(t) for t in self.tokens], device=self.log_probs.device)

    def scores(self, length_normalized: bool = False) -> torch.Tensor:
        """``[B, C]`` the ranking scores: log p(c|x), or log p(c|x) / (its number of tokens)."""
        return self.log_probs / self.lengths if length_normalized else self.log_probs


def candidate_tokens(
    tokenizer: Any, candidates: Sequence[str], what: str = "candidate", exact: bool = False
) -> list[tuple[int, ...]]:
    """Each candidate's token ids; a candidate that is empty, or that the tokenizer cannot write, is an error
    naming it (and its place in ``candidates``)."""
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError(f"Candidates must be a non-empty list of objects (strings), got {candidates!r}.")
    out = []
    for i, candidate in enumerate(candidates):
        if not isinstance(candidate, str) or not candidate.strip():
            raise DataFormatError(f"{what} {i + 1} ({candidate!r}) is empty; give every candidate object as text.")
        tokens = object_tokens(tokenizer, candidate, exact)
        if not tokens:
            raise DataFormatError(
                f"{what} {i + 1} ({candidate!r}) holds a piece that {type(tokenizer).__name__} cannot write (its "
                "unknown token), so no answer of the model can be it; remove it."
            )
        out.append(tokens)
    return out


@torch.inference_mode()
def score_candidates(
    model: Any,
    subjects: Sequence[str],
    candidates: Sequence[str],
    adapter_names: Sequence[str] | None = None,
    batch_size: int = 32,
    return_template_log_probs: bool = False,
    causal_scoring: str = "prefix",
) -> CandidateScores:
    """log p(c|x) of every candidate object c (any length) for every subject, through each subject's adapter
    (the active one by default) of a `PeftModelForSoftMixture`. See the module for how and at what cost; a causal
    LM's candidates are scored from the prompt's key/value cache (causal_ranking.py), as ``causal_scoring`` says."""
    check_subjects(subjects, "score_candidates")
    check_query_options(1, batch_size)
    names = list(adapter_names) if adapter_names is not None else [model.active_adapter] * len(subjects)
    if len(names) != len(subjects):
        raise ValueError(f"score_candidates got {len(subjects)} subject(s) and {len(names)} adapter name(s).")
    processors = [model.get_processor(name) for name in names]
    tokens = candidate_tokens(processors[0].tokenizer, candidates, exact=processors[0].causal)
    if processors[0].causal:
        return _score_causal(model, subjects, names, candidates, tokens, batch_size, causal_scoring)
    device = model.embedding_device
    by_length: dict[int, list[int]] = {}
    for c, token_ids in enumerate(tokens):
        by_length.setdefault(len(token_ids), []).append(c)
    columns = {n: torch.tensor(cs, device=device) for n, cs in by_length.items()}
    ids_of = {n: torch.tensor([tokens[c] for c in cs], device=device) for n, cs in by_length.items()}  # [C_n, n]
    B, C = len(subjects), len(tokens)
    mixed_parts, row_parts, weight_parts = [], [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, B, batch_size):
            chunk = list(subjects[start : start + batch_size])
            chunk_names = names[start : start + batch_size]
            chunk_processors = processors[start : start + batch_size]
            mixed = torch.empty(len(chunk), C, device=device)
            per_row: torch.Tensor | None = None
            for n in sorted(by_length):
                batch = encode_objects(chunk_processors, chunk, num_masks=[n] * len(chunk), device=device)
                out = model(**batch, adapter_names=chunk_names, return_template_log_probs=True)
                distributions = out.template_log_probs  # [N, n, V]
                ids = ids_of[n]
                rows = distributions[:, 0].index_select(1, ids[:, 0])  # [N, C_n]
                for j in range(1, n):
                    rows = rows + distributions[:, j].index_select(1, ids[:, j])
                groups = FactGroups(tuple(p.num_templates for p in chunk_processors), batch["fact_index"])
                mixed[:, columns[n]] = mix_rows(rows, out.log_weights, groups)
                if return_template_log_probs:
                    if per_row is None:
                        per_row = rows.new_empty(rows.shape[0], C)
                    per_row[:, columns[n]] = rows
                    weights = out.log_weights
            mixed_parts.append(mixed)
            if per_row is not None:
                row_parts.append(per_row)
                weight_parts.append(weights)
    finally:
        model.train(was_training)
    return CandidateScores(
        candidates=list(candidates),
        tokens=tokens,
        log_probs=torch.cat(mixed_parts),
        template_log_probs=torch.cat(row_parts) if row_parts else None,
        log_weights=torch.cat(weight_parts) if weight_parts else None,
    )


def _score_causal(
    model: Any,
    subjects: Sequence[str],
    names: list[str],
    candidates: Sequence[str],
    tokens: list[tuple[int, ...]],
    batch_size: int,
    causal_scoring: str,
) -> CandidateScores:
    """Causal LMs: each adapter's subjects in chunks, from the key/value cache of their prompts (or, for the types
    whose cache cannot continue a prompt exactly, one full forward per candidate). Rows come back in subject order,
    each subject's K templates together, as for masked LMs."""
    device = model.embedding_device
    sizes = [model.get_processor(name).num_templates for name in names]
    starts = [sum(sizes[:b]) for b in range(len(subjects))]
    mixed = torch.empty(len(subjects), len(tokens), device=device)
    per_row = torch.empty(sum(sizes), len(tokens), device=device)
    weights = torch.empty(sum(sizes), device=device)
    was_training = model.training
    model.eval()
    try:
        if model_type(model.get_base_model()) in CAUSAL_CACHE_UNUSABLE:
            for c, candidate in enumerate(candidates):
                for start in range(0, len(subjects), batch_size):
                    chunk = list(subjects[start : start + batch_size])
                    chunk_names = names[start : start + batch_size]
                    batch = encode_objects(
                        [model.get_processor(n) for n in chunk_names], chunk, [candidate] * len(chunk),
                        device=device, causal_scoring=causal_scoring,
                    )  # fmt: skip
                    out = model(**batch, adapter_names=chunk_names)
                    first = starts[start]
                    mixed[start : start + len(chunk), c] = out.object_log_probs
                    per_row[first : first + len(out.log_weights), c] = out.template_object_log_probs
                    weights[first : first + len(out.log_weights)] = out.log_weights
        else:
            for name in dict.fromkeys(names):
                mine = [b for b, n in enumerate(names) if n == name]
                processor = model.get_processor(name)
                K = processor.num_templates
                for start in range(0, len(mine), batch_size):
                    facts = mine[start : start + batch_size]
                    scores, rows, row_weights = score_causal_candidates(
                        model, name, processor, [subjects[b] for b in facts], tokens, causal_scoring
                    )
                    mixed[torch.tensor(facts, device=device)] = scores
                    places = torch.tensor([starts[b] + k for b in facts for k in range(K)], device=device)
                    per_row[places] = rows
                    weights[places] = row_weights
    finally:
        model.train(was_training)
    return CandidateScores(list(candidates), tokens, mixed, per_row, weights)
