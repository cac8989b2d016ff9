#!/usr/bin/env python
"""Train one mixture of soft prompts per T-REx relation (Qin & Eisner, NAACL 2021) with Accelerate.

For each relation: fill K templates with the subject, mix their answers, train the template words (and, with
``--deep``, per-layer offsets) and/or the mixture weights on the train split, keep the state with the best dev P@1,
and score the test split. Baselines come from the same code: the untrained (hard) first template, and the hard
templates as a uniform mixture. Outputs, in ``--output_dir``:

- ``<relation>/adapter/``: the trained adapter (``PeftModel.from_pretrained(base, that_dir)`` after
  ``import peft_softmix``);
- ``<relation>/checkpoints/epoch_N/``: Accelerate states, for ``--resume_from_checkpoint``;
- ``results.json``, ``results.md`` (relation x P@1 / P@10 / MRR) and ``mixture_weights.png``.

With no arguments it runs a demo on the sample shipped with the package and the probe LM in ``examples/probe_lm``::

    accelerate launch examples/train_trex.py

The paper's setting::

    accelerate launch examples/train_trex.py --model_name_or_path bert-base-cased --data_dir <T-REx dir> \\
        --templates_dir <templates dir> --relations all --templates mined --num_templates 5 --deep --output_dir out/

Two processes on CPU (DDP over gloo)::

    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train_trex.py ...

Which parts are trained (the "adjust mixture weights / adjust token vectors / adjust both" comparison):
``--freeze_prompts`` (weights only), ``--freeze_weights`` or ``--uniform_mixture`` (token vectors only), neither
(both). ``--mixture_fit em`` fits the weights by EM instead of by gradient.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from peft import get_peft_model
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
from tqdm.auto import tqdm
from transformers import AutoModelForMaskedLM, AutoTokenizer

import peft_softmix  # noqa: F401  (registers the SOFT_MIXTURE method with PEFT)
from peft_softmix import SoftMixtureConfig, TemplateError
from peft_softmix.facts import (
    SAMPLE_DIR,
    DataFormatError,
    candidate_token_ids,
    facts_in_vocab,
    filter_single_token,
    list_relations,
    load_common_vocab,
    load_relation,
)
from peft_softmix.metrics import load_fact_retrieval
from peft_softmix.template_sets import TemplateSetError, load_templates
from peft_softmix.tokenization import require_mask_token
from peft_softmix.training import (
    FactCollator,
    FactDataset,
    LengthGroupedSampler,
    em_mixture_logits,
    em_posteriors,
    evaluate_ranks,
    model_inputs,
    plot_mixture_weights,
    precision_at_1,
    results_markdown,
    scores_from_metric,
    subject_lengths,
    write_json_atomic,
    write_text_atomic,
)

logger = get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "examples" / "probe_lm"
DEFAULT_COMMON_VOCAB = SAMPLE_DIR / "vocab" / "common_vocab_cased.txt"
ADAPTER = "default"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("model and data")
    data.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="A masked LM (AutoModelForMaskedLM).")
    data.add_argument(
        "--data_dir", default=str(SAMPLE_DIR / "trex"), help="Folder of <relation>/{train,dev,test}.jsonl."
    )
    data.add_argument("--relations", default="all", help="'all' or comma-separated relation ids (P19,P20).")
    data.add_argument(
        "--templates",
        # the demo's template 1 is LAMA's manual template, so its first table row is the manual baseline
        default="manual+mined",
        help="Template source: manual, mined, paraphrase (or another name peft_softmix.template_sets knows, "
        "'manual+mined'), or a path to a .jsonl file with 'relation' and 'template' fields.",
    )
    data.add_argument(
        "--templates_dir",
        default=None,
        help="Folder with lama.jsonl, lpaqa_*.jsonl. Default: a 'templates' folder next to --data_dir if there is "
        "one (the layout of the full data), else the sample's.",
    )
    data.add_argument("--num_templates", type=int, default=5, help="K: the first K templates of the source.")
    data.add_argument(
        "--common_vocab",
        nargs="?",
        const="",
        default=None,
        help="Restrict candidates (and facts) to LAMA's common vocabulary; optionally the path of the word list "
        "(default: vocab/common_vocab_cased.txt next to --data_dir, else the sample's).",
    )
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N train facts.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use only the first N dev and test facts.")

    method = parser.add_argument_group("the adapter")
    method.add_argument("--init", choices=("template", "random"), default="template", help="Start of the soft words.")
    method.add_argument("--deep", action="store_true", help="Also train per-layer offsets at template positions.")
    method.add_argument("--deep_layers", type=int, default=None, help="Deep offsets for the first N layers only.")
    method.add_argument(
        "--template_weights",
        choices=("uniform", "source"),
        default="uniform",
        help="Initial mixture weights: uniform, or the template source's own scores (LPAQA's 'weight').",
    )
    method.add_argument("--mixture_fit", choices=("gradient", "em"), default="gradient", help="How weights are fit.")
    method.add_argument("--freeze_prompts", action="store_true", help="Train the mixture weights only.")
    method.add_argument("--freeze_weights", action="store_true", help="Keep the initial mixture weights.")
    method.add_argument("--uniform_mixture", action="store_true", help="Uniform, fixed mixture weights.")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", default="out/train_trex", help="Where adapters, checkpoints, results go.")
    train.add_argument("--learning_rate", type=float, default=1e-2, help="Adam's learning rate.")
    train.add_argument("--weight_decay", type=float, default=0.0)
    train.add_argument("--num_train_epochs", type=int, default=8)
    train.add_argument("--per_device_train_batch_size", type=int, default=32)
    train.add_argument("--per_device_eval_batch_size", type=int, default=64)
    train.add_argument("--gradient_accumulation_steps", type=int, default=1)
    train.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), default=None, help="Defaults to accelerate's config."
    )
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--patience", type=int, default=3, help="Stop after N epochs without a better dev P@1.")
    train.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="'latest' (each relation's last checkpoint in --output_dir) or a <relation>/checkpoints/epoch_N path.",
    )
    train.add_argument("--push_to_hub", action="store_true", help="Push each relation's adapter to the Hub.")
    train.add_argument("--hub_model_id", default=None, help="Repo id prefix: each relation goes to <id>-<relation>.")
    train.add_argument("--hub_token", default=None)
    train.add_argument("--hub_private", action="store_true")
    args = parser.parse_args(argv)

    # the full data keeps trex/, templates/ and vocab/ side by side, like the sample
    beside = Path(args.data_dir).resolve().parent
    if args.templates_dir is None:
        args.templates_dir = str(beside / "templates" if (beside / "templates").is_dir() else SAMPLE_DIR / "templates")
    if args.common_vocab == "":
        local = beside / "vocab" / DEFAULT_COMMON_VOCAB.name
        args.common_vocab = str(local if local.is_file() else DEFAULT_COMMON_VOCAB)
    if args.num_templates < 1:
        parser.error(f"--num_templates must be at least 1, got {args.num_templates}.")
    if args.deep_layers is not None:
        if args.deep_layers < 1:
            parser.error(f"--deep_layers must be at least 1, got {args.deep_layers}.")
        args.deep = True
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if args.num_train_epochs < 1 or args.gradient_accumulation_steps < 1 or args.patience < 1:
        parser.error("--num_train_epochs, --gradient_accumulation_steps and --patience must be at least 1.")
    if args.uniform_mixture and args.template_weights == "source":
        parser.error("--uniform_mixture and --template_weights source contradict each other; pick one.")
    if args.freeze_prompts and (args.freeze_weights or args.uniform_mixture):
        parser.error(
            "--freeze_prompts with --freeze_weights/--uniform_mixture leaves nothing to train; the hard-template rows "
            "of results.md already report that setting."
        )
    if args.mixture_fit == "em" and (args.freeze_weights or args.uniform_mixture):
        parser.error("--mixture_fit em fits the mixture weights; it cannot be combined with frozen weights.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/softmix-bert; '-<relation>' is appended).")
    return args


# -- what is trained ---------------------------------------------------------------------------------------------


def trained_label(args: argparse.Namespace) -> str:
    if args.freeze_prompts:
        what = "weights only"
    elif args.freeze_weights or args.uniform_mixture:
        what = "token vectors only"
    else:
        what = "vectors + weights"
    extras = []
    if args.deep:
        extras.append("deep" if args.deep_layers is None else f"deep {args.deep_layers}")
    if args.mixture_fit == "em":
        extras.append("EM")
    if args.init == "random":
        extras.append("random init")
    return f"soft ({what}{', ' + ', '.join(extras) if extras else ''})"


# Settings a checkpoint must share with the run that resumes it.
RESUME_KEYS = (
    "model_name_or_path",
    "templates",
    "num_templates",
    "common_vocab",
    "init",
    "deep",
    "deep_layers",
    "template_weights",
    "mixture_fit",
    "freeze_prompts",
    "freeze_weights",
    "uniform_mixture",
    "per_device_train_batch_size",
    "seed",
    "max_train_samples",
)
# Settings a resumed run may change (e.g. a lower learning rate after the loss diverged); the result then differs
# from an uninterrupted run, so the change is reported.
RESUME_ADJUSTABLE = ("learning_rate", "weight_decay", "gradient_accumulation_steps")


class RelationState:
    """The training state of the current relation that Accelerate checkpoints along with the optimizer and RNGs.

    It holds the adapter tensors too (current and best), so a checkpoint never contains the frozen base model.
    """

    def __init__(self) -> None:
        self.reset(None, {})

    def reset(self, relation: str | None, settings: dict[str, Any]) -> None:
        self.relation = relation
        self.settings = settings
        self.epoch = 0
        self.best_p1 = -1.0
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict[str, float]] = []
        self.adapter: dict[str, torch.Tensor] = {}
        self.best_adapter: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().clone() for name, t in model.prompt_encoder[ADAPTER].state_dict().items()}


def load_adapter_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    model.prompt_encoder[ADAPTER]._load_adapter_state_dict(tensors)


# -- data --------------------------------------------------------------------------------------------------------


@dataclass
class RelationData:
    relation: str
    splits: dict[str, list]  # split -> facts
    templates: list[str]
    template_weights: list[float] | None
    notes: str


class InputError(Exception):
    """Bad input found before training; main turns it into SystemExit with the message."""


def resolve_relations(args: argparse.Namespace) -> list[str]:
    data_dir = Path(args.data_dir)
    try:
        available = list_relations(data_dir)
    except FileNotFoundError as err:
        raise InputError(str(err)) from None
    if not available:
        raise InputError(
            f"{data_dir} holds no relation folders (<relation>/train.jsonl, dev.jsonl, test.jsonl); pass --data_dir "
            f"pointing at one (the shipped sample is {SAMPLE_DIR / 'trex'})."
        )
    if args.relations.strip().lower() == "all":
        return available
    wanted = [r.strip() for r in args.relations.split(",") if r.strip()]
    missing = [r for r in wanted if r not in available]
    if missing:
        raise InputError(
            f"Relation(s) {', '.join(missing)} not found in {data_dir}; it has {', '.join(available)}. "
            "Fix --relations (comma-separated ids, or 'all')."
        )
    return list(dict.fromkeys(wanted))


def load_relation_data(
    args: argparse.Namespace, relation: str, tokenizer, common_words: set[str] | None
) -> RelationData:
    try:
        splits = load_relation(args.data_dir, relation)
    except (FileNotFoundError, DataFormatError) as err:
        raise InputError(str(err)) from None
    kept: dict[str, list] = {}
    notes = []
    for split, fact_split in splits.items():
        facts, dropped = filter_single_token(fact_split.facts, tokenizer)
        note = f"{split} {len(facts)}/{len(fact_split.facts)}"
        if dropped:
            note += f" ({len(dropped)} objects not one token)"
        if common_words is not None:
            facts, outside = facts_in_vocab(facts, common_words)
            if outside:
                note += f" ({len(outside)} not in the common vocab)"
        limit = args.max_train_samples if split == "train" else args.max_eval_samples
        if limit is not None:
            facts = facts[:limit]
        if not facts:
            raise InputError(
                f"Relation {relation}: the {split} split is empty after filtering ({len(fact_split.facts)} facts "
                f"read from {fact_split.report.path}, {len(dropped)} with objects that are not one token of "
                f"{args.model_name_or_path}'s tokenizer"
                + (", the rest outside the common vocabulary" if common_words is not None else "")
                + "). Use a model whose vocabulary covers the objects, drop --common_vocab, or leave this relation "
                "out of --relations."
            )
        kept[split] = facts
        notes.append(note)
    try:
        chosen = load_templates(args.templates, relation, k=args.num_templates, templates_dir=args.templates_dir)
    except (TemplateSetError, FileNotFoundError, DataFormatError) as err:
        raise InputError(f"{err} Fix --templates / --templates_dir.") from None
    weights = chosen.weights if args.template_weights == "source" else None
    if args.template_weights == "source" and weights is None:
        raise InputError(
            f"--template_weights source: the {args.templates!r} templates of {relation} carry no 'weight'; use "
            "--template_weights uniform."
        )
    return RelationData(
        relation, kept, list(chosen.templates), weights, f"{chosen.summary()}; facts kept: " + ", ".join(notes)
    )


# -- one relation ----------------------------------------------------------------------------------------------


class TrainingDiverged(Exception):
    pass


def checkpoint_root(args: argparse.Namespace, relation: str) -> Path:
    return Path(args.output_dir) / relation / "checkpoints"


def latest_checkpoint(root: Path) -> Path | None:
    if not root.is_dir():
        return None
    epochs = []
    for path in root.iterdir():
        name = path.name
        if path.is_dir() and name.startswith("epoch_") and name[6:].isdigit():
            epochs.append((int(name[6:]), path))
    return max(epochs)[1] if epochs else None


def save_checkpoint(accelerator: Accelerator, root: Path, epoch: int) -> Path:
    """Save Accelerate's state to ``root/epoch_N`` through a temporary folder, so a crash never leaves half of it."""
    final = root / f"epoch_{epoch}"
    staging = root / f".epoch_{epoch}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    # every process writes its own RNG state file into the staging folder; the main process writes the rest
    accelerator.save_state(str(staging))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    accelerator.wait_for_everyone()
    return final


