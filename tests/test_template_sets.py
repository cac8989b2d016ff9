import json
from pathlib import Path

import pytest

from peft_softmix.facts import DataFormatError
from peft_softmix.template_sets import (
    DEFAULT_TEMPLATES_DIR,
    TEMPLATE_FILES,
    TemplateSetError,
    load_mixture,
    load_templates,
    template_relations,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def templates_dir(tmp_path):
    write_jsonl(
        tmp_path / "lama.jsonl",
        [
            {"relation": "P19", "template": "[X] was born in [Y] .", "label": "place of birth"},
            {"relation": "P20", "template": "[X] died in [Y] ."},
        ],
    )
    write_jsonl(
        tmp_path / "lpaqa_mined.jsonl",
        [
            {"relation": "P19", "template": "[X] is from [Y] .", "weight": 0.5},
            {"relation": "P20", "template": "[X] passed away in [Y] .", "weight": 0.9},
            {"relation": "P19", "template": "[X] was born in [Y] .", "weight": 0.25},  # = the manual template
            {"relation": "P19", "template": "[X] is from [Y] .", "weight": 0.125},  # exact repeat
            {"relation": "P19", "template": "[X] and [X] in [Y] .", "weight": 0.3},  # two subject slots
            {"relation": "P19", "template": "[Y] , birthplace of [X] .", "weight": 0.75},
            {"relation": "P19", "template": "[X] grew up in [Y] .", "weight": 0.0625},
        ],
    )
    write_jsonl(tmp_path / "conceptnet_manual.jsonl", [{"relation": "AtLocation", "template": "[X] is in [Y] ."}])
    return tmp_path


def test_k_selection_keeps_file_order_and_weights(templates_dir):
    every = load_templates("mined", "P19", templates_dir=templates_dir)
    assert every.templates == [
        "[X] is from [Y] .",
        "[X] was born in [Y] .",
        "[Y] , birthplace of [X] .",
        "[X] grew up in [Y] .",
    ]
    assert every.weights == [0.5, 0.25, 0.75, 0.0625]  # the file's order, not sorted by weight
    assert (every.available, every.duplicates, every.invalid) == (4, 1, 1)
    assert "4 of 4 templates" in every.summary() and "1 duplicate left out" in every.summary()

    first2 = load_templates("mined", "P19", k=2, templates_dir=templates_dir)
    assert first2.templates == every.templates[:2] and first2.weights == [0.5, 0.25]
    assert first2.available == 4 and first2.source == "mined" and first2.relation == "P19"

    assert len(load_templates("mined", "P19", k=10, templates_dir=templates_dir)) == 4  # fewer than k: all


def test_manual_has_no_weights(templates_dir):
    manual = load_templates("manual", "P20", templates_dir=templates_dir)
    assert manual.templates == ["[X] died in [Y] ."] and manual.weights is None


def test_mixture_is_manual_then_mined(templates_dir):
    mixed = load_mixture("P19", k=3, templates_dir=templates_dir)
    # The manual template first; its copy in the mined list does not use up one of the K slots.
    assert mixed.templates == ["[X] was born in [Y] .", "[X] is from [Y] .", "[Y] , birthplace of [X] ."]
    assert mixed.weights is None and mixed.source == "manual+mined"
    assert mixed.duplicates == 2
    assert load_templates("manual+mined", "P19", k=3, templates_dir=templates_dir) == mixed


def test_path_source(templates_dir):
    by_path = load_templates(templates_dir / "lpaqa_mined.jsonl", "P20")
    assert by_path.templates == ["[X] passed away in [Y] ."] and by_path.weights == [0.9]
    assert load_templates(str(templates_dir / "lpaqa_mined.jsonl"), "P20") == by_path


def test_missing_relation_lists_file_and_suggests(templates_dir):
    with pytest.raises(TemplateSetError) as info:
        load_templates("mined", "AtLocation", templates_dir=templates_dir)
    message = str(info.value)
    assert str(templates_dir / "lpaqa_mined.jsonl") in message
    assert "it has P19, P20" in message and "conceptnet_manual" in message


def test_random_is_not_a_source(templates_dir):
    with pytest.raises(TemplateSetError, match=r"initialisation mode.*init='random'"):
        load_templates("random", "P19", templates_dir=templates_dir)


@pytest.mark.parametrize("source", ["lama", "manual++mined"])
def test_unknown_source(templates_dir, source):
    with pytest.raises(TemplateSetError, match="Unknown template source|empty part"):
        load_templates(source, "P19", templates_dir=templates_dir)


def test_missing_file_and_bad_k(tmp_path, templates_dir):
    with pytest.raises(FileNotFoundError, match="lpaqa_paraphrase.jsonl"):
        load_templates("paraphrase", "P19", templates_dir=templates_dir)
    with pytest.raises(FileNotFoundError):
        load_templates(tmp_path / "absent.jsonl", "P19")
    for k in (0, -1, 2.0, True):
        with pytest.raises(TemplateSetError, match="k must be"):
            load_templates("mined", "P19", k=k, templates_dir=templates_dir)


def test_no_valid_template_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"relation": "P19", "template": "[X] was born ."}])
    with pytest.raises(TemplateSetError, match=r"no valid template.*1 invalid"):
        load_templates(path, "P19")


def test_malformed_template_file(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"relation": "P19", "template": "[X] in [Y] ."}, {"relation": "P19"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl, line 2: field 'template' must be a string"):
        load_templates(path, "P19")


@needs_shared
@pytest.mark.parametrize("source", list(TEMPLATE_FILES))
def test_real_template_files(source):
    templates_dir = SHARED_DATA / "templates"
    path = templates_dir / TEMPLATE_FILES[source]
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    relation = rows[0]["relation"]
    expected = list(dict.fromkeys(r["template"] for r in rows if r["relation"] == relation))
    got = load_templates(source, relation, templates_dir=templates_dir)
    assert got.templates == expected
    assert got.duplicates == sum(r["relation"] == relation for r in rows) - len(expected)
    assert (got.weights is None) == ("weight" not in rows[0])
    assert load_templates(source, relation, k=1, templates_dir=templates_dir).templates == expected[:1]
    assert relation in template_relations(source, templates_dir)


@needs_shared
def test_real_mixture_for_every_trex_relation():
    templates_dir = SHARED_DATA / "templates"
    relations = template_relations("mined", templates_dir)
    assert len(relations) == 41
    for relation in relations:
        manual = load_templates("manual", relation, templates_dir=templates_dir).templates
        mixed = load_mixture(relation, k=5, templates_dir=templates_dir)
        assert mixed.templates[0] == manual[0] and len(mixed) == 5 and len(set(mixed.templates)) == 5


@pytest.mark.skipif(not DEFAULT_TEMPLATES_DIR.is_dir(), reason="package sample not present")
def test_default_dir_is_the_shipped_sample():
    relation = template_relations("manual")[0]
    assert len(load_templates("manual", relation)) == 1
