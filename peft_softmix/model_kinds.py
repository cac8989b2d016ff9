"""Which kind of language model a base model is, masked or causal, decided from the model itself.

A masked LM predicts the token at a ``[MASK]`` from the words on both sides, which is what the cloze path reads. A
causal (decoder-only) LM predicts each token from the tokens before it only: read at a ``[MASK]`` position it ignores
everything after that position, so training there silently drops the template's last words. The kind therefore
comes from the model, never from a flag the user could get wrong: first transformers' own registry of LM-head
classes (`AutoModelForMaskedLM`, `AutoModelForCausalLM`, and the encoder-decoder and headless classes that neither
path serves), then, for a class transformers does not list, the config and one probe forward pass that tells
whether an earlier position sees a later token.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from transformers.models.auto import modeling_auto

from .errors import UnsupportedArchitectureError

__all__ = ["ModelKind", "class_names", "model_kind", "model_type"]

ModelKind = Literal["masked", "causal"]


def model_type(model: nn.Module) -> str:
    """The model's ``config.model_type`` (its class name when it has no config)."""
    return str(getattr(getattr(model, "config", None), "model_type", type(model).__name__))


def class_names(mapping: dict) -> frozenset[str]:
    """The class names of a transformers auto mapping."""
    # a mapping's value is a class name, or a tuple of them (FunnelModel, FunnelBaseModel)
    return frozenset(name for value in mapping.values() for name in ((value,) if isinstance(value, str) else value))


_MASKED = class_names(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
_CAUSAL = class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
_SEQ2SEQ = class_names(modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)
_HEADLESS = class_names(modeling_auto.MODEL_MAPPING_NAMES)
# encoder families whose causal-LM class attends both ways unless its config says it is a decoder (BertLMHeadModel)
_ENCODER_TYPES = frozenset(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)


def _describe(model: nn.Module) -> str:
    return f"{type(model).__name__} (model_type {model_type(model)!r})"


def _no_lm_head(model: nn.Module) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{_describe(model)} has no language-model head: it returns hidden states, not a distribution over the "
        "vocabulary, so no answer can be scored. Load the checkpoint with AutoModelForMaskedLM (a masked LM) or "
        "AutoModelForCausalLM (a decoder-only LM) instead."
    )


def _encoder_decoder(model: nn.Module) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{_describe(model)} is an encoder-decoder model: its decoder generates the answer from the encoder's "
        "states (T5 fills a blank with a sentinel span it generates), so there is neither a [MASK] position whose "
        "prediction sees the whole prompt nor one left-to-right prompt to continue. peft_softmix serves masked LMs "
        "(AutoModelForMaskedLM, which includes BART-style fill-mask models) and decoder-only causal LMs "
        "(AutoModelForCausalLM); load one of those instead."
    )


def _bidirectional_decoder(model: nn.Module) -> UnsupportedArchitectureError:
    return UnsupportedArchitectureError(
        f"{_describe(model)} has a causal-LM head but config.is_decoder is False, so its attention looks both ways "
        "and the next-token prediction at a position already sees that token. Load it with is_decoder=True "
        "(from_pretrained(name, is_decoder=True)) to use it as a causal LM, or with AutoModelForMaskedLM for its "
        "masked-LM head."
    )


def model_kind(model: nn.Module) -> ModelKind:
    """``"masked"`` or ``"causal"``: how ``model`` predicts tokens, from its class, else its config and a probe.

    Raises `UnsupportedArchitectureError` (naming the class, the model type and the reason) for a model with no LM
    head, an encoder-decoder model that is not a fill-mask model, and an encoder's causal-LM class whose config does
    not make its attention causal.
    """
    config = getattr(model, "config", None)
    # the most derived class transformers lists decides, so that a user's subclass of GPT2LMHeadModel is causal
    for cls in type(model).__mro__:
        name = cls.__name__
        if name in _MASKED:
            # XLM's one LM-head class serves its causal (CLM) checkpoints too, told apart by config.causal
            return "causal" if getattr(config, "causal", False) is True else "masked"
        if name in _CAUSAL:
            if model_type(model) in _ENCODER_TYPES and not getattr(config, "is_decoder", False):
                raise _bidirectional_decoder(model)
            return "causal"
        if name in _SEQ2SEQ:
            raise _encoder_decoder(model)
        if name in _HEADLESS:
            raise _no_lm_head(model)
    # a class transformers does not list (custom code): its head, its config, then its attention decide
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter) or getter() is None:
        raise _no_lm_head(model)
    if getattr(config, "is_encoder_decoder", False):
        raise _encoder_decoder(model)
    return "masked" if _later_tokens_reach_earlier_positions(model) else "causal"


def _later_tokens_reach_earlier_positions(model: nn.Module) -> bool:
    """Whether changing a sequence's last token changes the logits at its first positions (one probe forward)."""
    vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if vocab_size < 2:
        raise UnsupportedArchitectureError(f"{_describe(model)} states no vocab_size, so it cannot be probed.")
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    weight = getattr(embeddings, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
    # ids away from the usual special tokens at the start of the vocabulary
    ids = (torch.arange(6, device=device) * 7 + min(vocab_size - 1, 10)) % vocab_size
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % vocab_size
    batch = torch.stack([ids, changed])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
    except Exception as err:
        raise UnsupportedArchitectureError(
            f"{_describe(model)} is not a class transformers lists as a masked or causal LM, and a probe forward "
            f"to tell which it is failed ({type(err).__name__}: {err})."
        ) from err
    finally:
        model.train(was_training)
    return not torch.allclose(logits[0, :-1], logits[1, :-1], rtol=1e-5, atol=1e-6)
