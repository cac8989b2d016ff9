"""`SoftMixtureProcessor`: an adapter's query encoder, from subjects (and objects) to the tensors the model takes.

A processor in the transformers sense: it owns the tokenizer, the token layout of each of the adapter's templates,
and bounded caches of the queries it has tokenised. `PeftModelForSoftMixture.encode`, `query_lengths` and
`object_ids` are the active adapter's processor's.

`encode` is on the hot path of training and evaluation (docs/performance.md): every filled template is tokenised
once and kept as a ready ``[T, 2]`` tensor of (input id, role), and a batch is those cached rows padded in one
`pad_sequence` call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .errors import QueryTooLongError
from .inputs import check_objects, check_subjects
from .tokenization import EncodedQuery, TemplateLayout, encode_query, object_token_id, template_layout

__all__ = ["DEFAULT_CACHE_SIZE", "IGNORE_INDEX", "SoftMixtureProcessor"]

IGNORE_INDEX = -100
# Queries (and objects) each processor keeps. A T-REx relation's training split at K = 5 templates is a few
# thousand queries; 65,536 keep a whole run of an adapter warm in roughly 100 MB at most.
DEFAULT_CACHE_SIZE = 65_536

KT = TypeVar("KT", bound=Hashable)
VT = TypeVar("VT")


class BoundedCache(Generic[KT, VT]):
    """A dict that keeps at most ``max_size`` entries, dropping the least recently used one first."""

    def __init__(self, max_size: int) -> None:
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"A cache needs a max_size of at least 1, got {max_size!r}.")
        self.max_size = max_size
        self._entries: OrderedDict[KT, VT] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: KT) -> VT:
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def get(self, key: KT) -> VT | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def __setitem__(self, key: KT, value: VT) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


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
    ) -> None:
        self.tokenizer = tokenizer
        self.layouts: list[TemplateLayout] = [template_layout(tokenizer, template) for template in templates]
        self.max_query_length = max_query_length
        self.model_name = model_name
        # the row of `soft_words` where each template's words start
        self._word_starts = [sum(layout.num_soft_words for layout in self.layouts[:k]) for k in range(len(templates))]
        self._queries: BoundedCache[tuple[int, str], _CachedQuery] = BoundedCache(cache_size)
        self._object_ids: BoundedCache[str, int | None] = BoundedCache(cache_size)

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

    def cache_info(self) -> dict[str, int]:
        """How many filled templates and objects' token ids are cached now, and the bound on each."""
        return {"queries": len(self._queries), "objects": len(self._object_ids), "max_size": self.cache_size}

    def _cached(self, k: int, subject: str) -> _CachedQuery:
        key = (k, subject)
        entry = self._queries.get(key)
        if entry is None:
            query = encode_query(self.tokenizer, self.layouts[k], subject)
            # template words numbered as rows of `soft_words` here, once per query, not in every forward
            start = self._word_starts[k]
            numbered = [role + start if role >= 0 else role for role in query.roles]
            row = torch.tensor([query.input_ids, numbered], dtype=torch.long).T
            entry = self._queries[key] = _CachedQuery(query, row)
        return entry

    def encoded_query(self, k: int, subject: str) -> EncodedQuery:
        """Template ``k`` filled with ``subject``, tokenised once (while cached) for `encode` and `query_lengths`."""
        return self._cached(k, subject).query

    def __call__(
        self, subjects: Sequence[str], objects: Sequence[str | None] | None = None, device: Any = None
    ) -> dict[str, torch.Tensor]:
        """Same as `encode`."""
        return self.encode(subjects, objects, device=device)

    def encode(
        self, subjects: Sequence[str], objects: Sequence[str | None] | None = None, device: Any = None
    ) -> dict[str, torch.Tensor]:
        """Fill every template with every subject: tensors of shape ``[B, K, T]`` plus mask positions and labels.

        ``roles[b, k, t]`` is the row of the adapter's `soft_words` at a template word, or the token's kind (< 0:
        `HARD`, `SUBJECT`, `MASK`) elsewhere. ``labels[b]`` is the object's token id, or -100 when it is not one
        token (or not given).
        """
        check_subjects(subjects, "encode")
        check_objects(subjects, objects, "encode")
        K = len(self.layouts)
        queries: list[EncodedQuery] = []
        rows: list[torch.Tensor] = []
        # the cache's own dict, looked up inline: a method call per query would cost a third of a warm encode
        entries = self._queries._entries
        lookup, touch = entries.get, entries.move_to_end
        for subject in subjects:
            for k in range(K):
                key = (k, subject)
                entry = lookup(key)
                if entry is None:
                    entry = self._cached(k, subject)
                else:
                    touch(key)
                queries.append(entry.query)
                rows.append(entry.row)
        B = len(subjects)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # cached rows padded in one call: collating row by row in Python costs more than a training step on a GPU
        padded = pad_sequence(rows, batch_first=True, padding_value=-1)  # [B * K, T, 2]; role -1 = hard
        T = padded.shape[1]
        lengths = torch.tensor([len(q.input_ids) for q in queries])
        if self.max_query_length is not None and len(queries) and int(lengths.max()) > self.max_query_length:
            self._raise_too_long(queries, subjects)
        attention_mask = (torch.arange(T) < lengths[:, None]).long()
        input_ids = padded[..., 0].masked_fill(attention_mask == 0, pad)
        roles = padded[..., 1].contiguous()
        mask_positions = torch.tensor([q.mask_position for q in queries])
        labels = torch.full((B,), IGNORE_INDEX, dtype=torch.long)
        if objects is not None:
            for b, token in enumerate(self.object_ids(objects)):
                labels[b] = IGNORE_INDEX if token is None else token
        batch = {
            "input_ids": input_ids.view(B, K, T),
            "attention_mask": attention_mask.view(B, K, T),
            "roles": roles.view(B, K, T),
            "mask_positions": mask_positions.view(B, K),
            "labels": labels,
        }
        if device is not None:
            batch = {name: tensor.to(device) for name, tensor in batch.items()}
        return batch

    def query_lengths(self, subjects: Sequence[str]) -> list[int]:
        """For each subject, the token count of its longest filled template (compare with `max_query_length`)."""
        check_subjects(subjects, "query_lengths", allow_empty=True)
        return [
            max(len(self._cached(k, subject).query.input_ids) for k in range(len(self.layouts)))
            for subject in subjects
        ]

    def _raise_too_long(self, queries: list[EncodedQuery], subjects: Sequence[str]) -> None:
        K = len(self.layouts)
        i = max(range(len(queries)), key=lambda n: len(queries[n].input_ids))
        raise QueryTooLongError(
            f"The query for subject {subjects[i // K]!r} with template {self.layouts[i % K].template!r} is "
            f"{len(queries[i].input_ids)} tokens long, but {self.model_name} takes at most {self.max_query_length}. "
            "Leave such facts out (`query_lengths(subjects)` gives each subject's longest query; "
            "examples/train_trex.py drops and counts them) or shorten the template."
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
