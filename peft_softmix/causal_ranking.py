"""Ranking candidate objects under a causal LM from a key/value cache: the prompt runs once, not once per candidate.

Every (subject, template) row's prompt, the tokens before ``[Y]``, runs once through the model with its soft words
and deep offsets, keeping its key/value cache. Each candidate then continues that cache with its own tokens (and,
for a template scored as a whole sentence, the template's tokens after ``[Y]``, soft words included): the cost
grows with the candidates' tokens, not with candidates x prompt length. The scores are those of one forward pass
over each filled sentence (tests/test_causal.py checks it): log p_k(c|x) = sum_j log p_k(c_j | prompt, c_<j), and the
mixture log p(c|x) = logsumexp_k(log pi_k + log p_k(c|x)).

Prompts are padded on the left, so that every row's continuation starts at the same place; position ids count real
tokens only. One adapter at a time (`score_candidates` groups subjects by adapter).

`score_after_prompts` does the prompt pass and the continuations for any `CausalForward`: the adapter's
(`adapter_forward`), or another prompt method's, which then scores its candidates by the same code.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any, Protocol

import torch
from torch.nn.utils.rnn import pad_sequence

from .errors import QueryTooLongError
from .hooks import SoftPositions, deep_prompt_hooks, soft_word_embeddings
from .mixture import FactGroups, mix_rows
from .objects import require_prompt, whole_sentence
from .processing import SoftMixtureProcessor

__all__ = ["CausalForward", "adapter_forward", "left_padded", "score_after_prompts", "score_causal_candidates"]

# the [rows, positions, vocabulary] logits of one continuation pass, in floats (2**27: 512 MB)
_MAX_LOGITS = 2**27
_MAX_ROWS = 4096


def _run(model: Any, name: str | None, input_ids: torch.Tensor, roles: torch.Tensor, **kwargs: Any) -> Any:
    """The base model on ``input_ids`` with adapter ``name``'s soft words and deep offsets at ``roles`` (None: the
    hard templates, as with the adapters disabled)."""
    with ExitStack() as stack:
        if name is not None and bool((roles >= 0).any()):
            encoder = model._encoder(name)
            positions = SoftPositions.of(roles)
            stack.enter_context(soft_word_embeddings(model._embedding_tables, encoder, positions, input_ids))
            if encoder.deep_offsets is not None:
                stack.enter_context(deep_prompt_hooks(model._layers, encoder.deep_offsets, positions))
        return model.base_model(input_ids=input_ids, **kwargs)


def cache_argument(model: Any) -> str:
    """The name the base model's forward takes a key/value cache under: ``cache`` (transformers >= 5.24, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    parameters = inspect.signature(model.get_base_model().forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_of(output: Any) -> Any:
    """The key/value cache a forward returned (``cache``, or ``past_key_values`` before transformers 5.24)."""
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


