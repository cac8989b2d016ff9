"""Careless input gets a clear error, never a torch stack trace or a silently wrong answer.

Data files that are not UTF-8 (or carry a byte-order mark), subjects the tokenizer cannot read, a bare string where
a list of subjects belongs, empty or mismatched batches, impossible query options and repeated templates.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_softmix import AdapterLoadError, SoftMixtureConfig
from peft_softmix.facts import (
    DataFormatError,
    Fact,
    filter_single_token,
    filter_unknown_subjects,
    load_common_vocab,
    load_facts,
)
from peft_softmix.template_sets import load_templates

TEMPLATES = ["[X] was born in [Y] .", "[X] is from [Y] ."]
BOM = b"\xef\xbb\xbf"


@pytest.fixture
def model(base):
    return get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES))


# -- data files ------------------------------------------------------------------------------------------------


def test_a_facts_line_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(
        b'{"sub_label": "Dante", "obj_label": "Florence"}\n'
        + '{"sub_label": "Andr\xe9", "obj_label": "Paris"}\n'.encode("latin-1")
    )
    with pytest.raises(DataFormatError) as caught:
        load_facts(path)
    message = str(caught.value)
    assert f"{path}, line 2" in message and "not UTF-8" in message and "0xe9" in message


def test_a_byte_order_mark_is_accepted(tmp_path):
    lines = ['{"sub_label": "Dante", "obj_label": "Florence"}', '{"sub_label": "Ali", "obj_label": "Rome"}']
    path = tmp_path / "train.jsonl"
    path.write_bytes(BOM + "\n".join(lines).encode())
    split = load_facts(path)
    assert split.subjects == ["Dante", "Ali"] and split.report.lines == 2

    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(BOM + b"Paris\nRome\n")
    assert load_common_vocab(vocab) == ["Paris", "Rome"]

    templates = tmp_path / "templates.jsonl"
    templates.write_bytes(BOM + json.dumps({"relation": "P19", "template": TEMPLATES[0]}).encode() + b"\n")
    assert load_templates(templates, "P19").templates == [TEMPLATES[0]]


def test_other_files_that_are_not_utf8_are_named(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_bytes(b"Paris\n\xff\xfeRome\n")
    with pytest.raises(DataFormatError, match=rf"{vocab}, line 2: not UTF-8"):
        load_common_vocab(vocab)
    templates = tmp_path / "templates.jsonl"
    templates.write_bytes('{"relation": "P19", "template": "[X] n\xe9 \xe0 [Y] ."}\n'.encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"{templates}, line 1: not UTF-8"):
        load_templates(templates, "P19")


# -- subjects the tokenizer cannot read ------------------------------------------------------------------------


def test_subjects_of_unknown_tokens_only_are_counted_and_left_out(tokenizer, model):
    facts = [Fact("Dante", "Florence"), Fact("😀", "Paris"), Fact("école", "Rome"), Fact("Dante 😀", "Rome")]
    facts.append(Fact("\u200b", "Rome"))  # a zero-width space: nothing left after normalisation
    kept, dropped = filter_unknown_subjects(facts, tokenizer)
    assert [f.subject for f in kept] == ["Dante", "Dante 😀"]  # one known word is enough to tell subjects apart
    assert [f.subject for f in dropped] == ["😀", "école", "\u200b"]
    # why they are dropped: the model sees the same [UNK] for each, so their answers are identical
    out = model.query(["😀", "école"], top_k=3)
    assert out[0]["predictions"] == out[1]["predictions"]
    # objects are filtered the same way, independently
    assert filter_single_token(kept, tokenizer) == (kept, [])


# -- arguments of encode and query -----------------------------------------------------------------------------


def test_a_bare_string_is_refused_not_split_into_characters(model):
    for call in (
        lambda: model.query("Dante"),
        lambda: model.encode("Dante"),
        lambda: model.query_lengths("Dante"),
    ):
        with pytest.raises(TypeError, match=r"got the string 'Dante'.*pass \['Dante'\]"):
            call()
    with pytest.raises(TypeError, match="list of objects"):
        model.encode(["Dante"], "Florence")
    with pytest.raises(TypeError, match="every subject must be a string"):
        model.encode(["Dante", None])
    assert len(model.query(["Dante"])) == 1


def test_empty_and_mismatched_batches_are_refused(model):
    with pytest.raises(ValueError, match="encode needs at least one subject"):
        model.encode([])
    with pytest.raises(ValueError, match=r"2 subject\(s\) but 1 object\(s\)"):
        model.encode(["Dante", "Ali"], ["Florence"])
    with pytest.raises(ValueError, match=r"1 subject\(s\) but 2 object\(s\)"):
        model.encode(["Dante"], ["Florence", "Rome"])
    assert model.query([]) == []  # nothing asked, nothing answered
    batch = model.encode(["Dante", "Ali"], ["Florence", None])  # None: no label, as documented
    assert batch["labels"][1] == -100 and batch["labels"][0] != -100


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"top_k": 0}, "top_k must be a whole number >= 1, got 0"),
        ({"top_k": -2}, "top_k must be"),
        ({"top_k": 1.5}, "top_k must be"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"batch_size": -1}, "batch_size must be"),
        ({"candidate_ids": [-1]}, r"candidate_ids must be token ids in \[0, \d+\).*got -1"),
        ({"candidate_ids": [5, 10_000]}, "got 10000"),
        ({"candidate_ids": [2.0]}, "got 2.0"),
        ({"candidate_ids": []}, "candidate_ids is empty"),
    ],
)
def test_impossible_query_options_are_refused(model, kwargs, says):
    with pytest.raises(ValueError, match=says):
        model.query(["Dante"], **kwargs)


def test_candidate_ids_restrict_the_answers(model, tokenizer):
    ids = tokenizer.convert_tokens_to_ids(["Paris", "Rome"])
    for given in (ids, np.array(ids), torch.tensor(ids)):
        answers = model.query(["Dante"], top_k=5, candidate_ids=given)[0]["predictions"]
        assert {p["token_str"] for p in answers[:2]} == {"Paris", "Rome"}
        assert sum(p["score"] for p in answers[:2]) == pytest.approx(1.0, abs=1e-5)


# -- templates -------------------------------------------------------------------------------------------------


def test_a_template_given_twice_is_refused(base, tmp_path):
    with pytest.raises(ValueError, match=r"'\[X\] was born in \[Y\] \.' more than once \(at positions \[0, 2\]\)"):
        SoftMixtureConfig(templates=[TEMPLATES[0], TEMPLATES[1], TEMPLATES[0]])
    # in a saved adapter, the error names the file
    get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES)).save_pretrained(tmp_path / "adapter")
    edited = tmp_path / "edited"
    shutil.copytree(tmp_path / "adapter", edited)
    config = json.loads((edited / "adapter_config.json").read_text())
    config["templates"] = [TEMPLATES[0], TEMPLATES[0]]
    (edited / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterLoadError, match="more than once") as caught:
        PeftModel.from_pretrained(type(base).from_pretrained(base.name_or_path), edited)
    assert str(edited / "adapter_config.json") in str(caught.value)
