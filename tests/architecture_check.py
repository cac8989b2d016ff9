"""The end-to-end check of a mixture of soft prompts on one masked-LM type: a test helper, not part of the package.

`check_architecture` is what `tests/test_architectures.py` runs for every `AutoModelForMaskedLM` type and what
``scripts/architecture_matrix.py`` writes ``docs/supported-architectures.md`` from (that script puts ``tests/`` on
``sys.path`` to import it).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoTokenizer

from peft_softmix import QueryTooLongError, SoftMixtureConfig, UnsupportedArchitectureError
from peft_softmix.architectures import model_type

# Types whose predictions for a query change when it is padded in a batch beside longer queries (the model itself
# reads the pad positions; the adapter reproduces the hard prompts exactly either way).
PADDING_SENSITIVE: dict[str, str] = {
    "convbert": "ConvBERT's span-based convolution mixes pad positions into their neighbours.",
    "fnet": "FNet has no attention mask: its Fourier mixing runs over the pad positions too.",
    "funnel": "Funnel's pooling mixes pad positions into the pooled sequence.",
    "yoso": "YOSO's hashing-based attention approximation does not fully exclude pad positions.",
}

CHECK_TEMPLATES = ("[X] was born in [Y] .", "[X] is a subclass of [Y] .")
CHECK_SUBJECTS = ("Dante", "Zxq Qwerty")
CHECK_OBJECTS = ("Florence", "Paris")


@dataclass
class ArchitectureCheck:
    """The outcome of `check_architecture` for one model type and one prompt depth."""

    model_type: str
    deep: bool
    ok: bool = False
    unsupported: bool = False
    error: str | None = None
    stage: str | None = None
    seconds: float = 0.0
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "unsupported": self.unsupported,
            "error": self.error,
            "stage": self.stage,
            "seconds": round(self.seconds, 3),
            **self.details,
        }


def check_architecture(
    make_model: Callable[[], nn.Module], tokenizer_path: str, deep: bool, tolerance: float = 1e-5
) -> ArchitectureCheck:
    """Run a mixture of soft prompts end to end on a model type and say whether (and where) it fails.

    ``make_model`` must return the same masked LM (same weights) each time it is called. The stages: the
    template-initialised mixture gives each template exactly the bare model's distribution for the filled hard
    template; gradients reach the soft words (and deep offsets); after one training step the adapter saves, and
    `PeftModel.from_pretrained` on a fresh identical base gives identical predictions.
    An `UnsupportedArchitectureError` at `get_peft_model` is reported as ``unsupported``, not as a failure.
    """
    start = time.perf_counter()
    result = ArchitectureCheck(model_type="?", deep=deep)
    stage: str | None = "building the model"
    try:
        base = make_model().eval()
        result.model_type = model_type(base)
        stage = "get_peft_model"
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        frozen = {name: tensor.clone() for name, tensor in base.state_dict().items()}
        config = SoftMixtureConfig(templates=list(CHECK_TEMPLATES), tokenizer_name_or_path=tokenizer_path, deep=deep)
        try:
            peft_model = get_peft_model(base, config)
        except UnsupportedArchitectureError as err:
            result.unsupported, result.error = True, str(err)
            return result
        peft_model.eval()
        result.details["layers"] = getattr(peft_model.peft_config["default"], "num_deep_layers", None)
        batch = peft_model.encode(list(CHECK_SUBJECTS), list(CHECK_OBJECTS))

        stage = "hard-prompt equivalence"
        with torch.no_grad():
            initial = peft_model(**batch, return_template_log_probs=True)
            gap = _gap_to_hard_prompts(base, batch, initial.template_log_probs)
            # the same filled templates one at a time, unpadded: differs only for models that read padding
            result.details["unpadded_gap"] = _gap_to_unpadded_prompts(base, tokenizer, initial.template_log_probs)
        result.details["init_gap"] = gap
        if not gap <= tolerance:
            raise AssertionError(f"template-initialised soft prompts differ from the hard prompts by {gap:.2e}")

        stage = "backward"
        encoder = peft_model.prompt_encoder["default"]
        output = peft_model(**batch)
        output.loss.backward()
        names = ["soft_words", "mixture_logits", *(["deep_offsets"] if deep else [])]
        tensors: dict[str, torch.Tensor] = {}
        for name in names:
            tensor = getattr(encoder, name, None)
            grad = getattr(tensor, "grad", None)
            if not isinstance(tensor, torch.Tensor) or grad is None or not grad.abs().sum() > 0:
                raise AssertionError(f"no gradient reaches {name}")
            if not torch.isfinite(grad).all():
                raise AssertionError(f"the gradient of {name} is not finite")
            tensors[name] = tensor
        with torch.no_grad():
            for tensor in tensors.values():
                tensor -= 0.5 * tensor.grad.sign()  # type: ignore[union-attr]
        if any(not torch.equal(frozen[name], tensor) for name, tensor in base.state_dict().items()):
            raise AssertionError("the base model's weights changed")

        stage = "training step changes predictions"
        with torch.no_grad():
            trained = peft_model(**batch).log_probs
        moved = (trained - initial.log_probs).abs().max().item()
        if not moved > 1e-4:
            raise AssertionError(f"a training step left the predictions unchanged (max change {moved:.1e})")

        stage = "position limit"
        result.details["max_query_length"] = _check_position_limit(peft_model)

        stage = "save and reload"
        with tempfile.TemporaryDirectory() as folder:
            peft_model.save_pretrained(folder)
            # a model built in memory has no name to check the adapter's tokenizer against: the caller's is named
            reloaded = PeftModel.from_pretrained(make_model().eval(), folder, tokenizer=tokenizer_path)
            reloaded.eval()
            with torch.no_grad():
                again = reloaded(**batch).log_probs
        drift = (again - trained).abs().max().item()
        result.details["reload_gap"] = drift
        if not drift <= tolerance:
            raise AssertionError(f"the reloaded adapter predicts differently (max difference {drift:.2e})")
        result.ok, stage = True, None
    except Exception as err:  # the matrix records every failure instead of stopping at the first
        result.error = f"{type(err).__name__}: {err}".strip()[:500]
    finally:
        result.stage = stage
        result.seconds = time.perf_counter() - start
    return result


def _check_position_limit(peft_model: Any) -> int | None:
    """A query exactly as long as `max_query_length` runs; one token more is refused before the model sees it."""
    limit = peft_model.max_query_length
    if limit is None:
        return None
    # " in" is one token in every tokenizer family of the matrix, so the query grows a token per repetition
    base_length = peft_model.query_lengths(["in"])[0] - 1
    longest = " ".join(["in"] * (limit - base_length))
    if peft_model.query_lengths([longest])[0] != limit:
        raise AssertionError(f"could not build a query of exactly {limit} tokens")
    with torch.no_grad():
        log_probs = peft_model(**peft_model.encode([longest])).log_probs
    if not torch.isfinite(log_probs).all():
        raise AssertionError(f"a query of {limit} tokens (the stated limit) gives non-finite scores")
    try:
        peft_model.encode([longest + " in"])
    except QueryTooLongError:
        return limit
    raise AssertionError(f"a query of {limit + 1} tokens was not refused")


def _gap_to_hard_prompts(base: nn.Module, batch: dict, template_log_probs: torch.Tensor) -> float:
    """Largest |log p| difference between the adapter's per-template distributions and the bare model's, on the
    same (padded) batch of filled hard templates."""
    # the batch's rows are the filled hard templates: the base model takes them as they are
    logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    at_mask = logits[torch.arange(len(logits)), batch["mask_positions"]].float()
    hard = torch.log_softmax(at_mask, dim=-1)
    return (hard - template_log_probs).abs().max().item()


def _gap_to_unpadded_prompts(base: nn.Module, tokenizer, template_log_probs: torch.Tensor) -> float:
    """Like `_gap_to_hard_prompts`, with each filled template tokenised and run on its own."""
    gap = 0.0
    for b, subject in enumerate(CHECK_SUBJECTS):
        for k, template in enumerate(CHECK_TEMPLATES):
            text = template.replace("[X]", subject).replace("[Y]", tokenizer.mask_token)
            enc = tokenizer(text, return_tensors="pt")
            position = (enc["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0]
            logits = base(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            hard = torch.log_softmax(logits[0, position].float(), dim=-1)
            row = b * len(CHECK_TEMPLATES) + k  # a fact's rows are consecutive, in template order
            gap = max(gap, (hard - template_log_probs[row]).abs().max().item())
    return gap