@torch.inference_mode()
def score_causal_candidates(
    model: Any,
    name: str,
    processor: SoftMixtureProcessor,
    subjects: Sequence[str],
    tokens: Sequence[tuple[int, ...]],
    causal_scoring: str = "prefix",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([B, C] mixture log-probs, [N, C] per-row log-probs, [N] row log weights)`` of candidates ``tokens`` (their
    exact token ids) for ``subjects``, all through adapter ``name``."""
    device = model.embedding_device
    disabled = model._adapters_disabled
    processor._tokenise(subjects)
    entries = [entry for subject in subjects for entry in processor._rows(subject)]
    K = processor.num_templates
    whole = [whole_sentence(layout.template, causal_scoring) for layout in processor.layouts]
    for k, entry in enumerate(entries[:K]):
        require_prompt(processor, k, entry.query.mask_position)
    prefixes = [entry.row[: entry.query.mask_position] for entry in entries]
    suffixes = [
        entry.row[entry.query.mask_position + 1 :] if whole[n % K] else entry.row[:0]
        for n, entry in enumerate(entries)
    ]
    N = len(entries)
    limit = processor.max_query_length
    if limit is not None:
        longest = max(len(t) for t in tokens)
        for n, (prefix, suffix) in enumerate(zip(prefixes, suffixes)):
            if prefix.shape[0] + longest + suffix.shape[0] > limit:
                raise QueryTooLongError(
                    f"With its longest candidate ({longest} tokens), the query for subject {subjects[n // K]!r} with "
                    f"template {processor.layouts[n % K].template!r} is {prefix.shape[0] + longest + suffix.shape[0]} "
                    f"tokens long, but {processor.model_name} takes at most {limit}. Leave out such facts (or "
                    "candidates that long); peft_softmix.relations.drop_long_queries does it for a relation's data."
                )
    pad = processor.tokenizer.pad_token_id if processor.tokenizer.pad_token_id is not None else 0
    forward = adapter_forward(model, None if disabled else name)
    per_row = torch.empty(N, len(tokens), device=device)
    # one template at a time: its rows' continuations have one suffix length (none for prefix scoring), so that no
    # row is padded to another template's whole sentence
    for k in range(K):
        rows = torch.arange(k, N, K, device=device)
        per_row[rows] = score_after_prompts(forward, prefixes[k::K], tokens, device, suffixes[k::K], pad, limit)
    if disabled:
        log_weights = torch.full((N,), -torch.log(torch.tensor(float(K))).item(), device=device)
    else:
        log_weights = model._encoder(name).log_weights().to(device).repeat(len(subjects))
    groups = FactGroups((K,) * len(subjects), torch.arange(len(subjects), device=device).repeat_interleave(K))
    return mix_rows(per_row, log_weights, groups), per_row, log_weights


class CausalForward(Protocol):
    """A causal LM's forward as `score_after_prompts` calls it: ``ids`` ``[B, S]`` (with ``roles``, each position's
    template role or -1) under ``attention_mask`` and ``position_ids``; without ``cache`` the prompts' pass, which
    must return its key/value cache, with ``cache`` a continuation of it (``attention_mask`` then covers the
    cached positions too). Returns the model's output (``logits``, and the cache)."""

    def __call__(
        self,
        ids: torch.Tensor,
        roles: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
    ) -> Any: ...


def adapter_forward(model: Any, adapter: str | None) -> CausalForward:
    """The `CausalForward` of a `PeftModelForSoftMixture` with adapter ``adapter``'s soft words and deep offsets
    (None: the hard templates)."""
    argument = cache_argument(model)

    def forward(
        ids: torch.Tensor,
        roles: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any = None,
    ) -> Any:
        extra = {} if cache is None else {argument: cache}
        return _run(
            model, adapter, ids, roles,
            attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra,
        )  # fmt: skip

    return forward


