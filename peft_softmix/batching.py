"""Batches of facts for training and evaluation: each batch pads only to its own longest query.

Training batches group facts of similar subject length (`LengthGroupedSampler`), so a batch pads little, in an order
that depends only on the seed and the epoch (a resumed run sees the same batches). Evaluation batches go through
the facts sorted by subject length; `ranks_in_fact_order` puts their results back in the facts' own order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler, SequentialSampler

from .facts import Fact
from .inputs import BATCH_KEYS

__all__ = [
    "MODEL_INPUTS",
    "Collator",
    "FactCollator",
    "FactDataset",
    "LengthGroupedSampler",
    "eval_dataloader",
    "model_inputs",
    "ranks_in_fact_order",
    "subject_lengths",
    "train_dataloader",
]

# A collator turns a list of fact positions into a batch (a dict of tensors with an ``index`` entry).
Collator = Callable[[list[int]], dict[str, torch.Tensor]]


class FactDataset(Dataset):
    """Facts addressed by position; items are the positions, so a batch can be gathered back to its facts."""

    def __init__(self, facts: Sequence[Fact]):
        self.facts = list(facts)

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, index: int) -> int:
        return index


def subject_lengths(tokenizer: Any, facts: Sequence[Fact]) -> list[int]:
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
    the longest query of the batch (dynamic padding), plus ``index`` (the positions, to gather results by).

    ``multi_token=True`` encodes objects of any length (one mask per object token, ``labels`` ``[B, L]``)."""

    def __init__(self, model: Any, facts: Sequence[Fact], multi_token: bool = False):
        self.model = model  # a PeftModelForSoftMixture: its `encode` fills and pads the templates
        self.facts = list(facts)
        self.multi_token = multi_token

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        facts = [self.facts[i] for i in indices]
        subjects, objects = [f.subject for f in facts], [f.object for f in facts]
        if self.multi_token:
            batch = self.model.encode(subjects, objects, multi_token=True)
        else:
            batch = self.model.encode(subjects, objects)
        batch["index"] = torch.tensor(indices, dtype=torch.long)
        return batch


MODEL_INPUTS = BATCH_KEYS


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The entries of a batch that the model's forward takes (all of `MODEL_INPUTS` that the batch has)."""
    return {name: batch[name] for name in MODEL_INPUTS if name in batch}


def train_dataloader(
    facts: Sequence[Fact], collate: Collator, lengths: Sequence[int], batch_size: int, seed: int, pin_memory: bool
) -> DataLoader:
    """Shuffled, length-grouped training batches (see `LengthGroupedSampler`)."""
    sampler = LengthGroupedSampler(lengths, batch_size, shuffle=True, seed=seed)
    return DataLoader(
        FactDataset(facts),
        batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
        collate_fn=collate,
        pin_memory=pin_memory,
    )


def eval_dataloader(
    facts: Sequence[Fact], make_collator: Callable[[Sequence[Fact]], Collator], lengths: Sequence[int],
    batch_size: int, pin_memory: bool,
) -> tuple[DataLoader, list[int]]:  # fmt: skip
    """Evaluation batches over ``facts`` sorted by subject length (the least padding), and that order: ranks come
    back in it, and `ranks_in_fact_order` puts them back in the order of ``facts``."""
    order = sorted(range(len(facts)), key=list(lengths).__getitem__)
    ordered = [facts[i] for i in order]
    loader = DataLoader(
        FactDataset(ordered),
        batch_size=batch_size,
        sampler=SequentialSampler(range(len(ordered))),
        collate_fn=make_collator(ordered),
        pin_memory=pin_memory,
    )
    return loader, order


def ranks_in_fact_order(ranks: torch.Tensor, order: list[int]) -> torch.Tensor:
    """Undo `eval_dataloader`'s sorting: row ``i`` of ``ranks`` belongs to fact ``order[i]``."""
    out = torch.empty_like(ranks)
    out[torch.tensor(order, dtype=torch.long)] = ranks
    return out