def eval_loader(
    accelerator: Accelerator, model, tokenizer, facts: list, batch_size: int
) -> tuple[DataLoader, list[int]]:
    # evaluation order: by subject length, so that each batch pads little; ranks are put back in fact order
    order = sorted(range(len(facts)), key=subject_lengths(tokenizer, facts).__getitem__)
    ordered = [facts[i] for i in order]
    loader = DataLoader(
        FactDataset(ordered),
        batch_size=batch_size,
        sampler=SequentialSampler(range(len(ordered))),
        collate_fn=FactCollator(model, ordered),
        pin_memory=accelerator.device.type == "cuda",
    )
    return accelerator.prepare(loader), order


def ranks_in_fact_order(ranks: torch.Tensor, order: list[int]) -> torch.Tensor:
    out = torch.empty_like(ranks)
    out[torch.tensor(order, dtype=torch.long)] = ranks
    return out


def drop_long_queries(accelerator: Accelerator, model, data: RelationData) -> RelationData:
    """Leave out the facts with a filled template longer than the model takes (the model could not score them)."""
    limit = model.max_query_length
    if limit is None:
        return data
    splits, dropped = {}, []
    for split, facts in data.splits.items():
        lengths = model.query_lengths([fact.subject for fact in facts])
        splits[split] = [fact for fact, length in zip(facts, lengths) if length <= limit]
        if len(splits[split]) < len(facts):
            dropped.append(f"{split} {len(facts) - len(splits[split])}")
        if not splits[split]:
            raise InputError(
                f"Relation {data.relation}: every {split} fact has a query longer than the model's {limit} tokens. "
                "Use a model with more positions or shorter templates."
            )
    if not dropped:
        return data
    note = f"{data.relation}: facts left out, query longer than the model's {limit} tokens: {', '.join(dropped)}"
    accelerator.print(note)
    return replace(data, splits=splits, notes=f"{data.notes}; {note}")