def left_padded(
    rows: Sequence[torch.Tensor], pad: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows`` (``[L, 2]`` tensors of token id and template role) padded on the left, so that whatever follows
    them starts at one place: ``([R, P] ids, [R, P] roles (-1 in the padding), [R, P] attention mask)``. Position
    ids count real tokens only: ``(mask.cumsum(1) - 1).clamp(min=0)``."""
    lengths = torch.tensor([r.shape[0] for r in rows], device=device)
    P = int(lengths.max())
    flipped = pad_sequence([r.flip(0) for r in rows], batch_first=True, padding_value=-1).flip(1).to(device)
    mask = (torch.arange(P, device=device) >= P - lengths[:, None]).long()
    return flipped[..., 0].masked_fill(mask == 0, pad), flipped[..., 1].masked_fill(mask == 0, -1), mask


def score_after_prompts(
    forward: CausalForward,
    prefixes: Sequence[torch.Tensor],
    tokens: Sequence[tuple[int, ...]],
    device: torch.device | str,
    suffixes: Sequence[torch.Tensor] | None = None,
    pad: int = 0,
    limit: int | None = None,
) -> torch.Tensor:
    """``[R, C]`` log p of every candidate (``tokens``, exact ids) after each of R prompts, by the chain rule:
    sum_j log p(c_j | prompt, c_<j), plus each row's suffix tokens after the candidate when ``suffixes`` are given.

    ``prefixes`` and ``suffixes`` are ``[L, 2]`` tensors of (token id, template role or -1). One pass of the prompts
    (padded on the left, position ids counting real tokens), then one continuation of their key/value cache per
    candidate length (or per chunk of its candidates); a one-token candidate with no suffix costs no continuation.
    """
    R = len(prefixes)
    after = list(suffixes) if suffixes is not None else [torch.zeros(0, 2, dtype=torch.long)] * R
    prompt_ids, prompt_roles, prompt_mask = left_padded(prefixes, pad, device)
    lengths = prompt_mask.sum(1)
    out = forward(prompt_ids, prompt_roles, prompt_mask, (prompt_mask.cumsum(1) - 1).clamp(min=0))
    cache = cache_of(out)
    first_log_probs = out.logits[:, -1].float().log_softmax(-1)  # [R, V]: each candidate's first token
    scores = torch.empty(R, len(tokens), device=device)
    by_length: dict[int, list[int]] = {}
    for c, ids in enumerate(tokens):
        by_length.setdefault(len(ids), []).append(c)
    for n, columns in sorted(by_length.items()):
        candidate_ids = torch.tensor([tokens[c] for c in columns], device=device)  # [C_n, n]
        S = n + max(s.shape[0] for s in after)
        if S == 1:  # one-token candidates, nothing after them: the prompt's last logits score them all
            scores[:, columns] = first_log_probs.index_select(1, candidate_ids[:, 0])
            continue
        # as many candidates per pass as keep its [rows, positions, vocabulary] logits near _MAX_LOGITS floats and
        # its copy of the prompts' cache to _MAX_ROWS rows
        chunk = max(1, min(_MAX_LOGITS // (first_log_probs.shape[1] * R * S), _MAX_ROWS // R))
        for start in range(0, len(columns), chunk):
            part = candidate_ids[start : start + chunk]
            scores[:, columns[start : start + chunk]] = _continue(
                forward, cache, first_log_probs, prompt_mask, lengths, part, after, pad, limit
            )
    return scores


def _continue(
    forward: CausalForward,
    cache: Any,
    first_log_probs: torch.Tensor,
    prompt_mask: torch.Tensor,
    prompt_lengths: torch.Tensor,
    candidate_ids: torch.Tensor,
    suffixes: list[torch.Tensor],
    pad: int,
    limit: int | None,
) -> torch.Tensor:
    """``[N, C]`` log p of ``candidate_ids`` (``[C, n]``, and each row's suffix after them) from the prompts'
    cache: the continuation rows are (row, candidate) pairs, row-major, built as one tensor."""
    device = candidate_ids.device
    (C, n), N = candidate_ids.shape, len(suffixes)
    suffix_lengths = torch.tensor([x.shape[0] for x in suffixes], device=device)
    after = pad_sequence([x.to(device) for x in suffixes], batch_first=True, padding_value=-1)  # [N, Smax, 2]
    hard = torch.stack([candidate_ids, torch.full_like(candidate_ids, -1)], dim=-1)  # [C, n, 2]
    padded = torch.cat(
        [hard.unsqueeze(0).expand(N, C, n, 2), after.unsqueeze(1).expand(N, C, after.shape[1], 2)], dim=2
    ).reshape(N * C, -1, 2)
    lengths = (n + suffix_lengths).repeat_interleave(C)
    S = padded.shape[1]
    mask = (torch.arange(S, device=device) < lengths[:, None]).long()
    ids = padded[..., 0].masked_fill(mask == 0, pad)
    roles = padded[..., 1].masked_fill(mask == 0, -1)
    expanded = copy.deepcopy(cache)
    expanded.batch_repeat_interleave(C)
    attention = torch.cat([prompt_mask.repeat_interleave(C, dim=0), mask], dim=1)
    positions = prompt_lengths.repeat_interleave(C)[:, None] + torch.arange(S, device=device)
    if limit is not None:  # padding after a short row may run past the model's positions; its logits go unread
        positions = positions.clamp(max=limit - 1)
    logits = forward(ids, roles, attention, positions, expanded).logits
    log_probs = logits[:, :-1].float().log_softmax(-1)  # position j predicts token j + 1
    following = log_probs.gather(2, ids[:, 1:].unsqueeze(-1)).squeeze(-1) * mask[:, 1:]
    first = first_log_probs.repeat_interleave(C, dim=0).gather(1, ids[:, :1]).squeeze(1)
    return (first + following.sum(1)).view(N, C)
