"""Answers people can read: `query`'s ranked fillers of ``[Y]``, each with its token(s), its text and each
template's share of it.

Every subject gets ``{"subject", "adapter", "predictions": [...]}``, best first. A prediction is
``{"score", "token", "token_str", "template_shares"}``: the mixture probability p(y|x), the token id, the token as
the tokenizer decodes it (no ``Ġ``, ``▁`` or ``##`` marks) and, per template k, pi_k p_k(y|x) / p(y|x) (they sum to
1). With ``return_template_probs`` each subject also gets ``"templates": [{"template", "weight", "predictions"}]``,
every template's own top-k (predictions without shares).

Answers of any length (``max_tokens`` > 1: decoded, `peft_softmix.decoding`; or ``candidates``: ranked,
`peft_softmix.ranking`) are ``{"score", "tokens", "token_str", "template_shares"}``: ``tokens`` lists the ids,
``token_str`` is the tokenizer's decoding of them as it writes the object (``"Ind", "##ia"`` -> ``"India"``), and a
single-token answer also keeps ``"token"`` (its id), as transformers' fill-mask answers do. A ranked candidate also
has ``"candidate"``, the text as given. ``score`` is p(y|x) = sum_k pi_k prod_j p_k(y_j|x), the model's sequence
score; ``length_normalized=True`` orders by log p(y|x) / (its number of tokens) instead, so scores need not
decrease down the list. Answers that read the same (two token sequences that decode alike) are listed once, the
better one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedTokenizerBase

from .decoding import DEFAULT_STRATEGY, AnswerScores, check_decoding_options, decode_answers
from .inputs import candidate_mask as checked_candidate_mask
from .inputs import check_query_options, check_subjects
from .ranking import score_candidates

__all__ = ["object_string", "query_model", "token_strings"]

_TOKEN_STRINGS: WeakKeyDictionary[PreTrainedTokenizerBase, dict[int, str]] = WeakKeyDictionary()


def token_strings(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[str]:
    """Each token id as text, as the tokenizer decodes it on its own, without a word-piece mark or edge spaces.

    Cached per tokenizer (a vocabulary's worth at most): serving decodes the same few thousand answers again and
    again.
    """
    cache = _TOKEN_STRINGS.get(tokenizer)
    if cache is None:
        cache = _TOKEN_STRINGS[tokenizer] = {}
    out = []
    for token in ids:
        text = cache.get(token)
        if text is None:
            text = str(tokenizer.decode([token])).strip()
            if text.startswith("##") and len(text) > 2:  # a WordPiece continuation decodes with its mark
                text = text[2:]
            cache[token] = text
        out.append(text)
    return out


def object_string(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    """The object that token ids write, as the tokenizer joins them (pieces glued, no ``##``/``Ġ``/``▁`` marks)."""
    if len(ids) == 1:
        return token_strings(tokenizer, ids)[0]
    text = str(tokenizer.decode(list(ids))).strip()
    return text[2:] if text.startswith("##") and len(text) > 2 else text


@torch.inference_mode()
def query_model(
    model: Any,
    subjects: Sequence[str],
    top_k: int = 10,
    return_template_probs: bool = False,
    candidate_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    adapter_names: Sequence[str] | None = None,
    max_tokens: int = 1,
    strategy: str = DEFAULT_STRATEGY,
    candidates: Sequence[str] | None = None,
    length_normalized: bool = False,
) -> list[dict[str, Any]]:
    """The top-k fillers of ``[Y]`` for each subject of a `PeftModelForSoftMixture`, best first (see the module).

    ``adapter_names`` (one per subject) sends each subject through its own relation's adapter; subjects of several
    adapters share batches, one forward pass each. ``subjects`` is a list (a bare string is refused); ``top_k`` and
    ``batch_size`` are >= 1; ``candidate_ids`` are token ids (the single-token answers are restricted to them).

    ``max_tokens`` > 1 decodes open answers of 1..max_tokens tokens by ``strategy`` (`peft_softmix.decoding`: it
    keeps the top_k first tokens per length); ``candidates`` (objects of any length) ranks those instead
    (`score_candidates`); both rank by p(y|x), or by log p(y|x) / n with ``length_normalized``.
    """
    check_subjects(subjects, "query", allow_empty=True)
    check_query_options(top_k, batch_size)
    check_decoding_options(max_tokens, strategy)
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(subjects)):
        raise ValueError(
            f"query got {len(subjects)} subject(s) and adapter_names={adapter_names!r}; give one adapter name per "
            "subject (a list)."
        )
    if candidates is not None or max_tokens > 1:
        return _any_length(
            model, subjects, top_k, return_template_probs, candidate_ids, batch_size, adapter_names, max_tokens,
            strategy, candidates, length_normalized,
        )  # fmt: skip
    device = model.embedding_device
    candidate_mask = checked_candidate_mask(candidate_ids, model._vocab_size, device)
    count = None if candidate_mask is None else int(candidate_mask.sum())
    names = list(adapter_names) if adapter_names is not None else [model.active_adapter] * len(subjects)
    was_training = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    try:
        for start in range(0, len(subjects), batch_size):
            chunk = list(subjects[start : start + batch_size])
            chunk_names = names[start : start + batch_size]
            batch = model.encode(chunk, device=device, adapter_names=chunk_names)
            out = model(
                **batch, adapter_names=chunk_names, candidate_mask=candidate_mask, return_template_log_probs=True
            )
            results.extend(
                _answers(model, chunk, chunk_names, batch["fact_index"], out, top_k, return_template_probs, count)
            )
    finally:
        model.train(was_training)
    return results


def _answers(
    model: Any,
    subjects: list[str],
    names: list[str],
    fact_index: torch.Tensor,
    out: Any,
    top_k: int,
    with_templates: bool,
    candidate_count: int | None,
) -> list[dict[str, Any]]:
    tokenizer = model.get_processor(names[0]).tokenizer
    log_probs, per_row, row_weights = out.log_probs, out.template_log_probs, out.log_weights
    # never more answers than allowed tokens: with candidates, the rest have probability 0
    allowed = log_probs.shape[-1] if candidate_count is None else candidate_count
    top = min(top_k, allowed)
    values, ids = log_probs.topk(top)
    # each template's share of each answer: pi_k p_k(y|x) / p(y|x), gathered for all rows at once
    row_ids = ids.index_select(0, fact_index)
    shares = (per_row.gather(1, row_ids) + row_weights[:, None] - values.index_select(0, fact_index)[:, :]).exp()
    shares = torch.nan_to_num(shares, nan=0.0)  # an answer of probability 0 (outside the candidates) has no share
    scores, id_lists, share_rows = values.exp().tolist(), ids.tolist(), shares.T.tolist()
    per_template = per_row.topk(top) if with_templates else None
    weights = row_weights.exp().tolist()
    results, row = [], 0
    for b, (subject, name) in enumerate(zip(subjects, names)):
        processor = model.get_processor(name)
        K = processor.num_templates
        texts = token_strings(tokenizer, id_lists[b])
        predictions = [
            {
                "score": scores[b][j],
                "token": id_lists[b][j],
                "token_str": texts[j],
                "template_shares": share_rows[j][row : row + K],
            }
            for j in range(top)
        ]
        item: dict[str, Any] = {"subject": subject, "adapter": name, "predictions": predictions}
        if per_template is not None:
            item["templates"] = [
                {
                    "template": layout.template,
                    "weight": weights[row + k],
                    "predictions": _plain(tokenizer, per_template[0][row + k], per_template[1][row + k]),
                }
                for k, layout in enumerate(processor.layouts)
            ]
        results.append(item)
        row += K
    return results


def _plain(tokenizer: PreTrainedTokenizerBase, values: torch.Tensor, ids: torch.Tensor) -> list[dict[str, Any]]:
    token_ids = ids.tolist()
    return [
        {"score": score, "token": token, "token_str": text}
        for score, token, text in zip(values.exp().tolist(), token_ids, token_strings(tokenizer, token_ids))
    ]


def _any_length(
    model: Any,
    subjects: Sequence[str],
    top_k: int,
    return_template_probs: bool,
    candidate_ids: Sequence[int] | None,
    batch_size: int,
    adapter_names: Sequence[str] | None,
    max_tokens: int,
    strategy: str,
    candidates: Sequence[str] | None,
    length_normalized: bool,
) -> list[dict[str, Any]]:
    """Answers of any length: ``candidates`` ranked, or open answers of up to ``max_tokens`` tokens decoded."""
    what = "candidates" if candidates is not None else f"max_tokens={max_tokens}"
    if candidate_ids is not None:
        raise ValueError(
            f"candidate_ids restricts single-token answers and cannot be combined with {what}; give the objects "
            "as candidates=[...] (text) instead."
        )
    if return_template_probs:
        raise ValueError(
            f"return_template_probs lists each template's own single-token top-k, which {what} does not have; every "
            "answer's template_shares say how much each template gives it."
        )
    names = list(adapter_names) if adapter_names is not None else [model.active_adapter] * len(subjects)
    if not subjects:
        return []
    if candidates is not None:
        if isinstance(candidates, str):
            raise ValueError(f"candidates takes a list of objects, got the string {candidates!r}.")
        found = score_candidates(model, subjects, candidates, names, min(batch_size, 32), True)
        scores = _per_subject(model, names, found.log_probs, found.template_log_probs, found.log_weights, found.tokens)
    else:
        scores = decode_answers(model, subjects, max_tokens, strategy, top_k, False, names, min(batch_size, 16))
    texts = {} if candidates is None else {tuple(t): c for t, c in zip(found.tokens, candidates)}
    return [
        {
            "subject": subject,
            "adapter": name,
            "predictions": _readable(model, name, s, top_k, length_normalized, texts),
        }
        for subject, name, s in zip(subjects, names, scores)
    ]


def _per_subject(
    model: Any,
    names: list[str],
    log_probs: torch.Tensor,
    template_log_probs: Any,
    log_weights: Any,
    tokens: list[tuple[int, ...]],
) -> list[AnswerScores]:
    out, row = [], 0
    for b, name in enumerate(names):
        K = model.get_processor(name).num_templates
        out.append(AnswerScores(tokens, log_probs[b], template_log_probs[row : row + K].T, log_weights[row : row + K]))
        row += K
    return out


def _readable(
    model: Any,
    name: str,
    scores: AnswerScores,
    top_k: int,
    length_normalized: bool,
    candidates: dict[tuple[int, ...], str],
) -> list[dict[str, Any]]:
    tokenizer = model.get_processor(name).tokenizer
    ranked = scores.ranked(length_normalized)
    # pi_k p_k(y|x) / p(y|x), every answer's templates at once
    shares = (ranked.template_log_probs + ranked.log_weights[None, :] - ranked.log_probs[:, None]).exp()
    values, share_rows = ranked.log_probs.exp().tolist(), torch.nan_to_num(shares, nan=0.0).tolist()
    seen: set[str] = set()
    predictions: list[dict[str, Any]] = []
    for i, ids in enumerate(ranked.tokens):
        text = object_string(tokenizer, ids)
        if text in seen:
            continue  # the same object written with other pieces: its better reading is already listed
        seen.add(text)
        answer: dict[str, Any] = {"score": values[i], "tokens": list(ids), "token_str": text}
        if len(ids) == 1:
            answer["token"] = ids[0]
        if ids in candidates:
            answer["candidate"] = candidates[ids]
        answer["template_shares"] = share_rows[i]
        predictions.append(answer)
        if len(predictions) == top_k:
            break
    return predictions
