"""Fitting the mixture weights by EM (the paper's reference procedure) instead of by gradient.

Each training batch adds its E-step posteriors p(k | x, y) to a running sum; at the end of the epoch the M-step sets
the mixture weights to the normalised sums (`set_mixture_logits` writes them through PEFT's public state-dict API).
"""

from __future__ import annotations

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from .processing import IGNORE_INDEX

__all__ = ["em_mixture_logits", "em_object_posteriors", "em_posteriors", "set_mixture_logits"]


def em_posteriors(template_log_probs: torch.Tensor, log_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E-step: ``[B, K]`` posterior of each template given each fact, p(k | x, y) ∝ pi_k p_k(y | x).

    ``template_log_probs`` is the forward's ``[B * K, V]`` (a fact's K rows together; ``[B, K, V]`` is taken too) and
    ``log_weights`` its ``[B * K]`` row weights (or one adapter's ``[K]``). Rows whose label is -100 (no single-token
    object) are all zero, so they add nothing to the M-step's sums.
    """
    keep = labels != IGNORE_INDEX
    gold_ids = torch.where(keep, labels, torch.zeros_like(labels))
    B = labels.shape[0]
    per_fact = template_log_probs.view(B, -1, template_log_probs.shape[-1])
    K = per_fact.shape[1]
    gold = per_fact.gather(2, gold_ids.view(B, 1, 1).expand(B, K, 1)).squeeze(2)
    return _posteriors(gold, log_weights, keep)


def em_object_posteriors(
    template_object_log_probs: torch.Tensor, log_weights: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """E-step for objects of any length: ``[B, K]`` p(k | x, y) ∝ pi_k p_k(y | x) from the forward's
    ``template_object_log_probs`` ``[B * K]`` (each row's log p_k(y|x) of its fact's whole object) and ``labels``
    ``[B, L]``; a fact whose labels are all -100 gets zeros, as in `em_posteriors`."""
    keep = (labels != IGNORE_INDEX).any(dim=1)
    B = labels.shape[0]
    return _posteriors(template_object_log_probs.view(B, -1), log_weights, keep)


def _posteriors(gold: torch.Tensor, log_weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` softmax over k of log p_k(y|x) + log pi_k, zero for the facts not kept."""
    B, K = gold.shape
    weights = log_weights.float().view(-1, K)[:1] if log_weights.numel() in (K, B * K) else None
    if weights is None:
        raise ValueError(f"log_weights has {log_weights.numel()} values; expected {K} or {B * K}.")
    # EM fits one adapter's weights: every fact's rows carry the same K weights
    posterior = torch.softmax(gold.float() + weights, dim=1)
    return posterior * keep.unsqueeze(1).to(posterior.dtype)


def em_mixture_logits(posterior_sum: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """M-step: the new mixture logits, log of the normalised posterior sums (floored so no template dies forever)."""
    total = posterior_sum.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("EM M-step got no posterior mass (no fact with a usable object label in the epoch).")
    weights = (posterior_sum / total).clamp(min=floor)
    return torch.log(weights / weights.sum())


def set_mixture_logits(model, logits: torch.Tensor) -> None:
    """Give the active adapter of a `PeftModelForSoftMixture` these mixture logits (its soft words stay)."""
    state = dict(get_peft_model_state_dict(model))
    if "mixture_logits" not in state:
        raise ValueError(f"{type(model).__name__} has no mixture logits; EM fits the weights of a soft mixture.")
    state["mixture_logits"] = logits.detach()
    set_peft_model_state_dict(model, state)
