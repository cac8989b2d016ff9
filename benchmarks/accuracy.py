"""Accuracy of mixtures of soft prompts against their peers, on one model and one data set (Qin & Eisner, Table 1).

Every method is trained on the train facts of each relation, picked by dev P@1 and scored on the test facts:

- the paper's grid, through the library's training loop (``peft_softmix.training.train_relation``, the loop of
  ``examples/train_trex.py``):
  initialisation (``manual``, ``mined``, ``paraphrase``, ``random``) x (the hard prompt -> soft -> deep), as a
  single prompt and as a mixture of K. The manual mixture is LAMA's template plus LPAQA's manual paraphrases
  (``lpaqa_manual_paraphrase.jsonl``) where the templates folder has them, else plus LPAQA's paraphrases (the
  shipped sample has no manual paraphrases); a mined or paraphrase mixture is the first K templates of that
  source; ``random`` keeps the layout of the manual template (single) or of the K mined ones (mixture) and draws
  the vectors at random;
- peers on the same facts: PEFT's own ``PROMPT_TUNING`` and ``P_TUNING`` (``--num_virtual_tokens`` virtual tokens
  before the manual template), trained by the same loop (``peft_softmix.trainer.RelationTrainer``: the same
  optimiser, batches, epochs and dev selection) through a small wrapper that scores the mask (`PeftPeer`), each
  tuned as a fair comparison needs: a learning-rate sweep (``--peer_learning_rates``, default 1e-3 1e-2 1e-1 3e-1)
  of which the rate with the best macro dev P@1 is kept, and prompt tuning started from the manual template's
  words (PEFT's ``TEXT`` init; ``peft_prompt_tuning_vocab`` starts from sampled vocabulary vectors instead),
  an OptiPrompt-style single soft prompt (manual init, K = 1: the grid's ``manual_soft`` run), and the LPAQA-style
  weighted ensemble of the K mined hard prompts (only the mixture weights trained);
- the majority baseline: each relation's train objects ranked by frequency.

It prints micro and macro P@1 / P@10 / MRR of every method, the grid, a per-relation P@1 table next to the majority
baseline, the peers' sweep, whether the targets on the probe LM are met, and, as its last line, one JSON object
mapping every method's name to its macro test P@1. Everything is also written to ``<output_dir>/accuracy.json``.

Run (defaults: the probe LM in ``examples/probe_lm`` and the sample shipped with the package)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --quick   # fewer epochs, no paraphrase row, no single deep runs
    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --peers_only   # the majority baseline and the peers' sweep

Objects of any length (issue #17) have their own benchmark, ``benchmarks/accuracy_multi_token.py``. A causal LM
(issue #18) takes the same command and flags: it is handed to that benchmark, which ranks each relation's
candidate objects by the chain rule (a causal LM has no mask to rank the vocabulary at)::

    OMP_NUM_THREADS=1 python benchmarks/accuracy.py --model_name_or_path examples/probe_lm_causal

The paper's experiment (BERT-base-cased, the full T-REx split; needs the Hub and a GPU)::

    python benchmarks/accuracy.py --model_name_or_path bert-base-cased --data_dir ../shared/data/trex \\
        --templates_dir ../shared/data/templates --num_train_epochs 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import platform
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"
sys.path.insert(0, str(REPO_ROOT))  # this checkout's peft_softmix, installed or not

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from peft import PromptEncoderConfig, PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import BatchSampler, DataLoader  # noqa: E402
from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer  # noqa: E402

import peft_softmix  # noqa: E402, F401  (registers SOFT_MIXTURE with PEFT)
from peft_softmix import SoftMixtureConfig, SoftMixtureOutput, TrainingDiverged  # noqa: E402
from peft_softmix.architectures import find_backbone  # noqa: E402
from peft_softmix.atomic import write_json_atomic  # noqa: E402
from peft_softmix.base_models import language_model_kind  # noqa: E402
from peft_softmix.batching import FactDataset, LengthGroupedSampler, subject_lengths  # noqa: E402
from peft_softmix.facts import SAMPLE_DIR  # noqa: E402
from peft_softmix.hooks import gather_mask_positions  # noqa: E402
from peft_softmix.metrics import load_fact_retrieval  # noqa: E402
from peft_softmix.relations import (  # noqa: E402
    RelationData,
    candidate_mask,
    drop_long_queries,
    load_relation_data,
    resolve_relations,
)
from peft_softmix.results import results_document, row_labels, write_results  # noqa: E402
from peft_softmix.template_sets import TemplateSetError, load_templates  # noqa: E402
from peft_softmix.tokenization import encode_query, object_token_id, template_layout  # noqa: E402
from peft_softmix.trainer import RelationTrainer, TrainResult  # noqa: E402
from peft_softmix.training import train_relation, trained_label  # noqa: E402
from peft_softmix.training_args import TrainingArguments  # noqa: E402

DEFAULT_MODEL = REPO_ROOT / "examples" / "probe_lm"
DEFAULT_COMMON_VOCAB = SAMPLE_DIR / "vocab" / "common_vocab_cased.txt"

INITS = ("manual", "mined", "paraphrase", "random")


@dataclass(frozen=True)
class Peer:
    """One PEFT peer: its row name, its PEFT method and how its prompt starts (the learning rate is swept)."""

    name: str
    method: str  # "prompt_tuning" or "p_tuning"
    init: str | None = None  # prompt tuning's start: "text" (the manual template's words) or "sample_vocab"


PEERS = (
    Peer("peft_prompt_tuning", "prompt_tuning", "text"),
    Peer("peft_prompt_tuning_vocab", "prompt_tuning", "sample_vocab"),
    Peer("peft_p_tuning", "p_tuning"),
)
PEFT_PEERS = tuple(p.name for p in PEERS)


# The per-relation table: the baselines, the paper's main rows and the peers.
PER_RELATION_COLUMNS = [
    "majority", "manual", "mined_hard_mixture", "manual_soft", "random_soft", "soft_mixture", "soft_mixture_deep",
    "random_soft_mixture", "lpaqa_weighted_ensemble", *PEFT_PEERS,
]  # fmt: skip


# -- the settings of the grid ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One training run over the relations: what it trains and which method names its rows give."""

    name: str  # the method name of its trained row
    templates: str  # the template source
    num_templates: int
    init: str = "template"
    deep: bool = False
    freeze_prompts: bool = False
    hard_first: str | None = None  # method name of its "hard, template 1" row, when that row is wanted
    hard_mixture: str | None = None  # method name of its "hard, uniform mixture" row, when that row is wanted


