#!/usr/bin/env python
"""Train one mixture of soft prompts per T-REx relation (Qin & Eisner, NAACL 2021) with Accelerate.

For each relation: fill K templates with the subject, mix their answers, train the template words (and, with
``--deep``, per-layer offsets) and/or the mixture weights on the train split, keep the state with the best dev P@1,
and score the test split, beside the untrained (hard) first template and the hard templates as a uniform mixture.
The loop is the library's (`peft_softmix.training.train_relation`); this script parses flags, loads data and model,
builds each relation's adapter and writes, in ``--output_dir``: ``<relation>/adapter/`` (load it with
``PeftModel.from_pretrained`` after ``import peft_softmix``), ``<relation>/checkpoints/epoch_N/`` (for
``--resume_from_checkpoint``), ``results.json``, ``results.md`` and ``mixture_weights.png``.

    accelerate launch examples/train_trex.py    # demo: the packaged sample and the probe LM in examples/probe_lm
    accelerate launch examples/train_trex.py --model_name_or_path bert-base-cased --data_dir <T-REx dir> \
        --relations all --templates mined --num_templates 5 --deep --preset paper --output_dir out/   # the paper
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train_trex.py ...   # DDP, CPU

What is trained: ``--freeze_prompts`` (weights only), ``--freeze_weights`` or ``--uniform_mixture`` (token vectors
only), neither (both); ``--mixture_fit em`` fits the weights by EM. ``--preset paper`` is the paper's protocol
(EM weights, Adam at 1e-3, up to 16 epochs, patience 4); flags given explicitly override it.

``--multi_token`` trains on all facts, objects of any length (one mask per object token), and evaluates by ranking
each relation's candidate objects (default: the distinct objects of its three files; ``--candidates FILE`` gives
them, one per line, or a folder of ``<relation>.txt`` files), with scores split into single- and multi-token facts.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from dataclasses import fields
from pathlib import Path

import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from peft import get_peft_model
from transformers import AutoModelForMaskedLM, AutoTokenizer

from peft_softmix import SoftMixtureConfig, TemplateError
from peft_softmix.candidate_evaluation import load_candidates
from peft_softmix.checkpoints import ResumeError, checkpoint_dir, resume_points
from peft_softmix.errors import DataFormatError
from peft_softmix.facts import SAMPLE_DIR
from peft_softmix.output_dir import OutputDirError, lock_output_dir
from peft_softmix.relations import (
    RelationDataError,
    candidate_mask,
    drop_long_queries,
    load_relation_data,
    resolve_relations,
)
from peft_softmix.results import (
    results_document,
    results_markdown,
    results_markdown_by_length,
    row_labels,
    write_results,
)
from peft_softmix.tokenization import require_mask_token
from peft_softmix.trainer import TrainingDiverged, TrainingSetupError, check_mixed_precision
from peft_softmix.training import train_relation, trained_label
from peft_softmix.training_args import PRESETS, TrainingArguments, preset_note

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO_ROOT / "examples" / "probe_lm"
DEFAULT_COMMON_VOCAB = SAMPLE_DIR / "vocab" / "common_vocab_cased.txt"
# Flags that, with TrainingArguments' own, define a run: a checkpoint made with other values cannot be resumed.
RUN_FLAGS = ("model_name_or_path", "templates", "num_templates", "common_vocab", "init", "deep", "deep_layers",
             "template_weights", "freeze_prompts", "freeze_weights", "uniform_mixture",
             "max_train_samples")  # fmt: skip
TRAINING_FLAGS = [f.name for f in fields(TrainingArguments)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("model and data")
    data.add_argument("--model_name_or_path", default=str(DEFAULT_MODEL), help="A masked LM (AutoModelForMaskedLM).")
    data.add_argument("--data_dir", default=str(SAMPLE_DIR / "trex"), help="<relation>/{train,dev,test}.jsonl.")
    data.add_argument("--relations", default="all", help="'all' or comma-separated relation ids (P19,P20).")
    # the demo's template 1 is LAMA's manual template, so its first table row is the manual baseline
    sources = "manual, mined, paraphrase (peft_softmix.template_sets), 'manual+mined', or a .jsonl file"
    data.add_argument("--templates", default="manual+mined", help=f"Template source: {sources}.")
    data.add_argument(
        "--templates_dir", help="lama.jsonl, lpaqa_*.jsonl. Default: templates/ by --data_dir, or the sample's."
    )
    data.add_argument("--num_templates", type=int, default=5, help="K: the first K templates of the source.")
    vocab = "optionally its path (default: vocab/common_vocab_cased.txt by --data_dir, or the sample's)"
    data.add_argument("--common_vocab", nargs="?", const="", help=f"Rank among LAMA's common vocabulary; {vocab}.")
    data.add_argument("--max_train_samples", type=int, default=None, help="Use only the first N train facts.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Use only the first N dev and test facts.")
    data.add_argument(
        "--candidates",
        help="With --multi_token: candidate objects to rank, one per line (for every relation), or a folder of "
        "<relation>.txt files. Default: each relation's objects; a gold object not among them is ranked last.",
    )

    method = parser.add_argument_group("the adapter")
    method.add_argument("--init", choices=("template", "random"), default="template", help="Start of the soft words.")
    method.add_argument("--deep", action="store_true", help="Also train per-layer offsets at template positions.")
    method.add_argument("--deep_layers", type=int, default=None, help="Deep offsets for the first N layers only.")
    weights = "Initial mixture weights: uniform, or the template source's own (LPAQA's 'weight')."
    method.add_argument("--template_weights", choices=("uniform", "source"), default="uniform", help=weights)
    method.add_argument("--freeze_prompts", action="store_true", help="Train the mixture weights only.")
    method.add_argument("--freeze_weights", action="store_true", help="Keep the initial mixture weights.")
    method.add_argument("--uniform_mixture", action="store_true", help="Uniform, fixed mixture weights.")

    train = parser.add_argument_group("training (peft_softmix.training_args.TrainingArguments)")
    paper = f"'paper': {preset_note('paper', {}).split(': ', 1)[1]}; flags given explicitly override it"
    train.add_argument("--preset", choices=tuple(PRESETS), help=f"The paper's protocol ({paper}).")
    defaults = TrainingArguments()
    for f in fields(TrainingArguments):
        # None: "not given", so that --preset can tell a default from an explicit flag
        default = getattr(defaults, f.name)
        help_text = f"{f.metadata['help']} Default: {default}."
        if isinstance(default, bool):  # a switch: given, it is True
            train.add_argument(f"--{f.name}", action="store_const", const=True, help=help_text)
            continue
        train.add_argument(f"--{f.name}", type=type(default), choices=f.metadata.get("choices"), help=help_text)
    train.add_argument("--output_dir", default="out/train_trex", help="Where adapters, checkpoints, results go.")
    train.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), help="Default: accelerate's config.")
    resume = "'latest' (each relation's last checkpoint in --output_dir) or a <relation>/checkpoints/epoch_N path."
    train.add_argument("--resume_from_checkpoint", help=resume)
    train.add_argument("--push_to_hub", action="store_true", help="Push each relation's adapter to the Hub.")
    train.add_argument("--hub_model_id", default=None, help="Repo id prefix: each relation goes to <id>-<relation>.")
    train.add_argument("--hub_token", default=None)
    train.add_argument("--hub_private", action="store_true")
    args = parser.parse_args(argv)

    given = {name: getattr(args, name) for name in TRAINING_FLAGS}
    try:
        args.training = TrainingArguments.from_preset(args.preset, **given)
    except ValueError as err:
        parser.error(str(err))
    args.preset_note = preset_note(args.preset, given) if args.preset else None
    for name in TRAINING_FLAGS:  # results.json's settings show the values used
        setattr(args, name, getattr(args.training, name))
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
    if args.uniform_mixture and args.template_weights == "source":
        parser.error("--uniform_mixture and --template_weights source contradict each other; pick one.")
    if args.freeze_prompts and (args.freeze_weights or args.uniform_mixture):
        parser.error(
            "--freeze_prompts with --freeze_weights/--uniform_mixture leaves nothing to train; the "
            "hard-template rows of results.md already report that setting."
        )
    if args.mixture_fit == "em" and (args.freeze_weights or args.uniform_mixture):
        parser.error(
            "--mixture_fit em"
            + (" (from --preset paper)" if given["mixture_fit"] is None else "")
            + " fits the mixture weights; it cannot be combined with frozen weights."
        )
    if args.multi_token and args.common_vocab is not None:
        parser.error("--common_vocab ranks single-token answers; with --multi_token give --candidates FILE instead.")
    if args.candidates is not None and not args.multi_token:
        parser.error("--candidates ranks objects of any length, which --multi_token does; add it.")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. your-name/softmix-bert; '-<relation>' is appended).")
    return args


def load_model(args: argparse.Namespace):
    hint = ""
    if Path(args.model_name_or_path) == DEFAULT_MODEL and not DEFAULT_MODEL.is_dir():
        hint = " The demo's probe LM is built by `python scripts/build_probe_lm.py`."
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise RelationDataError(
            f"Could not load a tokenizer from --model_name_or_path {args.model_name_or_path}: "
            f"{str(err).rstrip('.')}. Give a model folder or Hub id of a masked LM.{hint}"
        ) from None
    try:
        require_mask_token(tokenizer)
    except TemplateError as err:
        raise RelationDataError(f"--model_name_or_path {args.model_name_or_path}: {err}") from None
    try:
        model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path)
    except (OSError, ValueError) as err:
        raise RelationDataError(
            f"Could not load a masked LM from --model_name_or_path {args.model_name_or_path}: {err}"
        ) from None
    return tokenizer, model


def adapter_config(args: argparse.Namespace, templates: list[str], weights: list[float] | None) -> SoftMixtureConfig:
    return SoftMixtureConfig(
        templates=templates,
        tokenizer_name_or_path=args.model_name_or_path,
        base_model_name_or_path=args.model_name_or_path,
        init=args.init,
        deep=(args.deep_layers or True) if args.deep else False,
        train_prompts=not args.freeze_prompts,
        train_weights=not (args.freeze_weights or args.uniform_mixture or args.mixture_fit == "em"),
        template_weights=weights,
        seed=args.seed,
    )


def relation_candidates(path: str, relation: str, tokenizer) -> list[str]:
    """The candidates of ``relation`` from --candidates: one file for every relation, or a folder's <relation>.txt."""
    file = Path(path) / f"{relation}.txt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise RelationDataError(f"--candidates {path}: no file {file}; give a file, or a folder of <relation>.txt.")
    try:
        return load_candidates(file, tokenizer)
    except DataFormatError as err:
        raise RelationDataError(f"{err} Fix --candidates.") from None


