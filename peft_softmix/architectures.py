"""Which masked-LM architectures a mixture of soft prompts fits, and the few that need a rule of their own.

The generic rules (in `layers.py`) cover almost every `AutoModelForMaskedLM` type: soft words are swapped into the
output of the token embedding table, so the model runs on its usual token ids; deep offsets go before each call of
the largest stack of identical blocks. This module holds the exceptions as small explicit tables, the clear error
for the types that cannot work, and `check_architecture`, the end-to-end check behind both the test matrix and
``docs/supported-architectures.md``.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import find_input_embeddings, find_layer_stack

# Types whose masked-LM head cannot be queried with a cloze prompt at all.
UNSUPPORTED: dict[str, str] = {
    "reformer": "Reformer runs a backward pass only in train mode and then only on sequences exactly as long as its "
    "axial position grid (the product of config.axial_pos_shape), so a short cloze prompt cannot be trained; no "
    "Reformer tokenizer has a mask token either.",
}

# Types where shallow prompts work but the hidden states entering the layers do not line up with the tokens.
DEEP_UNSUPPORTED: dict[str, str] = {
    "funnel": "Funnel pools the sequence between its blocks, so after the first block there are no template "
    "positions left to add offsets to.",
    "perceiver": "Perceiver's layers act on a fixed array of latent vectors, not on the token positions.",
    "squeezebert": "SqueezeBERT calls its layers' forward() directly, which bypasses the hooks that add the "
    "offsets (and its layers take channel-first hidden states).",
}

# Types whose predictions for a query change when it is padded in a batch beside longer queries (the model itself
# reads the pad positions; the adapter reproduces the hard prompts exactly either way).
PADDING_SENSITIVE: dict[str, str] = {
    "convbert": "ConvBERT's span-based convolution mixes pad positions into their neighbours.",
    "fnet": "FNet has no attention mask: its Fourier mixing runs over the pad positions too.",
    "funnel": "Funnel's pooling mixes pad positions into the pooled sequence.",
    "yoso": "YOSO's hashing-based attention approximation does not fully exclude pad positions.",
}


class UnsupportedArchitectureError(ValueError):
    """A base model whose architecture cannot take a mixture of soft prompts (or deep prompts)."""


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def _missing_kernel(kind: str) -> str | None:
    """Why a type that needs a custom kernel cannot run here, or None."""
    if kind == "mra":
        from transformers.models.mra import modeling_mra

        if modeling_mra.mra_cuda_kernel is None:
            return (
                "MRA's attention needs its CUDA kernel (kernels-community/mra, which transformers loads when the "
                "model is built on a CUDA machine with the `kernels` package and Hub access); without it MRA's "
                "attention returns zeros, so no token sees any other and the template cannot influence the mask."
            )
    return None


def unsupported_reason(kind: str, deep: bool) -> str | None:
    """Why ``kind`` (a ``config.model_type``) cannot take soft prompts (or deep ones) here, or None if it can."""
    reason = UNSUPPORTED.get(kind) or _missing_kernel(kind)
    if reason:
        return f"cannot take a mixture of soft prompts: {reason}"
    if deep and kind in DEEP_UNSUPPORTED:
        return f"cannot take deep prompts: {DEEP_UNSUPPORTED[kind]} Use deep=False (soft words at the input only)."
    return None


def check_supported(model: nn.Module, deep: bool) -> None:
    """Raise `UnsupportedArchitectureError`, naming the model type and the reason, for the types that cannot work."""
    kind = model_type(model)
    reason = unsupported_reason(kind, deep)
    if reason:
        raise UnsupportedArchitectureError(f"{type(model).__name__} (model_type {kind!r}) {reason}")


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The token embedding table that the soft words replace rows of."""
    embeddings = find_input_embeddings(model)
    if embeddings is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type(model)!r}) has no token embedding table: "
            "get_input_embeddings() is not an nn.Embedding and no embedding matches the vocabulary size."
        )
    if not isinstance(embeddings, nn.Embedding):
        # the adapter reads the table's size the nn.Embedding way (I-BERT's QuantEmbedding calls them num_/dim)
        weight: torch.Tensor = embeddings.weight  # type: ignore[assignment]
        rows, width = weight.shape
        embeddings.num_embeddings, embeddings.embedding_dim = int(rows), int(width)  # type: ignore[assignment]
    return embeddings  # type: ignore[return-value]


def layer_stack(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks that deep offsets enter, in order (a shared block appears once)."""
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if getattr(config, "is_encoder_decoder", False) and callable(get_encoder):
        # template positions exist in the encoder; the decoder reads them shifted, through cross-attention
        return find_layer_stack(get_encoder())
    # search the smallest module around the token embeddings that holds a stack, so that a vision tower beside
    # the text model (ModernVBERT) cannot win on size
    table = find_input_embeddings(model)
    name = next((n for n, module in model.named_modules() if module is table), "")
    parts = name.split(".")[:-1] if name else []
    for depth in range(len(parts), 0, -1):
        layers = find_layer_stack(model.get_submodule(".".join(parts[:depth])))
        if layers:
            return layers
    return find_layer_stack(model)


def max_query_length(model: nn.Module, tokenizer: Any) -> int | None:
    """The most tokens a query may have: the model's position table, or the tokenizer's limit if smaller.

    RoBERTa-style tables number positions from ``padding_idx + 1``, so they hold that many positions fewer. None
    when neither the model nor the tokenizer states a limit.
    """
    limits = []
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        table = next((m for n, m in model.named_modules() if n.endswith("position_embeddings")), None)
        padding_idx = getattr(table, "padding_idx", None)
        limits.append(positions - (padding_idx + 1 if isinstance(padding_idx, int) else 0))
    stated = getattr(tokenizer, "model_max_length", None)
    # tokenizers without a limit state a huge sentinel (int(1e30))
    if isinstance(stated, int) and 0 < stated < 1_000_000:
        limits.append(stated)
    return min(limits) if limits else None


# -- the end-to-end check ----------------------------------------------------------------------------------------

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
    from peft import PeftModel, get_peft_model
    from transformers import AutoTokenizer

    from .config import SoftMixtureConfig

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
    from .peft_model import QueryTooLongError

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
    B, K, T = batch["input_ids"].shape
    logits = base(
        input_ids=batch["input_ids"].reshape(B * K, T), attention_mask=batch["attention_mask"].reshape(B * K, T)
    ).logits
    at_mask = logits[torch.arange(B * K), batch["mask_positions"].reshape(B * K)].float()
    hard = torch.log_softmax(at_mask, dim=-1).view(B, K, -1)
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
            gap = max(gap, (hard - template_log_probs[b, k]).abs().max().item())
    return gap
