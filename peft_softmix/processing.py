"""`SoftMixtureProcessor`: an adapter's query encoder, from subjects (and objects) to the tensors the model takes.

A processor in the transformers sense: it owns the tokenizer, the token layout of each of the adapter's templates,
and bounded caches of the queries it has tokenised. `PeftModelForSoftMixture.encode`, `query_lengths` and
`object_ids` are the active adapter's processor's.

`encode` is on the hot path of training and evaluation (docs/performance.md): every filled template is tokenised
once and kept as a ready ``[T, 2]`` tensor of (input id, role), and a batch is those cached rows padded in one
`pad_sequence` call.
"""

from __future__ import annotations

import itertools
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple, cast

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .cache import BoundedCache
from .errors import QueryTooLongError
from .inputs import BATCH_KEYS, check_objects, check_subjects
from .tokenization import (
    EncodedQuery,
    TemplateLayout,
    encode_queries,
    object_token_id,
    special_tokens_in,
    template_layout,
)

__all__ = [
    "BATCH_KEYS",
    "DEFAULT_CACHE_SIZE",
    "IGNORE_INDEX",
    "DroppedObjectsWarning",
    "SoftMixtureProcessor",
    "encode_facts",
]

IGNORE_INDEX = -100
# Queries (and objects) each processor keeps. A T-REx relation's training split at K = 5 templates is a few
# thousand queries; 65,536 keep a whole run of an adapter warm in roughly 100 MB at most.
DEFAULT_CACHE_SIZE = 65_536


class DroppedObjectsWarning(UserWarning):
    """Objects that are not one token of the tokenizer were labelled -100 (the loss and metrics skip them)."""


class _CachedQuery(NamedTuple):
    query: EncodedQuery
    # the query as a [T, 2] tensor of (input id, role), template words numbered across all templates (i.e. as rows
    # of `soft_words`): what `encode` collates
    row: torch.Tensor


