"""Library pieces of the training loop in ``examples/train_trex.py``: batching facts, fitting mixture weights by EM,
ranking gold objects, and writing the results.

Nothing here owns the loop itself; the example keeps it readable in transformers' ``run_*_no_trainer.py`` style and
calls these helpers. They work with or without Accelerate (pass ``accelerator=None`` for a single process).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from .facts import Fact
from .metrics import rank_of_gold
from .peft_model import IGNORE_INDEX, PeftModelForSoftMixture

# -- batching ----------------------------------------------------------------------------------------------------


class FactDataset(Dataset):
    """Facts addressed by position; items are the positions, so a batch can be gathered back to its facts."""

    def __init__(self, facts: Sequence[Fact]):
        self.facts = list(facts)

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, index: int) -> int:
        return index


def subject_lengths(tokenizer, facts: Sequence[Fact]) -> list[int]:
    """Token count of each fact's subject: the only part of a filled template that changes from fact to fact."""
    cache: dict[str, int] = {}
    lengths = []
    for fact in facts:
        if fact.subject not in cache:
            cache[fact.subject] = len(tokenizer.tokenize(" " + fact.subject))
        lengths.append(cache[fact.subject])
    return lengths


class LengthGroupedSampler(Sampler[int]):
    """Yields fact positions so that every ``batch_size`` consecutive ones have similar subject lengths.

    Without shuffling, the order is by length (stable), which is what evaluation wants: the least padding. With
    shuffling, positions are permuted, cut into groups of ``group_batches`` batches, each group sorted by length
    and cut into batches, and the batches shuffled; the partial batch always comes last, so that a ``BatchSampler``
    of the same ``batch_size`` cuts exactly these batches. The order depends only on ``seed`` and the epoch set
    with `set_epoch` (Accelerate calls it through the prepared data loader), so a resumed run sees the same batches.
    """

    def __init__(
        self, lengths: Sequence[int], batch_size: int, shuffle: bool, seed: int = 0, group_batches: int = 50
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_batches = group_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        n = len(self.lengths)
        if not self.shuffle:
            yield from sorted(range(n), key=lambda i: self.lengths[i])
            return
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=generator).tolist()
        group = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, n, group):
            chunk = sorted(order[start : start + group], key=lambda i: self.lengths[i])
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        full = [b for b in batches if len(b) == self.batch_size]
        partial = [b for b in batches if len(b) < self.batch_size]
        # at most one partial batch per group; merge them so that only the very last batch is short
        leftovers = [i for b in partial for i in b]
        full_order = torch.randperm(len(full), generator=generator).tolist()
        for b in full_order:
            yield from full[b]
        yield from leftovers


class FactCollator:
    """Turns a list of fact positions into the model's batch: each template filled with each subject, padded only to
    the longest query of the batch (dynamic padding), plus ``index`` (the positions, to gather results by)."""

    def __init__(self, model: PeftModelForSoftMixture, facts: Sequence[Fact]):
        self.model = model
        self.facts = list(facts)

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        facts = [self.facts[i] for i in indices]
        batch = self.model.encode([f.subject for f in facts], [f.object for f in facts])
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch


MODEL_INPUTS = ("input_ids", "attention_mask", "roles", "mask_positions", "labels")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a `FactCollator` batch that the model's forward takes."""
    return {name: batch[name] for name in MODEL_INPUTS}


# -- mixture weights by EM ---------------------------------------------------------------------------------------