def manual_mixture_source(args: argparse.Namespace, relations: list[str]) -> str:
    """LAMA's template plus LPAQA's manual paraphrases if the templates folder has them for every relation, else
    plus LPAQA's paraphrases (back-translations of the manual template; the shipped sample has only these)."""
    try:
        for relation in relations:
            load_templates("manual_paraphrase", relation, k=1, templates_dir=args.templates_dir)
    except (FileNotFoundError, TemplateSetError):
        return "manual+paraphrase"
    return "manual+manual_paraphrase"


def grid_settings(args: argparse.Namespace, relations: list[str]) -> list[Setting]:
    K = args.num_templates
    mixtures = {"manual": manual_mixture_source(args, relations), "mined": "mined", "paraphrase": "paraphrase"}
    inits = [i for i in INITS if not (args.quick and i == "paraphrase")]
    settings = []
    for init in inits:
        for deep in (False, True):
            if deep and args.quick and init != "manual":
                continue  # --quick: deep single prompts only from the manual template
            tail = "_deep" if deep else ""
            if init == "random":
                single = Setting(f"random_soft{tail}", "manual", 1, init="random", deep=deep)
            else:
                single = Setting(f"{init}_soft{tail}", init, 1, deep=deep, hard_first=None if deep else init)
            settings.append(single)
    for init in inits:
        for deep in (False, True):
            tail = "_deep" if deep else ""
            # the mined mixture is the paper's main setting: plain "soft_mixture"
            name = f"soft_mixture{tail}" if init == "mined" else f"{init}_soft_mixture{tail}"
            if init == "random":
                settings.append(Setting(name, "mined", K, init="random", deep=deep))
            else:
                hard = None if deep else f"{init}_hard_mixture"
                settings.append(Setting(name, mixtures[init], K, deep=deep, hard_mixture=hard))
    settings.append(Setting("lpaqa_weighted_ensemble", "mined", K, freeze_prompts=True))
    return settings


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    return TrainingArguments(
        learning_rate=args.learning_rate,
        num_train_epochs=args.num_train_epochs,
        patience=args.patience,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        seed=args.seed,
    )