class SoftMixtureProcessor:
    """Fills an adapter's K templates with subjects and turns them into the model's inputs.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The base model's (fast) tokenizer.
        templates (`Sequence[str]`): The adapter's templates, in order (`SoftMixtureConfig.templates`).
        max_query_length (`int`, *optional*): The most tokens a filled template may have (the base model's
            positions); `encode` refuses longer queries with `QueryTooLongError`. None: no limit.
        model_name (`str`): The base model, as named in that error.
        adapter_name (`str`, *optional*): The adapter these templates belong to; `encode`'s batches record it under
            ``encoded_for``, so that the model refuses to run them through another adapter.
        causal (`bool`): The templates are for a causal LM: ``[Y]`` holds a placeholder that the object's tokens
            replace (see `TemplateLayout`), not a mask.
        cache_size (`int`): How many filled templates, and how many objects' token ids, the processor keeps
            (least recently used dropped first; a dropped one is tokenised again, identically, when next needed).

    **Attributes**:
        - **tokenizer** -- the tokenizer.
        - **layouts** (`list[TemplateLayout]`) -- the token layout of each template's own words.
        - **max_query_length** (`int` or `None`) -- as given.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        templates: Sequence[str],
        max_query_length: int | None = None,
        model_name: str = "the base model",
        cache_size: int = DEFAULT_CACHE_SIZE,
        adapter_name: str | None = None,
        causal: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.adapter_name = adapter_name
        self.causal = causal
        self.layouts: list[TemplateLayout] = [template_layout(tokenizer, t, causal) for t in templates]
        self.max_query_length = max_query_length
        self.model_name = model_name
        # the row of `soft_words` where each template's words start
        self._word_starts = [sum(layout.num_soft_words for layout in self.layouts[:k]) for k in range(len(templates))]
        self._queries: BoundedCache[tuple[int, str], _CachedQuery] = BoundedCache(cache_size)
        self._object_ids: BoundedCache[str, int | None] = BoundedCache(cache_size)
        self._reported: set[str] = set()  # multi-token objects already warned about
        self._vocabulary_key: int | None = None

    @property
    def templates(self) -> list[str]:
        """The adapter's templates, in order."""
        return [layout.template for layout in self.layouts]

    @property
    def num_templates(self) -> int:
        """K, the number of templates."""
        return len(self.layouts)

    @property
    def cache_size(self) -> int:
        """The most filled templates (and, separately, objects) the processor keeps."""
        return self._queries.max_size

    def vocabulary_key(self) -> int:
        """A hash of the tokenizer's vocabulary (computed once): adapters whose keys agree can share a batch."""
        if self._vocabulary_key is None:
            self._vocabulary_key = hash(tuple(sorted(self.tokenizer.get_vocab().items())))
        return self._vocabulary_key

    def cache_info(self) -> dict[str, int]:
        """How many filled templates and objects' token ids are cached now, and the bound on each."""
        return {"queries": len(self._queries), "objects": len(self._object_ids), "max_size": self.cache_size}

    def _cached(self, k: int, subject: str) -> _CachedQuery:
        key = (k, subject)
        entry = self._queries.get(key)
        if entry is None:
            self._tokenise([subject], [k])
            entry = self._queries[key]
        return entry

    def _tokenise(self, subjects: Sequence[str], templates: Sequence[int] | None = None) -> None:
        """Tokenise and cache every (template, subject) query not cached yet, in one batch call of the tokenizer."""
        ks = range(len(self.layouts)) if templates is None else templates
        missing = list(dict.fromkeys((k, s) for s in subjects for k in ks if (k, s) not in self._queries))
        if not missing:
            return
        check_special_tokens(self.tokenizer, dict.fromkeys(s for _, s in missing))
        encoded = encode_queries(self.tokenizer, [(self.layouts[k], s) for k, s in missing])
        # the rows of the whole call as views of one [sum T, 2] tensor: one conversion, not one per query
        lengths = [len(query.input_ids) for query in encoded]
        chain = itertools.chain.from_iterable
        ids = torch.tensor(list(chain(query.input_ids for query in encoded)), dtype=torch.long)
        roles = torch.tensor(list(chain(query.roles for query in encoded)), dtype=torch.long)
        # template words numbered as rows of `soft_words` here, once per query, not in every forward
        starts = torch.tensor([self._word_starts[k] for k, _ in missing]).repeat_interleave(torch.tensor(lengths))
        rows = torch.stack([ids, torch.where(roles >= 0, roles + starts, roles)], dim=1)
        for key, query, row in zip(missing, encoded, rows.split(lengths)):
            self._queries[key] = _CachedQuery(query, row)

    def encoded_query(self, k: int, subject: str) -> EncodedQuery:
        """Template ``k`` filled with ``subject``, tokenised once (while cached) for `encode` and `query_lengths`."""
        return self._cached(k, subject).query

    def __call__(
        self,
        subjects: Sequence[str],
        objects: Sequence[str | None] | None = None,
        device: Any = None,
        strict: bool = False,
    ) -> dict[str, Any]:
        """Same as `encode`."""
        return self.encode(subjects, objects, device=device, strict=strict)

    def encode(
        self,
        subjects: Sequence[str],
        objects: Sequence[str | None] | None = None,
        device: Any = None,
        strict: bool = False,
    ) -> dict[str, Any]:
        """Fill every template with every subject: one row per (fact, template), see `encode_facts`."""
        check_subjects(subjects, "encode")
        return encode_facts([self] * len(subjects), subjects, objects, device=device, strict=strict)

    def query_lengths(self, subjects: Sequence[str]) -> list[int]:
        """For each subject, the token count of its longest filled template (compare with `max_query_length`)."""
        check_subjects(subjects, "query_lengths", allow_empty=True)
        self._tokenise(subjects)
        return [
            max(len(self._cached(k, subject).query.input_ids) for k in range(len(self.layouts)))
            for subject in subjects
        ]

    def _rows(self, subject: str) -> list[_CachedQuery]:
        """The cached queries of ``subject``, one per template (tokenised by `_tokenise` first)."""
        entries = self._queries._entries
        lookup, touch = entries.get, entries.move_to_end
        out = []
        for k in range(len(self.layouts)):
            key = (k, subject)
            entry = lookup(key)
            if entry is None:
                entry = self._cached(k, subject)
            else:
                touch(key)
            out.append(entry)
        return out

    def _warn_dropped(self, objects: Sequence[str | None], ids: Sequence[int | None]) -> None:
        """Warn once per object (per processor) that is not one token, so that the loss skips it visibly."""
        fresh = [o for o, t in zip(objects, ids) if o is not None and t is None and o not in self._reported]
        fresh = list(dict.fromkeys(fresh))
        if not fresh:
            return
        if len(self._reported) < self.cache_size:
            self._reported.update(fresh)
        shown = ", ".join(repr(o) for o in fresh[:5]) + (f" and {len(fresh) - 5} more" if len(fresh) > 5 else "")
        warnings.warn(
            f"{len(fresh)} object(s) are not one token of {type(self.tokenizer).__name__} and get label "
            f"{IGNORE_INDEX} (the loss and metrics skip those facts): {shown}. Drop such facts first "
            "(peft_softmix.facts.filter_single_token), or pass strict=True to make this an error. (Each object is "
            "reported once.)",
            DroppedObjectsWarning,
            stacklevel=_caller_level(),
        )

    def object_ids(self, objects: Sequence[str | None], strict: bool = False) -> list[int | None]:
        """The token id each object is when it fills ``[Y]`` (None when it is not one token of the tokenizer).

        `encode` labels such objects -100, which the loss skips; ``strict=True`` raises instead, naming them.
        """
        cache = self._object_ids
        entries, touch = cache._entries, cache._entries.move_to_end  # inline, as in `encode`
        ids: list[int | None] = []
        for obj in objects:
            if obj is None:
                ids.append(None)
            elif obj in entries:
                touch(obj)
                ids.append(entries[obj])
            else:
                token = cache[obj] = object_token_id(self.tokenizer, obj)
                ids.append(token)
        if strict:
            bad = list(dict.fromkeys(obj for obj, token in zip(objects, ids) if token is None))
            if bad:
                more = f" and {len(bad) - 10} more" if len(bad) > 10 else ""
                shown = ", ".join(repr(obj) for obj in bad[:10]) + more
                raise ValueError(
                    f"{len(bad)} object(s) are not one token of {type(self.tokenizer).__name__} "
                    f"({self.tokenizer.name_or_path!r}), so a single [Y] mask cannot produce them: {shown}. Drop "
                    "those facts first, e.g. with peft_softmix.facts.filter_single_token."
                )
        return ids


