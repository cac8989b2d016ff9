"""The mixture over templates: which rows of a batch belong to which fact, and how their distributions combine.

A batch holds one row per (fact, template) (`encode`), so facts of different adapters, with different numbers of
templates K, share it. `FactGroups` is that grouping, known on the host from each fact's adapter; `mix_rows` mixes
each fact's rows, log p(y|x) = logsumexp_k(log pi_k + log p_k(y|x)), and `mixture_loss` is the mean of -log p(y|x).
`mix_logits` is the same mixture straight from the rows' logits, for a forward pass that needs no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .processing import IGNORE_INDEX

__all__ = ["FactGroups", "mix_logits", "mix_rows", "mix_templates", "mixture_loss"]

# `mix_logits` mixes in probability space, where a term below about 2**-126 loses its precision (float32): a mixed
# value under this bound, relative to its fact's largest term, is recomputed in log space
_UNDERFLOW = 2.0**-100
# the scratch buffer of `mix_logits` on a CPU: a few facts' rows, small enough to stay in the core's cache
_CHUNK_BYTES = 1 << 22


@dataclass(frozen=True)
class FactGroups:
    """How the N rows of a batch group into B facts: fact b has ``sizes[b]`` consecutive rows (its templates).

    Args:
        sizes: K of each fact, in batch order.
        fact_index: ``[N]`` the fact of each row, on the batch's device.
    """

    sizes: tuple[int, ...]
    fact_index: torch.Tensor

    @property
    def num_facts(self) -> int:
        return len(self.sizes)

    @property
    def uniform(self) -> int | None:
        """K when every fact has the same number of templates (rows then reshape to ``[B, K]``), else None."""
        first = self.sizes[0] if self.sizes else 1
        return first if all(k == first for k in self.sizes) else None

    @property
    def max_size(self) -> int:
        return max(self.sizes, default=1)

    def template_of_row(self) -> list[int]:
        """Each row's template index within its fact (host list)."""
        return [k for size in self.sizes for k in range(size)]

    def dense_index(self) -> torch.Tensor:
        """``[N]`` each row's place in a ``[B, max K]`` layout (for facts of different K)."""
        K = self.max_size
        places = [b * K + k for b, size in enumerate(self.sizes) for k in range(size)]
        return torch.tensor(places, device=self.fact_index.device)


def mix_templates(per_template: torch.Tensor, log_weights: torch.Tensor) -> torch.Tensor:
    """``logsumexp_k(log pi_k + per_template[:, k])`` for ``per_template`` of shape ``[B, K, ...]``.

    ``log_weights`` is ``[K]`` (one adapter's weights for every fact) or ``[B, K]``. One template is its own mixture
    (``log pi = 0`` exactly): returned as is, which spares a launch-bound GPU step the logsumexp kernels forward and
    backward.
    """
    if per_template.shape[1] == 1:
        return per_template[:, 0]
    lead = (1, -1) if log_weights.dim() == 1 else tuple(log_weights.shape)
    shape = lead + (1,) * (per_template.dim() - 2)
    return torch.logsumexp(per_template + log_weights.view(shape), dim=1)


def mix_rows(per_row: torch.Tensor, log_weights: torch.Tensor, groups: FactGroups) -> torch.Tensor:
    """Mix ``per_row`` (``[N, ...]``) into ``[B, ...]`` with each row's log weight ``log_weights`` (``[N]``, or ``[K]``
    when every fact has the same K and the same weights)."""
    B, K = groups.num_facts, groups.uniform
    if K is not None:
        weights = log_weights if log_weights.dim() == 1 and log_weights.shape[0] == K else log_weights.view(B, K)
        return mix_templates(per_row.view(B, K, *per_row.shape[1:]), weights)
    # facts of different K: laid out as [B, max K], the missing templates at -inf (weight 0)
    Kmax, rest = groups.max_size, per_row.shape[1:]
    index = groups.dense_index()
    dense = per_row.new_full((B * Kmax, *rest), float("-inf")).index_copy(0, index, per_row)
    weights = log_weights.new_full((B * Kmax,), float("-inf")).index_copy(0, index, log_weights)
    return torch.logsumexp(dense.view(B, Kmax, *rest) + weights.view(B, Kmax, *(1,) * len(rest)), dim=1)