def relation_data(args: argparse.Namespace, relation: str, tokenizer, templates: str, k: int, words) -> RelationData:
    return load_relation_data(
        args.data_dir,
        relation,
        tokenizer,
        templates,
        k,
        args.templates_dir,
        common_words=words,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )


def run_setting(
    args: argparse.Namespace, setting: Setting, relations: list[str], accelerator, words, candidates, run_dir: Path
) -> dict[str, Any]:
    """Train ``setting`` on every relation with the library's loop, as ``examples/train_trex.py`` does; its
    results document (also written to ``run_dir``)."""
    training = training_arguments(args)
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    base = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path).to(accelerator.device)
    outcomes, label = [], ""
    for relation in relations:
        data = relation_data(args, relation, tokenizer, setting.templates, setting.num_templates, words)
        set_seed(args.seed)
        config = SoftMixtureConfig(
            templates=data.templates,
            tokenizer_name_or_path=args.model_name_or_path,
            base_model_name_or_path=args.model_name_or_path,
            init=setting.init,
            deep=setting.deep,
            train_prompts=not setting.freeze_prompts,
            seed=args.seed,
        )
        model = get_peft_model(base, config).to(accelerator.device)
        data, _ = drop_long_queries(model, data)
        outcomes.append(train_relation(model, data, training, accelerator, candidate_mask=candidates))
        label = trained_label(config, training)
    results = results_document(outcomes, row_labels(setting.templates, label), {"setting": vars(setting)})
    write_results(run_dir, results, f"# {setting.name} on {args.data_dir}")
    return results


@contextlib.contextmanager
def quiet(log_path: Path, verbose: bool):
    """Send a run's own output (its tables, progress bars) to a log file, unless ``--verbose``."""
    if verbose:
        yield
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w", encoding="utf-8") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        yield


def scores_of(results: dict[str, Any], row: str) -> dict[str, Any]:
    """One row of a results document: overall micro/macro and per-relation test scores."""
    overall = dict(results["overall"]["test"][row])
    per_relation = {rel: dict(entry["test"][row]) for rel, entry in results["relations"].items()}
    return {"overall": overall, "per_relation": per_relation}


# -- peers: PEFT's prompt tuning and P-tuning before the manual template, trained by the same loop -----------------


class ManualTemplateCollator:
    """Facts filled into one hard template and padded by the tokenizer; the mask position is where the base model
    sees it (after PEFT's virtual tokens)."""

    def __init__(self, tokenizer, template: str, facts: list, num_virtual_tokens: int):
        self.tokenizer = tokenizer
        self.layout = template_layout(tokenizer, template)
        self.facts = facts
        self.shift = num_virtual_tokens  # PEFT puts the virtual tokens before the whole input

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        queries = [encode_query(self.tokenizer, self.layout, self.facts[i].subject) for i in indices]
        batch = self.tokenizer.pad({"input_ids": [q.input_ids for q in queries]}, return_tensors="pt")
        labels = [object_token_id(self.tokenizer, self.facts[i].object) for i in indices]
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "mask_positions": torch.tensor([q.mask_position + self.shift for q in queries]),
            "labels": torch.tensor(labels),
            "index": torch.tensor(indices, dtype=torch.long),
        }


def template_words(template: str) -> str:
    """The words of a hard template without its slots and lone punctuation: ``"[X] is located in [Y] ."`` ->
    ``"is located in"`` (prompt tuning's TEXT start)."""
    words = [w for w in template.replace("[X]", " ").replace("[Y]", " ").split() if any(c.isalnum() for c in w)]
    return " ".join(words) or template