def _caller_level() -> int:
    """The `warnings.warn` stacklevel of the first frame outside this package (the user's call)."""
    package = os.path.dirname(__file__)
    frame: Any = sys._getframe(2)  # the caller of the function that warns
    level = 2
    while frame is not None and os.path.dirname(frame.f_code.co_filename) == package:
        frame, level = frame.f_back, level + 1
    return level


def check_special_tokens(tokenizer: PreTrainedTokenizerBase, subjects: Any) -> None:
    """Refuse subjects that hold a special token: a ``[MASK]`` inside a subject would be scored as the answer."""
    for subject in subjects:
        found = special_tokens_in(tokenizer, subject)
        if found:
            raise ValueError(
                f"The subject {subject!r} contains the special token(s) {', '.join(map(repr, found))} of "
                f"{type(tokenizer).__name__}; a query may hold only the mask token that the template's [Y] becomes. "
                "Remove or rewrite them in the subject."
            )


def check_shared_vocabulary(processors: Sequence[SoftMixtureProcessor]) -> None:
    """Facts of several adapters share a batch only when their tokenizers have the same vocabulary."""
    first = processors[0]
    for processor in dict.fromkeys(processors):
        if processor.tokenizer is not first.tokenizer and processor.vocabulary_key() != first.vocabulary_key():
            raise ValueError(
                f"Adapters '{first.adapter_name}' and '{processor.adapter_name}' use different tokenizers, so their "
                "queries cannot share a batch; encode them separately."
            )


