"""Which adapter each row of a batch goes through: the soft words, deep offsets and mixture weights of a forward.

A batch may mix facts of several adapters (``adapter_names``, PEFT's convention for mixed-adapter batches). Each
fact's rows get its own adapter's soft words and weights; the batch still runs as one forward pass of the frozen
model, because every adapter's soft words are rows of one concatenated table for that pass.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .hooks import SoftPositions
from .mixture import FactGroups
from .model import SoftMixtureModel, put_soft_words

__all__ = ["Route", "resolve_adapter_names", "route"]


@dataclass
class Route:
    """What a forward pass needs to run a batch through its adapters (all None/empty with the adapters off).

    Args:
        groups: the facts' rows.
        log_weights: ``[K]`` (one adapter for every fact) or ``[N]`` each row's log mixture weight.
        positions: where the soft words go (None: the hard templates).
        put_soft_words: ``(embeds, positions, scale) -> embeds`` with the soft words in place.
        deep_offsets: ``[L, n_soft, H]`` the offsets of the soft words of ``positions``, or None.
    """

    groups: FactGroups
    log_weights: torch.Tensor
    positions: SoftPositions | None = None
    put_soft_words: Any = None
    deep_offsets: torch.Tensor | None = None

    def row_log_weights(self) -> torch.Tensor:
        """``[N]`` each row's log weight."""
        if self.log_weights.shape[0] == self.groups.fact_index.shape[0]:
            return self.log_weights
        return self.log_weights.repeat(self.groups.num_facts)


def resolve_adapter_names(
    adapter_names: Sequence[str] | None,
    encoded_for: Sequence[str] | None,
    active: str | None,
    known: Mapping[str, Any],
    num_facts: int | None,
) -> list[str]:
    """The adapter of each fact: ``adapter_names`` if given, else the active adapter; checked against the names the
    batch was encoded for, so that a batch is never run through another adapter's soft words."""
    if adapter_names is not None:
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names takes a list of adapter names, one per fact, got {adapter_names!r}.")
        names = list(adapter_names)
        if num_facts is not None and len(names) != num_facts:
            raise ValueError(f"adapter_names has {len(names)} name(s) but the batch has {num_facts} fact(s).")
        unknown = sorted({name for name in names if name not in known})
        if unknown:
            raise ValueError(f"Unknown adapter(s) {unknown}; this model has {sorted(known)}.")
    else:
        if active is None or active not in known:
            raise ValueError("The model has no active adapter; pass adapter_names=[...] or add an adapter.")
        if num_facts is None:
            raise ValueError("Cannot tell how many facts the batch holds: give labels, encoded_for or adapter_names.")
        names = [active] * num_facts
    if encoded_for is not None and list(encoded_for) != names:
        b = next((i for i, (a, e) in enumerate(zip(names, encoded_for)) if a != e), min(len(names), len(encoded_for)))
        ran = names[b] if b < len(names) else "nothing"
        was = encoded_for[b] if b < len(encoded_for) else "nothing"
        raise ValueError(
            f"Fact {b} of the batch was encoded for adapter '{was}' but would run through '{ran}': another "
            f"adapter's templates give a wrong answer. Run it with adapter_names=batch['encoded_for'] (or "
            f"set_adapter('{was}')), or encode it with this adapter active (or for the adapters you pass)."
        )
    return names


def route(
    encoders: Mapping[str, SoftMixtureModel], names: list[str], roles: torch.Tensor, fact_index: torch.Tensor
) -> Route:
    """The route of a batch whose fact b goes through adapter ``names[b]``."""
    distinct = list(dict.fromkeys(names))
    sizes = tuple(encoders[name].num_templates for name in names)
    N = roles.shape[0]
    if sum(sizes) != N:
        raise ValueError(
            f"The batch has {N} rows but its facts' adapters have {sum(sizes)} templates in all: it was encoded for "
            "other adapters (or built by hand); encode it with these adapters."
        )
    groups = FactGroups(sizes, fact_index)
    positions = SoftPositions.of(roles)
    if len(distinct) == 1:
        encoder = encoders[distinct[0]]
        capacity = len(names) * encoder.num_soft_words
        _check_capacity(positions, capacity, len(names), distinct[0])
        return Route(groups, encoder.log_weights(), positions, encoder, encoder.deep_offsets)
    # several adapters: their soft words as one table, each fact's roles shifted to its adapter's rows
    starts, start = {}, 0
    for name in distinct:
        starts[name] = start
        start += encoders[name].num_soft_words
    device = roles.device
    row_shift = torch.tensor([starts[name] for name, k in zip(names, sizes) for _ in range(k)], device=device)
    _check_capacity(positions, sum(encoders[name].num_soft_words for name in names), len(names), ", ".join(distinct))
    shifted = torch.where(roles >= 0, roles + row_shift[:, None], roles)
    table = torch.cat([encoders[name].soft_words for name in distinct])
    deep = [encoders[name].deep_offsets for name in distinct]
    offsets = None
    if any(d is not None for d in deep):
        depth = max(d.shape[0] for d in deep if d is not None)
        width = next(d.shape[2] for d in deep if d is not None)
        parts = []
        for name, d in zip(distinct, deep):
            n = encoders[name].num_soft_words
            part = table.new_zeros(depth, n, width) if d is None else d
            if part.shape[0] < depth:
                part = torch.cat([part, part.new_zeros(depth - part.shape[0], n, width)])
            parts.append(part)
        offsets = torch.cat(parts, dim=1)
    weights = {name: encoders[name].log_weights() for name in distinct}
    row_weights = torch.cat([weights[name] for name in names]).to(device)

    def put(embeds: torch.Tensor, where: SoftPositions, scale: Any = None) -> torch.Tensor:
        return put_soft_words(table, embeds, where, scale)

    return Route(groups, row_weights, SoftPositions.of(shifted), put, offsets)


def hard_route(fact_index: torch.Tensor, sizes: Sequence[int] | None) -> Route:
    """The hard templates with uniform weights (adapters disabled or deleted)."""
    if sizes is None:
        # one wait for the device, on this path only
        sizes = torch.bincount(fact_index.cpu()).tolist()
    groups = FactGroups(tuple(int(k) for k in sizes), fact_index)
    weights = torch.tensor([-math.log(k) for k in groups.sizes for _ in range(k)], device=fact_index.device)
    return Route(groups, weights)


def _check_capacity(positions: SoftPositions, capacity: int, num_facts: int, adapters: str) -> None:
    # a count known on the host already (it sized the index). Fewer is fine: a template stretch that tokenises
    # differently next to a subject keeps its hard words. More means soft words these adapters do not have, which
    # would fail inside torch (a device-side assert on a GPU)
    if positions.index.numel() > capacity:
        raise ValueError(
            f"The batch's queries hold {positions.index.numel()} template words, more than its {num_facts} facts can "
            f"hold with adapter(s) {adapters} ({capacity}): the batch was encoded with other templates (or built by "
            "hand); encode it with these adapters."
        )
