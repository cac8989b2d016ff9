"""Where every token of a filled cloze template comes from.

A LAMA template such as ``"[X] was born in [Y] ."`` is filled with a subject and the tokenizer's mask token and
tokenised *as one sentence*, exactly as the base model would see it. Character offsets then tell, for every
token, whether it belongs to the subject, is the mask, or is a template word (which becomes a soft word).
Working from the filled sentence, rather than from separately tokenised pieces, keeps WordPiece, byte-level BPE and
SentencePiece tokenizers all honest about spaces and merges.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast
from weakref import WeakKeyDictionary

import numpy as np
from transformers import PreTrainedTokenizerBase

from .errors import TemplateError

SUBJECT_SLOT = "[X]"
OBJECT_SLOT = "[Y]"

# Token roles in an encoded example.
HARD = -1  # special tokens (CLS/SEP/BOS/EOS) and anything that keeps its frozen embedding
SUBJECT = -2
MASK = -3


@dataclass(frozen=True)
class TemplateLayout:
    """The canonical tokenisation of one template's own words.

    Attributes:
        template: The template text, e.g. ``"[X] was born in [Y] ."``.
        segments: Token ids of the template words in each of the three stretches of text around the two slots
            (before the first slot, between them, after the second).
        causal: For a causal LM: ``[Y]`` holds a placeholder special token (the tokenizer's end-of-text token)
            instead of a mask, glued to the word before it, because the object's own tokens carry their leading
            space (``ĠFlorence``, ``▁Florence``).
    """

    template: str
    segments: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
    causal: bool = False

    @property
    def token_ids(self) -> list[int]:
        return [t for seg in self.segments for t in seg]

    @property
    def num_soft_words(self) -> int:
        return sum(len(seg) for seg in self.segments)


@dataclass(frozen=True)
class EncodedQuery:
    """One filled template, ready for the model.

    ``roles[i]`` is the soft-word index (``>= 0``, counted within the template) of token ``i``, or one of
    `HARD`, `SUBJECT`, `MASK`. ``mismatched`` is True when the subject changed how a template word was tokenised
    (those words then keep their hard embedding for this query).
    """

    input_ids: list[int]
    roles: list[int]
    mask_position: int
    mismatched: bool = False


def validate_template(template: str) -> None:
    """Raise `TemplateError` unless ``template`` has exactly one ``[X]`` and one ``[Y]``."""
    if not isinstance(template, str) or not template.strip():
        raise TemplateError(f"Template {template!r} is empty. Write it like '[X] was born in [Y] .'.")
    for slot, what in ((SUBJECT_SLOT, "subject"), (OBJECT_SLOT, "object")):
        n = template.count(slot)
        if n == 0:
            raise TemplateError(
                f"Template {template!r} has no {slot} slot (the {what}). Write it like '[X] was born in [Y] .'."
            )
        if n > 1:
            raise TemplateError(
                f"Template {template!r} has {n} {slot} slots; a cloze template needs exactly one {slot} (the {what})."
            )


def require_mask_token(tokenizer: PreTrainedTokenizerBase) -> str:
    mask = tokenizer.mask_token
    if mask is None or tokenizer.mask_token_id is None:
        raise TemplateError(
            f"The tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path!r}) has no mask token, so it cannot "
            "fill [Y]. Use the tokenizer of a masked language model (one that AutoModelForMaskedLM loads)."
        )
    if not tokenizer.is_fast:
        raise TemplateError(
            f"The tokenizer {type(tokenizer).__name__} is a slow (Python) tokenizer without character offsets. "
            "Load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )
    return mask


def slot_placeholder(tokenizer: PreTrainedTokenizerBase) -> str:
    """The special token that stands in ``[Y]`` for a causal LM's tokenizer (which has no mask token): its
    end-of-text token, else another special token that every tokenizer splits off the text."""
    for token in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token, tokenizer.pad_token):
        if isinstance(token, str) and token.strip() and tokenizer.convert_tokens_to_ids(token) is not None:
            return token
    raise TemplateError(
        f"The tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path!r}) has no special token (end-of-text, "
        "beginning-of-text, unknown or padding) to mark where [Y] goes; set tokenizer.eos_token."
    )


def _fill(template: str, subject: str, mask: str, glue: bool = False) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """Fill both slots; return the text and the character spans of the subject and the mask. With ``glue`` the
    space before ``[Y]`` goes (the object's tokens bring their own)."""
    if glue:
        template = template.replace(" " + OBJECT_SLOT, OBJECT_SLOT, 1)
    before, first, between, _, after = _slots(template)
    if first == SUBJECT_SLOT:
        subject_start, mask_start = len(before), len(before) + len(subject) + len(between)
        text = before + subject + between + mask + after
    else:
        mask_start, subject_start = len(before), len(before) + len(mask) + len(between)
        text = before + mask + between + subject + after
    return text, (subject_start, subject_start + len(subject)), (mask_start, mask_start + len(mask))


@functools.lru_cache(maxsize=4096)
def _slots(template: str) -> tuple[str, str, str, str, str]:
    """``template`` split around its two slots: text before, first slot, text between, second slot, text after."""
    parts = re.split(r"(\[X\]|\[Y\])", template)
    if len(parts) != 5:
        validate_template(template)  # names what is wrong
        raise TemplateError(f"Template {template!r} needs exactly one [X] and one [Y].")
    return parts[0], parts[1], parts[2], parts[3], parts[4]


@dataclass(frozen=True)
class _TokenizerFacts:
    """What tokenising a query reads from a tokenizer, looked up once per tokenizer: every attribute of a
    transformers tokenizer goes through a slow ``__getattr__``, and T-REx evaluation tokenises 170,000 queries.
    (Special tokens added to a tokenizer after its first query are therefore not seen here.)"""

    mask: str
    mask_id: int
    special_ids: frozenset[int]
    # the special tokens as text, longest first (a subject holding one is refused: see `special_tokens_in`)
    special_tokens: tuple[str, ...]
    # the Rust `tokenizers.Tokenizer` to call directly when it gives what ``tokenizer(text)`` gives (checked),
    # which skips transformers' per-call wrapping (about half the time of a query), else None
    backend: Any


_FACTS: WeakKeyDictionary[PreTrainedTokenizerBase, _TokenizerFacts] = WeakKeyDictionary()
_CAUSAL_FACTS: WeakKeyDictionary[PreTrainedTokenizerBase, _TokenizerFacts] = WeakKeyDictionary()


def _tokenizer_facts(tokenizer: PreTrainedTokenizerBase, causal: bool = False) -> _TokenizerFacts:
    """What tokenising reads from ``tokenizer``; ``causal``: ``[Y]`` is `slot_placeholder`, not the mask token."""
    table = _CAUSAL_FACTS if causal else _FACTS
    facts = table.get(tokenizer)
    if facts is None:
        if causal:
            if not tokenizer.is_fast:
                require_mask_token(tokenizer)  # its error about slow tokenizers
            mask = slot_placeholder(tokenizer)
            mask_id = cast(int, tokenizer.convert_tokens_to_ids(mask))
        else:
            mask = require_mask_token(tokenizer)
            mask_id = cast(int, tokenizer.mask_token_id)
        specials = tuple(sorted({t for t in tokenizer.all_special_tokens if t and t.strip()}, key=len, reverse=True))
        facts = _TokenizerFacts(mask, mask_id, frozenset(tokenizer.all_special_ids), specials, None)
        backend = getattr(tokenizer, "_tokenizer", None)
        if backend is not None and all(
            _encode(tokenizer, facts, text) == _encode_directly(backend, text)
            for text in (f"Zxq Qwerty-Smith was born in {mask} .", f"{mask} , é 1,234 d'Arc  ({mask})")
        ):
            facts = _TokenizerFacts(facts.mask, facts.mask_id, facts.special_ids, facts.special_tokens, backend)
        table[tokenizer] = facts
    return facts


def _encode_directly(backend: Any, text: str) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    try:
        enc = backend.encode(text)
        return list(enc.ids), [tuple(o) for o in enc.offsets], list(enc.special_tokens_mask)
    except Exception:  # not a tokenizers.Tokenizer after all: the comparison fails and the slow path is kept
        return [], [], []


def _encode(
    tokenizer: PreTrainedTokenizerBase, facts: _TokenizerFacts, text: str
) -> tuple[list[int], list[tuple[int, int]], list[int]]:
    """Input ids, character offsets and the special-tokens mask of ``text``, as ``tokenizer(text)`` gives them."""
    backend = facts.backend
    # a call with truncation or padding (e.g. the user's) leaves them set on the Rust tokenizer until the next
    # plain tokenizer(...) call resets them: take that call then
    if backend is not None and backend.truncation is None and backend.padding is None:
        return _encode_directly(backend, text)
    enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], list(enc["special_tokens_mask"])


def _encode_many(
    tokenizer: PreTrainedTokenizerBase, facts: _TokenizerFacts, texts: list[str]
) -> list[tuple[list[int], list[tuple[int, int]], list[int]]]:
    """`_encode` of many texts in one call of the tokenizer (its Rust batch call, which also runs in parallel)."""
    backend = facts.backend
    if backend is not None and backend.truncation is None and backend.padding is None:
        try:
            encodings = backend.encode_batch(texts)
        except Exception:  # not a tokenizers.Tokenizer after all: one text at a time
            return [_encode(tokenizer, facts, text) for text in texts]
        # as the Rust encodings give them (fresh lists): `_placements` reads offsets as pairs of any kind
        return [(e.ids, e.offsets, e.special_tokens_mask) for e in encodings]
    enc = tokenizer(texts, return_offsets_mapping=True, return_special_tokens_mask=True)
    return [
        (list(ids), [tuple(o) for o in offsets], list(special))
        for ids, offsets, special in zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"])
    ]


def _placements(
    facts: _TokenizerFacts,
    filled: Sequence[tuple[str, tuple[int, int], tuple[int, int]]],
    encoded: Sequence[tuple[list[int], Sequence[tuple[int, int]], list[int]]],
    tokenizer_name: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where every token of many filled templates comes from, from the tokenizer's character offsets.

    Returns the input ids and each token's kind (`HARD`, `SUBJECT`, `MASK`, or the template stretch 0..2 it lies
    in) of all queries end to end, the queries' start offsets in them (``n + 1``) and each query's mask position.
    A token is, by the first rule that holds: the mask (the first mask token inside the mask's span); hard (a
    special token the tokenizer added); the subject (it overlaps the subject's characters); hard (a piece glued
    to the mask token); else the template stretch that its first character lies in. One pass of array operations
    over all tokens: per token in Python, this was most of the time of building T-REx queries.
    """
    n = len(encoded)
    lengths = np.fromiter((len(ids) for ids, _, _ in encoded), dtype=np.int64, count=n)
    starts = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    total = int(starts[-1])
    chain = itertools.chain.from_iterable
    ids = np.fromiter(chain(ids for ids, _, _ in encoded), dtype=np.int64, count=total)
    offsets = np.fromiter(chain(chain(o for _, o, _ in encoded)), dtype=np.int64, count=2 * total)
    special = np.fromiter(chain(s for _, _, s in encoded), dtype=np.int64, count=total) != 0
    spans = np.array([(*subject, *mask) for _, subject, mask in filled], dtype=np.int64).reshape(n, 4)
    query = np.repeat(np.arange(n), lengths)
    start, end = offsets[0::2], offsets[1::2]
    subject_start, subject_end, mask_start, mask_end = (spans[query, c] for c in range(4))
    empty = start == end  # an empty-span token (e.g. a bare SentencePiece '▁') sits where it starts

    def overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.where(empty, (a <= start) & (start < b), (start < b) & (a < end))

    in_subject, in_mask = overlaps(subject_start, subject_end), overlaps(mask_start, mask_end)
    # `special` marks only the tokens the tokenizer adds (CLS, BOS): a BOS that is also the slot's token is not it
    candidates = np.flatnonzero((ids == facts.mask_id) & in_mask & ~special)
    with_mask, first = np.unique(query[candidates], return_index=True)
    if len(with_mask) < n:
        lost = int(np.flatnonzero(np.isin(np.arange(n), with_mask, invert=True))[0])
        raise TemplateError(
            f"The mask token {facts.mask!r} disappeared when tokenising {filled[lost][0]!r}; the tokenizer "
            f"{tokenizer_name} does not treat it as one token."
        )
    mask_at = candidates[first]
    is_mask = np.zeros(total, dtype=bool)
    is_mask[mask_at] = True
    added = special | (empty & (start == 0) & np.isin(ids, np.fromiter(facts.special_ids, dtype=np.int64)))
    first_slot, second_slot = np.minimum(subject_start, mask_start), np.maximum(subject_start, mask_start)
    kinds = np.select(
        [is_mask, added, in_subject, in_mask, start < first_slot, start < second_slot],
        [MASK, HARD, SUBJECT, HARD, 0, 1],
        default=2,
    )
    return ids, kinds, starts, mask_at - starts[:-1]


def _tokenise(
    tokenizer: PreTrainedTokenizerBase, template: str, subject: str, causal: bool = False
) -> tuple[list[int], list[int], int]:
    """Return input ids, per-token kind (HARD/SUBJECT/MASK, or the template stretch 0..2) and the mask position."""
    facts = _tokenizer_facts(tokenizer, causal)
    filled = _fill(template, subject, facts.mask, glue=causal)
    encoded = _encode(tokenizer, facts, filled[0])
    ids, kinds, _, mask_position = _placements(facts, [filled], [encoded], type(tokenizer).__name__)
    return ids.tolist(), kinds.tolist(), int(mask_position[0])


def template_layout(tokenizer: PreTrainedTokenizerBase, template: str, causal: bool = False) -> TemplateLayout:
    """Tokenise ``template``'s own words as they appear in a filled sentence.

    The subject slot is filled with the mask token for this: special tokens are split off by every tokenizer
    family, so the template words come out as they do next to any subject that starts and ends on a word
    boundary.
    """
    validate_template(template)
    ids, kinds, _ = _tokenise(tokenizer, template, _tokenizer_facts(tokenizer, causal).mask, causal)
    segments: tuple[list[int], list[int], list[int]] = ([], [], [])
    for tok, kind in zip(ids, kinds):
        if kind >= 0:
            segments[kind].append(tok)
    if not any(segments):
        raise TemplateError(f"Template {template!r} has no words besides [X] and [Y]: there is nothing to tune.")
    return TemplateLayout(template, (tuple(segments[0]), tuple(segments[1]), tuple(segments[2])), causal)


def encode_query(tokenizer: PreTrainedTokenizerBase, layout: TemplateLayout, subject: str) -> EncodedQuery:
    """Tokenise ``layout.template`` filled with ``subject`` and the mask, and give every token its role.

    Template words are numbered 0..n-1 in template order; a stretch of template words whose tokens came out
    differently next to this subject keeps its hard embeddings (``mismatched`` is then set).
    """
    return encode_queries(tokenizer, [(layout, subject)])[0]


def encode_queries(
    tokenizer: PreTrainedTokenizerBase, queries: Sequence[tuple[TemplateLayout, str]]
) -> list[EncodedQuery]:
    """`encode_query` of many (layout, subject) pairs, tokenised in one batch call of the tokenizer."""
    if not queries:
        return []
    causal = queries[0][0].causal
    facts = _tokenizer_facts(tokenizer, causal)
    filled = []
    for layout, subject in queries:
        if not subject or not subject.strip():
            raise TemplateError(f"Empty subject for template {layout.template!r}.")
        filled.append(_fill(layout.template, subject, facts.mask, glue=causal))
    texts = [text for text, _, _ in filled]
    encoded = _encode_many(tokenizer, facts, texts) if len(texts) > 1 else [_encode(tokenizer, facts, texts[0])]
    ids, kinds, starts, mask_positions = _placements(facts, filled, encoded, type(tokenizer).__name__)
    roles, mismatched = _roles([layout for layout, _ in queries], ids, kinds, starts)
    bounds = starts.tolist()
    return [
        EncodedQuery(enc[0], roles[a:b], mask, bad)
        for enc, a, b, mask, bad in zip(encoded, bounds, bounds[1:], mask_positions.tolist(), mismatched.tolist())
    ]


def _roles(
    layouts: Sequence[TemplateLayout], ids: np.ndarray, kinds: np.ndarray, starts: np.ndarray
) -> tuple[list[int], np.ndarray]:
    """Every token's role (all queries end to end) and whether each query is mismatched.

    The k-th template word of a stretch (kind ``s``) is soft word ``sum(len of stretches before s) + k``, if the
    stretch's tokens are exactly the layout's; a stretch that came out differently next to this subject keeps its
    hard embeddings (every token `HARD`).
    """
    n = len(layouts)
    distinct: dict[int, int] = {}
    which = np.fromiter((distinct.setdefault(id(layout), len(distinct)) for layout in layouts), np.int64, count=n)
    shapes = list({id(layout): layout for layout in layouts}.values())
    widths = np.array([[len(segment) for segment in layout.segments] for layout in shapes], dtype=np.int64)
    table = np.full((len(shapes), 3, max(1, int(widths.max()))), -1, dtype=np.int64)  # each stretch's token ids
    for row, layout in enumerate(shapes):
        for s, segment in enumerate(layout.segments):
            table[row, s, : len(segment)] = segment
    query = np.repeat(np.arange(n), np.diff(starts))
    layout_of = which[query]
    stretch = np.maximum(kinds, 0)
    # each template word's place in its stretch, and how many words each stretch of each query has
    place = np.zeros(len(kinds), dtype=np.int64)
    counts = np.zeros((n, 3), dtype=np.int64)
    for s in range(3):
        mine = kinds == s
        running = np.concatenate([[0], np.cumsum(mine)])
        before = running[starts[:-1]]
        counts[:, s] = running[starts[1:]] - before
        place[mine] = (running[1:] - 1 - before[query])[mine]
    expected = table[layout_of, stretch, np.minimum(place, table.shape[2] - 1)]
    wrong = (kinds >= 0) & ((place >= widths[layout_of, stretch]) | (ids != expected))
    ok = (counts == widths[which]) & (np.bincount(query[wrong] * 3 + stretch[wrong], minlength=3 * n) == 0).reshape(
        n, 3
    )
    first_word = np.cumsum(widths, axis=1) - widths  # soft word of each stretch's first word
    roles = np.where(kinds >= 0, np.where(ok[query, stretch], first_word[layout_of, stretch] + place, HARD), kinds)
    return roles.tolist(), ~ok.all(axis=1)


def special_tokens_in(tokenizer: PreTrainedTokenizerBase, text: str) -> list[str]:
    """The tokenizer's special tokens (``[MASK]``, ``<s>``, ...) that occur in ``text``."""
    facts = _FACTS.get(tokenizer) or _CAUSAL_FACTS.get(tokenizer)
    if facts is None:
        facts = _tokenizer_facts(tokenizer, causal=tokenizer.mask_token is None)
    return [token for token in facts.special_tokens if token in text]


def object_token_id(tokenizer: PreTrainedTokenizerBase, obj: str) -> int | None:
    """The single token id that ``obj`` is when it fills ``[Y]`` after a space, or None if it is not one token.

    WordPiece gives ``Paris``, byte-level BPE ``ĠParis``, SentencePiece ``▁Paris``.
    """
    if not obj or not obj.strip() or obj != obj.strip():
        return None
    pieces = [p for p in tokenizer.tokenize(" " + obj) if p not in ("▁", "Ġ", "")]
    if len(pieces) != 1:
        return None
    token_id = tokenizer.convert_tokens_to_ids(pieces[0])
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(cast(int, token_id))