def mix_logits(
    logits: torch.Tensor,
    log_weights: torch.Tensor,
    groups: FactGroups,
    candidate_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`mix_rows` of ``log_softmax(logits)``, for logits ``[N, V]`` that need no gradient: ``[B, V]``.

    The log-softmax and the logsumexp over ``[B, K, V]`` are about five passes over the batch's ``N x V`` floats, each
    into a fresh tensor, and dominated evaluation after the frozen model (docs/performance.md). Here each row's
    probabilities are mixed in probability space instead: with ``e_k = exp(logits_k - max logits_k)`` and ``S_k`` its
    sum, ``p(y) = sum_k pi_k e_k(y) / S_k``, one weighted sum per fact (a batched matrix product), scaled by the
    fact's largest ``pi_k / S_k`` so that nothing overflows. On a CPU a few facts go at a time through one scratch
    buffer that stays in cache. Equal to `mix_rows` up to float32 rounding; a value so small that its terms underflow
    (``log p`` some 69 below the fact's best) is recomputed in log space for its fact, so the tail of the
    distribution, and every rank, stays exact. ``candidate_mask`` (``[V]`` bool) marks the tokens that ``logits`` did
    not set to -inf: only those are checked.
    """
    N, V = logits.shape
    B, K = groups.num_facts, groups.uniform
    row_weights = log_weights if log_weights.shape[0] == N else log_weights.repeat(B)
    out, shift = logits.new_empty(B, V), logits.new_empty(B)
    rows_per_chunk = N
    if logits.device.type == "cpu":
        rows_per_chunk = max(groups.max_size, _CHUNK_BYTES // (V * logits.element_size()))
    scratch = logits.new_empty(min(N, rows_per_chunk), V)
    for first_fact, end_fact, first_row, end_row in _chunks(groups.sizes, rows_per_chunk):
        part, b = logits[first_row:end_row], end_fact - first_fact
        e = torch.sub(part, part.amax(1, keepdim=True), out=scratch[: end_row - first_row]).exp_()
        coef_log = row_weights[first_row:end_row] - e.sum(1).log()  # log(pi_k / S_k)
        mixed = out[first_fact:end_fact]
        if K is not None:
            best = shift[first_fact:end_fact] = coef_log.view(b, K).amax(1)
            coef = (coef_log.view(b, K) - best[:, None]).exp_()
            torch.bmm(coef.unsqueeze(1), e.view(b, K, V), out=mixed.unsqueeze(1))
        else:
            local = groups.fact_index[first_row:end_row] - first_fact
            best = shift[first_fact:end_fact] = coef_log.new_full((b,), float("-inf")).scatter_reduce_(
                0, local, coef_log, "amax"
            )
            coef = (coef_log - best.index_select(0, local)).exp_()
            mixed.zero_().index_add_(0, local, e.mul_(coef[:, None]))
    tiny = out < _UNDERFLOW
    if candidate_mask is not None:
        tiny &= candidate_mask.to(tiny.device)
    out.log_().add_(shift[:, None])
    redo = tiny.any(1)
    if bool(redo.any()):  # the caller reads these values on the host next: the wait costs little
        facts = redo.nonzero().squeeze(1)
        rows = redo.index_select(0, groups.fact_index).nonzero().squeeze(1)
        sizes = torch.tensor([groups.sizes[b] for b in facts.tolist()], device=logits.device)
        sub = FactGroups(
            tuple(sizes.tolist()), torch.arange(len(sizes), device=logits.device).repeat_interleave(sizes)
        )
        out[facts] = mix_rows(torch.log_softmax(logits[rows], dim=-1), row_weights[rows], sub)
    return out


def _chunks(sizes: tuple[int, ...], rows_per_chunk: int) -> list[tuple[int, int, int, int]]:
    """Consecutive facts of at most ``rows_per_chunk`` rows together (a fact with more alone): (first fact, end
    fact, first row, end row) of each chunk."""
    chunks, first_fact, first_row, row = [], 0, 0, 0
    for b, size in enumerate(sizes):
        if row + size - first_row > rows_per_chunk and b > first_fact:
            chunks.append((first_fact, b, first_row, row))
            first_fact, first_row = b, row
        row += size
    if row > first_row or not chunks:
        chunks.append((first_fact, len(sizes), first_row, row))
    return chunks


def mixture_loss(
    template_log_probs: torch.Tensor,
    labels: torch.Tensor,
    log_weights: torch.Tensor,
    groups: FactGroups,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of -log p(y|x) over the facts whose label is not -100, or the sum over them divided by
    ``num_items_in_batch`` when given (transformers' Trainer counts the labelled facts of all the batches it
    accumulates, and then does not divide the loss by the accumulation steps itself).

    Mixed from each template's gold log-prob (= log_probs at the label): the backward pass then touches [N] values,
    not the [N, V] logsumexp. nll_loss gives unlabelled rows 0 (selecting them would wait for the GPU), so no -inf
    reaches their logsumexp to turn a zero gradient into NaN. The fewer small kernels, the better: at K = 1 on a GPU
    the step is launch-bound.
    """
    keep = labels != IGNORE_INDEX
    if labels.device.type == "cpu" and not bool(keep.any()):
        # on an accelerator this check would wait for the device every step; `encode` refuses such batches there
        raise ValueError(
            "Every label of the batch is -100 (no fact has a single-token object), so its loss would be a silent 0. "
            "Drop such facts (peft_softmix.facts.filter_single_token), or leave labels out to only query."
        )
    K = groups.uniform
    per_row_labels = labels if K == 1 else labels.index_select(0, groups.fact_index)
    nll = F.nll_loss(template_log_probs, per_row_labels, ignore_index=IGNORE_INDEX, reduction="none")
    # one template is its own mixture; with more, an unlabelled fact mixes zeros into log(sum pi), 0 only up to
    # rounding: masked, so that it adds exactly nothing
    total = nll.sum() if K == 1 else -(mix_rows(-nll, log_weights, groups) * keep).sum()
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / keep.sum().clamp(min=1)