def train_relations(args: argparse.Namespace, accelerator: Accelerator, output_dir: Path) -> tuple[list, str]:
    """Load the model and every relation's data (all checked before any training), then train each relation."""
    outcomes = []
    tokenizer, base_model = load_model(args)
    relations = resolve_relations(args.data_dir, args.relations)
    common_words = candidates = None
    if args.common_vocab is not None:
        vocab_size = base_model.get_input_embeddings().num_embeddings
        common_words, candidates, note = candidate_mask(tokenizer, args.common_vocab, vocab_size)
        accelerator.print(note)
    datasets = []
    for relation in relations:
        pool = relation_candidates(args.candidates, relation, tokenizer) if args.candidates else None
        data = load_relation_data(
            args.data_dir,
            relation,
            tokenizer,
            args.templates,
            args.num_templates,
            args.templates_dir,
            source_weights=args.template_weights == "source",
            common_words=common_words,
            max_train_samples=args.max_train_samples,
            max_eval_samples=args.max_eval_samples,
            multi_token=args.multi_token,
            candidates=pool,
        )
        accelerator.print(data.notes)
        datasets.append(data)
    points, notes = resume_points(args.resume_from_checkpoint, output_dir, relations, accelerator.num_processes)
    for note in notes:
        accelerator.print(note)
    base_model.to(accelerator.device)

    for data in datasets:
        set_seed(args.seed)
        config = adapter_config(args, data.templates, data.template_weights)
        soft_label = trained_label(config, args.training)
        try:
            model = get_peft_model(base_model, config)
        except (TemplateError, ValueError) as err:
            raise RelationDataError(f"Relation {data.relation}: cannot build the adapter: {err}") from None
        model.to(accelerator.device)
        data, note = drop_long_queries(model, data)
        if note:
            accelerator.print(note)
        outcome = train_relation(
            model,
            data,
            args.training,
            accelerator,
            candidate_mask=candidates,
            checkpoint_dir=checkpoint_dir(output_dir, data.relation),
            resume_from=points[data.relation],
            settings={name: getattr(args, name) for name in RUN_FLAGS},
        )
        outcome.adapter_dir = str(output_dir / data.relation / "adapter")
        model.save_pretrained(outcome.adapter_dir, is_main_process=accelerator.is_main_process)
        if args.push_to_hub and accelerator.is_main_process:
            repo_id = f"{args.hub_model_id}-{data.relation}"
            message = f"{data.relation}: {soft_label}, best dev P@1 {outcome.training.best_dev_p1:.4f}"
            model.push_to_hub(repo_id, token=args.hub_token, private=args.hub_private or None, commit_message=message)
            accelerator.print(f"{data.relation}: pushed the adapter to {repo_id}")
        accelerator.wait_for_everyone()
        outcomes.append(outcome)
    return outcomes, soft_label


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        # with the loaders' pinned batches (on a GPU), copies to the device do not wait for it
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-file checkpoint lines drown the epoch log
    logging.getLogger(__name__).info(accelerator.state)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    if args.preset_note:
        accelerator.print(args.preset_note)
    output_dir = Path(args.output_dir)

    with contextlib.ExitStack() as stack:
        try:
            check_mixed_precision(accelerator)
            if accelerator.is_main_process:  # one run per --output_dir, and it must be writable before training
                stack.enter_context(lock_output_dir(output_dir))
            outcomes, soft_label = train_relations(args, accelerator, output_dir)
        except (RelationDataError, ResumeError, TrainingDiverged, TrainingSetupError, OutputDirError) as err:
            raise SystemExit(f"error: {err}") from None

        results = None
        if accelerator.is_main_process:
            settings = {k: v for k, v in vars(args).items() if k not in ("hub_token", "training", "preset_note")}
            results = results_document(outcomes, row_labels(args.templates, soft_label), settings)
            title = f"# Soft-prompt mixtures on {args.data_dir}\n\nModel: `{args.model_name_or_path}`"
            if args.multi_token:
                how = "log p per token" if args.length_normalized else "log p"
                title += f"\n\nAll facts, objects of any length, ranked by {how} among each relation's candidates."
            written = write_results(output_dir, results, title)
            if output_dir / "mixture_weights.png" not in written:
                print("matplotlib is not installed: mixture_weights.png skipped (pip install 'peft-softmix[plot]').")
            print("Wrote " + ", ".join(str(path) for path in written))
            print(results_markdown(results, "test"))
            if args.multi_token:
                print(results_markdown_by_length(results, "test"))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
