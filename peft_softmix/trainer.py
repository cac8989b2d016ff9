"""The training loop for one relation: train, keep the best state on dev, score it on test, with Accelerate.

`RelationTrainer` trains any model whose forward takes a batch's `model_inputs` and returns ``loss`` and, when
evaluating, ``log_probs`` at the mask: a `PeftModelForSoftMixture`, or a small wrapper around another PEFT method
(the accuracy benchmark trains PEFT's prompt tuning and P-tuning through it). It covers early stopping with
patience, mixture weights by gradient or by EM, checkpoints every epoch and a bitwise resume, several processes
(DDP), and a stop with a clear message when the loss stops being finite.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.logging import get_logger
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm

from .batching import Collator, FactCollator, eval_dataloader, model_inputs, subject_lengths, train_dataloader
from .candidate_evaluation import CandidateCollator, default_candidates, evaluate_candidate_ranks
from .checkpoints import TrainingState, as_json, load_checkpoint, save_checkpoint, start_run
from .denormals import flush_denormals
from .em import em_mixture_logits, em_object_posteriors, em_posteriors, set_mixture_logits
from .errors import TrainingDiverged, TrainingSetupError
from .evaluation import EvalRanks, evaluate_ranks, precision_at_1
from .facts import Fact
from .training_args import TrainingArguments

__all__ = [
    "EpochLog",
    "RelationTrainer",
    "TrainResult",
    "TrainingDiverged",
    "TrainingSetupError",
    "check_mixed_precision",
    "adapter_state",
    "load_adapter_state",
]

logger = get_logger(__name__)


@dataclass
class EpochLog:
    """One line of the training history; epoch 0 is the untrained adapter (no training loss)."""

    epoch: int
    train_loss: float
    dev_loss: float
    dev_p1: float

    def to_dict(self) -> dict[str, float]:
        return {"epoch": self.epoch, "train_loss": self.train_loss, "dev_loss": self.dev_loss, "dev_p@1": self.dev_p1}


@dataclass
class TrainResult:
    """What `RelationTrainer.train` gives back.

    Args:
        best_epoch: the epoch whose state was kept (0: training never beat the untrained adapter on dev).
        best_dev_p1: its dev P@1.
        epochs_run: epochs trained, resumed ones included.
        stopped_early: whether patience ran out before ``num_train_epochs``.
        history: one `EpochLog` per epoch, from epoch 0.
        dev: ranks of the kept state on dev, in fact order.
        test: ranks of the kept state on test, in fact order.
    """

    best_epoch: int
    best_dev_p1: float
    epochs_run: int
    stopped_early: bool
    history: list[EpochLog]
    dev: EvalRanks
    test: EvalRanks


def check_mixed_precision(accelerator: Any) -> None:
    """Refuse a mixed precision that Accelerate would silently run in fp32 (fp16 on a CPU)."""
    if accelerator.mixed_precision in ("fp16", "bf16") and not accelerator.native_amp:
        raise TrainingSetupError(
            f"--mixed_precision {accelerator.mixed_precision} is not available on {accelerator.device} (training "
            "would silently run in fp32). Use --mixed_precision no"
            + (" or bf16" if accelerator.mixed_precision == "fp16" else "")
            + ", or run on a GPU."
        )


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of what training changes: a PEFT model's adapter (PEFT's public state-dict API), or the
    trainable parameters of any other module."""
    if isinstance(model, PeftModel):
        tensors = get_peft_model_state_dict(model, adapter_name=model.active_adapter)
    else:
        tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return {name: t.detach().cpu().clone() for name, t in tensors.items()}


