"""Decoder-only (causal) LMs in the same adapter (#18): the object scored by the chain rule, checked by hand."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, LlamaConfig, LlamaForCausalLM

from peft_softmix import SoftMixtureConfig
from peft_softmix.errors import TemplateError

sys.path.insert(0, str(Path(__file__).parent))
from factories import byte_level_vocabulary  # noqa: E402

TEMPLATES = ["[X] was born in [Y] .", "[Y] is where [X] was born ."]
EOT = "<|endoftext|>"


def gpt2_style_tokenizer(folder: Path, bos: bool) -> str:
    """A byte-level BPE tokenizer with no mask token; every test word is one ``Ġword`` token."""
    vocab, merges = byte_level_vocabulary([EOT])
    tokenizer = GPT2Tokenizer(
        vocab=vocab, merges=merges, add_bos_token=bos, bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT
    )
    tokenizer.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return gpt2_style_tokenizer(tmp_path_factory.mktemp("gpt2-tok"), bos=True)


def tiny_causal(kind: str, vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=vocab_size,
                n_embd=32,
                n_layer=2,
                n_head=2,
                n_positions=64,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            )
        )
    else:
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        )  # fmt: skip
        model = LlamaForCausalLM(config)
    with torch.no_grad():  # a wider spread than the default init, so that the template words matter
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.3)
    return model.eval()


@pytest.fixture(params=["gpt2-shallow", "gpt2-deep", "llama-shallow", "llama-deep"])
def causal_model(request, tokenizer_dir):
    kind, depth = request.param.split("-")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = tiny_causal(kind, len(tokenizer))
    config = SoftMixtureConfig(templates=TEMPLATES, tokenizer_name_or_path=tokenizer_dir, deep=depth == "deep")
    model = get_peft_model(base, config)
    with torch.no_grad():
        model.prompt_encoder["default"].mixture_logits.copy_(torch.tensor([0.5, -0.3]))
    return model.eval()


def hand_score(base, tokenizer, template: str, subject: str, obj: str, whole_sentence: bool) -> float:
    """log p of the object's tokens (and, for a whole sentence, every token after them) given the tokens before,
    from one forward pass of the frozen model over the filled sentence."""
    before, after = template.split("[Y]")
    prefix = tokenizer(before.replace("[X]", subject).rstrip())["input_ids"]
    object_ids = tokenizer(" " + obj, add_special_tokens=False)["input_ids"]
    suffix = tokenizer(after.replace("[X]", subject), add_special_tokens=False)["input_ids"]
    ids = prefix + object_ids + (suffix if whole_sentence else [])
    with torch.no_grad():
        log_probs = base(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    start = len(prefix)
    return sum(float(log_probs[i - 1, ids[i]]) for i in range(start, len(ids)))


@pytest.mark.parametrize("scoring", ["prefix", "sentence"])
def test_a_hard_initialised_adapter_gives_the_frozen_models_chain_rule(causal_model, scoring):
    tokenizer = causal_model.tokenizer
    assert causal_model.processor.causal and tokenizer.mask_token is None
    subjects, objects = ["Dante", "Einstein"], ["Florence", "Ulm"]  # "Ulm" is three byte-level pieces
    batch = causal_model.encode(subjects, objects, causal_scoring=scoring)
    out = causal_model(**batch)
    base = causal_model.get_base_model()
    expected = [
        # the second template has [Y] before [X]: its prefix has no subject, so it is always a whole sentence
        hand_score(base, tokenizer, template, s, o, whole_sentence=scoring == "sentence" or template.startswith("[Y]"))
        for s, o in zip(subjects, objects)
        for template in TEMPLATES
    ]
    assert out.template_object_log_probs.tolist() == pytest.approx(expected, abs=1e-4)
    weights = causal_model.mixture_weights()
    for b in range(2):
        mixture = math.log(sum(w * math.exp(expected[2 * b + k]) for k, w in enumerate(weights)))
        assert float(out.object_log_probs[b].detach()) == pytest.approx(mixture, abs=1e-4)


def test_text_after_the_object_counts_only_in_whole_sentence_scoring(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    losses = {}
    for scoring in ("prefix", "sentence"):
        for template in ("[X] was born in [Y]", "[X] was born in [Y] ."):
            config = SoftMixtureConfig(templates=[template], tokenizer_name_or_path=tokenizer_dir)
            model = get_peft_model(tiny_causal("gpt2", len(tokenizer)), config)
            batch = model.encode(["Dante"], ["Florence"], causal_scoring=scoring)
            losses[scoring, template] = float(model(**batch).loss.detach())
    assert losses["prefix", "[X] was born in [Y]"] == pytest.approx(losses["prefix", "[X] was born in [Y] ."])
    assert losses["sentence", "[X] was born in [Y]"] != pytest.approx(losses["sentence", "[X] was born in [Y] ."])


def test_a_causal_lm_whose_tokenizer_has_a_mask_token_is_still_scored_causally(tmp_path):
    folder = gpt2_style_tokenizer(tmp_path, bos=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    tokenizer.save_pretrained(folder)
    config = SoftMixtureConfig(templates=["[X] was born in [Y] ."], tokenizer_name_or_path=folder)
    model = get_peft_model(tiny_causal("gpt2", len(tokenizer)), config)
    batch = model.encode(["Dante"], ["Florence"])
    assert model.processor.causal
    assert tokenizer.mask_token_id not in batch["input_ids"].tolist()[0]  # the object itself, not a mask


def test_training_a_causal_adapter_lowers_the_loss(causal_model):
    batch = causal_model.encode(["Dante", "Einstein"], ["Florence", "Ulm"])
    causal_model.train()
    optimizer = torch.optim.Adam([p for p in causal_model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(5):
        loss = causal_model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_a_template_opening_with_the_object_needs_a_bos_token(tmp_path):
    folder = gpt2_style_tokenizer(tmp_path, bos=False)
    config = SoftMixtureConfig(templates=["[Y] is where [X] was born ."], tokenizer_name_or_path=folder)
    model = get_peft_model(tiny_causal("gpt2", len(AutoTokenizer.from_pretrained(folder))), config)
    with pytest.raises(TemplateError, match="starts with \\[Y\\]"):
        model.encode(["Dante"], ["Florence"])


@pytest.mark.parametrize("scoring", ["prefix", "sentence"])
def test_candidates_from_the_prompts_cache_score_as_the_full_forward(causal_model, scoring):
    subjects = ["Dante", "Einstein", "Kant"]
    candidates = ["Florence", "Ulm", "Paris", "Berlin", "Tokyo"]
    calls = []
    handle = causal_model.get_base_model().register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        scores = causal_model.score_candidates(subjects, candidates, causal_scoring=scoring)
    finally:
        handle.remove()
    # per template, one pass of its prompts, then one per candidate length (1 and 3 tokens here), never one per
    # candidate
    assert len(calls) <= len(TEMPLATES) * (1 + 2)
    for c, candidate in enumerate(candidates):
        out = causal_model(**causal_model.encode(subjects, [candidate] * 3, causal_scoring=scoring))
        assert torch.allclose(scores.log_probs[:, c], out.object_log_probs.detach(), atol=1e-4), candidate


def test_scores_after_any_prompts_are_the_chain_rule_of_one_full_pass(tokenizer_dir):
    # the public helper that other prompt methods (the benchmarks' PEFT peers) score candidates through: any
    # forward, prompts of different lengths, candidates of 1 to 3 tokens
    from peft_softmix.causal_ranking import score_after_prompts

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = tiny_causal("gpt2", len(tokenizer))

    def forward(ids, roles, attention_mask, position_ids, cache=None):
        extra = {} if cache is None else {"past_key_values": cache}
        return base(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)

    # 9 and 8 tokens: the shorter prompt is padded on the left
    prompts = [tokenizer(text)["input_ids"] for text in ("Dante was born in", "Kant was born in")]
    candidates = [tuple(tokenizer(" " + c)["input_ids"][1:]) for c in ("Florence", "Ulm", "Paris")]
    candidates.append(candidates[0] + candidates[1])  # two tokens
    candidates.append(candidates[3] + candidates[2])  # three
    rows = [torch.tensor([(i, -1) for i in prompt]) for prompt in prompts]
    with torch.no_grad():
        scores = score_after_prompts(forward, rows, candidates, "cpu", pad=tokenizer.pad_token_id)
        for r, prompt in enumerate(prompts):
            for c, ids in enumerate(candidates):
                full = torch.tensor([prompt + list(ids)])
                log_probs = base(input_ids=full).logits[0, :-1].log_softmax(-1)
                expected = sum(float(log_probs[len(prompt) - 1 + j, t]) for j, t in enumerate(ids))
                assert float(scores[r, c]) == pytest.approx(expected, abs=1e-4), (r, c)


def test_beam_search_of_one_template_starts_from_the_models_next_token(tokenizer_dir):
    from peft_softmix.causal_decoding import causal_answers, decode_causal

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    template = "[X] was born in [Y] ."
    model = get_peft_model(
        tiny_causal("gpt2", len(tokenizer)),
        SoftMixtureConfig(templates=[template], tokenizer_name_or_path=tokenizer_dir),
    ).eval()
    base = model.get_base_model()
    prompt = tokenizer("Dante was born in")["input_ids"]
    with torch.no_grad():
        first = base(input_ids=torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    end = tokenizer(" .", add_special_tokens=False)["input_ids"][0]
    # one token, one beam: the answer is the next token the frozen model likes best, ended by the template's " ."
    [[(answer, search_score)]] = decode_causal(model, "default", ["Dante"], max_tokens=1, num_beams=1)
    assert answer == (int(first.argmax()),)
    with torch.no_grad():
        after = base(input_ids=torch.tensor([prompt + list(answer)])).logits[0, -1].log_softmax(-1)
    assert search_score == pytest.approx(float(first[answer[0]] + after[end]), abs=1e-4)
    [result] = causal_answers(model, "default", ["Dante"], top_k=1, max_tokens=1, num_beams=1)
    best = result["predictions"][0]
    assert best["tokens"] == list(answer) and best["template_shares"] == pytest.approx([1.0])
    # the answer's score is p(y|x) (prefix scoring), not the search's p(y|x) p(end|x, y)
    assert math.log(best["score"]) == pytest.approx(float(first[answer[0]]), abs=1e-4)


def test_beam_search_answers_are_scored_exactly_and_ranked(causal_model):
    from peft_softmix.causal_decoding import causal_answers

    results = causal_answers(causal_model, "default", ["Dante", "Kant"], top_k=3, max_tokens=3, num_beams=4)
    for result in results:
        predictions = result["predictions"]
        assert 1 <= len(predictions) <= 3
        scores = [p["score"] for p in predictions]
        assert scores == sorted(scores, reverse=True)
        texts = [p["token_str"] for p in predictions]
        exact = causal_model.score_candidates([result["subject"]], texts).log_probs[0].exp().tolist()
        for prediction, expected in zip(predictions, exact):
            # re-tokenising the decoded text can merge differently; where it gives the same tokens, same score
            if (
                list(causal_model.tokenizer(" " + prediction["token_str"], add_special_tokens=False)["input_ids"])
                == prediction["tokens"]
            ):
                assert prediction["score"] == pytest.approx(expected, rel=1e-3)
        assert all(sum(p["template_shares"]) == pytest.approx(1.0, abs=1e-4) for p in predictions)


def test_the_loader_picks_the_head_from_the_checkpoint(tmp_path, tiny_dir):
    from transformers import T5Config

    from peft_softmix.base_models import language_model_kind, load_language_model
    from peft_softmix.errors import UnsupportedArchitectureError

    tiny_causal("gpt2", 300).save_pretrained(tmp_path / "gpt2")
    assert type(load_language_model(str(tmp_path / "gpt2"))).__name__ == "GPT2LMHeadModel"
    assert type(load_language_model(str(tiny_dir))).__name__ == "BertForMaskedLM"
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
        language_model_kind(T5Config())


NAMED_TYPES = [
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "opt", "gpt_neox",
    "falcon", "bloom", "mamba",  # mamba: its cache cannot continue a prompt exactly, so candidates take full passes
]  # fmt: skip


@pytest.mark.parametrize("model_type", NAMED_TYPES)
def test_every_named_causal_type_reproduces_the_frozen_model_end_to_end(model_type, tokenizer_dir):
    from causal_factories import tiny_causal_config, tiny_causal_model

    from peft_softmix.causal_architectures import CAUSAL_DEEP_UNSUPPORTED

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base = tiny_causal_model(tiny_causal_config(model_type, vocab_size=len(tokenizer)))
    deep = model_type not in CAUSAL_DEEP_UNSUPPORTED
    config = SoftMixtureConfig(templates=TEMPLATES[:1], tokenizer_name_or_path=tokenizer_dir, deep=deep)
    model = get_peft_model(base, config).eval()
    frozen = model.get_base_model()
    subjects, candidates = ["Dante", "Kant"], ["Florence", "Ulm"]
    scores = model.score_candidates(subjects, candidates)
    for c, candidate in enumerate(candidates):
        out = model(**model.encode(subjects, [candidate] * 2))
        expected = [hand_score(frozen, tokenizer, TEMPLATES[0], s, candidate, False) for s in subjects]
        assert out.object_log_probs.tolist() == pytest.approx(expected, abs=2e-4), candidate
        assert scores.log_probs[:, c].tolist() == pytest.approx(expected, abs=2e-4), candidate


def test_query_on_a_causal_adapter_decodes_or_ranks(causal_model):
    answers = causal_model.query(["Dante"], top_k=2)
    predictions = answers[0]["predictions"]
    assert 1 <= len(predictions) <= 2 and all(1 <= len(p["tokens"]) <= 5 for p in predictions)
    ranked = causal_model.query(["Dante"], candidates=["Florence", "Ulm"], top_k=2)[0]["predictions"]
    exact = causal_model.score_candidates(["Dante"], ["Florence", "Ulm"]).log_probs[0].exp()
    assert sorted(p["score"] for p in ranked) == pytest.approx(sorted(exact.tolist()), rel=1e-4)
    with pytest.raises(ValueError, match="candidate_ids"):
        causal_model.query(["Dante"], candidate_ids=[1, 2])


def test_generate_is_refused_with_the_way_to_ask_instead(causal_model, tokenizer_dir, base):
    """PEFT's generate would run the base model without the soft prompts: a silent wrong answer on a causal LM."""
    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(["Dante was born in"], return_tensors="pt")
    with pytest.raises(NotImplementedError, match=r"query\(subjects\)"):
        causal_model.generate(**ids, max_new_tokens=2)
    masked = get_peft_model(base, SoftMixtureConfig(templates=TEMPLATES[:1]))  # a masked LM has no generate at all
    with pytest.raises(NotImplementedError, match="score_candidates"):
        masked.generate(input_ids=ids["input_ids"])


def test_a_candidate_too_long_for_the_models_positions_is_named(causal_model):
    from peft_softmix.errors import QueryTooLongError

    with pytest.raises(QueryTooLongError, match="at most 64"):
        causal_model.score_candidates(["Dante"], ["Florence", " ".join(["Paris"] * 70)])
