"""Finding a masked LM's layer stack and backbone, and the forward-time hooks that use them.

Nothing here is architecture-specific: the layer stack is the `nn.ModuleList` of identical blocks holding the most
parameters, and its depth is measured by counting calls in one tiny forward pass, so models that run one shared
block many times (ALBERT) get one offset per *call*. The hooks exist only inside a forward call.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
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
        if hidden_states is None or hidden_states.shape[:2] != index.shape:
            raise RuntimeError(
                f"Deep prompts could not find the hidden states entering {type(module).__name__} "
                f"(expected shape {tuple(index.shape)} + (hidden,)). This architecture needs an entry in "
                "peft_softmix's layer table; use deep=False meanwhile."
            )
        shifted = hidden_states + padded[depth][index].to(hidden_states.dtype)
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
