"""A relation's training data: its facts (filtered to what the model can answer) and its templates, checked up front.

Every problem is a `RelationDataError` that names the relation, the file and the fix, raised before any training
starts, so a run over many relations never fails after hours on the last one's typo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .facts import (
    SAMPLE_DIR,
    DataFormatError,
    Fact,
    candidate_token_ids,
    facts_in_vocab,
    filter_single_token,
    list_relations,
    load_common_vocab,
    load_relation,
)
from .template_sets import TemplateSetError, load_templates

__all__ = [
    "RelationData",
    "RelationDataError",
    "candidate_mask",
    "drop_long_queries",
    "load_relation_data",
    "resolve_relations",
]


class RelationDataError(ValueError):
    """The facts, templates or vocabulary of a run cannot be used; the message says which and how to fix it."""


@dataclass
class RelationData:
    """One relation's facts per split, ready to train on, and its templates.

    Args:
        relation: the relation id (its folder name).
        splits: ``{"train": [...], "dev": [...], "test": [...]}`` facts with one-token objects.
        templates: the K templates of the mixture.
        template_weights: the template source's own weights (LPAQA's), when asked for; else None (uniform).
        notes: what was kept and dropped, for the log.
    """

    relation: str
    splits: dict[str, list[Fact]]
    templates: list[str]
    template_weights: list[float] | None
    notes: str


def resolve_relations(data_dir: str | Path, relations: str = "all") -> list[str]:
    """The relation ids to train: every relation folder of ``data_dir`` for ``"all"``, else the comma-separated ids
    in ``relations`` (each must be a folder of ``data_dir``)."""
    data_dir = Path(data_dir)
    try:
        available = list_relations(data_dir)
    except FileNotFoundError as err:
        raise RelationDataError(str(err)) from None
    if not available:
        raise RelationDataError(
            f"{data_dir} holds no relation folders (<relation>/train.jsonl, dev.jsonl, test.jsonl); pass --data_dir "
            f"pointing at one (the shipped sample is {SAMPLE_DIR / 'trex'})."
        )
    if relations.strip().lower() == "all":
        return available
    wanted = [r.strip() for r in relations.split(",") if r.strip()]
    missing = [r for r in wanted if r not in available]
    if missing:
        raise RelationDataError(
            f"Relation(s) {', '.join(missing)} not found in {data_dir}; it has {', '.join(available)}. "
            "Fix --relations (comma-separated ids, or 'all')."
        )
    return list(dict.fromkeys(wanted))


def load_relation_data(
    data_dir: str | Path,
    relation: str,
    tokenizer: Any,
    templates: str,
    num_templates: int,
    templates_dir: str | Path | None = None,
    source_weights: bool = False,
    common_words: set[str] | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> RelationData:
    """Read ``relation``'s splits from ``data_dir`` and its first ``num_templates`` templates of ``templates``.

    Facts whose object is not one token of ``tokenizer`` (or, with ``common_words``, not one of those words) are
    dropped and counted; ``max_train_samples`` / ``max_eval_samples`` keep the first N train / dev and test facts.
    ``source_weights`` takes the template source's own weights as the mixture's start (LPAQA's ``weight``).
    """
    try:
        splits = load_relation(data_dir, relation)
    except (FileNotFoundError, DataFormatError) as err:
        raise RelationDataError(str(err)) from None
    kept: dict[str, list[Fact]] = {}
    notes = []
    name = getattr(tokenizer, "name_or_path", "the model")
    for split, fact_split in splits.items():
        facts, dropped = filter_single_token(fact_split.facts, tokenizer)
        why = [f"{len(dropped)} objects not one token"] if dropped else []
        if common_words is not None:
            facts, outside = facts_in_vocab(facts, common_words)
            if outside:
                why.append(f"{len(outside)} not in the common vocab")
        flag = "--max_train_samples" if split == "train" else "--max_eval_samples"
        limit = max_train_samples if split == "train" else max_eval_samples
        if limit is not None and len(facts) > limit:
            why.append(f"{len(facts) - limit} beyond {flag} {limit}")
            facts = facts[:limit]
        # the count kept after every filter, then what each filter took
        note = f"{split} {len(facts)}/{len(fact_split.facts)}" + "".join(f" ({reason})" for reason in why)
        if not facts:
            raise RelationDataError(
                f"Relation {relation}: the {split} split is empty after filtering ({len(fact_split.facts)} facts "
                f"read from {fact_split.report.path}, {len(dropped)} with objects that are not one token of "
                f"{name}'s tokenizer"
                + (", the rest outside the common vocabulary" if common_words is not None else "")
                + "). Use a model whose vocabulary covers the objects, drop --common_vocab, or leave this relation "
                "out of --relations."
            )
        kept[split] = facts
        notes.append(note)
    try:
        chosen = load_templates(templates, relation, k=num_templates, templates_dir=templates_dir)
    except (TemplateSetError, FileNotFoundError, DataFormatError) as err:
        raise RelationDataError(f"{err} Fix --templates / --templates_dir.") from None
    weights = chosen.weights if source_weights else None
    if source_weights and weights is None:
        raise RelationDataError(
            f"--template_weights source: the {templates!r} templates of {relation} carry no 'weight'; use "
            "--template_weights uniform."
        )
    return RelationData(
        relation, kept, list(chosen.templates), weights, f"{chosen.summary()}; facts kept: " + ", ".join(notes)
    )


def drop_long_queries(model: Any, data: RelationData) -> tuple[RelationData, str | None]:
    """Leave out the facts with a filled template longer than ``model`` takes (it could not score them).

    Returns the data and a note of how many facts each split lost (None when none did).
    """
    limit = model.max_query_length
    if limit is None:
        return data, None
    splits, dropped = {}, []
    for split, facts in data.splits.items():
        lengths = model.query_lengths([fact.subject for fact in facts])
        splits[split] = [fact for fact, length in zip(facts, lengths) if length <= limit]
        if len(splits[split]) < len(facts):
            dropped.append(f"{split} {len(facts) - len(splits[split])}")
        if not splits[split]:
            raise RelationDataError(
                f"Relation {data.relation}: every {split} fact has a query longer than the model's {limit} tokens. "
                "Use a model with more positions or shorter templates."
            )
    if not dropped:
        return data, None
    note = f"{data.relation}: facts left out, query longer than the model's {limit} tokens: {', '.join(dropped)}"
    return replace(data, splits=splits, notes=f"{data.notes}; {note}"), note


def candidate_mask(tokenizer: Any, path: str | Path, vocab_size: int) -> tuple[set[str], torch.Tensor, str]:
    """LAMA's common vocabulary from ``path`` as answer candidates: its words, a ``[vocab_size]`` bool mask of their
    tokens, and a note of how many words are not one token of ``tokenizer``.

    ``vocab_size`` is the model's (its input embeddings' rows), which may exceed the tokenizer's length.
    """
    try:
        words = load_common_vocab(path)
    except (FileNotFoundError, DataFormatError) as err:
        raise RelationDataError(f"{err} Fix --common_vocab.") from None
    candidates = candidate_token_ids(tokenizer, words)
    if not candidates.token_ids:
        raise RelationDataError(
            f"No word of {path} is one token of {getattr(tokenizer, 'name_or_path', 'the model')}'s tokenizer; the "
            "vocabulary does not fit this model. Drop --common_vocab or give another word list."
        )
    mask = torch.zeros(max(vocab_size, len(tokenizer)), dtype=torch.bool)
    mask[candidates.token_ids] = True
    note = (
        f"Common vocabulary: {len(candidates.token_ids)} candidate tokens ({len(candidates.skipped)} of its words "
        "are not one token here)."
    )
    return set(words), mask, note
