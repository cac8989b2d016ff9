"""Training and evaluating a mixture of soft prompts with the 🤗 `transformers.Trainer`.

Three pieces, each usable on its own (docs/trainer.md has the whole recipe):

- `SoftMixtureDataCollator` turns rows with a subject and an object into the adapter's batch (its `encode`).
- `FactRows` is how a `datasets.Dataset` with subject/object columns reaches that collator under the *default*
  `TrainingArguments`. With ``remove_unused_columns=True`` the Trainer drops every dataset column that the base model's
  forward does not name (it inspects the base model, e.g. ``BertForMaskedLM.forward``), so ``subject`` and ``object``
  would be gone before the collator sees them. The Trainer leaves rows alone that are not dicts, and the rows of
  `FactRows` are `peft_softmix.facts.Fact` objects: nothing is dropped, and no Trainer setting has to change.
- `FactRetrievalMetrics` makes evaluation meaningful: its `preprocess_logits_for_metrics` turns each batch's output
  into the rank of every fact's gold object (the eval predictions are those ranks, one per fact, instead of the
  ``[N, V]`` log-probabilities plus a concatenation of per-batch mixture weights), and its `compute_metrics` scores
  them with the ``fact_retrieval`` metric: ``p@1``, ``p@10`` and ``mrr``, ready for ``metric_for_best_model="p@1"``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .facts import Fact
from .metrics import load_fact_retrieval, rank_of_gold
from .processing import IGNORE_INDEX

__all__ = ["FactRetrievalMetrics", "FactRows", "SoftMixtureDataCollator"]

logger = logging.getLogger(__name__)


def _columns_of(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict has one list per split
        raise TypeError(
            f"Got a DatasetDict with splits {sorted(names)}; give one split, e.g. FactRows(dataset['train'])."
        )
    return list(names) if names is not None else []


class FactRows(Dataset):
    """The rows of a table of facts as `peft_softmix.facts.Fact` objects, for `transformers.Trainer`.

    Args:
        rows: A `datasets.Dataset` (or a list of dicts) with a subject and an object column, or a list of `Fact`
            (e.g. ``load_facts("train.jsonl").facts``).
        subject_column: The subject column's name.
        object_column: The object column's name; a table without it gives facts without objects (to predict).
        relation_column: An optional relation column, kept on each fact.

    Raises:
        ValueError: a column is missing (the message lists the table's columns), or a subject or object is not a
            non-empty string (the message names the row).
    """

    def __init__(
        self,
        rows: Any,
        subject_column: str = "subject",
        object_column: str = "object",
        relation_column: str | None = None,
    ) -> None:
        self.facts: list[Fact] = []
        if isinstance(rows, Sequence) and rows and all(isinstance(r, Fact) for r in rows):
            self.facts = list(rows)
            return
        columns = _columns_of(rows)
        if columns and subject_column not in columns:
            raise ValueError(
                f"The table has no {subject_column!r} column (it has {columns}); name the subject column with "
                "subject_column=..."
            )
        has_object = not columns or object_column in columns
        for i, row in enumerate(_iter_rows(rows)):
            subject = row.get(subject_column)
            obj = row.get(object_column) if has_object else None
            if not isinstance(subject, str) or not subject.strip():
                raise ValueError(
                    f"Row {i}: the subject ({subject_column!r}) must be a non-empty string, got {subject!r}."
                )
            if obj is not None and (not isinstance(obj, str) or not obj.strip()):
                raise ValueError(f"Row {i}: the object ({object_column!r}) must be a non-empty string, got {obj!r}.")
            relation = row.get(relation_column) if relation_column else None
            self.facts.append(Fact(subject=subject, object=obj, relation=relation))  # type: ignore[arg-type]
        if not self.facts:
            raise ValueError("The table of facts is empty.")

    def __len__(self) -> int:
        return len(self.facts)

    def __getitem__(self, index: int) -> Fact:
        return self.facts[index]


def _iter_rows(rows: Any) -> Iterable[Mapping[str, Any]]:
    for row in rows:
        if not isinstance(row, Mapping):
            raise TypeError(f"Expected rows with named columns (dicts), got a {type(row).__name__}: {row!r}.")
        yield row


class SoftMixtureDataCollator:
    """Builds the batch of a `PeftModelForSoftMixture` from rows with a subject and an object.

    A row is a `peft_softmix.facts.Fact` (the rows of `FactRows`, which pass the Trainer's column removal untouched)
    or a dict with the subject and object columns (a `datasets.Dataset` under ``remove_unused_columns=False``, or a
    plain `DataLoader`). Every template is filled with every subject and padded only to the batch's longest query;
    ``labels`` is each object's token id, or -100 for an object that is not one token (the loss skips it, evaluation
    gives it no rank, and `FactRetrievalMetrics` counts it).

    Args:
        model: The `PeftModelForSoftMixture` whose active adapter's `encode` makes the batch.
        subject_column: The subject key in dict rows.
        object_column: The object key in dict rows.
        multi_token: Encode objects of any length (one mask per object token, ``labels`` ``[B, L]``): training then
            maximises log sum_k pi_k p_k(y|x) over all facts. Rank candidates with
            `peft_softmix.candidate_evaluation` (`FactRetrievalMetrics` scores single-token batches).
    """

    def __init__(
        self, model: Any, subject_column: str = "subject", object_column: str = "object", multi_token: bool = False
    ) -> None:
        if not callable(getattr(model, "encode", None)):
            raise TypeError(
                f"SoftMixtureDataCollator needs a PeftModelForSoftMixture (with an encode method), got "
                f"{type(model).__name__}."
            )
        self.model = model
        self.subject_column = subject_column
        self.object_column = object_column
        self.multi_token = multi_token

    def __call__(self, rows: Sequence[Any]) -> dict[str, torch.Tensor]:
        subjects: list[str] = []
        objects: list[str | None] = []
        for row in rows:
            if isinstance(row, Fact):
                subjects.append(row.subject)
                objects.append(row.object)
            elif isinstance(row, Mapping):
                if self.subject_column not in row:
                    raise ValueError(
                        f"A row has no {self.subject_column!r} (it has {sorted(row)}). transformers.Trainer drops "
                        "the dataset columns that the model's forward does not name (remove_unused_columns=True, the "
                        "default): pass train_dataset=FactRows(dataset) (peft_softmix.hf_trainer), whose rows it "
                        "leaves alone, or set remove_unused_columns=False."
                    )
                subjects.append(row[self.subject_column])
                objects.append(row.get(self.object_column))
            else:
                raise TypeError(f"Cannot collate a row of type {type(row).__name__}: give Fact objects or dicts.")
        has_objects = any(obj is not None for obj in objects)
        if self.multi_token:
            if not has_objects:
                raise ValueError(
                    "multi_token=True gives each fact one mask per token of its object, so rows need objects; "
                    "rank candidate objects of subjects alone with peft_model.score_candidates."
                )
            return self.model.encode(subjects, objects, multi_token=True)
        return self.model.encode(subjects, objects if has_objects else None)


class FactRetrievalMetrics:
    """Fact retrieval scores for `transformers.Trainer`: pass both methods to it.

    ```python
    metrics = FactRetrievalMetrics()
    trainer = Trainer(..., compute_metrics=metrics.compute_metrics,
                      preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics)
    ```

    Args:
        candidate_ids: Token ids the answers are ranked among (e.g. LAMA's common vocabulary through
            `peft_softmix.facts.candidate_token_ids`); all tokens by default. A gold object outside them is an error.
    """

    def __init__(self, candidate_ids: Sequence[int] | None = None) -> None:
        self.candidate_ids = None if candidate_ids is None else sorted({int(i) for i in candidate_ids})
        self._mask: torch.Tensor | None = None
        self._metric: Any = None

    def preprocess_logits_for_metrics(self, logits: Any, labels: torch.Tensor) -> torch.Tensor:
        """The rank of each fact's gold object (1 = the top answer), ``[B]``; 0 for a row without a label.

        ``logits`` is what the Trainer gathered from the model's output: the mixture's ``log_probs`` first.
        """
        log_probs = logits[0] if isinstance(logits, (tuple, list)) else logits
        labels = torch.as_tensor(labels, device=log_probs.device)
        if labels.dim() == 2:
            raise ValueError(
                "These are multi_token batches (labels [facts, masks]); FactRetrievalMetrics ranks single tokens. "
                "Rank candidate objects with peft_softmix.candidate_evaluation.evaluate_candidate_ranks instead."
            )
        if log_probs.dim() != 2 or labels.dim() != 1 or log_probs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"Expected the model's log_probs [batch, vocab] and labels [batch], got {tuple(log_probs.shape)} and "
                f"{tuple(labels.shape)}: FactRetrievalMetrics works with a PeftModelForSoftMixture and "
                "SoftMixtureDataCollator batches."
            )
        ranks = torch.zeros(labels.shape, dtype=torch.long, device=log_probs.device)
        keep = labels != IGNORE_INDEX
        if keep.any():
            ranks[keep] = rank_of_gold(log_probs[keep], labels[keep], self._candidate_mask(log_probs))
        return ranks

    def _candidate_mask(self, log_probs: torch.Tensor) -> torch.Tensor | None:
        if self.candidate_ids is None:
            return None
        if self._mask is None or self._mask.device != log_probs.device or len(self._mask) != log_probs.shape[1]:
            vocab = log_probs.shape[1]
            bad = [i for i in self.candidate_ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"candidate_ids {bad[:5]} are not token ids of this model (vocabulary {vocab}).")
            mask = torch.zeros(vocab, dtype=torch.bool, device=log_probs.device)
            mask[torch.tensor(self.candidate_ids, device=log_probs.device)] = True
            self._mask = mask
        return self._mask

    def compute_metrics(self, eval_prediction: Any) -> dict[str, float]:
        """``p@1``, ``p@10`` and ``mrr`` over the facts with a one-token object, and ``facts`` (their count).

        Facts without a rank (an object that is not one token, label -100) are counted in ``unscored`` and logged,
        never silently left out. Needs `preprocess_logits_for_metrics`: without it the predictions are not ranks.
        """
        ranks = np.asarray(eval_prediction.predictions)
        if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
            raise ValueError(
                f"The eval predictions are {ranks.dtype} of shape {ranks.shape}, not one rank per fact: pass "
                "preprocess_logits_for_metrics=metrics.preprocess_logits_for_metrics to the Trainer too."
            )
        scored = ranks[ranks > 0]
        unscored = int((ranks <= 0).sum())
        if not len(scored):
            raise ValueError(
                f"None of the {len(ranks)} evaluation facts has an object that is one token of the tokenizer, so none "
                "can be scored; filter them first (peft_softmix.facts.filter_single_token)."
            )
        if self._metric is None:
            self._metric = load_fact_retrieval()
        scores = self._metric.compute(ranks=scored.tolist(), relations=["all"] * len(scored))["per_relation"]["all"]
        result = {"p@1": scores["p@1"], "p@10": scores["p@10"], "mrr": scores["mrr"], "facts": int(scores["count"])}
        if unscored:
            logger.warning(
                "%d of %d evaluation facts have an object that is not one token and were not scored.",
                unscored,
                len(ranks),
            )
            result["unscored"] = unscored
        return result
