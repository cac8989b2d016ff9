"""Facts for cloze querying: reading LAMA-style ``.jsonl`` splits and narrowing them to what a model can answer.

Two field styles are read: LAMA/AutoPrompt's ``sub_label``/``obj_label`` (with optional ``predicate_id`` and
``uuid``), and Qin & Eisner's ``sub``/``obj``. A data folder holds one sub-folder per relation with
``{train,dev,test}.jsonl`` in it; that is the layout of ``trex/`` and of every ``qin_eisner/*`` split.

Lines that cannot be facts stop the load with a `DataFormatError` naming the file and line. Lines that are
well-formed but unusable (an empty subject or object, a repeat of an earlier fact) are left out and counted in the
split's `LoadReport`, so a caller can print what was dropped instead of losing it silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from transformers import PreTrainedTokenizerBase

from .errors import DataFormatError
from .tokenization import object_token_id

SPLITS = ("train", "dev", "test")

# The small sample shipped inside the package (trex/<rel>/{split}.jsonl, templates/, vocab/); package data only.
SAMPLE_DIR = Path(__file__).parent / "data" / "sample"

# Accepted (subject, object) key pairs, in order of preference.
_FIELD_STYLES = (("sub_label", "obj_label"), ("sub", "obj"))


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple. ``uuid`` is LAMA's test-fact id where the file has one."""

    subject: str
    object: str
    relation: str | None = None
    uuid: str | None = None


@dataclass
class LoadReport:
    """What happened to the lines of one file.

    Attributes:
        path: The file read.
        lines: Non-blank lines read.
        kept: Facts returned.
        duplicates: Lines repeating the (subject, object) of an earlier line.
        duplicates_kept: Whether those repeats are among the facts returned (the default) or left out.
        empty: Lines whose subject or object is empty or only whitespace, left out.
        blank: Blank lines, skipped.
        empty_lines: The line numbers of the ``empty`` ones (1-based), to name in a message.
    """

    path: Path
    lines: int = 0
    kept: int = 0
    duplicates: int = 0
    duplicates_kept: bool = True
    empty: int = 0
    blank: int = 0
    empty_lines: list[int] = field(default_factory=list)

    @property
    def dropped(self) -> int:
        return self.lines - self.kept

    def empty_where(self) -> str:
        """Where the lines with an empty subject or object are: ``train.jsonl line 7, 9``."""
        shown = ", ".join(str(n) for n in self.empty_lines[:5])
        more = f" and {len(self.empty_lines) - 5} more" if len(self.empty_lines) > 5 else ""
        return f"{self.path.name} line{'s' if len(self.empty_lines) != 1 else ''} {shown}{more}"

    def summary(self) -> str:
        text = f"{self.path}: {self.kept} facts from {self.lines} lines"
        notes = []
        if self.duplicates:
            fate = "kept" if self.duplicates_kept else "left out"
            notes.append(f"{self.duplicates} duplicate{'s' if self.duplicates != 1 else ''} {fate}")
        if self.empty:
            notes.append(f"{self.empty} with an empty subject or object left out ({self.empty_where()})")
        if self.blank:
            notes.append(f"{self.blank} blank line{'s' if self.blank != 1 else ''} skipped")
        return text + (f" ({'; '.join(notes)})" if notes else "")


@dataclass
class FactSplit:
    """The facts of one file, in file order, with the report of what was left out."""

    facts: list[Fact]
    report: LoadReport
    relation: str | None = None

    def __len__(self) -> int:
        return len(self.facts)

    def __iter__(self) -> Iterator[Fact]:
        return iter(self.facts)

    def __getitem__(self, index: int) -> Fact:
        return self.facts[index]

    @property
    def subjects(self) -> list[str]:
        return [f.subject for f in self.facts]

    @property
    def objects(self) -> list[str]:
        return [f.object for f in self.facts]

    def nothing_to_score(self, left_out: Mapping[str, int], hint: str = "") -> DataFormatError:
        """The error for a file of which no fact can be scored: how many were read, and why each was left out."""
        counts = ", ".join(f"{n} {why.replace('_', ' ')}" for why, n in left_out.items() if n)
        path = self.report.path
        return DataFormatError(f"No fact of {path} can be scored ({len(self.facts)} read; {counts or 'none'}).{hint}")


_BOM = "\ufeff"


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """The lines of a UTF-8 text file, numbered from 1; a leading byte-order mark (spreadsheet exports) is dropped.

    Raises:
        DataFormatError: a line that is not UTF-8, naming the file, the line and the byte.
    """
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataFormatError(
                    f"{path}, line {lineno}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}). "
                    "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."
                ) from None
            yield lineno, line[1:] if lineno == 1 and line.startswith(_BOM) else line


def read_json_object(path: Path, lineno: int, line: str) -> dict:
    """One jsonl line as a JSON object; `DataFormatError` naming the file and line otherwise."""
    where = f"{path}, line {lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{where}: not valid JSON ({err.msg} at column {err.colno}).") from None
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, found {type(record).__name__}.")
    return record