def encode_facts(
    processors: Sequence[SoftMixtureProcessor],
    subjects: Sequence[str],
    objects: Sequence[str | None] | None = None,
    device: Any = None,
    strict: bool = False,
) -> dict[str, Any]:
    """Fill the templates of ``processors[b]`` with ``subjects[b]``, for every fact b: one row per (fact, template).

    Facts may come from different adapters (different K and template lengths): their rows are padded together.

    Returns a dict of
        - ``input_ids``, ``attention_mask``, ``roles``: ``[N, T]``, N the sum over facts of their K. ``roles[n, t]`` is
          the row of the fact's adapter's `soft_words` at a template word, or the token's kind (< 0: `HARD`,
          `SUBJECT`, `MASK`) elsewhere. ``input_ids`` are the hard templates: the base model can take them as is.
        - ``mask_positions``: ``[N]``, ``fact_index``: ``[N]`` the fact of each row (a fact's rows are consecutive,
          in template order): the grouping of the mixture.
        - ``labels``: ``[B]`` each object's token id, or -100 when it is not one token (warned about once per
          object; ``strict=True`` raises instead). Only when ``objects`` are given; a batch none of whose objects is
          usable is refused.
        - ``encoded_for``: a tuple of each fact's adapter name (when the processors know it).
    """
    check_subjects(subjects, "encode")
    check_objects(subjects, objects, "encode")
    first = processors[0]
    by_processor: dict[int, SoftMixtureProcessor] = {id(p): p for p in processors}
    check_shared_vocabulary(processors)
    for processor in by_processor.values():
        processor._tokenise([s for p, s in zip(processors, subjects) if p is processor])
    entries: list[_CachedQuery] = []
    fact_of_row: list[int] = []
    for b, (processor, subject) in enumerate(zip(processors, subjects)):
        rows = processor._rows(subject)
        entries.extend(rows)
        fact_of_row.extend([b] * len(rows))
    B = len(subjects)
    pad = first.tokenizer.pad_token_id if first.tokenizer.pad_token_id is not None else 0
    # cached rows padded in one call: collating row by row in Python costs more than a training step on a GPU
    padded = pad_sequence([e.row for e in entries], batch_first=True, padding_value=-1)  # [N, T, 2]; role -1 = hard
    T = padded.shape[1]
    lengths = torch.tensor([len(e.query.input_ids) for e in entries])
    limits = [p.max_query_length for p in processors]
    if any(limit is not None for limit in limits):
        row_limits = torch.tensor([limits[b] if limits[b] is not None else T for b in fact_of_row])
        if bool((lengths > row_limits).any()):
            _raise_too_long(entries, fact_of_row, processors, subjects, lengths - row_limits)
    attention_mask = (torch.arange(T) < lengths[:, None]).long()
    batch: dict[str, Any] = {
        "input_ids": padded[..., 0].masked_fill(attention_mask == 0, pad),
        "attention_mask": attention_mask,
        "roles": padded[..., 1].contiguous(),
        "mask_positions": torch.tensor([e.query.mask_position for e in entries]),
        "fact_index": torch.tensor(fact_of_row),
    }
    if objects is not None and any(obj is not None for obj in objects):
        labels = torch.full((B,), IGNORE_INDEX, dtype=torch.long)
        for processor in by_processor.values():
            mine = [b for b, p in enumerate(processors) if p is processor]
            wanted = [objects[b] for b in mine]
            ids = processor.object_ids(wanted, strict=strict)
            processor._warn_dropped(wanted, ids)
            for b, token in zip(mine, ids):
                if token is not None:
                    labels[b] = token
        if not bool((labels != IGNORE_INDEX).any()):
            raise ValueError(
                f"None of the {B} object(s) of this batch is one token of {type(first.tokenizer).__name__}, so the "
                "batch has no usable label (its loss would be a silent 0). Drop such facts first "
                "(peft_softmix.facts.filter_single_token), or encode without objects to only query."
            )
        batch["labels"] = labels
    return finish_batch(batch, processors, device)


def finish_batch(batch: dict[str, Any], processors: Sequence[SoftMixtureProcessor], device: Any) -> dict[str, Any]:
    """A batch's tensors moved to ``device``, and ``encoded_for``: each fact's adapter (when processors know it)."""
    if device is not None:
        batch = {name: tensor.to(device) for name, tensor in batch.items()}
    names = [p.adapter_name for p in processors]
    if all(name is not None for name in names):
        batch["encoded_for"] = tuple(cast(list[str], names))
    return batch


def _raise_too_long(
    entries: list[_CachedQuery],
    fact_of_row: list[int],
    processors: Sequence[SoftMixtureProcessor],
    subjects: Sequence[str],
    excess: torch.Tensor,
) -> None:
    n = int(excess.argmax())
    b = fact_of_row[n]
    processor = processors[b]
    k = n - fact_of_row.index(b)
    raise QueryTooLongError(
        f"The query for subject {subjects[b]!r} with template {processor.layouts[k].template!r} is "
        f"{len(entries[n].query.input_ids)} tokens long, but {processor.model_name} takes at most "
        f"{processor.max_query_length}. Leave such facts out (`query_lengths(subjects)` gives each subject's longest "
        "query; examples/train_trex.py drops and counts them) or shorten the template."
    )
