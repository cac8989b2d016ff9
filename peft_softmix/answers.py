"""Answers people can read: `query`'s ranked fillers of ``[Y]``, each with its token, its text and each template's
share of it.

Every subject gets ``{"subject", "adapter", "predictions": [...]}``, best first. A prediction is
``{"score", "token", "token_str", "template_shares"}``: the mixture probability p(y|x), the token id, the token as
the tokenizer decodes it (no ``Ġ``, ``▁`` or ``##`` marks) and, per template k, pi_k p_k(y|x) / p(y|x) (they sum to
1). With ``return_template_probs`` each subject also gets ``"templates": [{"template", "weight", "predictions"}]``,
every template's own top-k (predictions without shares).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import PreTrainedTokenizerBase

from .inputs import candidate_mask as checked_candidate_mask
from .inputs import check_query_options, check_subjects

__all__ = ["query_model", "token_strings"]

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


@torch.inference_mode()
def query_model(
    model: Any,
    subjects: Sequence[str],
    top_k: int = 10,
    return_template_probs: bool = False,
    candidate_ids: Sequence[int] | None = None,
    batch_size: int = 64,
    adapter_names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The top-k fillers of ``[Y]`` for each subject of a `PeftModelForSoftMixture`, best first (see the module).

    ``adapter_names`` (one per subject) sends each subject through its own relation's adapter; subjects of several
    adapters share batches, one forward pass each. ``subjects`` is a list (a bare string is refused); ``top_k`` and
    ``batch_size`` are >= 1; ``candidate_ids`` are token ids (the answers are restricted to them).
    """
    check_subjects(subjects, "query", allow_empty=True)
    check_query_options(top_k, batch_size)
    if adapter_names is not None and (isinstance(adapter_names, str) or len(adapter_names) != len(subjects)):
        raise ValueError(
            f"query got {len(subjects)} subject(s) and adapter_names={adapter_names!r}; give one adapter name per "
            "subject (a list)."
        )
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