def _parse_line(path: Path, lineno: int, line: str, relation: str | None) -> Fact:
    where = f"{path}, line {lineno}"
    record = read_json_object(path, lineno, line)
    for sub_key, obj_key in _FIELD_STYLES:
        if sub_key in record or obj_key in record:
            break
    else:
        raise DataFormatError(
            f"{where}: no subject/object fields; found keys {sorted(record)}. Each line needs "
            '"sub_label" and "obj_label" (LAMA) or "sub" and "obj" (Qin & Eisner).'
        )
    for key in (sub_key, obj_key):
        if key not in record:
            raise DataFormatError(f"{where}: missing field {key!r} (found keys {sorted(record)}).")
        if not isinstance(record[key], str):
            raise DataFormatError(
                f"{where}: field {key!r} must be a string, found {type(record[key]).__name__} {record[key]!r}."
            )
    uuid = record.get("uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise DataFormatError(f"{where}: field 'uuid' must be a string, found {type(uuid).__name__} {uuid!r}.")
    predicate = record.get("predicate_id")
    if relation is None and isinstance(predicate, str):
        relation = predicate
    return Fact(subject=record[sub_key], object=record[obj_key], relation=relation, uuid=uuid)


def load_facts(path: str | Path, relation: str | None = None, keep_duplicates: bool = True) -> FactSplit:
    """Read one ``.jsonl`` file of facts.

    Args:
        path: The file; one JSON object per line with ``sub_label``/``obj_label`` or ``sub``/``obj``.
        relation: The relation to record on each fact. Defaults to the line's ``predicate_id`` where it has one.
        keep_duplicates: Keep lines that repeat an earlier (subject, object) pair (the default, as the paper's
            loader does: LAMA's T-REx test files hold 22 such repeats in 34,039 lines, and published numbers are
            computed over every line). Either way the report counts them; pass False to leave them out.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataFormatError: A line is not JSON, not an object, lacks the subject or object, or has a non-string one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fact file {path} does not exist.")
    report = LoadReport(path=path, duplicates_kept=keep_duplicates)
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    for lineno, line in text_lines(path):
        if not line.strip():
            report.blank += 1
            continue
        report.lines += 1
        fact = _parse_line(path, lineno, line, relation)
        if not fact.subject.strip() or not fact.object.strip():
            report.empty += 1
            report.empty_lines.append(lineno)
            continue
        key = (fact.subject, fact.object)
        if key in seen:
            report.duplicates += 1
            if not keep_duplicates:
                continue
        seen.add(key)
        facts.append(fact)
    report.kept = len(facts)
    if relation is None:
        relations = {f.relation for f in facts}
        relation = relations.pop() if len(relations) == 1 else None
    return FactSplit(facts=facts, report=report, relation=relation)


def _natural_key(name: str) -> list[str | int]:
    # P17 before P101; ConceptNet names sort alphabetically.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _is_relation_dir(path: Path) -> bool:
    return path.is_dir() and any((path / f"{split}.jsonl").is_file() for split in SPLITS)


def _data_dirs_below(root: Path, depth: int = 2) -> list[str]:
    """Folders under ``root`` (up to ``depth`` levels) that hold relation folders: hints for a wrong --data_dir."""
    found: list[str] = []
    frontier = [root]
    for _ in range(depth):
        next_frontier = []
        for folder in frontier:
            for child in sorted(p for p in folder.iterdir() if p.is_dir()):
                if any(_is_relation_dir(grandchild) for grandchild in child.iterdir()):
                    found.append(str(child.relative_to(root)))
                else:
                    next_frontier.append(child)
        frontier = next_frontier
    return found


def _check_data_dir(data_dir: Path) -> None:
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise FileNotFoundError(
            f"Data folder {data_dir} {what}; pass --data_dir pointing at a folder with "
            f"<relation>/train.jsonl, <relation>/dev.jsonl and <relation>/test.jsonl in it "
            f"(the shipped sample is {SAMPLE_DIR / 'trex'})."
        )


def list_relations(data_dir: str | Path) -> list[str]:
    """The relations in ``data_dir``: its sub-folders holding at least one of ``{train,dev,test}.jsonl``.

    Sorted with numbers in numeric order (``P17`` before ``P101``).
    """
    data_dir = Path(data_dir)
    _check_data_dir(data_dir)
    return sorted((p.name for p in data_dir.iterdir() if _is_relation_dir(p)), key=_natural_key)


def load_relation(
    data_dir: str | Path, relation: str, splits: Sequence[str] = SPLITS, keep_duplicates: bool = True
) -> dict[str, FactSplit]:
    """Read ``data_dir/<relation>/<split>.jsonl`` for each of ``splits``; returns ``{split: FactSplit}``.

    Every fact is labelled with ``relation`` (the folder name). See `load_facts` for ``keep_duplicates``.
    """
    data_dir = Path(data_dir)
    relations = list_relations(data_dir)
    if relation not in relations:
        if relations:
            raise FileNotFoundError(
                f"Relation {relation!r} is not in {data_dir}; it has {len(relations)} relations: "
                f"{', '.join(relations)}."
            )
        hint = _data_dirs_below(data_dir)
        raise FileNotFoundError(
            f"{data_dir} holds no relation folders (<relation>/train.jsonl, ...)."
            + (f" Did you mean one of its sub-folders: {', '.join(hint)}?" if hint else "")
        )
    folder = data_dir / relation
    result = {}
    for split in splits:
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            present = [s for s in SPLITS if (folder / f"{s}.jsonl").is_file()]
            raise FileNotFoundError(
                f"Split file {path} does not exist; {folder} has {', '.join(present) or 'no'} split files. "
                f"Ask only for the splits you need (splits=...)."
            )
        result[split] = load_facts(path, relation=relation, keep_duplicates=keep_duplicates)
    return result


def filter_single_token(facts: Iterable[Fact], tokenizer: PreTrainedTokenizerBase) -> tuple[list[Fact], list[Fact]]:
    """Split facts into those whose object is one token of ``tokenizer`` and the rest: ``(kept, dropped)``.

    The LAMA protocol (followed by Qin & Eisner) only asks for objects a masked LM can produce in a single mask;
    ``len(dropped)`` is the per-relation count worth printing. One token means
    `peft_softmix.tokenization.object_token_id` finds it (the object after a space, as in a filled template).
    """
    kept: list[Fact] = []
    dropped: list[Fact] = []
    cache: dict[str, bool] = {}
    for fact in facts:
        if fact.object not in cache:
            cache[fact.object] = object_token_id(tokenizer, fact.object) is not None
        (kept if cache[fact.object] else dropped).append(fact)
    return kept, dropped


def filter_unknown_subjects(
    facts: Iterable[Fact], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[Fact], list[Fact]]:
    """Split facts into those whose subject the tokenizer can read and those whose subject is unknown tokens only
    (e.g. "😀" or "école" with a vocabulary without them): ``(kept, dropped)``.

    Such a subject reaches the model as ``[UNK]``, so all of them get identical answers; count and report them as
    `filter_single_token` does for objects. A tokenizer without an unknown token (byte-level BPE) drops none.
    """
    unk = tokenizer.unk_token_id
    kept: list[Fact] = []
    dropped: list[Fact] = []
    cache: dict[str, bool] = {}
    for fact in facts:
        if fact.subject not in cache:
            # nothing at all left after normalisation (control characters only) is as unreadable as [UNK]
            ids = tokenizer(fact.subject, add_special_tokens=False)["input_ids"] if unk is not None else []
            cache[fact.subject] = unk is None or any(token != unk for token in ids)
        (kept if cache[fact.subject] else dropped).append(fact)
    return kept, dropped


def load_common_vocab(path: str | Path) -> list[str]:
    """Read a vocabulary file, one word per line (LAMA's ``common_vocab_cased.txt``), in file order.

    Lines are stripped of their line ending only (a word is never whitespace-padded in LAMA's file); blank lines
    and repeats are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Vocabulary file {path} does not exist (the shipped sample is {SAMPLE_DIR / 'vocab'})."
        )
    words: list[str] = []
    seen: set[str] = set()
    for _, line in text_lines(path):
        word = line.rstrip("\r\n")
        if word.strip() and word not in seen:
            seen.add(word)
            words.append(word)
    if not words:
        raise DataFormatError(f"Vocabulary file {path} has no words (expected one word per line).")
    return words


class CandidateIds(NamedTuple):
    """Token ids of a candidate vocabulary (sorted, unique) and the words that are not one token."""

    token_ids: list[int]
    skipped: list[str]


def candidate_token_ids(tokenizer: PreTrainedTokenizerBase, words: Iterable[str]) -> CandidateIds:
    """Map candidate words to their single token ids (as objects filling ``[Y]``); skip and return the others.

    Used to restrict predictions to LAMA's common vocabulary. Returns ``CandidateIds(token_ids, skipped)``;
    ``token_ids`` is sorted and free of repeats (two words can share a token), ``len(skipped)`` is the count of
    words that are not a single token of this tokenizer.
    """
    ids: set[int] = set()
    skipped: list[str] = []
    for word in words:
        token_id = object_token_id(tokenizer, word)
        if token_id is None:
            skipped.append(word)
        else:
            ids.add(token_id)
    return CandidateIds(sorted(ids), skipped)


def facts_in_vocab(facts: Iterable[Fact], vocab: Iterable[str]) -> tuple[list[Fact], list[Fact]]:
    """Split facts into those whose object is a word of ``vocab`` and the rest: ``(kept, dropped)``.

    LAMA scores only facts whose object is in the common vocabulary, so every model competes on the same facts.
    """
    words = vocab if isinstance(vocab, (set, frozenset)) else set(vocab)
    kept: list[Fact] = []
    dropped: list[Fact] = []
    for fact in facts:
        (kept if fact.object in words else dropped).append(fact)
    return kept, dropped
