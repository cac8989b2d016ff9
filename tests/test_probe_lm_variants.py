"""The subword and causal probe LMs (examples/probe_lm_subword/, examples/probe_lm_causal/) and the parts of
scripts/build_probe_lm.py that built them (scripts/probe_lm_multitoken.py).

No pretraining happens here: the models are loaded as committed; the script's functions are checked on tiny models.
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
from conftest import WORDS, load_script
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
)

REPO = Path(__file__).resolve().parents[1]
SUBWORD_DIR = REPO / "examples" / "probe_lm_subword"
CAUSAL_DIR = REPO / "examples" / "probe_lm_causal"
SAMPLE_DIR = REPO / "peft_softmix" / "data" / "sample"
SPLITS = ("train", "dev", "test")
LIMIT = 12 * 2**20

builder = load_script(REPO / "scripts" / "build_probe_lm.py")
multitoken = load_script(REPO / "scripts" / "probe_lm_multitoken.py")


def _facts(relation: str, split: str) -> list[tuple[str, str]]:
    with (SAMPLE_DIR / "trex" / relation / f"{split}.jsonl").open(encoding="utf-8") as handle:
        return [(rec["sub_label"], rec["obj_label"]) for rec in map(json.loads, handle)]


def _info(folder: Path) -> dict:
    path = folder / "build_info.json"
    assert path.is_file(), f"{path} is missing; run the build command in {folder}/README.md."
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def subword():
    return AutoModelForMaskedLM.from_pretrained(SUBWORD_DIR).eval(), AutoTokenizer.from_pretrained(SUBWORD_DIR)


@pytest.fixture(scope="module")
def causal():
    return AutoModelForCausalLM.from_pretrained(CAUSAL_DIR).eval(), AutoTokenizer.from_pretrained(CAUSAL_DIR)


def _relations(folder: Path) -> list[str]:
    return [row["relation"] for row in _info(folder)["relations"]]


# --------------------------------------------------------------------------------------------------- the models


@pytest.mark.parametrize("folder", [SUBWORD_DIR, CAUSAL_DIR], ids=["subword", "causal"])
def test_probe_lm_folder_is_small_and_matches_its_build_info(folder):
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    assert total < LIMIT, f"{folder.name} holds {total / 2**20:.1f} MB; the limit is 12 MB"
    info = _info(folder)
    weights = (folder / "model.safetensors").stat().st_size
    assert abs(weights / 2**20 - info["model"]["safetensors_mb"]) < 1e-6
    assert info["tokenizer"] == "subword"
    assert _relations(folder) == _relations(REPO / "examples" / "probe_lm")  # the same relations as the first one


def test_subword_probe_lm_is_a_masked_lm_with_a_small_wordpiece_vocabulary(subword):
    model, tokenizer = subword
    info = _info(SUBWORD_DIR)
    assert isinstance(model, BertForMaskedLM)
    assert model.config.vocab_size == len(tokenizer) == info["model"]["vocab_size"] <= 4000
    assert sum(p.numel() for p in model.parameters()) == info["model"]["parameters"]
    assert tokenizer.is_fast and tokenizer.mask_token == "[MASK]"
    assert any(tok.startswith("##") for tok in tokenizer.get_vocab())


def test_causal_probe_lm_is_a_decoder_without_a_mask_token(causal):
    model, tokenizer = causal
    info = _info(CAUSAL_DIR)
    assert isinstance(model, GPT2LMHeadModel) and not model.config.is_encoder_decoder
    assert info["architecture"] == "causal"
    assert model.config.vocab_size == len(tokenizer) == info["model"]["vocab_size"]
    assert tokenizer.mask_token is None and tokenizer.mask_token_id is None
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    assert None not in ids and len(ids) == 4
    encoded = tokenizer("Dante was born in Florence .")["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in encoded
    assert model.config.bos_token_id == tokenizer.bos_token_id and model.config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("which", ["subword", "causal"])
def test_tokenizer_round_trips_and_knows_every_prompt_word(which, request):
    _, tokenizer = request.getfixturevalue(which)
    text = "The capital of France is Paris"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer.convert_tokens_to_ids(tokenizer.convert_ids_to_tokens(ids)) == ids
    templates = builder.load_templates(SAMPLE_DIR)
    texts = [s for rel in _relations(SUBWORD_DIR) for s, _ in _facts(rel, "test")[:50]]
    for rel in _relations(SUBWORD_DIR):
        t = templates[rel]
        texts += [x.replace("[X]", " ").replace("[Y]", " ") for x in (t.manual, *t.mined, *t.paraphrase)]
    unknown = [x for x in texts if tokenizer.unk_token_id in tokenizer(x)["input_ids"]]
    assert not unknown, f"{len(unknown)} texts have unknown tokens, e.g. {unknown[:3]}"


def test_both_new_probe_lms_share_their_wordpiece_vocabulary(subword, causal):
    # Both vocabularies were trained by the same code on the same corpus; the tokenizers library's WordPiece trainer
    # breaks ties differently between runs, so a handful of pieces differ (the causal model's card says so).
    pieces = [set(t.get_vocab()) - set(t.all_special_tokens) for t in (subword[1], causal[1])]
    assert len(pieces[0] ^ pieces[1]) <= 0.01 * len(pieces[0]), sorted(pieces[0] ^ pieces[1])
    texts = [s for s, _ in _facts("P19", "test")[:200]] + [o for _, o in _facts("P36", "test")[:200]]
    same = sum(subword[1].tokenize(t) == causal[1].tokenize(t) for t in texts)
    assert same >= 0.95 * len(texts)
    objects = [o for rel in _relations(CAUSAL_DIR) for _, o in _facts(rel, "test")]
    multi = sum(len(causal[1].tokenize(" " + o)) > 1 for o in objects) / len(objects)
    assert multi >= 0.30 and multi == pytest.approx(_info(CAUSAL_DIR)["multi_token_test_fraction"])


def test_at_least_30_percent_of_the_shipped_test_facts_have_a_multi_token_object(subword):
    _, tokenizer = subword
    info = _info(SUBWORD_DIR)
    multi = total = 0
    per_relation = {}
    for rel in _relations(SUBWORD_DIR):
        objects = [o for _, o in _facts(rel, "test")]
        lengths = [len(tokenizer.tokenize(" " + o)) for o in objects]
        per_relation[rel] = sum(n > 1 for n in lengths) / len(lengths)
        multi += sum(n > 1 for n in lengths)
        total += len(lengths)
        row = next(r for r in info["relations"] if r["relation"] == rel)
        assert row["multi_token_test_fraction"] == pytest.approx(per_relation[rel])
    assert multi / total >= 0.30, per_relation
    assert multi / total <= 0.70, f"too few single-token objects left: {per_relation}"
    assert info["multi_token_test_fraction"] == pytest.approx(multi / total)


def _corpus_template(rel: str) -> str:
    templates = builder.load_templates(SAMPLE_DIR)
    held = {builder.template_key(t) for r in _relations(SUBWORD_DIR) for t in builder.held_out_templates(templates[r])}
    return next(t for t in builder.corpus_templates(templates[rel], held) if t in templates[rel].mined)


@pytest.mark.parametrize("which", ["subword", "causal"])
def test_new_probe_lm_knows_train_facts_through_a_corpus_template(which, request):
    # Neither knows all its facts (their model cards: mean corpus recall 0.76 and 0.64, far less on the relations
    # whose objects are mostly several tokens); through a corpus sentence they must still beat always answering
    # the relation's most frequent object.
    model, tokenizer = request.getfixturevalue(which)
    hits = majority_hits = total = 0
    per_relation = {}
    for rel in _relations(SUBWORD_DIR):
        objects = {o for split in SPLITS for _, o in _facts(rel, split)}
        candidates = multitoken.Candidates(tokenizer, objects)
        train = _facts(rel, "train")
        majority = max(objects, key=[o for _, o in train].count)
        facts = train[: 40 if which == "subword" else 10]
        texts = [builder.fill(_corpus_template(rel), s, multitoken.SLOT)[0] for s, _ in facts]
        right = sum(p == o for p, (_, o) in zip(multitoken.rank(model, tokenizer, texts, candidates), facts))
        per_relation[rel] = right / len(facts)
        hits, total = hits + right, total + len(facts)
        majority_hits += sum(o == majority for _, o in facts)
        if rel == "P176":
            assert sum(o == majority for _, o in facts) / len(facts) < 0.3
    recall, baseline = hits / total, majority_hits / total
    report = f"{which}: recall@1 {recall:.2f} (majority {baseline:.2f}) through corpus templates: {per_relation}"
    assert recall >= 0.3 and recall > baseline, report
    # manufacturers: many objects, none frequent (majority 0.09 of the test facts), mostly one token
    assert per_relation["P176"] >= 0.6, report


def test_new_probe_lms_load_with_the_hub_offline():
    code = (
        "from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer; import sys; "
        "m = AutoModelForMaskedLM.from_pretrained(sys.argv[1]); "
        "c = AutoModelForCausalLM.from_pretrained(sys.argv[2]); "
        "t = AutoTokenizer.from_pretrained(sys.argv[2]); print(type(m).__name__, type(c).__name__, t.mask_token)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(SUBWORD_DIR), str(CAUSAL_DIR)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["BertForMaskedLM", "GPT2LMHeadModel", "None"]


@pytest.mark.parametrize("folder", [SUBWORD_DIR, CAUSAL_DIR], ids=["subword", "causal"])
def test_new_model_cards_state_the_licence_and_the_build_command(folder):
    from huggingface_hub import ModelCard

    card = ModelCard.load(folder / "README.md")
    info = _info(folder)
    assert card.data.license == "cc-by-nc-4.0" and "CC BY-NC 4.0" in card.text
    assert info["command"] in card.text and "--tokenizer subword" in info["command"]
    assert ("--architecture causal" in info["command"]) == (folder == CAUSAL_DIR)


# --------------------------------------------------------------------------------------------------- script parts


@pytest.fixture(scope="module")
def tiny_wordpiece():
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}, do_lower_case=False)


def test_whole_object_masking_masks_every_piece_of_the_object():
    ids = torch.tensor([[2, 10, 11, 12, 13, 3, 0], [2, 10, 11, 12, 13, 14, 3]])
    starts, ends = torch.tensor([2, 3]), torch.tensor([4, 6])
    kwargs = dict(special_ids=[0, 2, 3], mask_id=4, first_regular_id=5, vocab_size=20)
    inputs, chosen = multitoken.mask_whole_object(
        ids, starts, ends, generator=torch.Generator().manual_seed(0), object_rate=1.0, token_rate=0.0, **kwargs
    )
    expected = torch.zeros_like(ids, dtype=torch.bool)
    expected[0, 2:4] = expected[1, 3:6] = True
    assert torch.equal(chosen, expected)
    assert torch.equal(inputs[expected], torch.full((5,), 4)) and torch.equal(inputs[~expected], ids[~expected])
    # no object (start -1) or object_rate 0: nothing; token masking never touches special tokens
    inputs, chosen = multitoken.mask_whole_object(
        ids, torch.tensor([-1, 3]), ends, generator=torch.Generator().manual_seed(0), object_rate=0.0, token_rate=1.0,
        **kwargs,
    )  # fmt: skip
    assert not chosen[torch.isin(ids, torch.tensor([0, 2, 3]))].any()
    assert chosen[~torch.isin(ids, torch.tensor([0, 2, 3]))].all()
    assert set(inputs[chosen].tolist()) - {4} <= set(range(5, 20))


def test_encode_object_spans_finds_the_pieces_of_the_object(tiny_wordpiece):
    texts = ["Dante was born in India .", "Ali speaks French .", "Bo was born in Paris ."]
    spans = [(18, 23), (11, 17), (5, 8)]  # the last one is not a word boundary
    ids, starts, ends, dropped = multitoken.encode_object_spans(tiny_wordpiece, texts, spans, max_length=16)
    assert dropped == 0
    pieces = [tiny_wordpiece.convert_ids_to_tokens(x[s:e].tolist()) for x, s, e in zip(ids, starts, ends)]
    assert pieces[:2] == [["Ind", "##ia"], ["French"]]
    assert (starts[2], ends[2]) == (-1, -1)
    ids, *_, dropped = multitoken.encode_object_spans(tiny_wordpiece, texts, spans, max_length=7, eos=3)
    # only "Ali speaks French ." fits in 7 with the end token: [CLS] Ali speaks French . [SEP] <end>
    assert dropped == 2 and ids[0].tolist()[-2:] == [3, 3]


def test_rank_masked_scores_a_candidate_by_its_pieces_at_as_many_masks(tiny_wordpiece):
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, intermediate_size=64)).eval()  # fmt: skip
    candidates = multitoken.Candidates(tiny_wordpiece, ["India", "Paris", "Indo", "France"])
    assert sorted(candidates.by_length) == [1, 2]
    text = "Dante was born in [Y] ."

    def score(obj: str) -> float:  # the oracle: one forward pass with one mask per piece, log-probs summed
        pieces = multitoken.object_pieces(tiny_wordpiece, obj)
        masked = text.replace("[Y]", " ".join(["[MASK]"] * len(pieces)))
        enc = tiny_wordpiece(masked, return_tensors="pt")
        with torch.no_grad():
            logp = model(**enc).logits[0].log_softmax(-1)
        where = (enc["input_ids"][0] == tiny_wordpiece.mask_token_id).nonzero()[:, 0]
        return sum(logp[w, p].item() for w, p in zip(where, pieces))

    best = max(candidates.objects, key=score)
    assert multitoken.rank(model, tiny_wordpiece, [text, text], candidates) == [best, best]


def test_causal_scores_equal_the_chain_rule_of_the_whole_sentence():
    pieces = [w for w in WORDS if not w.startswith("[")]
    tokenizer = multitoken.causal_subword_tokenizer(pieces)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    objects = ["India", "Paris", "Indo", "France"]
    prefix, suffix = multitoken.split_at_object("Dante was born in [Y] .")
    scores = multitoken.causal_scores(model, tokenizer, prefix, [o + suffix for o in objects])

    def sentence_logp(text: str) -> float:
        ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))

    full = torch.tensor([sentence_logp(prefix + o + suffix) for o in objects])
    # the same up to log p(prefix), which all candidates share
    shift = full - scores
    assert torch.allclose(shift, shift[0].expand_as(shift), atol=1e-4)
    candidates = multitoken.Candidates(tokenizer, objects)
    assert multitoken.rank(model, tokenizer, ["Dante was born in [Y] ."], candidates) == [objects[int(full.argmax())]]


def test_model_flags_name_the_tokenizer_and_architecture_of_a_variant_build():
    assert builder.model_flags(builder.parse_args([])) == ""  # the default build: the shipped word-level probe LM
    flags = builder.model_flags(builder.parse_args(["--tokenizer", "subword", "--architecture", "causal"]))
    assert "--tokenizer subword" in flags and "--vocab_size 1500" in flags and "--architecture causal" in flags


def test_causal_build_without_a_subword_tokenizer_is_refused():
    with pytest.raises(SystemExit, match="--architecture causal needs --tokenizer subword"):
        builder.main(["--architecture", "causal", "--dry_run"])


def test_sample_of_facts_is_fixed_and_all_when_zero():
    assert builder._sample(5, 0, 0) == list(range(5)) == builder._sample(5, 9, 0)
    picked = builder._sample(100, 10, 3)
    assert picked == sorted(random.Random(3).sample(range(100), 10)) == builder._sample(100, 10, 3)
