"""What a masked LM is made of, for a mixture of soft prompts, and whether its architecture is supported.

The generic rules find the parts of almost every `AutoModelForMaskedLM` type without per-model code: the token
embedding table (soft words are swapped into its output, so the model runs on its usual token ids), the layer stack
(the `nn.ModuleList` of identical blocks holding the most parameters; deep offsets go before each call of it) and
the backbone whose output the MLM head reads. The exceptions are the small explicit tables `UNSUPPORTED` and
`DEEP_UNSUPPORTED`, with the clear error for the types that cannot work; causal (decoder-only) LMs have their own
tables in `causal_architectures`, and `model_kinds` tells the two kinds apart. The end-to-end checks of every type
(``tests/architecture_check.py`` and ``tests/causal_architecture_check.py``, behind
``docs/supported-architectures.md``) are test helpers, not part of the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .causal_architectures import CAUSAL_DEEP_UNSUPPORTED, CAUSAL_UNSUPPORTED
from .errors import UnsupportedArchitectureError
from .hooks import count_layer_calls, gather_mask_positions
from .model_kinds import ModelKind, model_kind, model_type

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


def unsupported_reason(kind: str, deep: bool, lm: ModelKind = "masked") -> str | None:
    """Why ``kind`` (a ``config.model_type``) cannot take soft prompts (or deep ones) here, or None if it can.

    ``lm`` says which of the type's LM classes is meant: a type such as ``bert`` or ``reformer`` has both.
    """
    unsupported, deep_unsupported = (
        (UNSUPPORTED, DEEP_UNSUPPORTED) if lm == "masked" else (CAUSAL_UNSUPPORTED, CAUSAL_DEEP_UNSUPPORTED)
    )
    reason = unsupported.get(kind) or (_missing_kernel(kind) if lm == "masked" else None)
    if reason:
        return f"cannot take a mixture of soft prompts: {reason}"
    if deep and kind in deep_unsupported:
        return f"cannot take deep prompts: {deep_unsupported[kind]} Use deep=False (soft words at the input only)."
    return None


def check_supported(model: nn.Module, deep: bool) -> ModelKind:
    """The model's kind (`model_kind`), once its type is known to take soft (and, with ``deep``, deep) prompts.

    Raises `UnsupportedArchitectureError`, naming the model type and the reason, for the models that cannot work:
    no LM head, an encoder-decoder model that is not a fill-mask model, and the types the tables list.
    """
    lm = model_kind(model)
    kind = model_type(model)
    reason = unsupported_reason(kind, deep, lm)
    if reason:
        raise UnsupportedArchitectureError(f"{type(model).__name__} (model_type {kind!r}) {reason}")
    return lm


# -- finding a model's parts ------------------------------------------------------------------------------------


def find_layer_stack(model: nn.Module) -> list[nn.Module]:
    """The blocks of the largest `nn.ModuleList` of same-class modules (the transformer layers)."""
    best: list[nn.Module] = []
    best_params = -1
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params > best_params:
            best, best_params = list(module), n_params
    return best


def find_input_embeddings(model: nn.Module) -> nn.Module | None:
    """The token embedding table: ``get_input_embeddings()``, else the embedding as wide as the vocabulary.

    Any module with a ``[vocab, width]`` ``weight`` qualifies (I-BERT's `QuantEmbedding` is no `nn.Embedding`).
    """
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    getter = getattr(model, "get_input_embeddings", None)
    embeddings = getter() if callable(getter) else None
    if isinstance(embeddings, nn.Module) and _is_table(embeddings, vocab_size):
        return embeddings
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size:
            return module
    return None


def _is_table(module: nn.Module, vocab_size: int | None) -> bool:
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Embedding):
        return True
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == vocab_size


def tied_embedding_modules(model: nn.Module, embeddings: nn.Module) -> list[nn.Module]:
    """Every module that looks tokens up in ``embeddings``'s table: seq2seq models keep one module per stack."""
    weight = embeddings.weight
    # _parameters, not getattr: a missing attribute costs an exception per module, and this runs every forward
    tied = [m for m in model.modules() if m is not embeddings and m._parameters.get("weight") is weight]
    return [embeddings, *(m for m in tied if not isinstance(m, nn.Linear))]


def find_backbone(model: nn.Module) -> nn.Module | None:
    """The encoder whose first output is the last hidden state that the MLM head reads."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


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


# -- one probe forward pass ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """What one probe forward pass of the base model tells about it.

    Attributes:
        gather_ok: Whether the LM head may run at the mask positions only (it gave the full head's logits there).
        layers: The layer modules deep offsets enter, or None when deep prompts were not asked for.
        depth: How many layer calls a forward makes (None when not measured).
        hidden_size: The width of the hidden states entering the layers (0 when not measured).
    """

    gather_ok: bool
    layers: list[nn.Module] | None = None
    depth: int | None = None
    hidden_size: int = 0


def probe_model(model: nn.Module, input_ids: torch.Tensor, mask_position: int, want_layers: bool) -> ProbeResult:
    """Run ``model`` once on a ``[1, T]`` query with its mask at ``mask_position``, in eval mode, without gradients.

    Measures the layer stack's depth in calls (with ``want_layers``) and checks that the LM head run at the mask
    position only gives the full head's logits there.
    """
    kwargs = {"attention_mask": torch.ones_like(input_ids)}
    layers: list[nn.Module] | None = None
    depth: int | None = None
    hidden_size = 0
    gather_ok = False
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            stack = layer_stack(model) if want_layers else []
            with count_layer_calls(stack) as counter:
                full = model(input_ids=input_ids, **kwargs).logits[0, mask_position].float()
            if want_layers:
                if not counter.calls:
                    raise ValueError(
                        f"Could not find the transformer layers of {type(model).__name__} for deep prompts; "
                        "use deep=False."
                    )
                layers, depth, hidden_size = stack, counter.calls, counter.hidden_size
            backbone = find_backbone(model)
            if backbone is not None:
                try:
                    with gather_mask_positions(backbone, torch.tensor([mask_position], device=input_ids.device)):
                        picked = model(input_ids=input_ids, **kwargs).logits
                    gather_ok = picked.shape[1] == 1 and torch.allclose(
                        picked[0, 0].float(), full, atol=1e-4, rtol=1e-4
                    )
                except Exception:  # an exotic head: fall back to the full logits, which is always right
                    gather_ok = False
    finally:
        model.train(was_training)
    return ProbeResult(gather_ok=bool(gather_ok), layers=layers, depth=depth, hidden_size=hidden_size)
