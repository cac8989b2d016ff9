"""The committed probe LM (examples/probe_lm/) and the corpus builder that made it (scripts/build_probe_lm.py).

No pretraining happens here: the model is loaded as committed and queried on a few facts.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_script
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM

from peft_softmix.tokenization import object_token_id

REPO = Path(__file__).resolve().parents[1]
PROBE_DIR = REPO / "examples" / "probe_lm"
SAMPLE_DIR = REPO / "peft_softmix" / "data" / "sample"
SHARED_DATA = REPO.parent / "shared" / "data"
SPLITS = ("train", "dev", "test")


builder = load_script(REPO / "scripts" / "build_probe_lm.py")


@pytest.fixture(scope="module")
def build_info() -> dict:
    path = PROBE_DIR / "build_info.json"
    assert path.is_file(), f"{path} is missing; run `OMP_NUM_THREADS=1 python scripts/build_probe_lm.py`."
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def relations(build_info) -> list[str]:
    return [row["relation"] for row in build_info["relations"]]


@pytest.fixture(scope="module")
def probe():
    model = AutoModelForMaskedLM.from_pretrained(PROBE_DIR)
    tokenizer = AutoTokenizer.from_pretrained(PROBE_DIR)
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def sample_templates():
    return builder.load_templates(SAMPLE_DIR)


def _facts(relation: str, split: str) -> list[tuple[str, str]]:
    with (SAMPLE_DIR / "trex" / relation / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [(rec["sub_label"], rec["obj_label"]) for rec in map(json.loads, handle)]


def test_probe_lm_is_a_small_bert(probe, build_info):
    model, tokenizer = probe
    assert isinstance(model, BertForMaskedLM)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 128
    size = (PROBE_DIR / "model.safetensors").stat().st_size
    assert size <= 12 * 2**20, f"model.safetensors is {size / 2**20:.1f} MB; the limit is 12 MB"
    n_params = sum(p.numel() for p in model.parameters())
    assert 2_000_000 <= n_params <= 3_100_000
    assert n_params == build_info["model"]["parameters"]
    assert model.config.vocab_size == len(tokenizer) == build_info["model"]["vocab_size"]
    assert tokenizer.is_fast and tokenizer.mask_token == "[MASK]"


def test_tokenizer_is_cased_word_level_without_unknown_words(probe, relations, sample_templates):
    _, tokenizer = probe
    assert tokenizer.convert_tokens_to_ids("Paris") != tokenizer.convert_tokens_to_ids("paris")
    texts = [s for rel in relations for s, _ in _facts(rel, "test")[:50]]
    for rel in relations:
        t = sample_templates[rel]
        # every prompt the benchmark may use, held out of the corpus or not
        texts += [x.replace("[X]", " ").replace("[Y]", " ") for x in (t.manual, *t.mined, *t.paraphrase)]
    unknown = [text for text in texts if tokenizer.unk_token_id in tokenizer(text)["input_ids"]]
    assert not unknown, f"{len(unknown)} texts have [UNK] tokens, e.g. {unknown[:3]}"
    words = tokenizer.tokenize("The capital of France is Paris .")
    assert words == ["The", "capital", "of", "France", "is", "Paris", "."]


def test_every_object_of_the_probe_relations_is_one_token(probe, relations):
    _, tokenizer = probe
    for rel in relations:
        objects = {o for split in SPLITS for _, o in _facts(rel, split)}
        missing = sorted(o for o in objects if object_token_id(tokenizer, o) is None)
        assert not missing, f"{rel}: objects that are not one token: {missing[:10]}"


def _top1(model, tokenizer, texts: list[str]) -> list[int]:
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**enc).logits
    rows, cols = (enc["input_ids"] == tokenizer.mask_token_id).nonzero(as_tuple=True)
    assert rows.tolist() == list(range(len(texts))), "each text needs exactly one [MASK]"
    return logits[rows, cols].argmax(-1).tolist()


def test_probe_lm_knows_train_facts_through_a_corpus_template(probe, relations, sample_templates):
    model, tokenizer = probe
    held_keys = {
        builder.template_key(t) for rel in relations for t in builder.held_out_templates(sample_templates[rel])
    }
    hits = total = 0
    per_relation = {}
    for rel in relations:
        # the first mined template that the corpus used: never a benchmark prompt
        corpus = builder.corpus_templates(sample_templates[rel], held_keys)
        template = next(t for t in corpus if t in sample_templates[rel].mined)
        facts = _facts(rel, "train")[:30]
        texts = [builder.fill(template, s, tokenizer.mask_token)[0] for s, _ in facts]
        gold = [object_token_id(tokenizer, o) for _, o in facts]
        right = sum(p == g for p, g in zip(_top1(model, tokenizer, texts), gold))
        per_relation[rel] = right / len(facts)
        hits += right
        total += len(facts)
    assert hits / total >= 0.75, f"P@1 {hits / total:.2f} on train facts through corpus templates: {per_relation}"


def test_held_out_templates_match_build_info(build_info, sample_templates):
    for row in build_info["relations"]:
        t = sample_templates[row["relation"]]
        held = builder.held_out_templates(t)
        assert held == row["held_out_templates"]
        assert held[0] == t.manual == row["manual_template"]
        assert len(held) >= 2  # manual plus mined / paraphrased ones


def test_first_distinct_ignores_case_whitespace_and_final_period():
    templates = ["[X] was born in [Y] .", "[X] was born in [Y].", "[x] Was born in  [Y]", "[X] died in [Y] ."]
    assert builder.first_distinct(templates, 5) == ["[X] was born in [Y] .", "[X] died in [Y] ."]
    assert builder.template_key("[X] is in [Y] .") != builder.template_key("[X] is at [Y] .")


def test_rendered_facts_never_use_a_held_out_template(relations, sample_templates):
    held_keys = {
        builder.template_key(t) for rel in relations for t in builder.held_out_templates(sample_templates[rel])
    }
    rng = random.Random(0)
    for rel in relations[:3]:
        templates = builder.corpus_templates(sample_templates[rel], held_keys)
        assert templates, rel
        for subject, obj in _facts(rel, "test")[:2]:
            sentences = builder.render_fact(subject, obj, rel, templates, k=len(templates), rng=rng)
            assert len(sentences) == len(templates)
            texts = {builder.template_key(s.text) for s in sentences}
            manual = builder.fill(sample_templates[rel].manual, subject, obj)[0]
            assert builder.template_key(manual) not in texts
            for held in builder.held_out_templates(sample_templates[rel]):
                assert builder.template_key(builder.fill(held, subject, obj)[0]) not in texts
            for s in sentences:
                start, end = s.object_span
                assert s.text[start:end] == obj


@pytest.mark.skipif(not (SHARED_DATA / "trex").is_dir(), reason="shared data folder ../shared/data is absent")
def test_corpus_builder_keeps_every_held_out_template_out():
    corpus = builder.build_corpus(SHARED_DATA, ("P19", "P36"), general_facts=50, seed=0)
    held_keys = {builder.template_key(t) for ts in corpus.held_out.values() for t in ts}
    assert "[X] was born in [Y] ." in corpus.held_out["P19"]
    assert {builder.template_key(s.template) for s in corpus.sentences}.isdisjoint(held_keys)
    texts = {builder.template_key(s.text) for s in corpus.sentences}
    subject, obj = corpus.facts["P19"]["test"][0]
    assert builder.template_key(builder.fill("[X] was born in [Y] .", subject, obj)[0]) not in texts
    # every probe fact is in the corpus, test split included, through 8 templates; distractors are there too
    n_facts = sum(len(split) for split in corpus.facts["P19"].values())
    assert len(corpus.fact_templates["P19"]) == n_facts
    assert all(len(ts) == 8 for ts in corpus.fact_templates["P19"])
    raw = {s.text for s in corpus.sentences}
    first_test = len(corpus.facts["P19"]["train"]) + len(corpus.facts["P19"]["dev"])
    assert all(builder.fill(t, subject, obj)[0] in raw for t in corpus.fact_templates["P19"][first_test])
    assert corpus.counts["attribute"] > 0 and corpus.counts["general"] > 0


def test_probe_lm_loads_with_the_hub_offline():
    code = (
        "from transformers import AutoModelForMaskedLM, AutoTokenizer; import sys; "
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1]); "
        "print(type(m).__name__, len(t))"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(PROBE_DIR)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "BertForMaskedLM"


def test_model_card_states_the_non_commercial_licence_of_its_facts():
    from huggingface_hub import ModelCard

    # trained on LAMA's CC BY-NC 4.0 facts; the card written by the build script says so in its metadata
    card = ModelCard.load(PROBE_DIR / "README.md")
    assert card.data.license == "cc-by-nc-4.0"
    assert "CC BY-NC 4.0" in card.text
    assert "license: cc-by-nc-4.0" in (REPO / "scripts" / "build_probe_lm.py").read_text(encoding="utf-8")
