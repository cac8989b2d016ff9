"""From the base model's logits at the masks to the mixture's answer: `SoftMixtureOutput`.

Two heads share the mixture (mixture.py):

- `vocabulary_head`, the single-token setting: one mask per row, each row's distribution over the vocabulary and the
  mixture of each fact's rows, ``[B, V]``.
- `object_head`, objects of any length: ``L`` masks per row (objects.py). A fact's object of n tokens scores
  log p_k(y|x) = sum_j log p_k(y_j|x) under template k (each token at its own mask, given all the masks), and the
  mixture log p(y|x) = logsumexp_k(log pi_k + log p_k(y|x)). Without labels it returns each row's ``[N, L, V]``
  distributions, from which `ranking.py` gathers any number of candidates of that length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .mixture import mix_logits, mix_rows, mixture_loss
from .processing import IGNORE_INDEX
from .routing import Route

__all__ = ["SoftMixtureOutput", "object_head", "object_log_probs", "vocabulary_head"]


@dataclass
class SoftMixtureOutput(ModelOutput):
    """
    Args:
        loss: mean of -log p(y|x) over the facts that have a label; None when no labels are given.
        log_probs: ``[B, V]`` log of each fact's mixture distribution over the vocabulary at the mask, unless the
            forward was called with ``return_log_probs=False`` (or the batch has several masks per row).
        template_log_probs: ``[N, V]`` each row's (fact and template's) log p_k(y|x), when asked for; ``[N, L, V]``
            at each of the L masks of a batch with several masks per row.
        log_weights: ``[N]`` each row's log mixture weight log pi_k (uniform with the adapters disabled).
        object_log_probs: ``[B]`` log p(y|x) of each fact's object under the mixture, for a batch with
            ``target_positions`` and labels (0 for a fact whose labels are all -100: the loss leaves it out).
        template_object_log_probs: ``[N]`` each row's log p_k(y|x) of its fact's object, likewise.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    template_log_probs: torch.Tensor | None = None
    log_weights: torch.Tensor | None = None
    object_log_probs: torch.Tensor | None = None
    template_object_log_probs: torch.Tensor | None = None


def vocabulary_head(
    logits: torch.Tensor,
    path: Route,
    labels: torch.Tensor | None,
    candidate_mask: torch.Tensor | None,
    return_template_log_probs: bool,
    return_log_probs: bool,
    num_items_in_batch: int | torch.Tensor | None,
) -> SoftMixtureOutput:
    """The single-token setting: ``logits`` ``[N, V]`` at each row's mask, ``labels`` ``[B]``."""
    logits = logits.float()
    if candidate_mask is not None:
        logits = logits.masked_fill(~candidate_mask.to(logits.device), float("-inf"))
    log_weights = path.log_weights.to(logits.device)
    # without a gradient, the mixture comes straight from the logits (mix_logits: fewer passes over [N, V])
    direct = return_log_probs and not (logits.requires_grad or log_weights.requires_grad)
    log_probs = mix_logits(logits, log_weights, path.groups, candidate_mask) if direct else None
    template_log_probs = None
    if return_template_log_probs or labels is not None or (return_log_probs and not direct):
        template_log_probs = torch.log_softmax(logits, dim=-1)
        if return_log_probs and not direct:
            log_probs = mix_rows(template_log_probs, log_weights, path.groups)
    loss = None
    if labels is not None and template_log_probs is not None:
        loss = mixture_loss(template_log_probs, labels, log_weights, path.groups, num_items_in_batch)
    N = logits.shape[0]
    return SoftMixtureOutput(
        loss=loss,
        log_probs=log_probs,
        template_log_probs=template_log_probs if return_template_log_probs else None,
        log_weights=path.row_log_weights() if log_weights.shape[0] != N else log_weights,
    )


def object_log_probs(template_log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[N]`` sum over j of ``template_log_probs[n, j, targets[n, j]]``, skipping targets of -100."""
    valid = targets != IGNORE_INDEX
    picked = template_log_probs.gather(2, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(dim=1)


def object_head(
    logits: torch.Tensor,
    path: Route,
    labels: torch.Tensor | None,
    return_template_log_probs: bool,
    num_items_in_batch: int | torch.Tensor | None,
    target_ids: torch.Tensor | None = None,
) -> SoftMixtureOutput:
    """Objects of any length: ``logits`` ``[N, L, V]`` at each row's target positions, ``labels`` ``[B, L]`` (the
    object's tokens: what a masked LM's L masks score), or ``target_ids`` ``[N, L]`` the token each row's target
    position scores (a causal LM's next tokens; ``labels`` then only say which facts have an object)."""
    template_log_probs = torch.log_softmax(logits.float(), dim=-1)
    log_weights = path.log_weights.to(template_log_probs.device)
    N = logits.shape[0]
    row_weights = path.row_log_weights() if log_weights.shape[0] != N else log_weights
    out = SoftMixtureOutput(
        template_log_probs=template_log_probs if return_template_log_probs else None, log_weights=row_weights
    )
    if labels is None:
        return out
    groups = path.groups
    width = logits.shape[1] if target_ids is None else labels.shape[-1]
    if labels.dim() != 2 or labels.shape[0] != groups.num_facts or labels.shape[1] != width:
        raise ValueError(
            f"A batch with target_positions takes labels of shape [facts, object tokens] = [{groups.num_facts}, "
            f"{width}] (encode(..., multi_token=True) makes them), got {tuple(labels.shape)}."
        )
    keep = (labels != IGNORE_INDEX).any(dim=1)
    if labels.device.type == "cpu" and not bool(keep.any()):
        raise ValueError(
            "Every label of the batch is -100, so its loss would be a silent 0; leave labels out to only query."
        )
    row_targets = labels.index_select(0, groups.fact_index) if target_ids is None else target_ids
    per_row = object_log_probs(template_log_probs, row_targets)
    mixed = mix_rows(per_row, log_weights, groups)
    # a fact without a label mixes zeros (log sum pi, 0 only up to rounding): masked so that it adds nothing
    total = -(mixed * keep).sum()
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp(min=1)
    out.loss = total / divisor
    out.object_log_probs = mixed
    out.template_object_log_probs = per_row
    return out
