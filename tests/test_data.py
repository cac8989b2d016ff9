import json
from pathlib import Path

import pytest
from transformers import BertTokenizerFast

from peft_softmix.facts import (
    SAMPLE_DIR,
    DataFormatError,
    Fact,
    candidate_token_ids,
    facts_in_vocab,
    filter_single_token,
    list_relations,
    load_common_vocab,
    load_facts,
    load_relation,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared data not found at {SHARED_DATA}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def tokenizer():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Paris", "France", "Ind", "##ia", "Rome", "born", "in"]
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=False)


def test_load_lama_style(tmp_path):
    path = write_jsonl(
        tmp_path / "test.jsonl",
        [
            {"obj_uri": "Q90", "obj_label": "Paris", "sub_uri": "Q1", "sub_label": "Alice", "predicate_id": "P19",
             "uuid": "u-1"},
            {"sub_label": "Bob", "obj_label": "Rome", "predicate_id": "P19"},
        ],
    )  # fmt: skip
    split = load_facts(path)
    assert split.facts == [Fact("Alice", "Paris", "P19", "u-1"), Fact("Bob", "Rome", "P19", None)]
    assert split.relation == "P19"
    assert split.subjects == ["Alice", "Bob"] and split.objects == ["Paris", "Rome"]
    assert load_facts(path, relation="place_of_birth")[0].relation == "place_of_birth"


def test_load_qin_eisner_style(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"sub": "dog", "obj": "desk"}, {"sub": "armrest", "obj": "car"}])
    split = load_facts(path)
    assert [(f.subject, f.object, f.relation) for f in split] == [("dog", "desk", None), ("armrest", "car", None)]
    assert split.relation is None
    assert split.report.lines == split.report.kept == 2


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"sub": "a", "obj": ', "not valid JSON"),
        ('["a", "b"]', "expected a JSON object, found list"),
        ('{"subject": "a", "object": "b"}', "no subject/object fields"),
        ('{"sub_label": "a"}', "missing field 'obj_label'"),
        ('{"sub": "a", "obj": 3}', "field 'obj' must be a string, found int"),
        ('{"sub_label": null, "obj_label": "b"}', "field 'sub_label' must be a string, found NoneType"),
        ('{"sub": "a", "obj": "b", "uuid": 7}', "field 'uuid' must be a string"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"sub": "x", "obj": "y"}, "", line, {"sub": "z", "obj": "w"}])
    with pytest.raises(DataFormatError) as info:
        load_facts(path)
    message = str(info.value)
    assert f"{path}, line 3:" in message  # 1-based, blank lines counted
    assert problem in message


