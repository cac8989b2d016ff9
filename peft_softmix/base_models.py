"""Loading the base model an adapter queries: a masked LM or a causal (decoder-only) LM, told from its config.

`get_peft_model` takes either kind and chooses the scoring path from the model itself
(`peft_softmix.architectures.model_kind`); this is the matching loader for scripts and the command line, so that a
checkpoint name is all a user gives: ``load_language_model("bert-base-cased")`` or ``load_language_model("gpt2")``.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PreTrainedModel
from transformers.models.auto import modeling_auto

from .errors import UnsupportedArchitectureError
from .model_kinds import class_names

__all__ = ["language_model_kind", "load_language_model"]


def language_model_kind(config: Any) -> str:
    """``"masked"`` or ``"causal"`` for a model config (its ``architectures``, else its ``model_type``)."""
    masked_classes = class_names(modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    causal_classes = class_names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - masked_classes
    architectures = list(getattr(config, "architectures", None) or [])
    if any(name in masked_classes for name in architectures):
        return "masked"
    if any(name in causal_classes for name in architectures):
        return "causal"
    kind = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(
            f"{kind!r} is an encoder-decoder model: a mixture of soft prompts queries a masked LM or a decoder-only "
            "(causal) LM. Use a masked LM (e.g. bert-base-cased) or a causal LM (e.g. gpt2)."
        )
    if kind in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "masked"
    if kind in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise UnsupportedArchitectureError(
        f"Model type {kind!r} has neither a masked-LM nor a causal-LM head in transformers; a mixture of soft prompts "
        "needs one of them to score objects."
    )


def load_language_model(name_or_path: str, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForMaskedLM`` or ``AutoModelForCausalLM`` ``.from_pretrained(name_or_path, **kwargs)``, whichever
    the checkpoint's config says it is (a local folder or a Hub id; ``kwargs`` go to both calls)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    config_options = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "token", "local_files_only")}
    config = AutoConfig.from_pretrained(name_or_path, **config_options)
    loader = AutoModelForCausalLM if language_model_kind(config) == "causal" else AutoModelForMaskedLM
    return loader.from_pretrained(name_or_path, **kwargs)
