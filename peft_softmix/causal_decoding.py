"""Open answers from a causal LM: a beam search over the mixture, from the prompts' key/value cache.

Every (subject, template) prompt runs once; each step feeds the chosen tokens of every beam to every template's
cache. A partial answer y has the mixture score log sum_k pi_k p_k(y|x); it *ends* under template k when the next
token is the one the template writes after ``[Y]`` (its first word after the slot, else the end-of-text token), so
a finished answer scores log sum_k pi_k p_k(y|x) p_k(end_k|x, y); an answer never holds a special token or a
template's end token. The search keeps ``num_beams`` partial answers per
subject for up to ``max_tokens`` tokens; the finished answers are then scored exactly by `score_candidates` (every
template, as ``causal_scoring`` says) and ranked.

Templates whose ``[Y]`` comes before ``[X]`` cannot propose answers (their prompt does not hold the subject); they
take part in the final scoring only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .causal_ranking import adapter_forward, cache_of, left_padded
from .objects import object_first, require_prompt

__all__ = ["decode_causal"]


@torch.inference_mode()
def decode_causal(
    model: Any,
    name: str,
    subjects: Sequence[str],
    max_tokens: int = 5,
    num_beams: int = 5,
) -> list[list[tuple[tuple[int, ...], float]]]:
    """For each subject, the distinct answers (token id tuples) that the beam search finished with the search's own
    score, log sum_k pi_k p_k(y|x) p_k(end_k|x, y) over the proposing templates, best first (`causal_answers`
    re-scores them exactly)."""
    processor = model.get_processor(name)
    device = model.embedding_device
    proposing = [k for k, layout in enumerate(processor.layouts) if not object_first(layout.template)]
    if not proposing:
        raise ValueError(
            f"No template of adapter '{name}' puts [X] before [Y], so no prompt holds the subject to continue; rank "
            "given objects instead (query(..., candidates=[...]) or score_candidates)."
        )
    processor._tokenise(subjects)
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token_id
    rows, ends = [], []
    for subject in subjects:
        entries = processor._rows(subject)
        for k in proposing:
            p = entries[k].query.mask_position
            require_prompt(processor, k, p)
            rows.append(entries[k].row[:p])
            after = entries[k].row[p + 1 :]
            ends.append(int(after[0, 0]) if after.shape[0] else eos)
    if any(end is None for end in ends):
        raise ValueError(
            f"{type(tokenizer).__name__} has no end-of-text token and a template ends with [Y], so an answer's end "
            "cannot be told; add text after [Y] or set tokenizer.eos_token."
        )
    B, K = len(subjects), len(proposing)
    banned = torch.tensor(sorted(set(ends) | set(tokenizer.all_special_ids)), device=device)
    weights = model._encoder(name).log_weights().to(device)[torch.tensor(proposing, device=device)]
    weights = weights - torch.logsumexp(weights, 0)  # the proposing templates' share of the mixture
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids, roles, mask = left_padded(rows, pad, device)
    forward = adapter_forward(model, None if model._adapters_disabled else name)
    out = forward(ids, roles, mask, (mask.cumsum(1) - 1).clamp(min=0))
    cache = cache_of(out)
    next_log_probs = out.logits[:, -1].float().log_softmax(-1).view(B, 1, K, -1)  # [B, beams, K, V]
    end_ids = torch.tensor(ends, device=device).view(B, 1, K, 1)
    mixture = weights.view(1, 1, K)
    # each subject's beams: their tokens and their per-template log p_k(y|x)
    beams: list[list[tuple[int, ...]]] = [[()] for _ in range(B)]
    so_far = torch.zeros(B, 1, K, device=device)
    finished: list[dict[tuple[int, ...], float]] = [{} for _ in range(B)]
    subject_index = torch.arange(B, device=device).view(B, 1)
    for step in range(max_tokens + 1):
        if step > 0:  # every beam may end here: y, then each template's end token
            ending = next_log_probs.gather(3, end_ids.expand(B, so_far.shape[1], K, 1)).squeeze(-1)
            end_scores = torch.logsumexp(mixture + so_far + ending, dim=2).tolist()
            for b in range(B):
                for j, answer in enumerate(beams[b]):
                    finished[b][answer] = max(finished[b].get(answer, float("-inf")), end_scores[b][j])
        if step == max_tokens:
            break
        joint = so_far.unsqueeze(-1) + next_log_probs  # [B, J, K, V]
        J, V = joint.shape[1], joint.shape[3]
        mixed = torch.logsumexp(mixture.unsqueeze(-1) + joint, dim=2)  # [B, J, V]
        # an answer holds no special token, nor the word that ends it under a template (". " after "Microsoft")
        mixed[..., banned] = float("-inf")
        top = mixed.flatten(1).topk(min(num_beams, J * V), dim=1)
        parents, tokens = top.indices // V, top.indices % V  # [B, J']
        beams = [[beams[b][p] + (t,) for p, t in zip(parents[b].tolist(), tokens[b].tolist())] for b in range(B)]
        so_far = joint[subject_index, parents, :, tokens]  # [B, J', K]
        # every new beam continues its parent's cache rows (one per template) with its new token
        rows = ((subject_index * J + parents).unsqueeze(-1) * K + torch.arange(K, device=device)).reshape(-1)
        cache.batch_select_indices(rows)
        mask = torch.cat([mask.index_select(0, rows), mask.new_ones(rows.shape[0], 1)], dim=1)
        step_ids = tokens.unsqueeze(-1).expand(-1, -1, K).reshape(-1, 1)
        out = forward(step_ids, torch.full_like(step_ids, -1), mask, mask.sum(1, keepdim=True) - 1, cache)
        cache = cache_of(out)
        next_log_probs = out.logits[:, -1].float().log_softmax(-1).view(B, -1, K, V)
    return [sorted(found.items(), key=lambda item: -item[1]) for found in finished]


def causal_answers(
    model: Any,
    name: str,
    subjects: Sequence[str],
    top_k: int = 10,
    max_tokens: int = 5,
    num_beams: int = 5,
    causal_scoring: str = "prefix",
) -> list[dict[str, Any]]:
    """`query`'s answers for a causal LM's adapter: the beam search's finished answers, scored exactly and ranked.

    Each subject gets ``{"subject", "adapter", "predictions"}``, a prediction ``{"score", "tokens", "token_str",
    "template_shares"}``: p(y|x) under the mixture, the answer's token ids, its text as the tokenizer decodes it and
    each template's share pi_k p_k(y|x) / p(y|x).
    """
    from .causal_ranking import score_causal_candidates

    processor = model.get_processor(name)
    tokenizer = processor.tokenizer
    proposals = decode_causal(model, name, subjects, max_tokens=max_tokens, num_beams=max(num_beams, top_k))
    results = []
    for subject, found in zip(subjects, proposals):
        answers = [answer for answer, _ in found]
        mixed, per_row, log_weights = score_causal_candidates(
            model, name, processor, [subject], answers, causal_scoring
        )
        order = mixed[0].argsort(descending=True)[:top_k].tolist()
        shares = (per_row + log_weights[:, None] - mixed[0][None, :]).exp()  # [K, C]
        predictions = [
            {
                "score": float(mixed[0, c].exp()),
                "tokens": list(answers[c]),
                "token_str": str(tokenizer.decode(list(answers[c]))).strip(),
                "template_shares": shares[:, c].tolist(),
            }
            for c in order
        ]
        results.append({"subject": subject, "adapter": name, "predictions": predictions})
    return results
