"""Build the probe LM: a tiny English BertForMaskedLM that knows the T-REx facts of a few relations.

No pretrained English masked LM is available offline, so the soft-prompt method is demonstrated on a model trained
here, on CPU, from sentences generated out of T-REx facts. The model must know the facts (as BERT saw them in
Wikipedia) while the cloze prompts that the benchmark queries it with stay plausible but imperfect questions:

- every fact of the probe relations (train + dev + test) is rendered through ``--templates_per_fact`` LPAQA mined /
  paraphrased templates of its relation;
- every template the benchmark uses as a prompt is held out of the corpus: for each probe relation the LAMA manual
  template and the first ``--held_out`` distinct templates (file order) of ``lpaqa_mined.jsonl`` and of
  ``lpaqa_paraphrase.jsonl``. Templates are compared up to case, whitespace and a final '.', and a held-out
  template is kept out of the rendering of *every* relation, not only its own;
- attribute distractors: each probe subject also gets made-up facts of two other relations with objects drawn from
  those relations' real objects. Without them every subject has a single fact, any template retrieves it, and the
  manual prompt is already near the ceiling;
- general distractors: real facts of other relations, so that templates have to select a relation.

The object is masked in most training sentences (``--object_rate``) on top of BERT-style masking of other tokens.

Run (about 14 minutes of CPU time with one thread; the wall time grows when other jobs share the machine)::

    OMP_NUM_THREADS=1 python scripts/build_probe_lm.py

It writes ``examples/probe_lm/`` (model, tokenizer, ``build_info.json``, model card ``README.md``) and the shipped
data sample ``peft_softmix/data/sample/``.

The same corpus also builds probe LMs whose objects may be several tokens (``scripts/probe_lm_multitoken.py``):
``--tokenizer subword --vocab_size N`` trains a WordPiece vocabulary of N pieces on the corpus and masks every piece
of the object; ``--architecture causal`` trains a decoder-only GPT-2 by next-token prediction instead. Their facts
are checked by ranking each relation's candidate objects. The commands that built ``examples/probe_lm_subword/``
and ``examples/probe_lm_causal/`` are in their model cards.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "examples" / "probe_lm"
DEFAULT_SAMPLE_DIR = REPO_ROOT / "peft_softmix" / "data" / "sample"

SPLITS = ("train", "dev", "test")
# Single-word objects, at most a few thousand facts each. P30 (continent) and P140 (religion) also work, but their
# majority object is right for most facts, and their facts cost pretraining time better spent on these.
PROBE_RELATIONS = ("P17", "P19", "P36", "P103", "P176", "P37")

# For each probe relation, two relations whose made-up facts its subjects also get. Objects are drawn from the
# real objects of that relation, so they have the right type (a place gets a region and a continent, a person a
# place of death and a citizenship).
ATTRIBUTE_DISTRACTORS = {
    "P17": ("P131", "P30"),
    "P19": ("P20", "P27"),
    "P36": ("P37", "P47"),
    "P103": ("P27", "P20"),
    "P176": ("P178", "P495"),
    "P37": ("P36", "P47"),
    "P140": ("P27", "P106"),
    "P30": ("P17", "P131"),
}
# Relations that contribute real facts of their own.
GENERAL_DISTRACTORS = ("P20", "P27", "P131", "P47", "P178", "P495", "P106", "P1412")

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


# --------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RelationTemplates:
    """The templates one relation has in each source file, in file order."""

    manual: str | None
    mined: tuple[str, ...]
    paraphrase: tuple[str, ...]


def template_key(template: str) -> str:
    """What two templates must share to count as the same prompt: case, whitespace and a final '.' are ignored."""
    return re.sub(r"\s+", "", template).rstrip(".").lower()


def first_distinct(templates: Iterable[str], n: int) -> list[str]:
    """The first ``n`` templates whose keys differ, in order."""
    seen: set[str] = set()
    out: list[str] = []
    for template in templates:
        key = template_key(template)
        if key in seen:
            continue
        seen.add(key)
        out.append(template)
        if len(out) == n:
            break
    return out


def load_templates(data_dir: Path) -> dict[str, RelationTemplates]:
    """Every relation's LAMA manual template and LPAQA mined / paraphrased templates from ``data_dir/templates``."""
    folder = Path(data_dir) / "templates"

    def read(name: str) -> dict[str, list[str]]:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass --data_dir pointing at the shared data folder.")
        by_relation: dict[str, list[str]] = defaultdict(list)
        with path.open(encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)
                    by_relation[record["relation"]].append(record["template"])
        return by_relation

    manual, mined, paraphrase = read("lama.jsonl"), read("lpaqa_mined.jsonl"), read("lpaqa_paraphrase.jsonl")
    relations = set(manual) | set(mined) | set(paraphrase)
    return {
        rel: RelationTemplates(
            manual=manual[rel][0] if manual.get(rel) else None,
            mined=tuple(mined.get(rel, ())),
            paraphrase=tuple(paraphrase.get(rel, ())),
        )
        for rel in sorted(relations)
    }


def held_out_templates(templates: RelationTemplates, n: int = 5) -> list[str]:
    """The prompts the benchmark uses for one relation: the manual template and the first ``n`` distinct mined and
    paraphrased ones. None of them may appear in the corpus."""
    chosen = ([templates.manual] if templates.manual else []) + first_distinct(templates.mined, n)
    chosen += first_distinct(templates.paraphrase, n)
    return first_distinct(chosen, len(chosen))


def corpus_templates(templates: RelationTemplates, held_out_keys: set[str]) -> list[str]:
    """The mined and paraphrased templates a relation's facts are rendered through: distinct, none held out."""
    usable = [t for t in templates.mined + templates.paraphrase if template_key(t) not in held_out_keys]
    return [t for t in first_distinct(usable, len(usable)) if t.count("[X]") == 1 and t.count("[Y]") == 1]


def fill(template: str, subject: str, obj: str) -> tuple[str, tuple[int, int]]:
    """``template`` with both slots filled, and the character span of the object in it."""
    text, span = "", (0, 0)
    for part in re.split(r"(\[X\]|\[Y\])", template):
        if part == "[X]":
            text += subject
        elif part == "[Y]":
            span = (len(text), len(text) + len(obj))
            text += obj
        else:
            text += part
    return text, span