def test_duplicates_and_empty_are_counted_not_silently_dropped(tmp_path):
    rows = [
        {"sub": "a", "obj": "b"},
        {"sub": "a", "obj": "b"},  # duplicate
        {"sub": "a", "obj": "c"},  # same subject, another object: a different fact
        {"sub": "  ", "obj": "c"},  # empty subject
        {"sub": "d", "obj": ""},  # empty object
        {"sub": "a", "obj": "b"},  # duplicate again
        "   ",
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    split = load_facts(path, keep_duplicates=False)
    assert [(f.subject, f.object) for f in split] == [("a", "b"), ("a", "c")]
    report = split.report
    assert (report.lines, report.kept, report.duplicates, report.empty, report.blank) == (6, 2, 2, 2, 1)
    assert report.dropped == 4
    summary = report.summary()
    assert "2 facts from 6 lines" in summary and "2 duplicates left out" in summary and "2 with an empty" in summary
    assert str(path) in summary

    kept_all = load_facts(path)  # the default keeps repeats, as the paper's loader does, and still counts them
    assert [(f.subject, f.object) for f in kept_all] == [("a", "b"), ("a", "b"), ("a", "c"), ("a", "b")]
    assert kept_all.report.duplicates == 2 and kept_all.report.empty == 2
    assert "2 duplicates kept" in kept_all.report.summary()


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_facts(tmp_path / "nope.jsonl")


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "trex"
    for rel in ("P101", "P17", "P19"):
        for split in ("train", "dev", "test"):
            write_jsonl(root / rel / f"{split}.jsonl", [{"sub_label": f"{rel}-{split}", "obj_label": "Paris"}])
    (root / "notes").mkdir()  # a folder without split files is not a relation
    write_jsonl(root / "P30" / "train.jsonl", [{"sub": "s", "obj": "o"}])  # only one split
    return root


def test_list_and_load_relations(data_dir):
    assert list_relations(data_dir) == ["P17", "P19", "P30", "P101"]  # numeric order
    splits = load_relation(data_dir, "P19")
    assert set(splits) == {"train", "dev", "test"}
    assert splits["dev"].facts == [Fact("P19-dev", "Paris", "P19")]
    assert splits["dev"].relation == "P19"
    assert set(load_relation(data_dir, "P30", splits=["train"])) == {"train"}


def test_missing_data_dir_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist; pass --data_dir pointing at a folder with"):
        load_relation(tmp_path / "absent", "P19")
    write_jsonl(tmp_path / "P19.jsonl", [{"sub": "a", "obj": "b"}])
    with pytest.raises(FileNotFoundError, match="is a file, not a folder; pass --data_dir"):
        list_relations(tmp_path / "P19.jsonl")


def test_missing_relation_names_the_existing_ones(data_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_relation(data_dir, "P999")
    assert "'P999'" in str(info.value) and "P17, P19, P30, P101" in str(info.value)


def test_missing_split_file(data_dir):
    with pytest.raises(FileNotFoundError) as info:
        load_relation(data_dir, "P30")
    message = str(info.value)
    assert str(data_dir / "P30" / "dev.jsonl") in message and "has train split files" in message


def test_parent_of_data_dir_gets_a_hint(data_dir):
    with pytest.raises(FileNotFoundError, match=r"no relation folders.*sub-folders: trex"):
        load_relation(data_dir.parent, "P19")


def test_filter_single_token(tokenizer):
    facts = [Fact("a", "Paris"), Fact("b", "India"), Fact("c", "Atlantis"), Fact("d", "France"), Fact("e", "Paris")]
    kept, dropped = filter_single_token(facts, tokenizer)
    assert [f.object for f in kept] == ["Paris", "France", "Paris"]
    assert [f.object for f in dropped] == ["India", "Atlantis"]  # two word pieces; unknown


def test_candidate_token_ids(tokenizer):
    ids, skipped = candidate_token_ids(tokenizer, ["Rome", "India", "Paris", "Paris", "Atlantis", "France"])
    vocab = tokenizer.get_vocab()
    assert ids == sorted({vocab["Rome"], vocab["Paris"], vocab["France"]})
    assert skipped == ["India", "Atlantis"]


def test_common_vocab_and_facts_in_vocab(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("Paris\n\nRome\nParis\nFrance\n", encoding="utf-8")
    words = load_common_vocab(path)
    assert words == ["Paris", "Rome", "France"]
    kept, dropped = facts_in_vocab([Fact("a", "Rome"), Fact("b", "Berlin"), Fact("c", "paris")], words)
    assert [f.object for f in kept] == ["Rome"] and [f.object for f in dropped] == ["Berlin", "paris"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match="no words"):
        load_common_vocab(empty)


def _count_lines(path: Path) -> tuple[int, int]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = {(r.get("sub_label", r.get("sub")), r.get("obj_label", r.get("obj"))) for r in rows}
    return len(rows), len(pairs)


@needs_shared
def test_real_trex_relation():
    assert len(list_relations(SHARED_DATA / "trex")) == 41
    # P138 has repeated facts in every split; its test file has uuids, P17's test file has none.
    for relation in ("P138", "P17"):
        splits = load_relation(SHARED_DATA / "trex", relation, keep_duplicates=False)
        for name, split in splits.items():
            lines, distinct = _count_lines(SHARED_DATA / "trex" / relation / f"{name}.jsonl")
            assert split.report.lines == lines
            assert len(split) == distinct
            assert split.report.kept + split.report.duplicates + split.report.empty == lines
            assert all(f.relation == relation for f in split)
    assert load_relation(SHARED_DATA / "trex", "P138")["test"][0].uuid is not None
    assert load_relation(SHARED_DATA / "trex", "P17")["test"][0].uuid is None


@needs_shared
@pytest.mark.parametrize(("split_dir", "relation"), [("conceptnet", "AtLocation"), ("google_re", "place_of_death")])
def test_real_qin_eisner_relation(split_dir, relation):
    data_dir = SHARED_DATA / "qin_eisner" / split_dir
    assert relation in list_relations(data_dir)
    train = load_relation(data_dir, relation, splits=["train"], keep_duplicates=False)["train"]
    lines, distinct = _count_lines(data_dir / relation / "train.jsonl")
    assert (train.report.lines, len(train), train.report.duplicates) == (lines, distinct, lines - distinct)
    assert lines > distinct  # both files repeat facts


@needs_shared
def test_real_common_vocab():
    lines = (SHARED_DATA / "vocab" / "common_vocab_cased.txt").read_text(encoding="utf-8").splitlines()
    words = load_common_vocab(SHARED_DATA / "vocab" / "common_vocab_cased.txt")
    assert words[:3] == lines[:3] and len(words) == len({w for w in lines if w.strip()})


@pytest.mark.skipif(not (SAMPLE_DIR / "trex").is_dir(), reason="package sample not present")
def test_shipped_sample_loads():
    relations = list_relations(SAMPLE_DIR / "trex")
    assert relations
    splits = load_relation(SAMPLE_DIR / "trex", relations[0])
    assert all(len(s) > 0 for s in splits.values())
