"""A transformers `Pipeline` for fact queries: ``pipeline("fact-query", model=peft_model)``.

Importing `peft_softmix` registers the task. The pipeline answers subjects through a `PeftModelForSoftMixture`,
each through its relation's adapter when ``adapter_names`` are given, in the format of `query`
(`peft_softmix.answers`):

```py
>>> ask = pipeline("fact-query", model=peft_model, tokenizer=tokenizer)
>>> ask("Dante Alighieri", top_k=3)                       # one subject: one answer dict
>>> ask(["Dante", "Paris"], adapter_names=["P19", "P17"])  # several: a list, each through its adapter
>>> ask("Dante", candidates=["Florence", "Rome"])          # answers restricted to these words (or token ids)
>>> ask("Dante", max_tokens=3, strategy="left_to_right")   # open answers of up to 3 tokens, decoded
>>> ask("Dante", max_tokens=3, candidates=["New York City", "Rome"])  # objects of any length, ranked
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .facts import candidate_token_ids

__all__ = ["TASK", "FactQueryPipeline", "register_pipeline"]

TASK = "fact-query"


class FactQueryPipeline(Pipeline):
    """Answers subjects with a `PeftModelForSoftMixture`: ``pipe(subjects, adapter_names=None, top_k=5,
    candidates=None, return_template_probs=False, batch_size=64, max_tokens=1, strategy=..., length_normalized=...)``.

    ``subjects`` is a string (one answer dict back) or a list of strings (a list back). ``adapter_names`` gives each
    subject's adapter (a string for all of them; default: the active adapter). ``candidates`` restricts the answers
    to these words (those that are one token) or token ids; with ``max_tokens`` > 1 the candidates are words of any
    length, ranked by the model's sequence score. ``max_tokens`` > 1 without candidates decodes answers of up to that
    many tokens by ``strategy`` (`peft_softmix.decoding`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(self.model, "query") or not hasattr(self.model, "get_processor"):
            raise TypeError(
                f"The {TASK!r} pipeline takes a PeftModelForSoftMixture (get_peft_model with a SoftMixtureConfig, or "
                f"PeftModel.from_pretrained of a soft-mixture adapter), got {type(self.model).__name__}."
            )

    def _sanitize_parameters(
        self,
        adapter_names: str | Sequence[str] | None = None,
        top_k: int | None = None,
        candidates: Sequence[str | int] | None = None,
        return_template_probs: bool | None = None,
        max_tokens: int | None = None,
        strategy: str | None = None,
        length_normalized: bool | None = None,
        **unknown: Any,
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        if unknown:
            raise TypeError(
                f"The {TASK!r} pipeline got unknown argument(s) {sorted(unknown)}; it takes adapter_names, top_k, "
                "candidates, return_template_probs, batch_size, max_tokens, strategy and length_normalized."
            )
        forward: dict[str, Any] = {
            name: value
            for name, value in (
                ("max_tokens", max_tokens),
                ("strategy", strategy),
                ("length_normalized", length_normalized),
            )
            if value is not None
        }
        if adapter_names is not None:
            forward["adapter_names"] = adapter_names
        if top_k is not None:
            forward["top_k"] = top_k
        if candidates is not None:
            forward["candidates"] = candidates
        if return_template_probs is not None:
            forward["return_template_probs"] = return_template_probs
        return {}, forward, {}

    def __call__(  # type: ignore[override]
        self, subjects: str | Sequence[str], *args: Any, batch_size: int = 64, **kwargs: Any
    ) -> Any:
        _, options, _ = self._sanitize_parameters(**kwargs)
        if args:
            raise TypeError(f"The {TASK!r} pipeline takes the subjects as its only positional argument.")
        single = isinstance(subjects, str)
        items = [subjects] if isinstance(subjects, str) else list(subjects)
        answers = self._answer(items, batch_size=batch_size, **options)
        return answers[0] if single else answers

    def _answer(
        self,
        subjects: list[str],
        adapter_names: str | Sequence[str] | None = None,
        top_k: int = 5,
        candidates: Sequence[str | int] | None = None,
        return_template_probs: bool = False,
        batch_size: int = 64,
        **decoding: Any,
    ) -> list[dict[str, Any]]:
        names = [adapter_names] * len(subjects) if isinstance(adapter_names, str) else adapter_names
        model: Any = self.model
        if decoding.get("max_tokens", 1) != 1 and candidates is not None:
            # objects of any length, ranked by their sequence score
            if isinstance(candidates, str) or not all(isinstance(c, str) for c in candidates):
                raise TypeError(f"With max_tokens > 1, candidates takes a list of words, got {candidates!r}.")
            decoding["candidates"] = list(candidates)
            ids = None
        else:
            ids = self._candidate_ids(candidates, names[0] if names else None)
        return model.query(
            subjects,
            top_k=top_k,
            return_template_probs=return_template_probs,
            candidate_ids=ids,
            batch_size=batch_size,
            adapter_names=names,
            **decoding,
        )

    def _candidate_ids(self, candidates: Sequence[str | int] | None, adapter: str | None) -> list[int] | None:
        if candidates is None:
            return None
        if isinstance(candidates, str):
            raise TypeError(f"candidates takes a list of words or token ids, got the string {candidates!r}.")
        words = [c for c in candidates if isinstance(c, str)]
        ids = [c for c in candidates if not isinstance(c, str)]
        if words:
            model: Any = self.model
            found = candidate_token_ids(model.get_processor(adapter).tokenizer, words)
            if not found.token_ids:
                raise ValueError(f"None of the candidate words is one token of the model's tokenizer: {words[:10]}.")
            ids += list(found.token_ids)
        return ids

    # the generic Pipeline steps, one subject at a time (`__call__` batches through `query` instead)

    def preprocess(self, input_: Any, **preprocess_parameters: Any) -> dict[str, Any]:
        return {"subject": input_}

    def _forward(self, input_tensors: dict[str, Any], **forward_parameters: Any) -> Any:
        return self._answer([input_tensors["subject"]], **forward_parameters)[0]

    def postprocess(self, model_outputs: Any, **postprocess_parameters: Any) -> Any:
        return model_outputs


def register_pipeline() -> None:
    """Register the ``"fact-query"`` task with transformers' `pipeline` (idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=FactQueryPipeline, pt_model=None, type="text")