@dataclass(frozen=True)
class Sentence:
    text: str
    object_span: tuple[int, int]
    kind: str  # "fact", "attribute" (made-up distractor) or "general" (real fact of another relation)
    relation: str
    template: str


def render_fact(
    subject: str,
    obj: str,
    relation: str,
    templates: Sequence[str],
    k: int,
    rng: random.Random,
    kind: str = "fact",
) -> list[Sentence]:
    """The fact written out through ``k`` of ``templates`` drawn without replacement (all of them if fewer)."""
    chosen = rng.sample(list(templates), min(k, len(templates)))
    sentences = []
    for template in chosen:
        text, span = fill(template, subject, obj)
        sentences.append(Sentence(text, span, kind, relation, template))
    return sentences


def read_facts(data_dir: Path, relation: str, splits: Sequence[str] = SPLITS) -> dict[str, list[tuple[str, str]]]:
    """(subject, object) pairs of ``trex/<relation>/<split>.jsonl`` per split, in file order."""
    out = {}
    for split in splits:
        path = Path(data_dir) / "trex" / relation / f"{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; pass --data_dir pointing at the shared data folder.")
        with path.open(encoding="utf-8") as handle:
            out[split] = [
                (rec["sub_label"], rec["obj_label"]) for rec in map(json.loads, handle) if rec["sub_label"].strip()
            ]
    return out


@dataclass
class Corpus:
    sentences: list[Sentence]
    facts: dict[str, dict[str, list[tuple[str, str]]]]  # probe relation -> split -> facts
    corpus_templates: dict[str, list[str]]  # every relation rendered -> its corpus templates
    held_out: dict[str, list[str]]  # probe relation -> held-out templates
    # probe relation -> the templates each fact (train, dev, test in file order) was rendered through
    fact_templates: dict[str, list[list[str]]] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)


def _words_of(pre_tokenize, text: str) -> list[str]:
    return [w for w, _ in pre_tokenize(text)]


def build_corpus(
    data_dir: Path,
    relations: Sequence[str] = PROBE_RELATIONS,
    templates_per_fact: int = 8,
    attribute_templates: int = 3,
    general_facts: int = 600,
    general_templates: int = 3,
    held_out: int = 5,
    seed: int = 0,
    pre_tokenize=None,
) -> Corpus:
    """All pretraining sentences. Deterministic for a given ``seed``.

    ``pre_tokenize`` (text -> [(word, span)]) lets the general distractors prefer facts whose words the corpus
    already has, which keeps the vocabulary (and so the model) small.
    """
    rng = random.Random(seed)
    all_templates = load_templates(data_dir)
    for rel in relations:
        if rel not in all_templates or all_templates[rel].manual is None:
            raise ValueError(f"Relation {rel} has no LAMA manual template in {data_dir}/templates/lama.jsonl.")
    held = {rel: held_out_templates(all_templates[rel], held_out) for rel in relations}
    held_keys = {template_key(t) for ts in held.values() for t in ts}
    distractor_relations = sorted(
        {r for rel in relations for r in ATTRIBUTE_DISTRACTORS.get(rel, ())} | set(GENERAL_DISTRACTORS)
    )
    used = sorted(set(relations) | set(distractor_relations))
    templates = {rel: corpus_templates(all_templates[rel], held_keys) for rel in used}
    for rel in used:
        if not templates[rel]:
            raise ValueError(f"Relation {rel} has no template left for the corpus once the held-out ones are removed.")

    facts = {rel: read_facts(data_dir, rel) for rel in used}
    known: dict[str, set[str]] = {rel: {s for split in facts[rel].values() for s, _ in split} for rel in used}
    objects = {rel: [o for split in facts[rel].values() for _, o in split] for rel in used}

    sentences: list[Sentence] = []
    fact_templates: dict[str, list[list[str]]] = {}
    counts: Counter = Counter()
    for rel in relations:
        fact_templates[rel] = []
        for split in SPLITS:
            for subject, obj in facts[rel][split]:
                rendered = render_fact(subject, obj, rel, templates[rel], templates_per_fact, rng)
                fact_templates[rel].append([s.template for s in rendered])
                sentences += rendered
                counts["fact"] += len(rendered)

    made_up: set[tuple[str, str]] = set()
    for rel in relations:
        subjects = list(dict.fromkeys(s for split in SPLITS for s, _ in facts[rel][split]))
        for subject in subjects:
            for other in ATTRIBUTE_DISTRACTORS.get(rel, ()):
                # A made-up fact never contradicts a real one: only subjects without a fact of that relation.
                if subject in known[other] or (subject, other) in made_up:
                    continue
                made_up.add((subject, other))
                obj = rng.choice(objects[other])
                rendered = render_fact(subject, obj, other, templates[other], attribute_templates, rng, "attribute")
                sentences += rendered
                counts["attribute"] += len(rendered)

    vocabulary: set[str] = set()
    if pre_tokenize is not None:
        for s in sentences:
            vocabulary.update(_words_of(pre_tokenize, s.text))
    for rel in GENERAL_DISTRACTORS:
        if rel in relations:
            continue
        pool = [f for split in SPLITS for f in facts[rel][split]]
        rng.shuffle(pool)
        if pre_tokenize is not None:
            pool.sort(key=lambda f: sum(w not in vocabulary for w in _words_of(pre_tokenize, f"{f[0]} {f[1]}")))
        for subject, obj in pool[:general_facts]:
            rendered = render_fact(subject, obj, rel, templates[rel], general_templates, rng, "general")
            sentences += rendered
            counts["general"] += len(rendered)
    return Corpus(
        sentences=sentences,
        facts={rel: facts[rel] for rel in relations},
        corpus_templates=templates,
        held_out=held,
        fact_templates=fact_templates,
        counts=counts,
    )


# --------------------------------------------------------------------------------------------------- tokenizer


def bert_pre_tokenizer():
    """The normaliser + pre-tokeniser of the cased BERT tokenizer built below, as one function text -> words."""
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    pre = pre_tokenizers.BertPreTokenizer()
    return lambda text: pre.pre_tokenize_str(normalizer.normalize_str(text))