def peer_config(peer: Peer, num_virtual_tokens: int, token_dim: int, template: str, tokenizer_path: str):
    # FEATURE_EXTRACTION: PEFT prepends the prompt and returns the base model's own output (the MLM logits)
    if peer.method == "prompt_tuning" and peer.init == "text":
        return PromptTuningConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.TEXT,  # PEFT repeats or cuts the text's tokens to the prompt length
            prompt_tuning_init_text=template_words(template),
            tokenizer_name_or_path=tokenizer_path,
        )
    if peer.method == "prompt_tuning":
        return PromptTuningConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            num_virtual_tokens=num_virtual_tokens,
            prompt_tuning_init=PromptTuningInit.SAMPLE_VOCAB,  # PEFT's RANDOM init is N(0, 1): far off BERT's scale
        )
    return PromptEncoderConfig(
        task_type=TaskType.FEATURE_EXTRACTION,
        num_virtual_tokens=num_virtual_tokens,
        encoder_reparameterization_type="MLP",
        encoder_hidden_size=token_dim,
    )


class PeftPeer(nn.Module):
    """A PEFT prompt-learning model asked at the mask: its forward returns ``loss`` and ``log_probs`` as ours does,
    so that `RelationTrainer` trains and scores it like a mixture (its trainable parameters are the prompt's).

    The candidate mask (LAMA's common vocabulary) applies to training as well as evaluation. The LM head can run at
    the mask alone (as it does in our adapter), so that the peers are not slowed by a head over every position;
    `use_head_at_mask_only` checks once that this is exact.
    """

    def __init__(self, peft_model, candidate_mask: torch.Tensor | None):
        super().__init__()
        self.peft_model = peft_model
        self.register_buffer("candidate_mask", candidate_mask, persistent=False)
        self.head_at_mask_only = False

    def mask_logits(self, input_ids, attention_mask, mask_positions, head_at_mask_only: bool) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        backbone = find_backbone(self.peft_model.get_base_model())
        if head_at_mask_only and backbone is not None:
            with gather_mask_positions(backbone, mask_positions):
                return self.peft_model(**inputs).logits[:, 0]
        logits = self.peft_model(**inputs).logits
        return logits[torch.arange(len(logits)), mask_positions]

    @torch.no_grad()
    def use_head_at_mask_only(self, batch: dict[str, torch.Tensor]) -> bool:
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        inputs = [batch[k].to(device) for k in ("input_ids", "attention_mask", "mask_positions")]
        full = self.mask_logits(*inputs, head_at_mask_only=False)
        if find_backbone(self.peft_model.get_base_model()) is not None:
            self.head_at_mask_only = torch.allclose(self.mask_logits(*inputs, True), full, atol=1e-4, rtol=1e-4)
        self.train(was_training)
        return self.head_at_mask_only

    def forward(self, input_ids, attention_mask, mask_positions, labels=None, **unused) -> SoftMixtureOutput:
        logits = self.mask_logits(input_ids, attention_mask, mask_positions, self.head_at_mask_only).float()
        if self.candidate_mask is not None:
            logits = logits.masked_fill(~self.candidate_mask, float("-inf"))
        log_probs = torch.log_softmax(logits, dim=-1)
        loss = None if labels is None else -log_probs.gather(1, labels.unsqueeze(1)).mean()
        return SoftMixtureOutput(loss=loss, log_probs=log_probs)


def train_peer(
    peer: Peer, learning_rate: float, args: argparse.Namespace, data: RelationData, tokenizer, candidates, accelerator
) -> TrainResult | None:
    """Train one PEFT peer on one relation with the library's loop (Adam, best dev P@1, patience) at
    ``learning_rate``; None when the loss stopped being finite (that learning rate is out of the sweep)."""
    set_seed(args.seed)
    base = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path)
    token_dim = base.get_input_embeddings().embedding_dim
    template = data.templates[0]
    config = peer_config(peer, args.num_virtual_tokens, token_dim, template, args.model_name_or_path)
    model = PeftPeer(get_peft_model(base, config), candidates).to(accelerator.device)

    def collator(facts):
        return ManualTemplateCollator(tokenizer, template, list(facts), args.num_virtual_tokens)

    # the first evaluation batch decides whether the head may run at the mask only
    dev = data.splits["dev"]
    sampler = LengthGroupedSampler(subject_lengths(tokenizer, dev), args.eval_batch_size, shuffle=False)
    probe = DataLoader(FactDataset(dev), batch_sampler=BatchSampler(sampler, args.eval_batch_size, False))
    model.use_head_at_mask_only(collator(dev)(next(iter(probe))))
    trainer = RelationTrainer(
        model,
        data.splits,
        replace(training_arguments(args), learning_rate=learning_rate),
        accelerator,
        name=f"{peer.name} lr {learning_rate:g} {data.relation}",
        tokenizer=tokenizer,
        collator=collator,
    )
    try:
        return trainer.train()
    except TrainingDiverged as error:
        print(error)
        return None


