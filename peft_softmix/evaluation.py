"""Evaluation: the rank of every fact's gold object under a model, across processes, in the facts' order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .batching import model_inputs
from .metrics import rank_of_gold
from .processing import IGNORE_INDEX

__all__ = ["EvalRanks", "evaluate_ranks", "precision_at_1", "scores_from_metric"]


@dataclass
class EvalRanks:
    """Ranks of the gold object for each fact of a split, in the split's order.

    Args:
        mixture: ``[N]`` ranks under the model's distribution (the mixture, for a soft mixture).
        templates: ``[N, K]`` ranks under each template on its own, when asked for.
        loss: the mean negative log-likelihood of the gold object.
    """

    mixture: torch.Tensor
    templates: torch.Tensor | None
    loss: float


@torch.no_grad()
def evaluate_ranks(
    model: Any,
    dataloader,
    num_facts: int,
    candidate_mask: torch.Tensor | None = None,
    accelerator=None,
    per_template: bool = False,
    progress: bool = False,
    description: str = "eval",
) -> EvalRanks:
    """Rank every fact's gold object under ``model`` over the vocabulary (or ``candidate_mask``).

    ``model`` is a `PeftModelForSoftMixture`, or any module whose forward takes a batch's `model_inputs` and
    ``candidate_mask`` and returns ``log_probs`` (``[B, V]`` at the mask) and, for ``per_template``,
    ``template_log_probs`` (``[B * K, V]``, a fact's K rows together). Across processes, ranks are gathered with
    ``accelerator.gather_for_metrics`` (which drops the samples that Accelerate repeats to even out the last batch)
    and put back in fact order; a fact missing or seen twice is an error, so a wrong gather cannot silently change
    the scores.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = getattr(model, "embedding_device", None) or next(model.parameters()).device
    mask = candidate_mask.to(device) if candidate_mask is not None else None
    indices, mixture, templates, nll = [], [], [], []
    try:
        for batch in tqdm(dataloader, desc=description, disable=not progress, leave=False):
            batch = {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in batch.items()}
            out = model(**model_inputs(batch), candidate_mask=mask, return_template_log_probs=per_template)
            labels = batch["labels"]
            if (labels == IGNORE_INDEX).any():
                raise ValueError(
                    "A fact without a single-token object reached evaluation; filter the facts first "
                    "(peft_softmix.facts.filter_single_token)."
                )
            ranks = rank_of_gold(out.log_probs, labels, mask)
            gold = out.log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)
            per = None
            if per_template:
                # one adapter: every fact has the same K rows
                flat = out.template_log_probs
                K = flat.shape[0] // labels.shape[0]
                per = rank_of_gold(flat, labels.repeat_interleave(K), mask).view(-1, K)
            gathered = (batch["index"], ranks, -gold.float(), per if per is not None else ranks.unsqueeze(1))
            if accelerator is not None:
                gathered = accelerator.gather_for_metrics(gathered)
            indices.append(gathered[0].cpu())
            mixture.append(gathered[1].cpu())
            nll.append(gathered[2].cpu())
            templates.append(gathered[3].cpu())
    finally:
        model.train(was_training)
    index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long)
    if len(index) != num_facts or len(torch.unique(index)) != num_facts:
        raise RuntimeError(
            f"Evaluation gathered {len(index)} ranks ({len(torch.unique(index))} distinct facts) for {num_facts} "
            "facts; the evaluation data loader must be prepared by the same Accelerator that gathers."
        )
    order = torch.argsort(index)
    loss = torch.cat(nll)[order]
    return EvalRanks(
        mixture=torch.cat(mixture)[order],
        templates=torch.cat(templates)[order] if per_template else None,
        loss=float(loss.mean()) if len(loss) else math.nan,
    )


def precision_at_1(ranks: torch.Tensor) -> float:
    """Fraction of rank-1 facts; for early stopping, where the full metric is not needed."""
    return float((ranks == 1).float().mean()) if len(ranks) else 0.0


def scores_from_metric(metric, ranks: Sequence[int], relation: str) -> dict[str, float]:
    """P@1, P@10, MRR and count of one relation's ranks through the ``fact_retrieval`` evaluate metric."""
    result = metric.compute(ranks=[int(r) for r in ranks], relations=[relation] * len(ranks))
    return dict(result["per_relation"][relation])