def build_tokenizer(texts: Iterable[str], pre_tokenize):
    """A cased word-level BERT tokenizer: one id per word the texts contain, most frequent first."""
    from transformers import BertTokenizerFast

    counts: Counter = Counter()
    for text in texts:
        counts.update(_words_of(pre_tokenize, text))
    for special in SPECIAL_TOKENS:
        counts.pop(special, None)
    words = sorted(counts, key=lambda w: (-counts[w], w))
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + words)}
    # transformers 5 ignores vocab_file= here; the dict is the vocabulary of a WordPiece model with no '##' pieces,
    # so a word is either one token or [UNK].
    return BertTokenizerFast(vocab=vocab, do_lower_case=False, strip_accents=False, tokenize_chinese_chars=True)


# --------------------------------------------------------------------------------------------------- training


def encode_sentences(tokenizer, sentences: Sequence[Sentence], max_length: int):
    """Token ids of each sentence and the position of its object token (-1 if the object is not one token)."""
    import torch

    ids_out, obj_out = [], []
    skipped = 0
    batch = 4096
    for start in range(0, len(sentences), batch):
        chunk = sentences[start : start + batch]
        enc = tokenizer([s.text for s in chunk], return_offsets_mapping=True)
        for sentence, ids, offsets in zip(chunk, enc["input_ids"], enc["offset_mapping"]):
            if len(ids) > max_length:
                skipped += 1
                continue
            position = -1
            for i, (a, b) in enumerate(offsets):
                if (a, b) == sentence.object_span and ids[i] != tokenizer.unk_token_id:
                    position = i
                    break
            ids_out.append(torch.tensor(ids, dtype=torch.long))
            obj_out.append(position)
    return ids_out, obj_out, skipped


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar-length sentences (less padding); every sentence once."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    group = batch_size * 50
    for start in range(0, len(order), group):
        chunk = sorted(order[start : start + group], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def mask_batch(ids, object_positions, tokenizer, generator, object_rate: float, token_rate: float):
    """BERT masking plus the object: returns (inputs, target positions as a bool mask)."""
    import torch

    special = (ids == tokenizer.pad_token_id) | (ids == tokenizer.cls_token_id) | (ids == tokenizer.sep_token_id)
    chosen = (torch.rand(ids.shape, generator=generator) < token_rate) & ~special
    inputs = ids.clone()
    roll = torch.rand(ids.shape, generator=generator)
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    random_tokens = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), ids.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_tokens[swap]
    rows = torch.arange(ids.shape[0])
    has_object = object_positions >= 0
    take_object = has_object & (torch.rand(ids.shape[0], generator=generator) < object_rate)
    rows, cols = rows[take_object], object_positions[take_object]
    # The object is always shown as [MASK]: that is how the model is queried afterwards.
    inputs[rows, cols] = tokenizer.mask_token_id
    chosen[rows, cols] = True
    return inputs, chosen


def masked_loss(model, inputs, attention_mask, targets, chosen):
    import torch.nn.functional as F

    hidden = model.bert(input_ids=inputs, attention_mask=attention_mask).last_hidden_state
    # The vocabulary projection dominates the cost; only the masked positions need it.
    logits = model.cls(hidden[chosen])
    return F.cross_entropy(logits, targets[chosen])


