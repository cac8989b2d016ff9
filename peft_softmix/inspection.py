"""Looking inside a trained adapter: its mixture weights, and for each soft word its nearest vocabulary words and how
far it moved from its start (the embedding of the template token it replaced).

This is the interpretability readout of `peft-softmix inspect`; it reads the adapter, it changes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch

__all__ = ["AdapterReport", "SoftWordReport", "TemplateReport", "inspect_adapter"]


@dataclass
class SoftWordReport:
    """One soft word of a template.

    Args:
        token: The template token it started as (e.g. ``"born"``).
        token_id: That token's id.
        moved: L2 distance from that token's embedding (0 for an untrained ``init="template"`` adapter).
        relative_move: ``moved`` divided by the length of that token's embedding.
        nearest: The vocabulary tokens whose embeddings are closest in cosine similarity, best first, as
            ``(token, cosine)`` pairs.
        deep_offset_norm: The length of its deep offsets summed over layers (None for a shallow adapter).
    """

    token: str
    token_id: int
    moved: float
    relative_move: float
    nearest: list[tuple[str, float]]
    deep_offset_norm: float | None = None


@dataclass
class TemplateReport:
    """One template of the mixture: its weight and its soft words in order."""

    template: str
    weight: float
    words: list[SoftWordReport] = field(default_factory=list)


@dataclass
class AdapterReport:
    """What `inspect_adapter` found: one `TemplateReport` per template, in the adapter's order."""

    adapter: str
    base_model: str | None
    init: str
    templates: list[TemplateReport]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (``nearest`` pairs become lists)."""
        return asdict(self)


@torch.no_grad()
def inspect_adapter(peft_model: Any, adapter_name: str | None = None, top_n: int = 5) -> AdapterReport:
    """Report an adapter's mixture weights and, for each soft word, its ``top_n`` nearest vocabulary tokens (cosine
    similarity to the base model's input embeddings) and how far it moved from its template token's embedding.

    Args:
        peft_model: A `PeftModelForSoftMixture`.
        adapter_name: The adapter to read (the active one by default).
        top_n: How many nearest tokens to list per soft word (at least 1).
    """
    if not isinstance(top_n, int) or isinstance(top_n, bool) or top_n < 1:
        raise ValueError(f"top_n must be a whole number >= 1, got {top_n!r}.")
    name = adapter_name or peft_model.active_adapter
    if name not in peft_model.peft_config:
        raise ValueError(f"No adapter named {name!r}; this model has {sorted(peft_model.peft_config)}.")
    config = peft_model.peft_config[name]
    encoder = peft_model.prompt_encoder[name]
    processor = peft_model.get_processor(name)
    tokenizer = processor.tokenizer
    table = cast(torch.Tensor, peft_model.word_embeddings.weight).detach().float()
    words = encoder.soft_words.detach().float().to(table.device)
    token_ids = torch.tensor([t for layout in processor.layouts for t in layout.token_ids], device=table.device)
    start = table[token_ids]
    moved = (words - start).norm(dim=-1)
    relative = moved / start.norm(dim=-1).clamp(min=1e-12)
    # cosine similarity of every soft word to every vocabulary row, [n_soft, V]: small for one adapter
    unit_table = table / table.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    unit_words = words / words.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    cosine, nearest_ids = (unit_words @ unit_table.T).topk(min(top_n, table.shape[0]), dim=-1)
    deep = encoder.deep_offsets
    deep_norms = deep.detach().float().norm(dim=-1).sum(0).tolist() if deep is not None else None
    weights = encoder.log_weights().exp().tolist()

    templates: list[TemplateReport] = []
    row = 0
    for k, layout in enumerate(processor.layouts):
        report = TemplateReport(template=layout.template, weight=float(weights[k]))
        for token_id in layout.token_ids:
            neighbours = tokenizer.convert_ids_to_tokens(nearest_ids[row].tolist())
            report.words.append(
                SoftWordReport(
                    token=str(tokenizer.convert_ids_to_tokens(int(token_id))),
                    token_id=int(token_id),
                    moved=float(moved[row]),
                    relative_move=float(relative[row]),
                    nearest=[(str(t), float(c)) for t, c in zip(neighbours, cosine[row].tolist())],
                    deep_offset_norm=float(deep_norms[row]) if deep_norms is not None else None,
                )
            )
            row += 1
        templates.append(report)
    init = getattr(config.init, "value", config.init)
    return AdapterReport(adapter=name, base_model=config.base_model_name_or_path, init=str(init), templates=templates)
