"""The mixture over templates: which rows of a batch belong to which fact, and how their distributions combine.

A batch holds one row per (fact, template) (`encode`), so facts of different adapters, with different numbers of
templates K, share it. `FactGroups` is that grouping, known on the host from each fact's adapter; `mix_rows` mixes
each fact's rows, log p(y|x) = logsumexp_k(log pi_k + log p_k(y|x)), and `mixture_loss` is the mean of -log p(y|x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .processing import IGNORE_INDEX

__all__ = ["FactGroups", "mix_rows", "mix_templates", "mixture_loss"]


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
