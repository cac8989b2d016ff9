"""Tiny random configs of every causal-LM type in transformers (`AutoModelForCausalLM`), offline.

The architecture checks need no tokenizer: token ids from a small vocabulary are enough to prove where soft words and
deep offsets go. The generic knobs of `factories` shrink most configs; the knobs below cover what decoder-only
families add (mixtures of experts, latent attention, state-space and recurrent layers), and ``CAUSAL_OVERRIDES``
the types whose configs need more.
"""

from __future__ import annotations

from typing import Any

import torch
from factories import _GENERIC, HEADS, HIDDEN, LAYERS
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

CAUSAL_VOCAB = 96
PAD, BOS, EOS = 0, 1, 2
HEAD_DIM = HIDDEN // HEADS

_CAUSAL_GENERIC: dict[str, Any] = {
    **_GENERIC,
    **dict.fromkeys(["n_layer", "num_layers", "n_layers", "num_blocks"], LAYERS),
    **dict.fromkeys(["num_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"], HEADS),
    # mixtures of experts: a few tiny experts, two per token
    **dict.fromkeys(["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"], 4),
    **dict.fromkeys(["num_experts_per_tok", "moe_topk", "moe_k", "top_k"], 2),
    **dict.fromkeys(
        ["moe_intermediate_size", "expert_ffn_hidden_size", "shared_expert_intermediate_size", "ffn_hidden_size"], 16
    ),
    **dict.fromkeys(["n_group", "topk_group"], 1),
    # multi-head latent attention (DeepSeek-style)
    **dict.fromkeys(["kv_lora_rank", "q_lora_rank"], 16),
    **dict.fromkeys(["qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"], HEAD_DIM),
    "qk_head_dim": 2 * HEAD_DIM,
    # partial rotary embeddings (GPT-J, CodeGen)
    "rotary_dim": HEAD_DIM // 2,
    # state-space and linear-attention layers
    **dict.fromkeys(["state_size", "mamba_d_state", "d_state", "ssm_state_size"], 8),
    **dict.fromkeys(["time_step_rank", "mamba_dt_rank"], 8),
    **dict.fromkeys(["mamba_n_heads", "n_mamba_heads"], 4),
    "mamba_d_head": HIDDEN * 2 // 4,
    **dict.fromkeys(["mamba_chunk_size", "chunk_size"], 16),
    **dict.fromkeys(["linear_num_key_heads", "linear_num_value_heads"], HEADS),
    **dict.fromkeys(["linear_key_head_dim", "linear_value_head_dim", "attention_head_dim"], HEAD_DIM),
    # per-layer inputs and per-layer attribute overrides (Gemma 3n, Gemma 4)
    "vocab_size_per_layer_input": 96,
    "hidden_size_per_layer_input": 8,
    "per_layer_config": {},
}

# Where the generic knobs leave a config inconsistent, or its defaults are huge.
CAUSAL_OVERRIDES: dict[str, dict[str, Any]] = {
    "gpt_neo": {"attention_layers": ["global", "local"], "attention_types": [[["global", "local"], 1]]},
    "prophetnet": {"num_encoder_layers": LAYERS, "num_decoder_layers": LAYERS},
    "mamba2": {"num_heads": 4, "n_groups": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "attention"]},
    **dict.fromkeys(
        ["gemma3n", "gemma3n_text"], {"num_kv_shared_layers": 0, "activation_sparsity_pattern": [0.0, 0.0]}
    ),
    # XLM's one LM-head class is a causal LM when its config says so
    "xlm": {"causal": True},
    "zaya": {"num_experts_per_tok": 1},
    "dots1": {"n_shared_experts": 1},
    "xmod": {"languages": ["en_XX"], "default_language": "en_XX"},
    "reformer": {
        "attn_layers": ["local", "local"],
        "axial_pos_shape": [8, 8],
        "axial_pos_embds_dim": [16, 16],
        "local_attn_chunk_length": 8,
    },
    # hybrids: one attention layer beside the state-space one
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "bamba": {"attn_layer_indices": [1]},
}

# The same for a composite config's text config.
_TEXT_OVERRIDES: dict[str, dict[str, Any]] = {"gemma4_assistant": {"hidden_size_per_layer_input": 0}}

# Attributes a config computes itself (from others) and refuses to be given.
_DERIVED: dict[str, tuple[str, ...]] = {
    "prophetnet": ("num_hidden_layers",),
    **dict.fromkeys(["bamba", "falcon_h1", "recurrent_gemma"], ("layer_types", "layers_block_type")),
}


def _settable(defaults: PretrainedConfig, name: str) -> bool:
    """Whether a config takes ``name`` as an argument (a read-only property, e.g. Falcon's head_dim, does not)."""
    attribute = getattr(type(defaults), name, None)
    if isinstance(attribute, property) and attribute.fset is None:
        return False
    try:
        getattr(defaults, name)
    except AttributeError:
        return False
    except Exception:  # a per-layer attribute (Gemma 4's head_dim) refuses a global read, but is a config field
        return name in vars(defaults)
    return True


def _layer_pattern(defaults: PretrainedConfig, name: str) -> list | None:
    """A short layer-type list that keeps one layer of each kind the default stack has, in order of appearance."""
    pattern = getattr(defaults, name, None)
    if not isinstance(pattern, list) or not pattern or not all(isinstance(t, str) for t in pattern):
        return None
    kinds = list(dict.fromkeys(pattern))
    return kinds if len(kinds) > 1 else kinds * LAYERS


def _shrunk(defaults: PretrainedConfig) -> dict[str, Any]:
    kwargs = {name: value for name, value in _CAUSAL_GENERIC.items() if _settable(defaults, name)}
    if not vars(defaults).get("per_layer_config"):
        kwargs.pop("per_layer_config", None)  # a composite config validates it against layers it does not have
    for name in ("layer_types", "layers_block_type", "mlp_layer_types"):
        pattern = _layer_pattern(defaults, name)
        if pattern is not None and _settable(defaults, name):
            kwargs[name] = pattern
            kwargs["num_hidden_layers"] = len(pattern)
    return kwargs


def tiny_causal_config(model_type: str, vocab_size: int = CAUSAL_VOCAB, **overrides: Any) -> PretrainedConfig:
    """A tiny random config (hidden 32, about 2 layers) of the causal-LM type ``model_type``.

    Encoder families (BERT, RoBERTa, ...) get ``is_decoder=True``, the way their causal-LM classes are meant to be
    loaded. Composite configs (a text model beside a vision or audio tower) get a tiny text config too.
    """
    defaults = AutoConfig.for_model(model_type)
    special = {"vocab_size": vocab_size, "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    kwargs: dict[str, Any] = {**_shrunk(defaults), **special, "is_decoder": True}
    sub = getattr(defaults, "text_config", None)
    if isinstance(sub, PretrainedConfig):
        kwargs["text_config"] = {**sub.to_dict(), **_shrunk(sub), **special, **_TEXT_OVERRIDES.get(model_type, {})}
    kwargs.update(CAUSAL_OVERRIDES.get(model_type, {}))
    kwargs.update(overrides)
    for name in _DERIVED.get(model_type, ()):
        kwargs.pop(name, None)
    return AutoConfig.for_model(model_type, **kwargs)


def tiny_causal_model(config: PretrainedConfig, seed: int = 0) -> PreTrainedModel:
    """A random causal LM from ``config``, the same for the same seed, in eval mode.

    All-zero weight matrices (residual projections some types initialise to zero) get small random values, so that
    every token's words matter; so do the biases and scales of a few state-space types, for the same reason.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    return model.eval()
