"""Objects of any length: their tokens, and the rows that score them.

An object of n tokens fills ``[Y]`` with n mask tokens. Each (fact, template) row is the cached single-mask query of
`SoftMixtureProcessor` with its one mask widened to n in place, so the template words, their soft-word numbering and
the subject's tokens are exactly those of the single-token setting; only the slot grows. Logits at the n masks score
the object's n tokens, each given the others (all masks are present at once): log p_k(y|x) = sum_j log p_k(y_j|x).

`encode_objects` builds such a batch: ``target_positions`` ``[N, L]`` (the masks of each row, L the longest object of
the batch) and, with objects, ``labels`` ``[B, L]`` (each fact's object tokens, -100 past its end). A batch of
single-token objects holds exactly the single-token setting's rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast
from weakref import WeakKeyDictionary

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .errors import DataFormatError, QueryTooLongError, TemplateError
from .inputs import check_objects, check_subjects
from .processing import (
    IGNORE_INDEX,
    BoundedCache,
    DroppedObjectsWarning,
    SoftMixtureProcessor,
    check_shared_vocabulary,
    check_special_tokens,
    finish_batch,
)
from .tokenization import HARD, MASK

__all__ = ["encode_objects", "object_tokens", "read_candidates", "tokenize_objects"]

# Objects' token ids kept per tokenizer (a relation has a few hundred distinct objects; T-REx a few thousand).
_CACHE_SIZE = 65_536
_TOKENS: WeakKeyDictionary[PreTrainedTokenizerBase, BoundedCache[tuple[str, bool], tuple[int, ...]]] = (
    WeakKeyDictionary()
)


def object_tokens(tokenizer: PreTrainedTokenizerBase, obj: str, exact: bool = False) -> tuple[int, ...]:
    """The token ids ``obj`` is when it fills ``[Y]`` after a space: ``("New York City")`` -> 3 ids with WordPiece.

    A bare space marker (SentencePiece's ``▁``, byte-level BPE's ``Ġ``) before the word is left out, as in the
    single-token setting (a mask takes the place of the word and its space), unless ``exact`` (a causal LM reads the
    object's own tokens, space and all). Empty when the tokenizer cannot write it (an unknown piece): no answer of
    the model can then be ``obj``. Raises `ValueError` for an empty object.
    """
    if not isinstance(obj, str) or not obj.strip():
        raise ValueError(f"The object {obj!r} is empty; every fact needs an object with at least one character.")
    cache = _TOKENS.get(tokenizer)
    if cache is None:
        cache = _TOKENS[tokenizer] = BoundedCache(_CACHE_SIZE)
    key = (obj, exact)
    found = cache.get(key)
    if found is not None:
        return found
    pieces = [p for p in tokenizer.tokenize(" " + obj.strip()) if p != ""]
    if not exact:
        pieces = [p for p in pieces if p not in ("▁", "Ġ")]
    ids = [int(cast(int, tokenizer.convert_tokens_to_ids(p))) for p in pieces]
    unknown = tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids
    tokens = () if not ids or unknown else tuple(ids)
    cache[key] = tokens
    return tokens


def tokenize_objects(
    tokenizer: PreTrainedTokenizerBase, objects: Sequence[str | None], strict: bool = False, exact: bool = False
) -> list[tuple[int, ...]]:
    """`object_tokens` of each object (``()`` for None). An object with an unknown piece gets ``()`` with a
    `DroppedObjectsWarning` (its fact is left out of the loss and metrics), or a `ValueError` with ``strict=True``."""
    out = [() if obj is None else object_tokens(tokenizer, obj, exact) for obj in objects]
    bad = list(dict.fromkeys(o for o, t in zip(objects, out) if o is not None and not t))
    if bad:
        shown = ", ".join(repr(o) for o in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        message = (
            f"{len(bad)} object(s) hold a piece that {type(tokenizer).__name__} cannot write (its unknown token), so "
            f"no answer of the model can be them: {shown}."
        )
        if strict:
            raise ValueError(message + " Drop those facts first.")
        warnings.warn(message + " Their facts get label -100 (skipped).", DroppedObjectsWarning, stacklevel=3)
    return out


def read_candidates(path: str | Path) -> list[str]:
    """A candidates file: one object per line (UTF-8). An empty line is an error naming its line; duplicates are
    kept once, in first-seen order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataFormatError(f"Cannot read the candidates file {path}: {error}.") from error
    out: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            if number == len(lines):
                continue  # a trailing blank line
            raise DataFormatError(f"{path}, line {number}: an empty line; write one candidate object per line.")
        out[text] = None
    if not out:
        raise DataFormatError(f"The candidates file {path} holds no candidate; write one object per line.")
    return list(out)


def encode_objects(
    processors: Sequence[SoftMixtureProcessor],
    subjects: Sequence[str],
    objects: Sequence[str | None] | None = None,
    num_masks: Sequence[int] | None = None,
    device: Any = None,
    strict: bool = False,
    causal_scoring: str = "prefix",
) -> dict[str, Any]:
    """Fill the templates of ``processors[b]`` with ``subjects[b]`` and one mask per token of ``objects[b]``.

    Without objects, ``num_masks[b]`` masks (to rank candidates of that length, or to decode). Returns the keys of
    `encode_facts` (``mask_positions`` is each row's first mask) and ``target_positions`` ``[N, L]``; with objects
    ``labels`` is ``[B, L]`` (each object's tokens, -100 after its end, all -100 for an object the tokenizer cannot
    write). Raises `QueryTooLongError`, naming the model's limit, when an object makes a query too long.

    For a causal LM's processors the object's own tokens fill ``[Y]`` (teacher forcing), the logits *before* each
    token score it, and ``target_ids`` ``[N, L]`` says which token each target position scores. ``causal_scoring``:
    ``"prefix"`` scores the object's tokens given the text before them (templates whose ``[Y]`` comes before ``[X]``
    are scored as whole sentences, since their prefix does not hold the subject); ``"sentence"`` scores every
    template as a whole sentence (the object's tokens and everything after them).
    """
    check_subjects(subjects, "encode")
    check_objects(subjects, objects, "encode")
    if causal_scoring not in ("prefix", "sentence"):
        raise ValueError(f"causal_scoring is 'prefix' or 'sentence', got {causal_scoring!r}.")
    first = processors[0]
    check_shared_vocabulary(processors)
    causal = first.causal
    if objects is not None:
        tokens = tokenize_objects(first.tokenizer, objects, strict=strict, exact=causal)
        if not any(tokens):
            raise ValueError(
                f"None of the {len(subjects)} object(s) of this batch can be written by "
                f"{type(first.tokenizer).__name__}, so the batch has no usable label (its loss would be a silent 0)."
            )
    elif num_masks is not None and not causal:
        bad = [n for n in num_masks if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if len(num_masks) != len(subjects) or bad:
            raise ValueError(f"num_masks takes one whole number >= 1 per subject, got {list(num_masks)!r}.")
        tokens = [(IGNORE_INDEX,) * n for n in num_masks]
    else:
        raise ValueError(
            "encode_objects needs objects"
            + (" (a causal LM scores the object's own tokens)." if causal else ", or num_masks (masks per [Y]).")
        )
    for processor in dict.fromkeys(processors):
        if processor.causal != causal:
            raise ValueError("Adapters of masked and causal LMs cannot share a batch; encode them separately.")
        mine = [s for p, s in zip(processors, subjects) if p is processor]
        check_special_tokens(processor.tokenizer, dict.fromkeys(mine))
        processor._tokenise(mine)
    rows: list[torch.Tensor] = []
    firsts: list[int] = []
    fact_of_row: list[int] = []
    positions: list[list[int]] = []
    targets: list[list[int]] = []
    mask_id = first.tokenizer.mask_token_id
    for b, (processor, subject, ids) in enumerate(zip(processors, subjects, tokens)):
        limit = processor.max_query_length
        n = max(len(ids), 1)
        if causal:
            slot = torch.tensor([[t, HARD] for t in (ids or (0,))], dtype=torch.long)
        else:
            slot = torch.tensor([[cast(int, mask_id), MASK]] * n, dtype=torch.long)
        for k, entry in enumerate(processor._rows(subject)):
            p = entry.query.mask_position
            row = torch.cat([entry.row[:p], slot, entry.row[p + 1 :]]) if (n > 1 or causal) else entry.row
            if limit is not None and row.shape[0] > limit:
                _too_long(processor, k, subject, objects[b] if objects is not None else None, n, row.shape[0])
            if causal:
                layout = processor.layouts[k]
                require_prompt(processor, k, p)
                whole = whole_sentence(layout.template, causal_scoring)
                stop = row.shape[0] - 1 if whole else p + n - 1
                where = list(range(p - 1, stop))
                positions.append(where)
                targets.append(row[p : stop + 1, 0].tolist() if ids else [IGNORE_INDEX] * len(where))
            else:
                positions.append(list(range(p, p + n)))
                targets.append(list(ids) if ids else [IGNORE_INDEX] * n)
            rows.append(row)
            firsts.append(p)
            fact_of_row.append(b)
    pad = first.tokenizer.pad_token_id if first.tokenizer.pad_token_id is not None else 0
    padded = pad_sequence(rows, batch_first=True, padding_value=-1)  # role -1 = hard
    lengths = torch.tensor([row.shape[0] for row in rows])
    attention_mask = (torch.arange(padded.shape[1]) < lengths[:, None]).long()
    L = max(len(w) for w in positions)
    # past a row's last target the position repeats its first (any real position would do: its target is -100)
    target_positions = torch.tensor([w + [w[0]] * (L - len(w)) for w in positions])
    target_ids = torch.tensor([t + [IGNORE_INDEX] * (L - len(t)) for t in targets])
    batch: dict[str, Any] = {
        "input_ids": padded[..., 0].masked_fill(attention_mask == 0, pad),
        "attention_mask": attention_mask,
        "roles": padded[..., 1].contiguous(),
        "mask_positions": torch.tensor(firsts),
        "fact_index": torch.tensor(fact_of_row),
        "target_positions": target_positions,
    }
    if causal:
        batch["target_ids"] = target_ids
    if objects is not None:
        width = max(len(t) for t in tokens)
        labels = torch.full((len(subjects), width), IGNORE_INDEX, dtype=torch.long)
        for b, ids in enumerate(tokens):
            if ids:
                labels[b, : len(ids)] = torch.tensor(ids)
        batch["labels"] = labels
    return finish_batch(batch, processors, device)


def object_first(template: str) -> bool:
    """Whether ``[Y]`` comes before ``[X]``: a causal LM's prompt (the text before ``[Y]``) then lacks the subject."""
    return template.index("[Y]") < template.index("[X]")


def whole_sentence(template: str, causal_scoring: str) -> bool:
    """Whether a causal LM scores ``template`` as a whole sentence: asked to, or its prompt lacks the subject."""
    return causal_scoring == "sentence" or object_first(template)


def require_prompt(processor: SoftMixtureProcessor, k: int, slot: int) -> None:
    """A causal LM predicts the object's first token from the tokens before it: there must be one."""
    if slot == 0:
        raise TemplateError(
            f"Template {processor.layouts[k].template!r} starts with [Y] and {type(processor.tokenizer).__name__} "
            "adds no beginning-of-text token, so a causal LM has nothing to predict the object's first token from. "
            "Start the template with a word, or use a tokenizer that adds a BOS token."
        )


def _too_long(processor: SoftMixtureProcessor, k: int, subject: str, obj: str | None, n: int, length: int) -> None:
    what = f"the object {obj!r} ({n} tokens)" if obj is not None else f"{n} masks"
    raise QueryTooLongError(
        f"With {what}, the query for subject {subject!r} with template {processor.layouts[k].template!r} is {length} "
        f"tokens long, but {processor.model_name} takes at most {processor.max_query_length}. Leave out objects that "
        "long (or shorten the template)."
    )
