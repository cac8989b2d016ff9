"""Synthetic T-REx-style data for the training tests: tiny BERTs and two relations of skewed facts."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import save_tiny_bert

SUBJECTS = ["Anna", "Bruno", "Carla", "Dario", "Elena", "Fabio", "Gina", "Hugo", "Ivo", "Lara", "Marco", "Nina"]
CITIES = ["Paris", "Rome", "Milan", "Berlin", "Madrid", "Lisbon"]
WORDS = ["was", "born", "in", "is", "from", "comes", "died", "lived", "the", "city", "of", ".", ",", "New", "York"]
TEMPLATES = [
    ("P19", "[X] was born in [Y] ."),
    ("P19", "[X] is from [Y] ."),
    ("P19", "[X] comes from the city of [Y] ."),
    ("P20", "[X] died in [Y] ."),
    ("P20", "[X] lived in [Y] ."),
]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def build_fixture(root: Path) -> SimpleNamespace:
    """Tiny BERTs (with and without dropout), two relations of skewed synthetic facts, and template files.

    Each split has one fact whose object ("New York") is two tokens, so filtering has something to count. Objects
    are "Paris" 60 % of the time: a prompt can learn that, so training has something to find.
    """
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *SUBJECTS, *CITIES]
    save_tiny_bert(root / "model", vocab, dropout=0.1)
    save_tiny_bert(root / "model_nodrop", vocab, dropout=0.0)
    rng = random.Random(0)
    # distinct subjects of one or two tokens (a repeated fact would be dropped by the loader)
    pool = SUBJECTS + [f"{a} {b}" for a in SUBJECTS for b in SUBJECTS if a != b]
    for relation in ("P19", "P20"):
        subjects = iter(rng.sample(pool, 72))
        for split, n in (("train", 40), ("dev", 16), ("test", 16)):
            records = []
            for _ in range(n):
                subject = next(subjects)
                obj = "Paris" if rng.random() < 0.6 else rng.choice(CITIES)
                records.append({"sub_label": subject, "obj_label": obj, "predicate_id": relation})
            records.append({"sub_label": "Anna", "obj_label": "New York"})
            write_jsonl(root / "trex" / relation / f"{split}.jsonl", records)
    write_jsonl(root / "templates" / "lpaqa_mined.jsonl", [{"relation": r, "template": t} for r, t in TEMPLATES])
    write_jsonl(root / "templates" / "lama.jsonl", [{"relation": r, "template": t} for r, t in TEMPLATES[::3]])
    return SimpleNamespace(root=root, model=root / "model", model_nodrop=root / "model_nodrop", trex=root / "trex")


def check_two_relation_outputs(on_disk: dict, out: Path) -> None:
    """What a 3-epoch run over P19 and P20 of the fixture writes: results.json's rows, histories and best epochs,
    and each relation's checkpoints (shared by the library's test and the script's)."""
    assert list(on_disk["rows"]) == ["hard_first", "hard_mixture", "soft"]
    for relation in ("P19", "P20"):
        entry = on_disk["relations"][relation]
        assert entry["facts"] == {"train": 40, "dev": 16, "test": 16}
        history = entry["history"]
        assert [h["epoch"] for h in history] == [0, 1, 2, 3]
        # the kept state is the best on dev, and its dev P@1 is what the metric reports for the soft row
        best = max(history, key=lambda h: h["dev_p@1"])
        assert entry["best_epoch"] == best["epoch"]
        assert entry["dev"]["soft"]["p@1"] == pytest.approx(best["dev_p@1"])
        # the hard single-template row is template 1's own column of the per-template scores
        assert entry["test"]["hard_first"]["p@1"] == pytest.approx(entry["test_hard_template_p@1"][0])
        # training lowers the dev loss of the frozen model's answers
        assert min(h["dev_loss"] for h in history[1:]) < history[0]["dev_loss"]
        assert (out / relation / "checkpoints" / "epoch_3").is_dir()
        assert not list((out / relation / "checkpoints").glob(".epoch_*"))  # no staging folder left behind