@dataclass
class SweepPoint:
    """One peer at one learning rate, over the relations: each relation's kept run (None: diverged)."""

    learning_rate: float
    runs: dict[str, TrainResult | None]

    @property
    def diverged(self) -> list[str]:
        return [rel for rel, run in self.runs.items() if run is None]

    @property
    def dev_macro_p1(self) -> float:
        """Macro dev P@1 of the kept states (NaN when a relation diverged: never chosen)."""
        if self.diverged:
            return math.nan
        return sum(run.best_dev_p1 for run in self.runs.values() if run is not None) / len(self.runs)


def best_point(points: list[SweepPoint]) -> SweepPoint:
    """The learning rate with the best macro dev P@1 (the first of equals); one learning rate for all relations."""
    usable = [p for p in points if not p.diverged]
    if not usable:
        raise RuntimeError("Every learning rate of the peer sweep diverged; add smaller --peer_learning_rates.")
    return max(usable, key=lambda p: p.dev_macro_p1)


def sweep_peer(
    peer: Peer, args, data: dict[str, RelationData], tokenizer, candidates, accelerator
) -> list[SweepPoint]:
    return [
        SweepPoint(
            lr, {rel: train_peer(peer, lr, args, d, tokenizer, candidates, accelerator) for rel, d in data.items()}
        )
        for lr in args.peer_learning_rates
    ]


