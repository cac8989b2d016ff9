"""A relation's training data: its facts (filtered to what the model can answer) and its templates, checked up front.

Every problem is a `RelationDataError` that names the relation, the file and the fix, raised before any training
starts, so a run over many relations never fails after hours on the last one's typo.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .candidate_evaluation import default_candidates
from .errors import RelationDataError
from .facts import (
    SAMPLE_DIR,
    DataFormatError,
    Fact,
    candidate_token_ids,
    facts_in_vocab,
    filter_single_token,
    filter_unknown_subjects,
    list_relations,
    load_common_vocab,
    load_relation,
)
from .objects import object_tokens
from .template_sets import TemplateSetError, load_templates

__all__ = [
    "RelationData",
    "RelationDataError",
    "candidate_mask",
    "drop_long_queries",
    "load_relation_data",
    "resolve_relations",
]


@dataclass
class RelationData:
    """One relation's facts per split, ready to train on, and its templates.

    Args:
        relation: the relation id (its folder name).
        splits: ``{"train": [...], "dev": [...], "test": [...]}`` facts with one-token objects.
        templates: the K templates of the mixture.
        template_weights: the template source's own weights (LPAQA's), when asked for; else None (uniform).
        notes: what was kept and dropped, for the log.
        candidates: in the multi-token setting, the objects dev and test facts are ranked among; else None.
    """

    relation: str
    splits: dict[str, list[Fact]]
    templates: list[str]
    template_weights: list[float] | None
    notes: str
    candidates: list[str] | None = None


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
    multi_token: bool = False,
    candidates: list[str] | None = None,
) -> RelationData:
    """Read ``relation``'s splits from ``data_dir`` and its first ``num_templates`` templates of ``templates``.

    Facts whose object is not one token of ``tokenizer`` (or, with ``common_words``, not one of those words) or whose
    subject the tokenizer reads as unknown tokens only are dropped and counted; ``max_train_samples`` /
    ``max_eval_samples`` keep the first N train / dev and test facts.
    ``source_weights`` takes the template source's own weights as the mixture's start (LPAQA's ``weight``).

    ``multi_token`` keeps objects of any length (only those with a piece the tokenizer cannot write are dropped) and
    sets ``candidates``: the given list (a user's file, `peft_softmix.candidate_evaluation.load_candidates`), or by
    default every distinct object of the relation's three files that the tokenizer can write.
    """
    if multi_token and common_words is not None:
        raise RelationDataError(
            "--common_vocab ranks single-token answers; with --multi_token give --candidates (a file of objects)."
        )
    try:
        splits = load_relation(data_dir, relation)
    except (FileNotFoundError, DataFormatError) as err:
        raise RelationDataError(str(err)) from None
    kept: dict[str, list[Fact]] = {}
    notes = []
    pool: list[str] | None = None
    if multi_token:
        every = [fact for fact_split in splits.values() for fact in fact_split.facts]
        pool = list(candidates) if candidates is not None else default_candidates(tokenizer, every)
    name = getattr(tokenizer, "name_or_path", "the model")
    for split, fact_split in splits.items():
        if multi_token:
            facts = [fact for fact in fact_split.facts if object_tokens(tokenizer, fact.object)]
            dropped = [fact for fact in fact_split.facts if not object_tokens(tokenizer, fact.object)]
            why = [f"{len(dropped)} objects the tokenizer cannot write"] if dropped else []
        else:
            facts, dropped = filter_single_token(fact_split.facts, tokenizer)
            why = [f"{len(dropped)} objects not one token"] if dropped else []
        report = fact_split.report
        if report.empty:
            why.append(f"{report.empty} empty subjects or objects, {report.empty_where()}")
        # a subject the tokenizer reads as [UNK] only would get the same answers as every other such subject
        facts, unreadable = filter_unknown_subjects(facts, tokenizer)
        if unreadable:
            shown = ", ".join(repr(fact.subject) for fact in unreadable[:3])
            why.append(f"{len(unreadable)} subjects only unknown tokens, e.g. {shown}")
        if common_words is not None:
            facts, outside = facts_in_vocab(facts, common_words)
            if outside:
                why.append(f"{len(outside)} not in the common vocab")
        flag = "--max_train_samples" if split == "train" else "--max_eval_samples"
        limit = max_train_samples if split == "train" else max_eval_samples
        if limit is not None and len(facts) > limit:
            why.append(f"{len(facts) - limit} beyond {flag} {limit}")
            facts = facts[:limit]
        if pool is not None and candidates is not None and split != "train":
            missing = sum(fact.object.strip() not in {c.strip() for c in pool} for fact in facts)
            if missing:
                why.append(f"{missing} gold objects not among the candidates, ranked last")
        # the count kept after every filter, then what each filter took
        note = f"{split} {len(facts)}/{len(fact_split.facts)}" + "".join(f" ({reason})" for reason in why)
        if not facts:
            raise RelationDataError(
                f"Relation {relation}: the {split} split is empty after filtering ({len(fact_split.facts)} facts "
                f"read from {fact_split.report.path}, {len(dropped)} with objects that "
                + (f"{name}'s tokenizer cannot write" if multi_token else f"are not one token of {name}'s tokenizer")
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
    summary = f"{chosen.summary()}; facts kept: " + ", ".join(notes)
    if pool is not None:
        where = "given" if candidates is not None else "the distinct objects of its train, dev and test files"
        summary += f"; {len(pool)} candidate objects ({where})"
        return RelationData(relation, kept, list(chosen.templates), weights, summary, pool)
    return RelationData(relation, kept, list(chosen.templates), weights, summary)


def drop_long_queries(model: Any, data: RelationData) -> tuple[RelationData, str | None]:
    """Leave out the facts with a filled template longer than ``model`` takes (it could not score them).

    In the multi-token setting (``data.candidates`` set) ``[Y]`` holds one mask per token of the object: of the gold
    object for a train fact, and of the gold or the longest candidate, whichever is longer, for a dev or test fact
    (every candidate is scored for it). Returns the data and a note of how many facts each split lost (None when
    none did).
    """
    limit = model.max_query_length
    if limit is None:
        return data, None
    splits, dropped = {}, []
    tokenizer = model.tokenizer
    longest = max((len(object_tokens(tokenizer, c)) for c in data.candidates or ()), default=1)
    for split, facts in data.splits.items():
        lengths = model.query_lengths([fact.subject for fact in facts])
        if data.candidates is not None:
            masks = [len(object_tokens(tokenizer, fact.object)) for fact in facts]
            masks = masks if split == "train" else [max(n, longest) for n in masks]
            lengths = [length + n - 1 for length, n in zip(lengths, masks)]
        splits[split] = [fact for fact, length in zip(facts, lengths) if length <= limit]
        if len(splits[split]) < len(facts):
            dropped.append(f"{split} {len(facts) - len(splits[split])}")
        if not splits[split]:
            raise RelationDataError(
                f"Relation {data.relation}: every {split} fact has a query longer than the model's {limit} tokens"
                + (
                    f" with one mask per token of its object or of the longest candidate ({longest} tokens). Give "
                    "--candidates without objects that long, or use"
                    if data.candidates is not None
                    else ". Use"
                )
                + " a model with more positions or shorter templates."
            )
    if not dropped:
        return data, None
    per_token = " with one mask per object token" if data.candidates is not None else ""
    note = f"{data.relation}: facts left out, query{per_token} longer than the model's {limit} tokens: " + ", ".join(
        dropped
    )
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