def em_posteriors(template_log_probs: torch.Tensor, log_weights: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """E-step: ``[B, K]`` posterior of each template given each fact, p(k | x, y) ∝ pi_k p_k(y | x).

    Rows whose label is -100 (no single-token object) are all zero, so they add nothing to the M-step's sums.
    """
    keep = labels != IGNORE_INDEX
    gold_ids = torch.where(keep, labels, torch.zeros_like(labels))
    B, K, _ = template_log_probs.shape
    gold = template_log_probs.gather(2, gold_ids.view(B, 1, 1).expand(B, K, 1)).squeeze(2)
    posterior = torch.softmax(gold.float() + log_weights.float().view(1, K), dim=1)
    return posterior * keep.unsqueeze(1).to(posterior.dtype)


def em_mixture_logits(posterior_sum: torch.Tensor, floor: float = 1e-8) -> torch.Tensor:
    """M-step: the new mixture logits, log of the normalised posterior sums (floored so no template dies forever)."""
    total = posterior_sum.sum()
    if not torch.isfinite(total) or total <= 0:
        raise ValueError("EM M-step got no posterior mass (no fact with a single-token object in the epoch).")
    weights = (posterior_sum / total).clamp(min=floor)
    return torch.log(weights / weights.sum())


# -- evaluation --------------------------------------------------------------------------------------------------


@dataclass
class EvalRanks:
    """Ranks of the gold object for each fact of a split, in the split's order.

    ``mixture`` is ``[N]``; ``templates`` is ``[N, K]`` (each template on its own) when asked for; ``loss`` is the
    mean negative log-likelihood of the gold object under the mixture.
    """

    mixture: torch.Tensor
    templates: torch.Tensor | None
    loss: float


@torch.no_grad()
def evaluate_ranks(
    model: PeftModelForSoftMixture,
    dataloader,
    num_facts: int,
    candidate_mask: torch.Tensor | None = None,
    accelerator=None,
    per_template: bool = False,
    progress: bool = False,
    description: str = "eval",
) -> EvalRanks:
    """Rank every fact's gold object under ``model`` over the vocabulary (or ``candidate_mask``).

    Across processes, ranks are gathered with ``accelerator.gather_for_metrics`` (which drops the samples that
    Accelerate repeats to even out the last batch) and put back in fact order; a fact missing or seen twice is an
    error, so a wrong gather cannot silently change the scores.
    """
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    device = model.embedding_device
    mask = candidate_mask.to(device) if candidate_mask is not None else None
    indices, mixture, templates, nll = [], [], [], []
    try:
        for batch in tqdm(dataloader, desc=description, disable=not progress, leave=False):
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
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
                B, K, V = out.template_log_probs.shape
                flat = out.template_log_probs.reshape(B * K, V)
                per = rank_of_gold(flat, labels.repeat_interleave(K), mask).view(B, K)
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


# -- results -----------------------------------------------------------------------------------------------------


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file and a rename: a crash never leaves half a results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, _umask_mode())  # mkstemp makes the file private; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`write_text_atomic` for JSON (NaN, e.g. the loss before the first epoch, is written as ``NaN``)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _cell(scores: dict[str, float] | None) -> str:
    if not scores:
        return "–"
    return f"{100 * scores['p@1']:.1f} / {100 * scores['p@10']:.1f} / {100 * scores['mrr']:.1f}"


def results_markdown(results: dict[str, Any], split: str = "test") -> str:
    """A Markdown table: one line per relation (then micro and macro averages), one column per row of results.

    ``results`` is the structure ``examples/train_trex.py`` writes to ``results.json``: ``rows`` (ordered
    ``{key: label}``), ``relations[rel][split][row]`` and ``overall[split][row]`` (the metric's micro/macro keys).
    """
    rows: dict[str, str] = results["rows"]
    header = ["relation", "facts", *rows.values()]
    lines = [
        f"Scores on {split}: P@1 / P@10 / MRR, in %. Micro averages weigh every fact equally, macro averages every "
        "relation (LAMA's convention).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * len(rows)) + "|",
    ]
    for relation, rel in results["relations"].items():
        scores = rel.get(split, {})
        count = next((s["count"] for s in scores.values() if s), 0)
        lines.append(f"| {relation} | {count} | " + " | ".join(_cell(scores.get(row)) for row in rows) + " |")
    overall = results.get("overall", {}).get(split, {})
    for kind in ("micro", "macro"):
        cells = []
        for row in rows:
            o = overall.get(row)
            cells.append(_cell({k: o[f"{kind}_{k}"] for k in ("p@1", "p@10", "mrr")}) if o else "–")
        facts = next((o["num_facts"] for o in overall.values() if o), 0)
        lines.append(f"| **{kind}** | {facts} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_mixture_weights(path: str | os.PathLike, weights: dict[str, list[float]]) -> bool:
    """A bar chart of each relation's learned mixture weights (one panel per relation) saved as a PNG.

    Returns False, writing nothing, when matplotlib is not installed (it is an optional extra: ``peft-softmix[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    relations = list(weights)
    if not relations:
        return False
    cols = min(4, len(relations))
    rows = math.ceil(len(relations) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, relation in zip(axes.flat, relations):
        w = weights[relation]
        ax.bar(range(1, len(w) + 1), w, color="tab:blue")
        ax.set_title(relation, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xticks(range(1, len(w) + 1))
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(relations) :]:
        ax.axis("off")
    fig.supxlabel("template", fontsize=9)
    fig.supylabel("mixture weight", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return True


__all__ = [
    "EvalRanks",
    "FactCollator",
    "FactDataset",
    "LengthGroupedSampler",
    "em_mixture_logits",
    "em_posteriors",
    "evaluate_ranks",
    "model_inputs",
    "plot_mixture_weights",
    "precision_at_1",
    "results_markdown",
    "scores_from_metric",
    "subject_lengths",
    "write_json_atomic",
    "write_text_atomic",
]
