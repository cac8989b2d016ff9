"""Named sets of cloze templates per relation: where a mixture's K templates come from.

Sources, by name, and the file each reads in a templates folder (lines ``{"relation", "template"[, "weight"]}``):

- ``manual``: ``lama.jsonl``, LAMA's one hand-written template per relation;
- ``mined``: ``lpaqa_mined.jsonl``, LPAQA's templates mined from Wikipedia;
- ``paraphrase``: ``lpaqa_paraphrase.jsonl``, LPAQA's back-translations of the manual template;
- ``manual_paraphrase``: ``lpaqa_manual_paraphrase.jsonl``, LPAQA's hand-written paraphrases;
- ``google_re_manual``, ``google_re_mined``, ``google_re_paraphrase``: the same three kinds for Google-RE;
- ``conceptnet_manual``: ``conceptnet_manual.jsonl``, LAMA's ConceptNet templates.

A source may also be a path to any such ``.jsonl`` file, or several sources joined with ``+``
(``"manual+mined"``): their templates in that order, repeats removed, then the first K. `load_mixture` is the
named form of the latter, the paper's mixed start: the manual template plus the first K-1 mined ones.

"random" is not a template source. Random initialisation (``SoftMixtureConfig(init="random")``) keeps the chosen
templates' layout (how many soft words, where the subject and the mask go) and only draws the vectors at random,
so it still needs templates from one of the sources above.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataFormatError, TemplateError, TemplateSetError
from .facts import SAMPLE_DIR, read_json_object, text_lines
from .tokenization import validate_template

TEMPLATE_FILES = {
    "manual": "lama.jsonl",
    "mined": "lpaqa_mined.jsonl",
    "paraphrase": "lpaqa_paraphrase.jsonl",
    "manual_paraphrase": "lpaqa_manual_paraphrase.jsonl",
    "google_re_manual": "google_re_manual.jsonl",
    "google_re_mined": "google_re_mined.jsonl",
    "google_re_paraphrase": "google_re_paraphrase.jsonl",
    "conceptnet_manual": "conceptnet_manual.jsonl",
}

# Templates shipped with the package (for the sample relations); pass templates_dir for the full sets.
DEFAULT_TEMPLATES_DIR = SAMPLE_DIR / "templates"

_INIT_MODES = {"random", "template"}


@dataclass(frozen=True)
class TemplateSet:
    """The templates chosen for one relation.

    Attributes:
        templates: The templates, in source order (the first K distinct valid ones).
        weights: LPAQA's score for each template, or None when any chosen template has none (LAMA's manual ones
            have none). Pass them as ``SoftMixtureConfig(template_weights=...)`` to start the mixture there.
        source: The source asked for (a name, ``"a+b"``, or a path).
        relation: The relation.
        available: Distinct valid templates the source has for the relation, before the first-K cut.
        duplicates: Exact repeats left out.
        invalid: Templates left out because `validate_template` rejected them.
    """

    templates: list[str]
    weights: list[float] | None
    source: str
    relation: str
    available: int
    duplicates: int = 0
    invalid: int = 0

    def __len__(self) -> int:
        return len(self.templates)

    def summary(self) -> str:
        text = f"{self.relation}: {len(self.templates)} of {self.available} templates from {self.source!r}"
        notes = []
        if self.duplicates:
            notes.append(f"{self.duplicates} duplicate{'s' if self.duplicates != 1 else ''} left out")
        if self.invalid:
            notes.append(f"{self.invalid} invalid left out")
        return text + (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class _Entry:
    relation: str
    template: str
    weight: float | None


def template_file(source: str | Path, templates_dir: str | Path | None = None) -> Path:
    """The file behind one source name (see the module docstring), or ``source`` itself if it is a path."""
    if isinstance(source, Path) or source.endswith(".jsonl") or "/" in source or "\\" in source:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Template file {path} does not exist.")
        return path
    if source in _INIT_MODES:
        raise TemplateSetError(
            f"{source!r} is an initialisation mode, not a template source. Choose the templates (e.g. 'manual' or "
            f"'mined') and set SoftMixtureConfig(init={source!r}): the soft prompts keep those templates' layout."
        )
    if source not in TEMPLATE_FILES:
        raise TemplateSetError(
            f"Unknown template source {source!r}. Use one of {', '.join(TEMPLATE_FILES)}, several joined with '+' "
            "(e.g. 'manual+mined'), or a path to a .jsonl file with 'relation' and 'template' fields."
        )
    folder = Path(templates_dir) if templates_dir is not None else DEFAULT_TEMPLATES_DIR
    path = folder / TEMPLATE_FILES[source]
    if not path.is_file():
        raise FileNotFoundError(
            f"Template file {path} (source {source!r}) does not exist; pass templates_dir pointing at a folder "
            f"with {TEMPLATE_FILES[source]} in it."
        )
    return path


def _read_entries(path: Path) -> list[_Entry]:
    entries = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        record = read_json_object(path, lineno, line)
        for key in ("relation", "template"):
            if not isinstance(record.get(key), str):
                raise DataFormatError(
                    f"{where}: field {key!r} must be a string, found {record.get(key)!r} (keys: {sorted(record)})."
                )
        weight = record.get("weight")
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
            raise DataFormatError(f"{where}: field 'weight' must be a number, found {weight!r}.")
        entries.append(_Entry(record["relation"], record["template"], None if weight is None else float(weight)))
    return entries


def template_relations(source: str | Path, templates_dir: str | Path | None = None) -> list[str]:
    """The relations a single source has templates for, in file order."""
    relations = dict.fromkeys(e.relation for e in _read_entries(template_file(source, templates_dir)))
    return list(relations)


def _where_else(relation: str, templates_dir: str | Path | None) -> list[str]:
    hits = []
    for name in TEMPLATE_FILES:
        try:
            if relation in template_relations(name, templates_dir):
                hits.append(name)
        except (FileNotFoundError, DataFormatError):
            continue
    return hits


def _split_sources(source: str | Path) -> list[str | Path]:
    if isinstance(source, Path) or "+" not in source:
        return [source]
    parts = [part.strip() for part in source.split("+")]
    if not all(parts):
        raise TemplateSetError(f"Template source {source!r} has an empty part; write e.g. 'manual+mined'.")
    return list(parts)


def load_templates(
    source: str | Path, relation: str, k: int | None = None, templates_dir: str | Path | None = None
) -> TemplateSet:
    """The first ``k`` distinct valid templates of ``source`` for ``relation``, in file order.

    Args:
        source: A source name (``manual``, ``mined``, ``paraphrase``, ``manual_paraphrase``, ``google_re_*``,
            ``conceptnet_manual``), several joined with ``+``, or a path to a ``.jsonl`` template file.
            ``random`` is refused: it is an initialisation mode (see the module docstring).
        relation: The relation id (``P19``) or name (``place_of_birth``, ``AtLocation``).
        k: How many templates to keep; all of them if None. A source with fewer than ``k`` yields them all
            (``TemplateSet.available`` says how many there were).
        templates_dir: The folder holding the named files; defaults to the sample shipped with the package.

    Exact repeats are left out before counting to ``k`` (LPAQA's lists have a few), as are templates that
    `validate_template` rejects; both are counted in the result.
    """
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise TemplateSetError(f"k must be a positive number of templates or None (all of them), got {k!r}.")
    templates: list[str] = []
    weights: list[float | None] = []
    duplicates = invalid = 0
    for part in _split_sources(source):
        path = template_file(part, templates_dir)
        entries = _read_entries(path)
        mine = [e for e in entries if e.relation == relation]
        if not mine:
            present = list(dict.fromkeys(e.relation for e in entries))
            elsewhere = [name for name in _where_else(relation, templates_dir) if name != part]
            raise TemplateSetError(
                f"Template file {path} has no templates for relation {relation!r}; it has "
                f"{', '.join(present) or 'none'}."
                + (f" Templates for {relation!r} are in source(s): {', '.join(elsewhere)}." if elsewhere else "")
            )
        for entry in mine:
            try:
                validate_template(entry.template)
            except TemplateError:
                invalid += 1
                continue
            if entry.template in templates:
                duplicates += 1
                continue
            templates.append(entry.template)
            weights.append(entry.weight)
    if not templates:
        raise TemplateSetError(
            f"Template source {str(source)!r} has no valid template for relation {relation!r} ({invalid} invalid: "
            "each needs exactly one [X] and one [Y])."
        )
    available = len(templates)
    chosen = templates[:k]
    chosen_weights = weights[: len(chosen)]
    return TemplateSet(
        templates=chosen,
        weights=None if any(w is None for w in chosen_weights) else [w for w in chosen_weights if w is not None],
        source=str(source),
        relation=relation,
        available=available,
        duplicates=duplicates,
        invalid=invalid,
    )


def load_mixture(
    relation: str,
    k: int,
    templates_dir: str | Path | None = None,
    first: str = "manual",
    rest: str = "mined",
) -> TemplateSet:
    """The paper's mixed start: the ``first`` source's templates (LAMA's single manual one) and then the first
    ``rest`` templates (LPAQA mined) up to ``k`` in all, repeats of the manual template not counted.

    For Google-RE use ``first="google_re_manual", rest="google_re_mined"``.
    """
    return load_templates(f"{first}+{rest}", relation, k=k, templates_dir=templates_dir)