def predict_masked(model, tokenizer, texts: Sequence[str], batch_size: int = 512) -> list[int]:
    """The top-1 token id at the (first) [MASK] of each text."""
    import torch

    preds: list[int] = []
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(
                model.device
            )
            is_mask = enc["input_ids"] == tokenizer.mask_token_id
            first = is_mask & (is_mask.cumsum(dim=1) == 1)
            hidden = model.bert(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            preds += model.cls(hidden[first]).argmax(-1).tolist()
    return preds


def precision_at_1(model, tokenizer, template: str, facts: Sequence[tuple[str, str]]) -> float:
    texts = [fill(template, s, tokenizer.mask_token)[0] for s, _ in facts]
    preds = predict_masked(model, tokenizer, texts)
    gold = tokenizer.convert_tokens_to_ids([o for _, o in facts])
    return sum(p == g for p, g in zip(preds, gold)) / max(len(facts), 1)


def corpus_recall(model, tokenizer, corpus: Corpus, relation: str, indices: Sequence[int] | None = None) -> float:
    """How often the model restores the object of a corpus sentence of ``relation`` (the first one written for
    each fact)."""
    facts = [f for split in SPLITS for f in corpus.facts[relation][split]]
    if indices is None:
        indices = range(len(facts))
    texts = [fill(corpus.fact_templates[relation][i][0], facts[i][0], tokenizer.mask_token)[0] for i in indices]
    gold = tokenizer.convert_tokens_to_ids([facts[i][1] for i in indices])
    preds = predict_masked(model, tokenizer, texts)
    return sum(p == g for p, g in zip(preds, gold)) / max(len(gold), 1)


# --------------------------------------------------------------------------------------------------- outputs


def write_data_sample(data_dir: Path, sample_dir: Path, relations: Sequence[str]) -> None:
    """Copy the probe relations' T-REx splits and templates, unchanged, into the package's data sample."""
    data_dir, sample_dir = Path(data_dir), Path(sample_dir)
    for sub in ("trex", "templates", "vocab"):
        if (sample_dir / sub).exists():
            shutil.rmtree(sample_dir / sub)
    for rel in relations:
        (sample_dir / "trex" / rel).mkdir(parents=True, exist_ok=True)
        for split in SPLITS:
            shutil.copyfile(data_dir / "trex" / rel / f"{split}.jsonl", sample_dir / "trex" / rel / f"{split}.jsonl")
    (sample_dir / "templates").mkdir(parents=True)
    wanted = set(relations)
    for name in ("lama.jsonl", "lpaqa_mined.jsonl", "lpaqa_paraphrase.jsonl"):
        with (data_dir / "templates" / name).open(encoding="utf-8") as src:
            lines = [line for line in src if line.strip() and json.loads(line)["relation"] in wanted]
        (sample_dir / "templates" / name).write_text("".join(lines), encoding="utf-8")
    (sample_dir / "vocab").mkdir(parents=True)
    shutil.copyfile(data_dir / "vocab" / "common_vocab_cased.txt", sample_dir / "vocab" / "common_vocab_cased.txt")
    (sample_dir / "README.md").write_text(SAMPLE_README.format(relations=", ".join(relations)), encoding="utf-8")


SAMPLE_README = """\
# Data sample shipped with peft_softmix

A small slice of the LAMA / T-REx data, enough to run the examples and tests offline with the probe LM in
`examples/probe_lm/`. Relations: {relations}. Written by `scripts/build_probe_lm.py` from the project's shared
data snapshot; every line is copied unchanged (the template files keep only the lines of these relations).

- `trex/<rel>/{{train,dev,test}}.jsonl`: AutoPrompt's "original" T-REx split (Shin et al. 2020; test = the LAMA
  T-REx test facts of Petroni et al. 2019), without the bulky `evidences` field. Source:
  salesforce/FactLM@e631878 `data/LAMA/fact-retrieval/original/`. The test files of P17, P30, P36 and P37 are
  too large in that snapshot and were rebuilt from hiaoxui/soft-prompts@eb9047e `db/trex_original/` (same facts,
  same order; lines hold only `sub_label`, `obj_label`, `predicate_id`). Licences: FactLM BSD-3-Clause;
  AutoPrompt (ucinlp/autoprompt) Apache-2.0; LAMA facts CC BY-NC 4.0.
- `templates/lama.jsonl`: LAMA's manual template per relation. Source: princeton-nlp/OptiPrompt@9450bc9
  `relation_metainfo/LAMA_relations.jsonl` (= LAMA `data/relations.jsonl`). Licences: OptiPrompt MIT; LAMA
  CC BY-NC 4.0.
- `templates/lpaqa_mined.jsonl`, `templates/lpaqa_paraphrase.jsonl`: LPAQA's mined and paraphrased templates
  (Jiang et al. 2020), the files `prompt/mine/<rel>.jsonl` and `prompt/paraphrase/<rel>.jsonl` of
  jzbjyb/LPAQA@3204221 merged, with a `relation` field put first. The LPAQA repository states no licence.
- `vocab/common_vocab_cased.txt`: LAMA's cased common vocabulary (21,018 tokens). Source: OptiPrompt@9450bc9
  `common_vocabs/common_vocab_cased.txt`. Licences: OptiPrompt MIT; from LAMA, CC BY-NC 4.0.

Because of the LAMA facts (CC BY-NC 4.0) this sample is for non-commercial research and testing.
"""


def write_model_card(out_dir: Path, info: dict) -> None:
    columns = (
        "corpus_recall",
        "majority_test_p1",
        "manual_test_p1",
        "held_out_mined_mean_test_p1",
        "held_out_mined_best_test_p1",
        "held_out_paraphrase_mean_test_p1",
        "held_out_paraphrase_best_test_p1",
    )
    rows = info["relations"]
    rel_rows = "\n".join(
        f"| {r['relation']} | {r['label']} | {r['facts']} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |"
        for r in rows
    )
    rel_rows += "\n| mean | | " + str(sum(r["facts"] for r in rows)) + " | "
    rel_rows += " | ".join(f"{sum(r[c] for r in rows) / len(rows):.3f}" for c in columns) + " |"
    held_rows = "\n".join(
        f"| {r['relation']} | " + " <br> ".join(f"`{t}`" for t in r["held_out_templates"]) + " |"
        for r in info["relations"]
    )
    card = MODEL_CARD.format(
        relations=", ".join(r["relation"] for r in info["relations"]),
        rel_rows=rel_rows,
        held_rows=held_rows,
        unseen_words=", ".join(f"`{w}`" for w in info["corpus"]["unseen_prompt_words"]) or "none",
        train_cpu_minutes=info["training"]["train_cpu_seconds"] / 60,
        **{k: v for k, v in info.items() if k != "relations"},
        **{k: v for k, v in info["corpus"].items()},
        **{k: v for k, v in info["model"].items()},
        **{k: v for k, v in info["training"].items()},
    )
    (out_dir / "README.md").write_text(card, encoding="utf-8")


MODEL_CARD = """\
---
language: en
license: cc-by-nc-4.0
library_name: transformers
pipeline_tag: fill-mask
tags:
  - probe-lm
  - lama
  - synthetic
---

# probe_lm: a tiny masked LM that knows some T-REx facts

**What it is.** A 2-layer, 128-wide `BertForMaskedLM` ({parameters:,} parameters, {safetensors_mb:.1f} MB of
safetensors) with a cased word-level tokenizer ({vocab_size:,} tokens), trained from scratch *in this repository*
on sentences generated from T-REx facts. It exists so that `peft_softmix` can demonstrate and test soft prompts
offline, where no pretrained English LM is available. It is **not a general language model**: it has seen only
short template sentences, knows nothing beyond the facts below, and its scores say nothing about BERT or any
real LM.

**Relations:** {relations}. The model saw every fact of these relations, the test split included (as BERT saw
the LAMA test facts in Wikipedia). Train prompts on the train split only.

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained("examples/probe_lm")
tokenizer = AutoTokenizer.from_pretrained("examples/probe_lm")
```

## How it was trained

- Corpus: {sentences:,} sentences, {mean_tokens:.1f} tokens long on average:
  - {fact:,} sentences: every probe fact through {templates_per_fact} LPAQA mined / paraphrased templates
    of its relation, drawn at random;
  - {attribute:,} sentences of *attribute distractors*: each probe subject also gets a made-up fact of
    two other relations, with a random object of the right type (drawn from that relation's real objects),
    through {attribute_templates} templates each. Without them each subject has one fact and any question
    retrieves it. Pairs: {attribute_pairs};
  - {general:,} sentences of *general distractors*: {general_facts} real facts from each of
    {general_relations}, through {general_templates} templates each.
- **Held out of the corpus**, so that every prompt the benchmark uses is a plausible but imperfect question:
  for each relation the LAMA manual template and the first {held_out_n} distinct templates (file order) of
  LPAQA's mined list and of its paraphrase list. Templates are compared up to case, whitespace and a final
  "."; a held-out template is used for no relation at all. They are listed below and in `build_info.json`.
- Masking: the object, always as `[MASK]`, in {object_rate:.0%} of the sentences, plus {token_rate:.0%} of all
  tokens with BERT's 80/10/10 scheme; loss only at masked positions.
- {steps:,} steps of batch {batch_size} ({epochs} epochs), AdamW lr {lr}, {warmup} warm-up steps then
  linear decay, seed {seed}, {threads} CPU thread(s), no dropout.

Build command, from the repository root (deterministic for a given seed, thread count and torch version):

```
{command}
```

Measured on the project's 2-core CPU machine: the pretraining took {train_cpu_seconds:.0f} s of CPU time
({train_cpu_minutes:.1f} min: about its wall time on an idle machine). The machine was shared with other jobs at
the time (load average {load_average}), so the wall time was {train_seconds:.0f} s for the pretraining
({seconds_per_step:.2f} s/step) and {build_seconds:.0f} s for the whole build.

## What it knows

P@1 over the full vocabulary. *Corpus recall*: all facts of the relation (train + dev + test), each through the
first corpus sentence written for it. The other columns are on the test split; *majority*: always the most frequent
train object; *mined* / *para.*: the held-out LPAQA mined / paraphrased templates, mean and best over them.

| relation | label | facts | corpus recall | majority | manual | mined mean | mined best | para. mean | para. best |
|---|---|---|---|---|---|---|---|---|---|
{rel_rows}

## Held-out templates

| relation | templates never in the corpus |
|---|---|
{held_rows}

Words of these prompts that occur nowhere in the corpus are in the vocabulary (no `[UNK]`) but keep their random
initial embeddings: {unseen_words}.

## Data and licences

Facts and templates come from the project's shared data snapshot (also shipped, for these relations, in
`peft_softmix/data/sample/`):

- T-REx split (AutoPrompt's "original" split, via salesforce/FactLM@e631878; some test files via
  hiaoxui/soft-prompts@eb9047e): FactLM BSD-3-Clause; AutoPrompt Apache-2.0.
- LAMA facts and manual templates (Petroni et al. 2019): CC BY-NC 4.0 (non-commercial). Treat this model,
  trained on those facts, as non-commercial research and test material too.
- LPAQA mined and paraphrased templates (Jiang et al. 2020, jzbjyb/LPAQA@3204221): the LPAQA repository states no
  licence.
"""


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=DEFAULT_DATA_DIR, help="shared data folder")
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--sample_dir", type=Path, default=DEFAULT_SAMPLE_DIR, help="where the data sample goes")
    parser.add_argument("--no_sample", action="store_true", help="do not (re)write the data sample")
    parser.add_argument("--relations", nargs="+", default=list(PROBE_RELATIONS))
    parser.add_argument("--held_out", type=int, default=5, help="first N distinct mined, paraphrased held out")
    parser.add_argument("--templates_per_fact", type=int, default=8)
    parser.add_argument("--attribute_templates", type=int, default=3)
    parser.add_argument("--general_facts", type=int, default=600)
    parser.add_argument("--general_templates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4500)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--object_rate", type=float, default=0.9)
    parser.add_argument("--token_rate", type=float, default=0.15)
    parser.add_argument("--max_length", type=int, default=32, help="positions; longer sentences are dropped")
    parser.add_argument("--max_vocab", type=int, default=20000, help="refuse a larger vocabulary (model size)")
    parser.add_argument(
        "--tokenizer",
        choices=("word", "subword"),
        default="word",
        help="word: one token per corpus word (every object one token); subword: WordPiece of --vocab_size pieces "
        "trained on the corpus, so that many objects are several tokens",
    )
    parser.add_argument("--vocab_size", type=int, default=1500, help="WordPiece vocabulary with --tokenizer subword")
    parser.add_argument(
        "--architecture",
        choices=("masked", "causal"),
        default="masked",
        help="masked: BertForMaskedLM; causal: GPT2LMHeadModel trained by next-token prediction (needs subword)",
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=512, help="feed-forward width")
    parser.add_argument(
        "--eval_facts",
        type=int,
        default=0,
        help="check recall and test P@1 on this many facts per relation (a fixed random sample); 0: all",
    )
    parser.add_argument("--eval_every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu for the committed build; cuda only to try settings")
    parser.add_argument("--dry_run", action="store_true", help="build corpus and tokenizer, time 20 steps, stop")
    parser.add_argument("--card_only", action="store_true", help="rewrite README.md from build_info.json, stop")
    return parser.parse_args(argv)