def sweep_table(sweeps: dict[str, dict[str, Any]]) -> str:
    lines = [
        "The PEFT peers' learning-rate sweep: macro P@1 in %, dev (of the kept epoch) and test; the row kept for each "
        "peer is the learning rate with the best macro dev P@1 (one learning rate for all relations).",
        "",
        "| peer | init | learning rate | dev macro P@1 | test macro P@1 | test micro P@1 | kept |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for name, sweep in sweeps.items():
        for point in sweep["points"]:
            test = point.get("test")
            cells = [
                name,
                sweep["init"] or "–",
                f"{point['learning_rate']:g}",
                "diverged" if point["diverged"] else pct(point["dev_macro_p@1"]),
                pct(test["overall"]["macro_p@1"]) if test else "–",
                pct(test["overall"]["micro_p@1"]) if test else "–",
                "**kept**" if point["learning_rate"] == sweep["kept_learning_rate"] else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def majority_ranks(data) -> torch.Tensor:
    """Each test object's rank in the list of train objects by frequency; unseen objects tie after all of them
    (ties in the gold's favour, as in `rank_of_gold`)."""
    counts = Counter(f.object for f in data.splits["train"])
    order = {obj: rank for rank, (obj, _) in enumerate(counts.most_common(), start=1)}
    return torch.tensor([order.get(f.object, len(order) + 1) for f in data.splits["test"]])


def scores_from_ranks(metric, ranks_by_relation: dict[str, torch.Tensor]) -> dict[str, Any]:
    ranks, relations = [], []
    for relation, r in ranks_by_relation.items():
        ranks += r.tolist()
        relations += [relation] * len(r)
    result = metric.compute(ranks=ranks, relations=relations)
    per_relation = {rel: dict(s) for rel, s in result.pop("per_relation").items()}
    return {"overall": result, "per_relation": per_relation}


# -- tables ------------------------------------------------------------------------------------------------------


def pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def methods_table(methods: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| method | micro P@1 | micro P@10 | micro MRR | macro P@1 | macro P@10 | macro MRR |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, scores in methods.items():
        o = scores["overall"]
        cells = [pct(o[f"{kind}_{m}"]) for kind in ("micro", "macro") for m in ("p@1", "p@10", "mrr")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(methods: dict[str, dict[str, Any]], inits: list[str]) -> str:
    def cell(name: str | None) -> str:
        if name is None or name not in methods:
            return "–"
        o = methods[name]["overall"]
        return f"{pct(o['macro_p@1'])} / {pct(o['macro_p@10'])} / {pct(o['macro_mrr'])}"

    lines = [
        "Macro P@1 / P@10 / MRR on test, in %. 'init' is the untrained prompt (the hard template, or the uniform "
        "mixture of the hard templates); random init has no hard prompt.",
        "",
        "| initialisation | single: init | single: soft | single: deep | mixture: init | mixture: soft | "
        "mixture: deep |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for init in inits:
        hard = None if init == "random" else init
        hard_mix = None if init == "random" else f"{init}_hard_mixture"
        mix = "soft_mixture" if init == "mined" else f"{init}_soft_mixture"
        cells = [hard, f"{init}_soft", f"{init}_soft_deep", hard_mix, mix, f"{mix}_deep"]
        lines.append(f"| {init} | " + " | ".join(cell(c) for c in cells) + " |")
    lines.append(f"| majority baseline | {cell('majority')} | | | | | |")
    return "\n".join(lines)


def per_relation_table(methods: dict[str, dict[str, Any]], columns: list[str]) -> str:
    columns = [c for c in columns if c in methods]
    relations = list(methods[columns[0]]["per_relation"])
    lines = [
        "Test P@1 per relation, in %, next to the majority baseline (the most frequent train object).",
        "",
        "| relation | facts | " + " | ".join(columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for rel in relations:
        count = methods[columns[0]]["per_relation"][rel]["count"]
        cells = [pct(methods[c]["per_relation"][rel]["p@1"]) for c in columns]
        lines.append(f"| {rel} | {count} | " + " | ".join(cells) + " |")
    lines.append("| **macro** | | " + " | ".join(pct(methods[c]["overall"]["macro_p@1"]) for c in columns) + " |")
    return "\n".join(lines)


def check_targets(macro: dict[str, float]) -> list[dict[str, Any]]:
    """The targets on the probe LM: the soft mixture at 1.5x the manual template, and 5 points over PEFT's best."""
    targets = []
    if "soft_mixture" in macro and "manual" in macro:
        goal = 1.5 * macro["manual"]
        targets.append(
            {
                "target": "soft_mixture >= 1.5 x manual",
                "value": macro["soft_mixture"],
                "goal": goal,
                "met": macro["soft_mixture"] >= goal,
            }
        )
    peers = {name: macro[name] for name in PEFT_PEERS if name in macro}
    if "soft_mixture" in macro and peers:
        best = max(peers, key=peers.__getitem__)
        goal = peers[best] + 0.05
        targets.append(
            {
                "target": f"soft_mixture >= best PEFT peer ({best}) + 5 points",
                "value": macro["soft_mixture"],
                "goal": goal,
                "met": macro["soft_mixture"] >= goal,
            }
        )
    return targets


# -- main --------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL))
    parser.add_argument("--data_dir", default=str(SAMPLE_DIR / "trex"))
    parser.add_argument("--templates_dir", default=str(SAMPLE_DIR / "templates"))
    parser.add_argument("--relations", default="all", help="'all' or comma-separated relation ids.")
    parser.add_argument("--num_templates", type=int, default=5, help="K of every mixture.")
    parser.add_argument(
        "--common_vocab",
        nargs="?",
        const=str(DEFAULT_COMMON_VOCAB),
        default=None,
        help="Rank over LAMA's common vocabulary (the paper's setting for BERT); optionally the word list's path.",
    )
    parser.add_argument("--num_train_epochs", type=int, default=None, help="Default 4 (2 with --quick).")
    parser.add_argument("--patience", type=int, default=2)
    parser.add_argument("--learning_rate", type=float, default=1e-2)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--eval_batch_size", type=int, default=128)
    parser.add_argument("--num_virtual_tokens", type=int, default=5, help="PEFT peers' prompt length.")
    parser.add_argument(
        "--peer_learning_rates",
        type=float,
        nargs="+",
        default=[1e-3, 1e-2, 1e-1, 3e-1],
        help="The PEFT peers' learning-rate sweep; each peer keeps the one with the best macro dev P@1.",
    )
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--max_eval_samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 epochs, first 300 dev/test facts per relation, no paraphrase init, deep single prompt only manual.",
    )
    parser.add_argument(
        "--peers_only",
        action="store_true",
        help="Only the majority baseline and the PEFT peers' sweep (tune the peers without the grid).",
    )
    parser.add_argument("--output_dir", default="out/accuracy")
    parser.add_argument("--verbose", action="store_true", help="Show each run's own output and progress bars.")
    args = parser.parse_args(argv)
    if args.num_train_epochs is None:
        args.num_train_epochs = 2 if args.quick else 4
    if args.quick and args.max_eval_samples is None:
        args.max_eval_samples = 300
    if not Path(args.model_name_or_path).exists() and args.model_name_or_path == str(DEFAULT_MODEL):
        parser.error(
            f"The probe LM is not at {DEFAULT_MODEL}; build it with scripts/build_probe_lm.py or pass "
            "--model_name_or_path."
        )
    return args


def causal_benchmark(args: argparse.Namespace) -> dict[str, float]:
    """A causal LM's accuracy: ``accuracy_multi_token.py`` with this run's flags (candidate ranking by the chain rule,
    issue #18's rows and targets); its macro test P@1 over all facts per method."""
    if args.common_vocab is not None:
        raise SystemExit(
            "--common_vocab ranks LAMA's common vocabulary at the mask, a masked-LM setting; a causal LM ranks each "
            "relation's candidate objects instead. Leave the flag out."
        )
    flags = ["model_name_or_path", "data_dir", "templates_dir", "relations", "num_templates", "num_train_epochs"]
    flags += ["patience", "learning_rate", "batch_size", "eval_batch_size", "num_virtual_tokens", "seed"]
    flags += ["max_train_samples", "max_eval_samples", "output_dir"]
    argv = [f"--{name}={getattr(args, name)}" for name in flags if getattr(args, name) is not None]
    argv += ["--peer_learning_rates", *map(str, args.peer_learning_rates)]
    argv += ["--quick"] * args.quick + ["--verbose"] * args.verbose
    argv += ["--peers_only"] * args.peers_only
    print(f"{args.model_name_or_path} is a causal LM: ranking candidates with benchmarks/accuracy_multi_token.py.")
    subprocess.run([sys.executable, str(BENCHMARKS / "accuracy_multi_token.py"), *argv], check=True)
    report = json.loads((Path(args.output_dir) / "accuracy_multi_token.json").read_text())
    return {name: by_subset["all"] for name, by_subset in report["macro_p@1"].items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    if language_model_kind(AutoConfig.from_pretrained(args.model_name_or_path)) == "causal":
        return causal_benchmark(args)
    out = Path(args.output_dir)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    relations = resolve_relations(args.data_dir, args.relations)
    accelerator = Accelerator()
    metric = load_fact_retrieval(keep_in_memory=True)
    methods: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}
    settings = [] if args.peers_only else grid_settings(args, relations)

    def progress(name: str, seconds: float) -> None:
        macro = methods[name]["overall"]["macro_p@1"] if name in methods else math.nan
        print(f"[{time.time() - start:7.0f}s] {name:<28} macro P@1 {pct(macro):>5}  ({seconds:.0f}s)", flush=True)

    # majority baseline and the PEFT peers, on the facts the grid keeps (one-token objects, common vocab)
    common_words = candidates = None
    if args.common_vocab is not None:
        vocab_size = (
            AutoModelForMaskedLM.from_pretrained(args.model_name_or_path).get_input_embeddings().num_embeddings
        )
        common_words, candidates, _ = candidate_mask(tokenizer, args.common_vocab, vocab_size)
    data = {rel: relation_data(args, rel, tokenizer, "manual", 1, common_words) for rel in relations}
    methods["majority"] = scores_from_ranks(metric, {rel: majority_ranks(d) for rel, d in data.items()})
    sweeps: dict[str, dict[str, Any]] = {}
    for peer in PEERS:
        t0 = time.time()
        with quiet(out / "runs" / peer.name / "log.txt", args.verbose):
            points = sweep_peer(peer, args, data, tokenizer, candidates, accelerator)
        kept = best_point(points)
        summary = []
        for point in points:
            entry: dict[str, Any] = {
                "learning_rate": point.learning_rate,
                "diverged": point.diverged,
                "dev_macro_p@1": point.dev_macro_p1,
            }
            if not point.diverged:
                test_ranks = {rel: run.test.mixture for rel, run in point.runs.items() if run is not None}
                entry["test"] = scores_from_ranks(metric, test_ranks)
                entry["best_epochs"] = {rel: run.best_epoch for rel, run in point.runs.items() if run is not None}
            summary.append(entry)
        sweeps[peer.name] = {"method": peer.method, "init": peer.init, "points": summary}
        sweeps[peer.name]["kept_learning_rate"] = kept.learning_rate
        methods[peer.name] = next(e["test"] for e in summary if e["learning_rate"] == kept.learning_rate)
        timings[peer.name] = time.time() - t0
        progress(peer.name, timings[peer.name])

    for setting in settings:
        t0 = time.time()
        run_dir = out / "runs" / setting.name
        with quiet(run_dir / "log.txt", args.verbose):
            results = run_setting(args, setting, relations, accelerator, common_words, candidates, run_dir)
        methods[setting.name] = scores_of(results, "soft")
        if setting.hard_first:
            methods[setting.hard_first] = scores_of(results, "hard_first")
        if setting.hard_mixture:
            methods[setting.hard_mixture] = scores_of(results, "hard_mixture")
        timings[setting.name] = time.time() - t0
        progress(setting.name, timings[setting.name])
    if "manual_soft" in methods:
        methods["optiprompt_single_soft"] = methods["manual_soft"]  # the same run: manual init, one prompt, no mixture

    order = [
        "majority", "manual", "mined", "paraphrase", "manual_hard_mixture", "mined_hard_mixture",
        "paraphrase_hard_mixture", "manual_soft", "manual_soft_deep", "mined_soft", "mined_soft_deep",
        "paraphrase_soft", "paraphrase_soft_deep", "random_soft", "random_soft_deep", "manual_soft_mixture",
        "manual_soft_mixture_deep", "soft_mixture", "soft_mixture_deep", "paraphrase_soft_mixture",
        "paraphrase_soft_mixture_deep", "random_soft_mixture", "random_soft_mixture_deep",
        "optiprompt_single_soft", "lpaqa_weighted_ensemble", *PEFT_PEERS,
    ]  # fmt: skip
    methods = {name: methods[name] for name in order if name in methods}
    macro = {name: scores["overall"]["macro_p@1"] for name, scores in methods.items()}
    targets = check_targets(macro)
    inits = [i for i in INITS if f"{i}_soft" in methods]
    elapsed = time.time() - start
    report = {
        "settings": vars(args),
        "relations": relations,
        "manual_mixture_templates": manual_mixture_source(args, relations),
        "seconds": elapsed,
        "seconds_per_method": timings,
        "torch_threads": torch.get_num_threads(),
        "methods": methods,
        "peer_sweeps": sweeps,
        "targets": targets,
        "macro_p@1": macro,
    }

    print()
    print(
        f"Model {args.model_name_or_path}; data {args.data_dir}; {len(relations)} relations; K = "
        f"{args.num_templates}; {args.num_train_epochs} epochs; {elapsed:.0f} s on {platform.machine()} "
        f"({torch.get_num_threads()} threads). Manual mixture: {report['manual_mixture_templates']}."
    )
    print()
    print(methods_table(methods))
    print()
    if inits:
        print(grid_table(methods, inits))
    print()
    print(per_relation_table(methods, PER_RELATION_COLUMNS))
    print()
    print(sweep_table(sweeps))
    print()
    for t in targets:
        print(f"target {t['target']}: {pct(t['value'])} vs {pct(t['goal'])}: {'met' if t['met'] else 'NOT met'}")

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "accuracy.json", report)
    print(f"Wrote {out / 'accuracy.json'}")
    print(json.dumps({name: round(value, 4) for name, value in macro.items()}))
    return macro


if __name__ == "__main__":
    main(sys.argv[1:])
