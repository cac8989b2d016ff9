"""Finding a masked LM's input embeddings, layer stack and backbone, and the forward-time hooks that use them.

Nothing here is architecture-specific (the few exceptions live in `architectures.py`): the layer stack is the
`nn.ModuleList` of identical blocks holding the most parameters, and its depth is measured by counting calls in one
tiny forward pass, so models that run one shared block many times (ALBERT) get one offset per *call*. The hooks
exist only inside a forward call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


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


def _hidden_from_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | int | None]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for name in ("hidden_states", "hidden_state", "x", "inputs_embeds"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name], name
    return None, None


class LayerCallCounter:
    """How often the layer stack ran in a forward pass, and the width of the hidden states entering it."""

    def __init__(self) -> None:
        self.calls = 0
        self.hidden_size = 0


@contextmanager
def count_layer_calls(layers: list[nn.Module]) -> Iterator[LayerCallCounter]:
    """Count the layer-stack calls (its depth) inside the ``with`` block."""
    counter = LayerCallCounter()

    def hook(module, args, kwargs):
        counter.calls += 1
        hidden, _ = _hidden_from_call(args, kwargs)
        if hidden is not None and not counter.hidden_size:
            counter.hidden_size = hidden.shape[-1]

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in dict.fromkeys(layers)]
    try:
        yield counter
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def soft_word_embeddings(
    embeddings: nn.Module | list[nn.Module],
    put_soft_words: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    soft_index: torch.Tensor,
    input_ids: torch.Tensor,
) -> Iterator[None]:
    """Make the embedding table's output carry the soft words at template positions of ``input_ids``.

    ``put_soft_words(embeds, soft_index)`` returns ``embeds`` with the soft words where ``soft_index >= 0`` (the
    adapter's `SoftMixtureModel`).

    The model still receives token ids, so everything it derives from them (position ids that skip padding, ESM's
    mask-token rescaling, a seq2seq decoder's shifted input) is exactly what the hard prompt gets. A lookup of the
    ids shifted right by one position (the decoder input of BART-style fill-mask) gets the soft words shifted too,
    one of the ids padded on the right gets them in place; any other lookup is left alone. Tables that scale their
    output (``embed_scale``) scale the soft words alike.
    """
    modules = embeddings if isinstance(embeddings, list) else [embeddings]
    shifted_index = F.pad(soft_index[:, :-1], (1, 0), value=-1)

    def hook(module, args, kwargs, output):
        ids = args[0] if args else kwargs.get("input")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != input_ids.shape[0]:
            return None
        length = input_ids.shape[1]
        if ids.shape[1] < length:
            return None
        if torch.equal(ids[:, :length], input_ids):
            # models that pad the ids on the right to a block size (Longformer, Reformer, MRA) look up a longer row
            index = F.pad(soft_index, (0, ids.shape[1] - length), value=-1)
        elif ids.shape[1] == length and torch.equal(ids[:, 1:], input_ids[:, :-1]):
            index = shifted_index
        else:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        mixed = put_soft_words(hidden, index)
        scale = getattr(module, "embed_scale", None)
        if scale is not None:
            mixed = torch.where((index >= 0).unsqueeze(-1), mixed * scale, hidden)
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    handles = [module.register_forward_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def deep_prompt_hooks(layers: list[nn.Module], offsets: torch.Tensor, soft_index: torch.Tensor) -> Iterator[None]:
    """Add ``offsets[l][soft_index]`` to the hidden state entering the l-th layer call, for l < len(offsets).

    ``offsets`` is ``[L, n_soft, H]``; ``soft_index`` is ``[N, T]`` with -1 where no offset applies.
    """
    num_deep, n_soft, hidden = offsets.shape
    # one extra zero row so that a single gather serves every position
    padded = torch.cat([offsets, offsets.new_zeros(num_deep, 1, hidden)], dim=1)
    index = torch.where(soft_index >= 0, soft_index, n_soft)
    calls = [0]

    def hook(module, args, kwargs):
        depth = calls[0]
        calls[0] += 1
        if depth >= num_deep:
            return None
        hidden_states, where = _hidden_from_call(args, kwargs)
        rows = index
        if hidden_states is not None and hidden_states.dim() == 3 and hidden_states.shape[0] == index.shape[0]:
            # models that pad the sequence on the right inside (Longformer, to its attention window)
            extra = hidden_states.shape[1] - index.shape[1]
            if extra > 0:
                rows = F.pad(index, (0, extra), value=n_soft)
        if hidden_states is None or hidden_states.shape[:2] != rows.shape:
            raise RuntimeError(
                f"Deep prompts could not find the hidden states entering {type(module).__name__} "
                f"(expected shape {tuple(index.shape)} + (hidden,)): this architecture hands its layers another "
                "layout. Use deep=False, and report the model type so that peft_softmix/architectures.py lists it."
            )
        shifted = hidden_states + padded[depth][rows].to(hidden_states.dtype)
        if isinstance(where, int):
            return (shifted, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[where] = shifted
        return args, kwargs

    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in dict.fromkeys(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def gather_mask_positions(backbone: nn.Module, mask_positions: torch.Tensor) -> Iterator[None]:
    """Make the backbone return only the hidden state at each row's mask position (``[N, 1, H]``).

    MLM heads act on each position independently, so the head (the vocabulary projection, most of the compute for
    short prompts) then runs on N positions instead of N x T.
    """

    def hook(module, args, output):
        hidden = output[0] if not isinstance(output, torch.Tensor) else output
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, mask_positions.to(hidden.device)].unsqueeze(1)
        if isinstance(output, torch.Tensor):
            return picked
        if isinstance(output, ModelOutput):
            output[next(iter(output.keys()))] = picked
            return output
        return (picked, *output[1:])

    handle = backbone.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