def load_adapter_state(model: Any, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back a copy taken by `adapter_state`."""
    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, dict(tensors), adapter_name=model.active_adapter)
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value.to(device=params[name].device, dtype=params[name].dtype))


class RelationTrainer:
    """Train ``model`` on one relation's ``splits`` (``train``, ``dev``, ``test`` facts) with ``accelerator``.

    Args:
        model: the model to train, already on ``accelerator.device``.
        splits: facts of the ``train``, ``dev`` and ``test`` splits.
        args: the `TrainingArguments`.
        accelerator: an ``accelerate.Accelerator`` (its ``gradient_accumulation_steps`` is set from ``args``).
        name: the relation's name, for messages and checkpoints.
        tokenizer: measures subject lengths for batching; defaults to ``model.tokenizer``.
        collator: builds a batch collator from a list of facts; defaults to `FactCollator` (``model.encode``).
        candidate_mask: ``[V]`` bool, the tokens evaluation ranks among (None: the whole vocabulary).
        progress: show progress bars (default: on the local main process).
        candidates: with ``args.multi_token``, the candidate objects dev and test facts are ranked among (default:
            every distinct object of ``splits`` that the tokenizer can write, `default_candidates`).
    """

    def __init__(
        self,
        model: Any,
        splits: Mapping[str, Sequence[Fact]],
        args: TrainingArguments,
        accelerator: Any,
        name: str = "",
        tokenizer: Any = None,
        collator: Callable[[Sequence[Fact]], Collator] | None = None,
        candidate_mask: torch.Tensor | None = None,
        progress: bool | None = None,
        candidates: Sequence[str] | None = None,
    ) -> None:
        check_mixed_precision(accelerator)
        self.model, self.args, self.accelerator, self.name = model, args, accelerator, name
        self.candidate_mask = candidate_mask
        self.progress = accelerator.is_local_main_process if progress is None else progress
        accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        multi = args.multi_token
        self.make_collator = collator or (lambda facts: FactCollator(model, facts, multi_token=multi))
        self.splits = {split: list(facts) for split, facts in splits.items()}
        self.candidates: list[str] | None = None
        if multi:
            if candidate_mask is not None:
                raise TrainingSetupError("candidate_mask ranks single tokens; with multi_token give candidates.")
            facts_of_all = [fact for facts in self.splits.values() for fact in facts]
            self.candidates = list(candidates or default_candidates(self.tokenizer, facts_of_all))
            if not self.candidates:
                raise TrainingSetupError(f"{name}: no candidate object to rank (none the tokenizer can write).")
        # pinned batches (on a GPU) are copied to the device without waiting for it
        self.pin_memory = accelerator.device.type == "cuda"
        self.eval_loaders = {}
        for split in ("dev", "test"):
            facts = self.splits[split]
            # with multi_token, dev and test rank each fact's gold among the candidates
            loader, order = eval_dataloader(
                facts,
                self.make_collator if not multi else lambda ordered: CandidateCollator(ordered, self.candidates or []),
                subject_lengths(self.tokenizer, facts),
                args.per_device_eval_batch_size,
                self.pin_memory,
            )
            self.eval_loaders[split] = (accelerator.prepare(loader), order)

    def evaluate(self, split: str, per_template: bool = False, description: str | None = None) -> EvalRanks:
        """Ranks of the gold objects of ``split`` (``dev`` or ``test``) under the model as it is now, in fact order."""
        loader, order = self.eval_loaders[split]
        shared = {"accelerator": self.accelerator, "per_template": per_template, "progress": self.progress}
        shared["description"] = description or f"{self.name} {split}"
        if self.candidates is not None:
            length_normalized = self.args.length_normalized
            result = evaluate_candidate_ranks(
                self.model, loader, len(order), self.candidates, length_normalized=length_normalized, **shared
            )
        else:
            result = evaluate_ranks(self.model, loader, len(order), candidate_mask=self.candidate_mask, **shared)
        index = torch.tensor(order, dtype=torch.long)
        mixture = torch.empty_like(result.mixture)
        mixture[index] = result.mixture
        templates = None
        if result.templates is not None:
            templates = torch.empty_like(result.templates)
            templates[index] = result.templates
        return EvalRanks(mixture=mixture, templates=templates, loss=result.loss)

    def train(
        self,
        checkpoint_dir: str | Path | None = None,
        resume_from: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> TrainResult:
        """Train, keep the best state on dev, load it into the model and score it on dev and test.

        Args:
            checkpoint_dir: where ``epoch_N`` checkpoints go (None: no checkpoints).
            resume_from: an ``epoch_N`` checkpoint of this relation to continue from.
            settings: what else defines the run (the caller's flags: model, templates, ...), recorded in each
                checkpoint; resuming with other values is a `ResumeError` that names each difference.
        """
        args, accelerator, model = self.args, self.accelerator, self.model
        run_settings = {**dict(settings or {}), **args.settings()}
        state = TrainingState()
        state.reset(self.name, run_settings)
        fingerprint = self.fingerprint(run_settings)

        train_facts = self.splits["train"]
        train_loader = train_dataloader(
            train_facts,
            self.make_collator(train_facts),
            subject_lengths(self.tokenizer, train_facts),
            args.per_device_train_batch_size,
            args.seed,
            self.pin_memory,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer: Any = None
        if trainable:
            # fused: one kernel for the whole update instead of a dozen, on a GPU where a step is launch-bound
            fused = accelerator.device.type == "cuda"
            optimizer = torch.optim.Adam(trainable, lr=args.learning_rate, weight_decay=args.weight_decay, fused=fused)
            train_model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
        else:
            # EM on the weights with frozen prompts: no gradient at all, so no DDP wrapper and no optimizer
            train_model = model
            train_loader = accelerator.prepare(train_loader)

        if resume_from is not None:
            self._resume(state, resume_from, fingerprint, run_settings, optimizer)
            if checkpoint_dir is not None:
                start_run(accelerator, checkpoint_dir, state.run_id)  # later checkpoints continue that run
        else:
            if checkpoint_dir is not None:
                # checkpoints of an earlier run into this folder are not this run's: `latest` skips them
                state.run_id = start_run(accelerator, checkpoint_dir)
            # the untrained model is the first candidate for "best on dev" (training must beat it)
            init = self.evaluate("dev", description=f"{self.name} init dev")
            state.best_p1 = precision_at_1(init.mixture)
            state.best_adapter = adapter_state(model)
            state.history.append(EpochLog(0, math.nan, init.loss, state.best_p1).to_dict())

        last_checkpoint = Path(resume_from) if resume_from is not None else None
        while not state.stopped and state.epoch < args.num_train_epochs:
            epoch = state.epoch + 1
            # a mixture's backward makes denormals (templates with a far smaller posterior); on a CPU they are slow
            with flush_denormals(accelerator.device.type == "cpu"):
                train_loss = self._train_epoch(train_model, train_loader, optimizer, epoch, last_checkpoint)
            dev = self.evaluate("dev")
            dev_p1 = precision_at_1(dev.mixture)
            improved = dev_p1 > state.best_p1
            if improved:
                state.best_p1, state.best_epoch, state.bad_epochs = dev_p1, epoch, 0
                state.best_adapter = adapter_state(model)
            else:
                state.bad_epochs += 1
            state.epoch = epoch
            state.stopped = state.bad_epochs >= args.patience
            state.history.append(EpochLog(epoch, train_loss, dev.loss, dev_p1).to_dict())
            state.adapter = adapter_state(model)
            logger.info(
                f"{self.name} epoch {epoch}: train loss {train_loss:.4f}, dev loss {dev.loss:.4f}, dev P@1 "
                f"{dev_p1:.4f}"
                + (" (best)" if improved else f" (best {state.best_p1:.4f} at epoch {state.best_epoch})")
                + (f"; no improvement for {state.bad_epochs} epochs, stopping" if state.stopped else ""),
                main_process_only=True,
            )
            if checkpoint_dir is not None:
                record = {**fingerprint, "run_id": state.run_id}
                last_checkpoint = save_checkpoint(accelerator, checkpoint_dir, epoch, state, record)

        # the best state on dev, then the test split
        load_adapter_state(model, state.best_adapter)
        dev = self.evaluate("dev", description=f"{self.name} best dev")
        test = self.evaluate("test", description=f"{self.name} best test")
        accelerator.free_memory()
        accelerator.wait_for_everyone()
        return TrainResult(
            best_epoch=state.best_epoch,
            best_dev_p1=state.best_p1,
            epochs_run=state.epoch,
            stopped_early=state.stopped,
            history=[EpochLog(int(h["epoch"]), h["train_loss"], h["dev_loss"], h["dev_p@1"]) for h in state.history],
            dev=dev,
            test=test,
        )

    def fingerprint(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """What defines this run, recorded in each checkpoint and compared first on resume: the relation, the
        settings that shape parameters, batches and random states (not the adjustable ones), and a hash of the
        facts of each split (so another --data_dir, filter or sample is seen)."""
        fixed = {k: v for k, v in settings.items() if k not in TrainingArguments.ADJUSTABLE}
        data = {}
        for split, facts in self.splits.items():
            digest = hashlib.sha256()
            for fact in facts:
                digest.update(f"{fact.subject}\x1f{fact.object}\n".encode())
            data[f"facts:{split}"] = f"{len(facts)} facts, sha256 {digest.hexdigest()[:16]}"
        if self.candidates is not None:  # they pick the best epoch on dev
            digest = hashlib.sha256("\n".join(self.candidates).encode())
            data["candidates"] = f"{len(self.candidates)} candidates, sha256 {digest.hexdigest()[:16]}"
        return as_json({"relation": self.name, "settings": fixed, "data": data})

    def _resume(
        self, state: TrainingState, checkpoint: str | Path, fingerprint: dict, settings: dict[str, Any], optimizer: Any
    ) -> None:
        accelerator, args = self.accelerator, self.args
        accelerator.print(f"{self.name}: resuming from {checkpoint}")
        adjustable = TrainingArguments.ADJUSTABLE
        changed = load_checkpoint(
            accelerator, checkpoint, state, fingerprint, settings, adjustable, TrainingArguments.RECORDED_SINCE
        )
        if changed:
            listed = "; ".join(f"--{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
            accelerator.print(
                f"{self.name}: resuming with changed settings ({listed}); later epochs use the new ones."
            )
            state.settings.update({k: new for k, (_, new) in changed.items()})
        if optimizer is not None:
            # the optimizer state brings back the checkpoint's learning rate; the one asked for now wins
            for group in optimizer.param_groups:
                group["lr"], group["weight_decay"] = args.learning_rate, args.weight_decay
        load_adapter_state(self.model, state.adapter)

    def _train_epoch(self, train_model: Any, loader: Any, optimizer: Any, epoch: int, last_checkpoint: Path | None):
        accelerator, args = self.accelerator, self.args
        em = args.mixture_fit == "em"
        # objects of any length: the E-step needs each row's log p_k(y|x) only, which the forward always returns
        row_distributions = em and not args.multi_token
        train_model.train()
        loader.set_epoch(epoch)
        total_loss = torch.zeros((), device=accelerator.device)
        steps = 0
        posterior_sum: torch.Tensor | None = None
        bar = tqdm(loader, desc=f"{self.name} epoch {epoch}", disable=not self.progress, leave=False)
        with torch.set_grad_enabled(optimizer is not None):
            for step, batch in enumerate(bar, start=1):
                with accelerator.accumulate(train_model):
                    out = train_model(
                        **model_inputs(batch), return_log_probs=False, return_template_log_probs=row_distributions
                    )
                    loss = out.loss
                    nonfinite = (~torch.isfinite(loss.detach())).float()
                    if accelerator.num_processes > 1:
                        nonfinite = accelerator.reduce(nonfinite, reduction="sum")
                    # the step's one wait for the GPU, before the backward pass: a non-finite loss on any process
                    # stops training before it reaches the prompts. Waiting after the update instead would keep
                    # the next batch's preparation from overlapping this step's kernels
                    if nonfinite.item() > 0:
                        raise TrainingDiverged(self._diverged(loss.item(), epoch, step, last_checkpoint))
                    if self.progress:
                        bar.set_postfix(loss=f"{loss.item():.3f}")  # ready: the check above waited for it
                    if em:
                        e_step, rows = (
                            (em_posteriors, out.template_log_probs)
                            if row_distributions
                            else (em_object_posteriors, out.template_object_log_probs)
                        )
                        posteriors = e_step(rows.detach(), out.log_weights.detach(), batch["labels"]).sum(0)
                        posterior_sum = posteriors if posterior_sum is None else posterior_sum + posteriors
                    if optimizer is not None:
                        accelerator.backward(loss)
                        optimizer.step()
                        optimizer.zero_grad()
                total_loss += loss.detach().float()
                steps += 1
        if em and posterior_sum is not None:
            if accelerator.num_processes > 1:
                posterior_sum = accelerator.reduce(posterior_sum, reduction="sum")
            set_mixture_logits(self.model, em_mixture_logits(posterior_sum))
        return float(accelerator.reduce(total_loss / max(steps, 1), reduction="mean"))

    def _diverged(self, loss: float, epoch: int, step: int, last_checkpoint: Path | None) -> str:
        where = (
            f"The last good checkpoint is {last_checkpoint}; "
            if last_checkpoint
            else "No checkpoint was saved for it yet; "
        )
        return (
            f"Training {self.name} stopped: the loss became {loss} at epoch {epoch}, step {step}. {where}lower "
            f"--learning_rate (now {self.args.learning_rate}) or use --mixed_precision no, then rerun"
            + (" with --resume_from_checkpoint latest." if last_checkpoint else ".")
        )
