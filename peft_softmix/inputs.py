"""Checks of the arguments of `encode` and `query`, run once at the top of each call.

Bad arguments would otherwise fail deep inside torch (``encode([])``), or worse, silently: ``query("Dante")`` would
query the letters D, a, n, t, e, and ``candidate_ids=[-1]`` would pick the last token of the vocabulary. `encode`
runs every training step, so its checks stay O(batch) and never call the tokenizer.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Sequence
from typing import Any

import torch


def check_subjects(subjects: Any, api: str, allow_empty: bool = False) -> None:
    """``subjects`` must be a sequence of strings (a bare string is refused, not split into its characters)."""
    if isinstance(subjects, (str, bytes)):
        raise TypeError(
            f"{api} takes a list of subjects, got the string {subjects!r}, which would be queried character by "
            f"character; pass [{subjects!r}]."
        )
    if not isinstance(subjects, Sequence):
        raise TypeError(f"{api} takes a list of subjects (strings), got {type(subjects).__name__}.")
    if not subjects and not allow_empty:
        raise ValueError(f"{api} needs at least one subject, got an empty list.")
    for subject in subjects:
        if not isinstance(subject, str):
            raise TypeError(f"{api}: every subject must be a string, got {type(subject).__name__} {subject!r}.")


def check_objects(subjects: Sequence[str], objects: Any, api: str) -> None:
    """``objects``, when given, holds one object (a string, or None for no label) per subject."""
    if objects is None:
        return
    if isinstance(objects, (str, bytes)):
        raise TypeError(f"{api} takes a list of objects, one per subject, got the string {objects!r}.")
    if not isinstance(objects, Sequence):
        raise TypeError(f"{api} takes a list of objects (strings or None), got {type(objects).__name__}.")
    if len(objects) != len(subjects):
        raise ValueError(
            f"{api} got {len(subjects)} subject(s) but {len(objects)} object(s); give one object per subject "
            "(None where a subject has no label)."
        )
    for obj in objects:
        if obj is not None and not isinstance(obj, str):
            raise TypeError(f"{api}: every object must be a string or None, got {type(obj).__name__} {obj!r}.")


def _positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")


def check_query_options(top_k: Any, batch_size: Any) -> None:
    """``top_k`` and ``batch_size`` of `query` are whole numbers >= 1."""
    _positive_int(top_k, "top_k")
    _positive_int(batch_size, "batch_size")


def candidate_mask(candidate_ids: Sequence[int] | None, vocab_size: int, device: Any) -> torch.Tensor | None:
    """The ``[V]`` bool mask of `query`'s ``candidate_ids``; each id must be a token of the vocabulary."""
    if candidate_ids is None:
        return None
    if isinstance(candidate_ids, torch.Tensor):
        candidate_ids = candidate_ids.reshape(-1).tolist()
    ids = list(candidate_ids)
    if not ids:
        raise ValueError(
            "candidate_ids is empty: no token could be predicted. Pass None to allow the whole vocabulary."
        )
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < vocab_size]
    if bad:
        shown = ", ".join(repr(i) for i in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"candidate_ids must be token ids in [0, {vocab_size}) (the base model's vocabulary), got {shown}. "
            "Map words to ids with peft_softmix.facts.candidate_token_ids."
        )
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[torch.tensor([int(i) for i in ids], device=device)] = True
    return mask


# what `encode` returns ("labels" only when objects are given, "encoded_for" when the processor names its adapter,
# "target_positions" for objects of any length)
BATCH_KEYS = (
    "input_ids",
    "attention_mask",
    "roles",
    "mask_positions",
    "fact_index",
    "labels",
    "encoded_for",
    "target_positions",
    "target_ids",
)

# keyword arguments that transformers, PEFT and Accelerate pass to a model's forward: accepted deliberately
_PASSED_THROUGH = ("return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch")


def check_forward_kwargs(kwargs: dict[str, Any]) -> bool:
    """Refuse unknown keyword arguments of the forward (a misspelt option would otherwise be ignored); returns
    ``return_dict``.

    ``num_items_in_batch`` (the Trainer's) divides the summed loss instead of the batch's own count of labels.
    ``output_attentions``/``output_hidden_states`` may be False only: the mixture has no single attention map.
    """
    unknown = [name for name in kwargs if name not in _PASSED_THROUGH]
    if unknown:
        known = [*BATCH_KEYS, "candidate_mask", "return_template_log_probs", "return_log_probs", "adapter_names"]
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known + list(_PASSED_THROUGH), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise TypeError(
            f"PeftModelForSoftMixture.forward got unexpected keyword argument(s) {', '.join(hints)}. It takes the "
            f"batch of `encode` ({', '.join(BATCH_KEYS)}) and {', '.join(known[len(BATCH_KEYS) :])}."
        )
    for name in ("output_attentions", "output_hidden_states"):
        if kwargs.get(name):
            raise ValueError(
                f"{name}=True is not supported: the answer mixes several forward passes of the base model. Run "
                "the base model (peft_model.get_base_model()) on the batch's input_ids for attentions/hidden states."
            )
    return_dict = kwargs.get("return_dict")
    return True if return_dict is None else bool(return_dict)
