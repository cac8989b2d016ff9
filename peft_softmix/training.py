"""Training a mixture of soft prompts on one relation: `train_relation`, the library call behind
``examples/train_trex.py`` and the accuracy benchmark.

It scores the untrained hard templates (each alone, and as a uniform mixture) with the adapter switched off, then
trains the adapter with `peft_softmix.trainer.RelationTrainer` (best state on dev, early stopping, checkpoints and
resume, EM or gradient weights) and scores the kept state. A minimal run::

    model = get_peft_model(base, SoftMixtureConfig(templates=data.templates, tokenizer_name_or_path=name))
    outcome = train_relation(model, data, TrainingArguments(), Accelerator())

The building blocks that used to live here are importable from here still; their homes are
`peft_softmix.batching`, `peft_softmix.em`, `peft_softmix.evaluation` and `peft_softmix.results`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .atomic import write_json_atomic, write_text_atomic
from .batching import FactCollator, FactDataset, LengthGroupedSampler, model_inputs, subject_lengths
from .candidate_evaluation import length_group
from .config import SoftMixtureConfig, SoftMixtureInit
from .em import em_mixture_logits, em_posteriors
from .evaluation import EvalRanks, evaluate_ranks, precision_at_1, scores_from_metric
from .relations import RelationData
from .results import RelationOutcome, SplitRanks, plot_mixture_weights, results_markdown
from .trainer import RelationTrainer
from .training_args import TrainingArguments

__all__ = [
    "EvalRanks",
    "FactCollator",
    "FactDataset",
    "LengthGroupedSampler",
    "em_mixture_logits",
    "em_posteriors",
    "evaluate_ranks",
    "model_inputs",
    "plot_mixture_weights",
    "precision_at_1",
    "results_markdown",
    "scores_from_metric",
    "subject_lengths",
    "trained_label",
    "train_relation",
    "write_json_atomic",
    "write_text_atomic",
]


def train_relation(
    model: Any,
    data: RelationData,
    args: TrainingArguments,
    accelerator: Any,
    candidate_mask: torch.Tensor | None = None,
    checkpoint_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    settings: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> RelationOutcome:
    """Score the hard templates, train ``model`` (a `PeftModelForSoftMixture` over ``data.templates``) on
    ``data``'s train facts, keep its best state on dev and score it on dev and test.

    Args:
        model: the PEFT model, on ``accelerator.device``; it ends holding the kept (best on dev) adapter.
        data: the relation's facts and templates (`peft_softmix.relations.load_relation_data`).
        args: the `TrainingArguments`.
        accelerator: an ``accelerate.Accelerator``.
        candidate_mask: ``[V]`` bool, the tokens answers are ranked among (LAMA's common vocabulary).
            With ``args.multi_token``, answers are ranked among ``data.candidates`` instead (objects of any length).
        checkpoint_dir: where ``epoch_N`` checkpoints go (None: none).
        resume_from: a checkpoint of this relation to continue from.
        settings: the caller's settings that define the run, recorded in checkpoints and compared on resume.
        progress: show progress bars (default: on the local main process).
    """
    trainer = RelationTrainer(
        model,
        data.splits,
        args,
        accelerator,
        name=data.relation,
        candidate_mask=candidate_mask,
        progress=progress,
        candidates=data.candidates,
    )
    # baselines: the frozen model with the hard templates, alone and as a uniform mixture
    hard = {}
    with model.disable_adapter():
        for split in ("dev", "test"):
            hard[split] = trainer.evaluate(split, per_template=True, description=f"{data.relation} hard {split}")
    result = trainer.train(checkpoint_dir=checkpoint_dir, resume_from=resume_from, settings=settings)

    def ranks(split: str, soft: EvalRanks) -> SplitRanks:
        templates = hard[split].templates
        assert templates is not None  # asked for with per_template=True
        return SplitRanks(hard_first=templates[:, 0], hard_mixture=hard[split].mixture, soft=soft.mixture)

    test_templates = hard["test"].templates
    assert test_templates is not None
    candidates = None
    if trainer.candidates is not None:  # the multi-token setting: scores also by the gold object's length
        pool = {candidate.strip() for candidate in trainer.candidates}
        candidates = {
            "count": len(pool),
            "gold_not_a_candidate": {
                s: sum(f.object.strip() not in pool for f in data.splits[s]) for s in ("dev", "test")
            },
            "length_groups": {
                s: [length_group(model.tokenizer, f.object) for f in data.splits[s]] for s in ("dev", "test")
            },
        }
    return RelationOutcome(
        relation=data.relation,
        templates=list(data.templates),
        mixture_weights=model.mixture_weights(),
        facts={split: len(facts) for split, facts in data.splits.items()},
        training=result,
        dev=ranks("dev", result.dev),
        test=ranks("test", result.test),
        hard_templates_test=test_templates,
        candidates=candidates,
    )


def trained_label(config: SoftMixtureConfig, args: TrainingArguments) -> str:
    """The name of what was trained, for the results table: ``soft (vectors + weights, deep, EM)`` and the like."""
    em = args.mixture_fit == "em"
    if not config.train_prompts:
        what = "weights only"
    elif not config.train_weights and not em:
        what = "token vectors only"
    else:
        what = "vectors + weights"
    extras = []
    if config.deep:
        extras.append("deep" if config.deep is True else f"deep {config.deep}")
    if em:
        extras.append("EM")
    if SoftMixtureInit(config.init) == SoftMixtureInit.RANDOM:
        extras.append("random init")
    return f"soft ({what}{', ' + ', '.join(extras) if extras else ''})"