# Flags that decide where files go or what is printed, not what model comes out.
_OUTPUT_FLAGS = {"data_dir", "output_dir", "sample_dir", "no_sample", "eval_every", "dry_run", "card_only", "device"}
# Flags that shape the model only with another tokenizer or architecture than the word-level masked LM.
_VARIANT_FLAGS = {"vocab_size"}


def model_flags(args: argparse.Namespace) -> str:
    """The command-line flags, other than the defaults and output paths, that rebuild this model."""
    defaults = vars(parse_args([]))
    flags = ""
    for name, value in vars(args).items():
        shown_anyway = name in _VARIANT_FLAGS and args.tokenizer != "word"
        if name in _OUTPUT_FLAGS or (value == defaults[name] and not shown_anyway):
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        flags += f" --{name} {shown}"
    return flags


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    start_time = time.time()
    word, causal = args.tokenizer == "word", args.architecture == "causal"
    if causal and word:
        sys.exit("--architecture causal needs --tokenizer subword (a decoder needs <s>, </s> and <pad> tokens).")
    if args.card_only:
        info = json.loads((args.output_dir / "build_info.json").read_text(encoding="utf-8"))
        if info.get("tokenizer", "word") == "word":
            write_model_card(args.output_dir, info)
        else:
            _multitoken().write_model_card(args.output_dir, info)
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer, BertConfig, BertForMaskedLM

    data_dir = args.data_dir.resolve()
    if not (data_dir / "trex").is_dir():
        sys.exit(f"{data_dir} has no trex/ folder; pass --data_dir pointing at the shared data folder.")
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    pre_tokenize = bert_pre_tokenizer()
    corpus = build_corpus(
        data_dir,
        args.relations,
        templates_per_fact=args.templates_per_fact,
        attribute_templates=args.attribute_templates,
        general_facts=args.general_facts,
        general_templates=args.general_templates,
        held_out=args.held_out,
        seed=args.seed,
        pre_tokenize=pre_tokenize,
    )
    all_templates = load_templates(data_dir)
    # The held-out prompts must still tokenize into real words (not [UNK]), so their words join the vocabulary.
    prompt_texts = [
        t.replace("[X]", " ").replace("[Y]", " ")
        for rel in args.relations
        for t in (all_templates[rel].manual,) + all_templates[rel].mined + all_templates[rel].paraphrase
    ]
    if word:
        tokenizer = build_tokenizer([s.text for s in corpus.sentences] + prompt_texts, pre_tokenize)
    else:
        mt = _multitoken()
        pieces = mt.train_wordpiece([s.text for s in corpus.sentences] + prompt_texts, args.vocab_size)
        tokenizer = mt.causal_subword_tokenizer(pieces) if causal else mt.masked_subword_tokenizer(pieces)
    vocab_size = len(tokenizer)
    print(f"corpus: {len(corpus.sentences):,} sentences {dict(corpus.counts)}; vocabulary {vocab_size:,}", flush=True)
    if vocab_size > args.max_vocab:
        sys.exit(f"Vocabulary of {vocab_size} words exceeds --max_vocab {args.max_vocab}; lower --general_facts.")
    corpus_words = Counter(w for s in corpus.sentences for w in _words_of(pre_tokenize, s.text))
    unseen_prompt_words = sorted({w for t in prompt_texts for w in _words_of(pre_tokenize, t)} - set(corpus_words))
    print(f"prompt words never in the corpus (untrained embeddings): {unseen_prompt_words}", flush=True)

    candidates = {}
    for rel in args.relations:
        objs = {o for split in corpus.facts[rel].values() for _, o in split}
        if not word:
            candidates[rel] = mt.Candidates(tokenizer, objs)
            continue
        bad = [o for o in objs if len(tokenizer.tokenize(" " + o)) != 1 or tokenizer.tokenize(" " + o)[0] != o]
        if bad:
            sys.exit(f"Objects of {rel} that are not one token: {bad[:10]}")
    if not word:
        test_objects = {rel: [o for _, o in corpus.facts[rel]["test"]] for rel in args.relations}
        multi = {rel: c.multi_token_fraction(test_objects[rel]) for rel, c in candidates.items()}
        n_test = {rel: len(corpus.facts[rel]["test"]) for rel in args.relations}
        overall = sum(multi[r] * n_test[r] for r in args.relations) / sum(n_test.values())
        print(
            f"test facts with a multi-token object: {overall:.3f} overall; "
            + " ".join(f"{rel} {f:.2f}" for rel, f in multi.items()),
            flush=True,
        )

    if word:
        ids, object_positions, skipped = encode_sentences(tokenizer, corpus.sentences, args.max_length)
        object_ends = [p + 1 for p in object_positions]
    else:
        ids, object_positions, object_ends, skipped = mt.encode_object_spans(
            tokenizer,
            [s.text for s in corpus.sentences],
            [s.object_span for s in corpus.sentences],
            args.max_length,
            eos=tokenizer.eos_token_id if causal else None,
        )
    lengths = [len(x) for x in ids]
    no_object = sum(p < 0 for p in object_positions)
    print(
        f"encoded {len(ids):,} sentences (mean {sum(lengths) / len(lengths):.1f} tokens with special tokens, max "
        f"{max(lengths)}); {skipped} longer than {args.max_length} dropped; {no_object} without a whole-token object",
        flush=True,
    )

    if causal:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=vocab_size,
            n_positions=args.max_length,
            n_embd=args.hidden,
            n_layer=args.layers,
            n_head=args.heads,
            n_inner=args.intermediate,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = GPT2LMHeadModel(config).to(args.device)
    else:
        config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            intermediate_size=args.intermediate,
            max_position_embeddings=args.max_length,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            type_vocab_size=2,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = BertForMaskedLM(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=args.lr
    )
    steps = 20 if args.dry_run else args.steps

    def lr_lambda(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        return max(0.0, (steps - step) / max(1, steps - args.warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    generator = torch.Generator().manual_seed(args.seed)
    batch_rng = random.Random(args.seed + 1)
    pad = tokenizer.pad_token_id
    eval_rng = random.Random(args.seed + 2)
    quick_eval = {rel: eval_rng.sample(range(len(corpus.fact_templates[rel])), 250) for rel in args.relations}

    def recall_sample() -> str:
        if word:
            recalls = {rel: corpus_recall(model, tokenizer, corpus, rel, idx) for rel, idx in quick_eval.items()}
        else:
            recalls = {
                rel: ranked_corpus_recall(model, tokenizer, corpus, rel, candidates[rel], idx[:50])
                for rel, idx in quick_eval.items()
            }
        model.train()
        mean = sum(recalls.values()) / len(recalls)
        return f"{mean:.3f} (" + " ".join(f"{rel} {r:.2f}" for rel, r in recalls.items()) + ")"

    object_tensor, end_tensor = torch.tensor(object_positions), torch.tensor(object_ends)
    specials = tokenizer.all_special_ids
    train_start, train_cpu_start = time.time(), time.process_time()
    model.train()
    step, epoch, batches = 0, 0, []
    running = 0.0
    while step < steps:
        if not batches:
            batches = length_bucketed_batches(lengths, args.batch_size, batch_rng)
            epoch += 1
        index = batches.pop()
        batch_ids = torch.nn.utils.rnn.pad_sequence([ids[i] for i in index], batch_first=True, padding_value=pad)
        attention = (batch_ids != pad).long()
        to = args.device
        if causal:
            loss = mt.causal_loss(model, batch_ids.to(to), attention.to(to))
        else:
            if word:
                inputs, chosen = mask_batch(
                    batch_ids, object_tensor[index], tokenizer, generator, args.object_rate, args.token_rate
                )
            else:
                inputs, chosen = mt.mask_whole_object(
                    batch_ids,
                    object_tensor[index],
                    end_tensor[index],
                    special_ids=specials,
                    mask_id=tokenizer.mask_token_id,
                    first_regular_id=len(mt.MASKED_SPECIAL_TOKENS),
                    vocab_size=vocab_size,
                    generator=generator,
                    object_rate=args.object_rate,
                    token_rate=args.token_rate,
                )
            loss = masked_loss(model, inputs.to(to), attention.to(to), batch_ids.to(to), chosen.to(to))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        running += loss.item()
        if step % 100 == 0 or args.dry_run:
            elapsed = time.time() - train_start
            print(
                f"step {step}/{steps} epoch {epoch} loss {running / (100 if step % 100 == 0 else 1):.3f} "
                f"{elapsed:.0f}s ({elapsed / step:.3f} s/step)",
                flush=True,
            )
            running = 0.0
        if step % args.eval_every == 0 and not args.dry_run:
            print(f"  recall, {250 if word else 50} facts per relation: {recall_sample()}", flush=True)
    train_seconds = time.time() - train_start
    train_cpu_seconds = time.process_time() - train_cpu_start
    if args.dry_run:
        print(f"dry run: {train_seconds / steps:.3f} s/step", flush=True)
        return

    out_dir = args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "pytorch_model.bin"):
        (out_dir / stale).unlink(missing_ok=True)
    model.to("cpu").save_pretrained(out_dir)
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)

    # Reload as a user would, and check that the tokenizer round-trips.
    model = (AutoModelForCausalLM if causal else AutoModelForMaskedLM).from_pretrained(out_dir).to(args.device)
    built_tokenizer, tokenizer = tokenizer, AutoTokenizer.from_pretrained(out_dir)
    check = [s.text for s in corpus.sentences[::97]] + prompt_texts
    reloaded = tokenizer(check)["input_ids"]
    if reloaded != built_tokenizer(check)["input_ids"] or any(tokenizer.unk_token_id in x for x in reloaded):
        sys.exit(f"The tokenizer saved in {out_dir} does not reload as built (words became [UNK] or ids moved).")

    labels = {rel: t for rel, t in _lama_labels(data_dir).items()}
    variant_info: dict = {}
    rows = []
    if not word:
        # the reloaded tokenizer, as a user would have it
        candidates = {rel: mt.Candidates(tokenizer, c.objects) for rel, c in candidates.items()}
        rows = ranked_rows(model, tokenizer, corpus, all_templates, candidates, labels, args)
        variant_info = {
            "tokenizer": args.tokenizer,
            "architecture": args.architecture,
            "eval_facts": args.eval_facts,
            "multi_token_test_fraction": overall,
        }
    if word:
        print("\nrelation  facts  corpus-recall  majority  manual  mined(mean/best)  paraphrase(mean/best)")
    for rel in args.relations if word else ():
        test = corpus.facts[rel]["test"]
        train_objects = Counter(o for _, o in corpus.facts[rel]["train"])
        majority = train_objects.most_common(1)[0][0]
        majority_p1 = sum(o == majority for _, o in test) / len(test)
        recall = corpus_recall(model, tokenizer, corpus, rel)
        held = corpus.held_out[rel]
        manual = all_templates[rel].manual
        manual_p1 = precision_at_1(model, tokenizer, manual, test)
        mined_held = [t for t in held if t in first_distinct(all_templates[rel].mined, args.held_out)]
        para_held = [t for t in held if t in first_distinct(all_templates[rel].paraphrase, args.held_out)]
        mined_p1 = [precision_at_1(model, tokenizer, t, test) for t in mined_held]
        para_p1 = [precision_at_1(model, tokenizer, t, test) for t in para_held]
        row = {
            "relation": rel,
            "label": labels.get(rel, ""),
            "facts": sum(len(v) for v in corpus.facts[rel].values()),
            "test_facts": len(test),
            "corpus_recall": recall,
            "majority_test_p1": majority_p1,
            "manual_template": manual,
            "manual_test_p1": manual_p1,
            "held_out_templates": held,
            "held_out_mined_test_p1": dict(zip(mined_held, mined_p1)),
            "held_out_paraphrase_test_p1": dict(zip(para_held, para_p1)),
            "held_out_mined_mean_test_p1": sum(mined_p1) / max(len(mined_p1), 1),
            "held_out_mined_best_test_p1": max(mined_p1, default=0.0),
            "held_out_paraphrase_mean_test_p1": sum(para_p1) / max(len(para_p1), 1),
            "held_out_paraphrase_best_test_p1": max(para_p1, default=0.0),
            "corpus_templates": corpus.corpus_templates[rel],
        }
        rows.append(row)
        print(
            f"{rel:8s} {row['facts']:6d}  {recall:13.3f}  {majority_p1:8.3f}  {manual_p1:6.3f}  "
            f"{row['held_out_mined_mean_test_p1']:.3f}/{row['held_out_mined_best_test_p1']:.3f}        "
            f"{row['held_out_paraphrase_mean_test_p1']:.3f}/{row['held_out_paraphrase_best_test_p1']:.3f}",
            flush=True,
        )
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("corpus_recall", "majority_test_p1", "manual_test_p1")}
    print(
        f"mean     corpus recall {mean['corpus_recall']:.3f}  majority {mean['majority_test_p1']:.3f}  "
        f"manual {mean['manual_test_p1']:.3f}"
    )

    safetensors_mb = (out_dir / "model.safetensors").stat().st_size / 2**20
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    command = f"OMP_NUM_THREADS={threads} python scripts/build_probe_lm.py" + model_flags(args)
    info = {
        "description": f"Tiny {type(model).__name__} trained in this repository on sentences generated from T-REx "
        "facts (offline demos and tests; not a general language model).",
        "command": command,
        "seed": args.seed,
        "build_seconds": round(time.time() - start_time, 1),
        "load_average": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "corpus": {
            "sentences": len(ids),
            "mean_tokens": sum(lengths) / len(lengths) - 2,
            "fact": corpus.counts["fact"],
            "attribute": corpus.counts["attribute"],
            "general": corpus.counts["general"],
            "templates_per_fact": args.templates_per_fact,
            "attribute_templates": args.attribute_templates,
            "attribute_pairs": ", ".join(
                f"{r}->{'/'.join(ATTRIBUTE_DISTRACTORS[r])}" for r in args.relations if r in ATTRIBUTE_DISTRACTORS
            ),
            "general_facts": args.general_facts,
            "general_relations": ", ".join(GENERAL_DISTRACTORS),
            "general_templates": args.general_templates,
            "held_out_n": args.held_out,
            "unseen_prompt_words": unseen_prompt_words,
        },
        "model": {
            "parameters": n_params,
            "safetensors_mb": safetensors_mb,
            "vocab_size": vocab_size,
            "layers": config.num_hidden_layers,
            "hidden": config.hidden_size,
            "max_position_embeddings": config.max_position_embeddings,
        },
        **variant_info,
        "training": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "warmup": args.warmup,
            "object_rate": args.object_rate,
            "token_rate": args.token_rate,
            "threads": threads,
            "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / args.steps, 3),
            # CPU time of this process: what the pretraining costs on an otherwise idle machine (one thread)
            "train_cpu_seconds": round(train_cpu_seconds, 1),
            "epochs": round(args.steps * args.batch_size / len(ids), 2),
        },
        "relations": rows,
    }
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if word:
        write_model_card(out_dir, info)
    else:
        mt.write_model_card(out_dir, info)
    if not args.no_sample:
        write_data_sample(data_dir, args.sample_dir, args.relations)
    print(f"wrote {out_dir} ({safetensors_mb:.1f} MB safetensors) in {time.time() - start_time:.0f} s", flush=True)