def run_relation(
    args: argparse.Namespace,
    accelerator: Accelerator,
    base_model,
    tokenizer,
    data: RelationData,
    state: RelationState,
    candidate_mask: torch.Tensor | None,
    resume_from: Path | None,
) -> dict[str, Any]:
    relation = data.relation
    main = accelerator.is_main_process
    progress = accelerator.is_local_main_process
    set_seed(args.seed)
    settings = {key: getattr(args, key) for key in RESUME_KEYS + RESUME_ADJUSTABLE}
    state.reset(relation, settings)

    config = SoftMixtureConfig(
        templates=data.templates,
        tokenizer_name_or_path=args.model_name_or_path,
        base_model_name_or_path=args.model_name_or_path,
        init=args.init,
        deep=(args.deep_layers if args.deep_layers is not None else True) if args.deep else False,
        train_prompts=not args.freeze_prompts,
        train_weights=not (args.freeze_weights or args.uniform_mixture or args.mixture_fit == "em"),
        template_weights=data.template_weights,
        seed=args.seed,
    )
    try:
        model = get_peft_model(base_model, config)
    except (TemplateError, ValueError) as err:
        raise InputError(f"Relation {relation}: cannot build the adapter: {err}") from None
    model.to(accelerator.device)
    data = drop_long_queries(accelerator, model, data)
    encoder = model.prompt_encoder[ADAPTER]
    K = len(data.templates)

    dev_loader, dev_order = eval_loader(
        accelerator, model, tokenizer, data.splits["dev"], args.per_device_eval_batch_size
    )
    test_loader, test_order = eval_loader(
        accelerator, model, tokenizer, data.splits["test"], args.per_device_eval_batch_size
    )

    def evaluate(loader, order, per_template: bool, desc: str):
        result = evaluate_ranks(
            model,
            loader,
            num_facts=len(order),
            candidate_mask=candidate_mask,
            accelerator=accelerator,
            per_template=per_template,
            progress=progress,
            description=desc,
        )
        mixture = ranks_in_fact_order(result.mixture, order)
        templates = None if result.templates is None else ranks_in_fact_order(result.templates, order)
        return mixture, templates, result.loss

    # baselines: the frozen model with the hard templates, alone and as a uniform mixture
    ranks: dict[str, dict[str, torch.Tensor]] = {"dev": {}, "test": {}}
    per_template_test = None
    with model.disable_adapter():
        for split, loader, order in (("dev", dev_loader, dev_order), ("test", test_loader, test_order)):
            mixture, per_template, _ = evaluate(loader, order, True, f"{relation} hard {split}")
            ranks[split]["hard_first"] = per_template[:, 0]
            ranks[split]["hard_mixture"] = mixture
            if split == "test":
                per_template_test = per_template

    # training data and optimizer
    train_facts = data.splits["train"]
    sampler = LengthGroupedSampler(
        subject_lengths(tokenizer, train_facts), args.per_device_train_batch_size, shuffle=True, seed=args.seed
    )
    train_loader = DataLoader(
        FactDataset(train_facts),
        batch_sampler=BatchSampler(sampler, args.per_device_train_batch_size, drop_last=False),
        collate_fn=FactCollator(model, train_facts),
        pin_memory=accelerator.device.type == "cuda",
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    if trainable:
        # fused: one kernel for the whole update instead of a dozen, on a GPU where a step of a few ms is launch-bound
        fused = accelerator.device.type == "cuda"
        optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)
        train_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    else:
        # EM on the weights with frozen prompts: no gradient at all, so no DDP wrapper and no optimizer
        optimizer = None
        train_model = model
        train_loader = accelerator.prepare(train_loader)

    root = checkpoint_root(args, relation)
    if resume_from is not None:
        accelerator.print(f"{relation}: resuming from {resume_from}")
        accelerator.load_state(str(resume_from))
        if state.relation != relation:
            raise InputError(f"Checkpoint {resume_from} is for relation {state.relation}, not {relation}.")
        differ = {k: (state.settings.get(k), v) for k, v in settings.items() if state.settings.get(k) != v}
        fixed = {k: d for k, d in differ.items() if k in RESUME_KEYS}
        if fixed:
            listed = "; ".join(f"--{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in fixed.items())
            raise InputError(
                f"Checkpoint {resume_from} was made with other settings ({listed}). Resume with the same arguments, "
                "or start afresh in another --output_dir."
            )
        if differ:
            listed = "; ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in differ.items())
            accelerator.print(f"{relation}: resuming with changed settings ({listed}); later epochs use the new ones.")
            state.settings.update({k: new for k, (_, new) in differ.items()})
        if optimizer is not None:
            # the optimizer state brings back the checkpoint's learning rate; the one asked for now wins
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = args.learning_rate, args.weight_decay
        load_adapter_tensors(model, state.adapter)
    else:
        # the untrained adapter is the first candidate for "best on dev" (training must beat it)
        dev_ranks, _, dev_loss = evaluate(dev_loader, dev_order, False, f"{relation} init dev")
        state.best_p1 = precision_at_1(dev_ranks)
        state.best_adapter = adapter_tensors(model)
        state.history.append({"epoch": 0, "train_loss": math.nan, "dev_loss": dev_loss, "dev_p@1": state.best_p1})
        ranks["dev"]["init"] = dev_ranks

    em = args.mixture_fit == "em"
    last_checkpoint = latest_checkpoint(root) if resume_from is not None else None
    while not state.stopped and state.epoch < args.num_train_epochs:
        epoch = state.epoch + 1
        train_model.train()
        train_loader.set_epoch(epoch)
        total_loss = torch.zeros((), device=accelerator.device)
        steps = 0
        posterior_sum = torch.zeros(K, device=accelerator.device)
        bar = tqdm(train_loader, desc=f"{relation} epoch {epoch}", disable=not progress, leave=False)
        with torch.set_grad_enabled(optimizer is not None):
            for step, batch in enumerate(bar, start=1):
                with accelerator.accumulate(train_model):
                    out = train_model(**model_inputs(batch), return_log_probs=False, return_template_log_probs=em)
                    loss = out.loss
                    nonfinite = (~torch.isfinite(loss.detach())).float()
                    if accelerator.num_processes > 1:
                        nonfinite = accelerator.reduce(nonfinite, reduction="sum")
                    # the step's one wait for the GPU, before the backward pass: a non-finite loss on any process
                    # stops training before it reaches the prompts. Waiting after the update instead would keep
                    # the next batch's preparation from overlapping this step's kernels
                    if nonfinite.item() > 0:
                        raise TrainingDiverged(
                            f"Training {relation} stopped: the loss became {loss.item()} at epoch {epoch}, step "
                            f"{step}. "
                            + (
                                f"The last good checkpoint is {last_checkpoint}; "
                                if last_checkpoint
                                else "No checkpoint was saved for it yet; "
                            )
                            + f"lower --learning_rate (now {args.learning_rate}) or use --mixed_precision no, then "
                            "rerun" + (" with --resume_from_checkpoint latest." if last_checkpoint else ".")
                        )
                    if progress:
                        bar.set_postfix(loss=f"{loss.item():.3f}")  # ready: the check above waited for it
                    if em:
                        posterior_sum += em_posteriors(
                            out.template_log_probs.detach(), out.log_weights.detach(), batch["labels"]
                        ).sum(0)
                    if optimizer is not None:
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad()
                total_loss += loss.detach().float()
                steps += 1
        if em:
            if accelerator.num_processes > 1:
                posterior_sum = accelerator.reduce(posterior_sum, reduction="sum")
            with torch.no_grad():
                encoder.mixture_logits.copy_(em_mixture_logits(posterior_sum).to(encoder.mixture_logits.device))
        train_loss = float(accelerator.reduce(total_loss / max(steps, 1), reduction="mean"))

        dev_ranks, _, dev_loss = evaluate(dev_loader, dev_order, False, f"{relation} dev")
        dev_p1 = precision_at_1(dev_ranks)
        improved = dev_p1 > state.best_p1
        if improved:
            state.best_p1, state.best_epoch, state.bad_epochs = dev_p1, epoch, 0
            state.best_adapter = adapter_tensors(model)
        else:
            state.bad_epochs += 1
        state.epoch = epoch
        state.stopped = state.bad_epochs >= args.patience
        state.history.append({"epoch": epoch, "train_loss": train_loss, "dev_loss": dev_loss, "dev_p@1": dev_p1})
        state.adapter = adapter_tensors(model)
        logger.info(
            f"{relation} epoch {epoch}: train loss {train_loss:.4f}, dev loss {dev_loss:.4f}, dev P@1 {dev_p1:.4f}"
            + (" (best)" if improved else f" (best {state.best_p1:.4f} at epoch {state.best_epoch})")
            + (f"; no improvement for {state.bad_epochs} epochs, stopping" if state.stopped else ""),
            main_process_only=True,
        )
        last_checkpoint = save_checkpoint(accelerator, root, epoch)

    # the best state on dev, then the test split
    load_adapter_tensors(model, state.best_adapter)
    for split, loader, order in (("dev", dev_loader, dev_order), ("test", test_loader, test_order)):
        mixture, _, _ = evaluate(loader, order, False, f"{relation} best {split}")
        ranks[split]["soft"] = mixture

    adapter_dir = Path(args.output_dir) / relation / "adapter"
    model.save_pretrained(str(adapter_dir), is_main_process=main)
    if args.push_to_hub and main:
        repo_id = f"{args.hub_model_id}-{relation}"
        model.push_to_hub(
            repo_id,
            token=args.hub_token,
            private=args.hub_private or None,
            commit_message=f"{relation}: {trained_label(args)}, best dev P@1 {state.best_p1:.4f}",
        )
        accelerator.print(f"{relation}: pushed the adapter to {repo_id}")
    weights = model.mixture_weights()
    accelerator.free_memory()
    accelerator.wait_for_everyone()
    return {
        "relation": relation,
        "templates": data.templates,
        "mixture_weights": weights,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped,
        "history": state.history,
        "facts": {split: len(facts) for split, facts in data.splits.items()},
        "ranks": ranks,
        "hard_template_ranks_test": per_template_test,
        "adapter_dir": str(adapter_dir),
    }


# -- results -----------------------------------------------------------------------------------------------------


def build_results(args: argparse.Namespace, outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    metric = load_fact_retrieval(keep_in_memory=True)
    rows = {
        "hard_first": "manual template (hard)"
        if args.templates.split("+")[0] == "manual"
        else f"hard, template 1 ({args.templates})",
        "hard_mixture": "hard, uniform mixture",
        "soft": trained_label(args),
    }
    relations: dict[str, Any] = {}
    pooled: dict[str, dict[str, tuple[list[int], list[str]]]] = {"dev": {}, "test": {}}
    for outcome in outcomes:
        rel = outcome["relation"]
        entry: dict[str, Any] = {
            "templates": outcome["templates"],
            "mixture_weights": outcome["mixture_weights"],
            "facts": outcome["facts"],
            "best_epoch": outcome["best_epoch"],
            "epochs_run": outcome["epochs_run"],
            "stopped_early": outcome["stopped_early"],
            "history": outcome["history"],
            "adapter": outcome["adapter_dir"],
        }
        for split in ("dev", "test"):
            entry[split] = {}
            for row in rows:
                r = outcome["ranks"][split][row].tolist()
                entry[split][row] = scores_from_metric(metric, r, rel)
                ranks_list, rel_list = pooled[split].setdefault(row, ([], []))
                ranks_list.extend(r)
                rel_list.extend([rel] * len(r))
        hard = outcome["hard_template_ranks_test"]
        entry["test_hard_template_p@1"] = [float((hard[:, k] == 1).float().mean()) for k in range(hard.shape[1])]
        relations[rel] = entry
    overall: dict[str, Any] = {}
    for split, by_row in pooled.items():
        overall[split] = {}
        for row, (r, rels) in by_row.items():
            scores = metric.compute(ranks=r, relations=rels)
            scores.pop("per_relation")
            overall[split][row] = scores
    settings = {k: v for k, v in vars(args).items() if k not in ("hub_token",)}
    return {"settings": settings, "rows": rows, "relations": relations, "overall": overall}


def write_outputs(args: argparse.Namespace, results: dict[str, Any]) -> None:
    out = Path(args.output_dir)
    write_json_atomic(out / "results.json", results)
    text = f"# Soft-prompt mixtures on {args.data_dir}\n\nModel: `{args.model_name_or_path}`\n\n"
    text += results_markdown(results, "test") + "\n" + results_markdown(results, "dev")
    write_text_atomic(out / "results.md", text)
    weights = {rel: entry["mixture_weights"] for rel, entry in results["relations"].items()}
    if plot_mixture_weights(out / "mixture_weights.png", weights):
        print(f"Wrote {out / 'mixture_weights.png'}")
    else:
        print("matplotlib is not installed: mixture_weights.png skipped (pip install 'peft-softmix[plot]').")
    print(f"Wrote {out / 'results.json'} and {out / 'results.md'}")
    print(results_markdown(results, "test"))


# -- main --------------------------------------------------------------------------------------------------------


def resume_points(args: argparse.Namespace, relations: list[str]) -> dict[str, Path | None]:
    points: dict[str, Path | None] = dict.fromkeys(relations)
    if args.resume_from_checkpoint is None:
        return points
    if args.resume_from_checkpoint == "latest":
        for rel in relations:
            points[rel] = latest_checkpoint(checkpoint_root(args, rel))
        return points
    path = Path(args.resume_from_checkpoint)
    if not (path / "custom_checkpoint_0.pkl").is_file():
        raise InputError(
            f"--resume_from_checkpoint {path} is not a checkpoint of this script (no custom_checkpoint_0.pkl); give "
            "a <output_dir>/<relation>/checkpoints/epoch_N folder or 'latest'."
        )
    relation = path.resolve().parent.parent.name
    if relation not in points:
        raise InputError(
            f"--resume_from_checkpoint {path} belongs to relation {relation!r}, which is not in this run "
            f"({', '.join(relations)}). Add it to --relations."
        )
    points[relation] = path
    return points


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # with the loaders' pinned batches (on a GPU), copies to the device do not wait for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the epoch log
    logger.info(accelerator.state, main_process_only=False)
    import transformers

    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()

    state = RelationState()
    accelerator.register_for_checkpointing(state)

    # checkpoints hold only the adapter (inside `state`): never the frozen base model's weights
    def save_hook(models, weights, output_dir):
        weights.clear()

    def load_hook(models, input_dir):
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    try:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError) as err:
            hint = (
                " The demo's probe LM is built by `python scripts/build_probe_lm.py`."
                if Path(args.model_name_or_path) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir()
                else ""
            )
            raise InputError(
                f"Could not load a tokenizer from --model_name_or_path {args.model_name_or_path}: "
                f"{str(err).rstrip('.')}. Give a model folder or Hub id of a masked LM." + hint
            ) from None
        try:
            require_mask_token(tokenizer)
        except TemplateError as err:
            raise InputError(f"--model_name_or_path {args.model_name_or_path}: {err}") from None

        relations = resolve_relations(args)
        common_words = candidate_mask = None
        if args.common_vocab is not None:
            try:
                words = load_common_vocab(args.common_vocab)
            except (FileNotFoundError, DataFormatError) as err:
                raise InputError(f"{err} Fix --common_vocab.") from None
            common_words = set(words)
            candidates = candidate_token_ids(tokenizer, words)
            if not candidates.token_ids:
                raise InputError(
                    f"No word of {args.common_vocab} is one token of {args.model_name_or_path}'s tokenizer; the "
                    "vocabulary does not fit this model. Drop --common_vocab or give another word list."
                )
            candidate_mask = torch.zeros(len(tokenizer), dtype=torch.bool)
            candidate_mask[candidates.token_ids] = True
            accelerator.print(
                f"Common vocabulary: {len(candidates.token_ids)} candidate tokens "
                f"({len(candidates.skipped)} of its words are not one token here)."
            )
        # every relation's data and templates are checked before any training starts
        datasets = []
        for relation in relations:
            data = load_relation_data(args, relation, tokenizer, common_words)
            accelerator.print(data.notes)
            datasets.append(data)
        points = resume_points(args, relations)

        try:
            base_model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path)
        except (OSError, ValueError) as err:
            raise InputError(
                f"Could not load a masked LM from --model_name_or_path {args.model_name_or_path}: {err}"
            ) from None
        if candidate_mask is not None:
            vocab = base_model.get_input_embeddings().num_embeddings
            if len(candidate_mask) < vocab:
                candidate_mask = torch.cat(
                    [candidate_mask, torch.zeros(vocab - len(candidate_mask), dtype=torch.bool)]
                )
        base_model.to(accelerator.device)

        outcomes = []
        for data in datasets:
            outcomes.append(
                run_relation(
                    args, accelerator, base_model, tokenizer, data, state, candidate_mask, points[data.relation]
                )
            )
    except InputError as err:
        raise SystemExit(f"error: {err}") from None
    except TrainingDiverged as err:
        raise SystemExit(f"error: {err}") from None

    results = None
    if accelerator.is_main_process:
        results = build_results(args, outcomes)
        write_outputs(args, results)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