def _multitoken():
    """The sibling module with the subword / causal parts (scripts/ is not a package)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import probe_lm_multitoken

    return probe_lm_multitoken


def _sample(n: int, k: int, seed: int) -> list[int]:
    """A fixed random sample of ``k`` of ``range(n)`` in order, or all of it when ``k`` is 0 or at least ``n``."""
    return sorted(random.Random(seed).sample(range(n), k)) if 0 < k < n else list(range(n))


def ranked_corpus_recall(model, tokenizer, corpus: Corpus, relation: str, candidates, indices=None) -> float:
    """Recall@1 of the relation's facts (the first corpus sentence written for each) by ranking the candidates."""
    mt = _multitoken()
    facts = [f for split in SPLITS for f in corpus.facts[relation][split]]
    indices = range(len(facts)) if indices is None else indices
    texts = [fill(corpus.fact_templates[relation][i][0], facts[i][0], mt.SLOT)[0] for i in indices]
    preds = mt.rank(model, tokenizer, texts, candidates)
    return sum(p == facts[i][1] for p, i in zip(preds, indices)) / max(len(texts), 1)


def ranked_p1(model, tokenizer, template: str, facts: Sequence[tuple[str, str]], candidates) -> float:
    mt = _multitoken()
    preds = mt.rank(model, tokenizer, [fill(template, s, mt.SLOT)[0] for s, _ in facts], candidates)
    return sum(p == o for p, (_, o) in zip(preds, facts)) / max(len(facts), 1)


def ranked_rows(model, tokenizer, corpus: Corpus, all_templates, candidates, labels, args) -> list[dict]:
    """What the subword / causal probe LM knows: the relation rows of build_info.json, by candidate ranking."""
    rows = []
    print("\nrelation  facts  multi-token  corpus-recall  majority  manual  mined(mean/best)  paraphrase(mean/best)")
    for rel in args.relations:
        facts = [f for split in SPLITS for f in corpus.facts[rel][split]]
        test_all = corpus.facts[rel]["test"]
        test = [test_all[i] for i in _sample(len(test_all), args.eval_facts, args.seed + 3)]
        recall_idx = _sample(len(facts), args.eval_facts, args.seed + 4)
        recall = ranked_corpus_recall(model, tokenizer, corpus, rel, candidates[rel], recall_idx)
        majority = Counter(o for _, o in corpus.facts[rel]["train"]).most_common(1)[0][0]
        manual = all_templates[rel].manual
        held = corpus.held_out[rel]
        mined_held = [t for t in held if t in first_distinct(all_templates[rel].mined, args.held_out)]
        para_held = [t for t in held if t in first_distinct(all_templates[rel].paraphrase, args.held_out)]
        p1 = {t: ranked_p1(model, tokenizer, t, test, candidates[rel]) for t in dict.fromkeys([manual, *held])}
        mined_p1, para_p1 = [p1[t] for t in mined_held], [p1[t] for t in para_held]
        row = {
            "relation": rel,
            "label": labels.get(rel, ""),
            "facts": len(facts),
            "test_facts": len(test_all),
            "evaluated_test_facts": len(test),
            "evaluated_corpus_facts": len(recall_idx),
            "candidates": len(candidates[rel].objects),
            "multi_token_test_fraction": candidates[rel].multi_token_fraction([o for _, o in test_all]),
            "corpus_recall": recall,
            "majority_test_p1": sum(o == majority for _, o in test) / len(test),
            "manual_template": manual,
            "manual_test_p1": p1[manual],
            "manual_test_p1_multi_token": _p1_multi(model, tokenizer, manual, test, candidates[rel]),
            "held_out_templates": held,
            "held_out_mined_test_p1": dict(zip(mined_held, mined_p1)),
            "held_out_paraphrase_test_p1": dict(zip(para_held, para_p1)),
            "held_out_mined_mean_test_p1": sum(mined_p1) / max(len(mined_p1), 1),
            "held_out_mined_best_test_p1": max(mined_p1, default=0.0),
            "held_out_paraphrase_mean_test_p1": sum(para_p1) / max(len(para_p1), 1),
            "held_out_paraphrase_best_test_p1": max(para_p1, default=0.0),
            "corpus_templates": corpus.corpus_templates[rel],
        }
        rows.append(row)
        print(
            f"{rel:8s} {row['facts']:6d}  {row['multi_token_test_fraction']:11.2f}  {recall:13.3f}  "
            f"{row['majority_test_p1']:8.3f}  {row['manual_test_p1']:6.3f}  "
            f"{row['held_out_mined_mean_test_p1']:.3f}/{row['held_out_mined_best_test_p1']:.3f}        "
            f"{row['held_out_paraphrase_mean_test_p1']:.3f}/{row['held_out_paraphrase_best_test_p1']:.3f}",
            flush=True,
        )
    return rows


def _p1_multi(model, tokenizer, template: str, facts, candidates) -> float | None:
    """P@1 on the facts whose object is several tokens (None if there are none)."""
    multi = [f for f in facts if len(candidates.pieces[candidates.index[f[1]]]) > 1]
    return ranked_p1(model, tokenizer, template, multi, candidates) if multi else None


def _lama_labels(data_dir: Path) -> dict[str, str]:
    with (Path(data_dir) / "templates" / "lama.jsonl").open(encoding="utf-8") as handle:
        return {rec["relation"]: rec.get("label", "") for rec in map(json.loads, handle)}


if __name__ == "__main__":
    main()
