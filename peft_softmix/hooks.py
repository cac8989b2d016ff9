"""The forward hooks that put a mixture of soft prompts into a frozen masked LM, for one forward call at a time.

`soft_word_embeddings` swaps soft words into the token embedding table's output, `deep_prompt_hooks` adds deep
offsets before each layer call, `gather_mask_positions` makes the backbone hand the MLM head the mask positions only,
and `count_layer_calls` measures the layer stack's depth in calls (so a model that runs one shared block many times,
ALBERT, gets one offset per *call*). Nothing here is architecture-specific: `architectures.py` finds the modules the
hooks go on. Every hook is removed when its ``with`` block ends, even when the forward inside it raises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.utils import ModelOutput


def _hidden_from_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, str | int | None]:
    if args and isinstance(args[0], torch.Tensor):
        return args[0], 0
    for name in ("hidden_states", "hidden_state", "x", "inputs_embeds"):
        if isinstance(kwargs.get(name), torch.Tensor):
            return kwargs[name], name
    return None, None


@contextmanager
def _removed_on_exit(handles: list[RemovableHandle]) -> Iterator[None]:
    """Keep hooks registered for the ``with`` block only, even when the forward inside it raises."""
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


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

    with _removed_on_exit(
        [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in dict.fromkeys(layers)]
    ):
        yield counter


@dataclass(frozen=True)
class SoftPositions:
    """Where the soft words of a batch of ``num_rows`` rows of ``length`` tokens sit, as flat indices.

    Position ``index[i]`` of the flattened ``[num_rows * length]`` batch holds soft word ``words[i]``. Adding or
    writing at these P positions only (``index_add`` / ``index_copy``) costs O(P) in forward and backward, where a
    dense gather over all positions would scatter gradients for every token.
    """

    index: torch.Tensor
    words: torch.Tensor
    num_rows: int
    length: int

    @classmethod
    def of(cls, soft_index: torch.Tensor) -> SoftPositions:
        """From ``soft_index`` (``[N, T]``: the soft word at each position, negative where there is none).

        `encode`'s ``roles`` are such an index.
        """
        flat = soft_index.reshape(-1)
        # the one host-device synchronisation of a forward pass: the number of soft positions sizes what follows
        index = (flat >= 0).nonzero().squeeze(1)
        return cls(index, flat.index_select(0, index), soft_index.shape[0], soft_index.shape[1])

    def padded_to(self, length: int) -> SoftPositions:
        """The same words in rows padded on the right to ``length``."""
        if length == self.length:
            return self
        index = self.index // self.length * length + self.index % self.length
        return SoftPositions(index, self.words, self.num_rows, length)

    def shifted_right(self) -> SoftPositions:
        """The words one position to the right within their rows; a word in a row's last position drops out."""
        keep = self.index % self.length != self.length - 1
        return SoftPositions(self.index[keep] + 1, self.words[keep], self.num_rows, self.length)


@contextmanager
def soft_word_embeddings(
    embeddings: nn.Module | list[nn.Module],
    put_soft_words: Callable[[torch.Tensor, SoftPositions, Any], torch.Tensor],
    positions: SoftPositions,
    input_ids: torch.Tensor,
) -> Iterator[None]:
    """Make the embedding table's output carry the soft words at template positions of ``input_ids``.

    ``put_soft_words(embeds, positions, scale)`` returns ``embeds`` with the soft words, times ``scale`` unless it is
    None, at ``positions`` (the adapter's `SoftMixtureModel`).

    The model still receives token ids, so everything it derives from them (position ids that skip padding, ESM's
    mask-token rescaling, a seq2seq decoder's shifted input) is exactly what the hard prompt gets. A lookup of the
    ids shifted right by one position (the decoder input of BART-style fill-mask) gets the soft words shifted too,
    one of the ids padded on the right gets them in place; any other lookup is left alone. Tables that scale their
    output (``embed_scale``) scale the soft words alike.
    """
    modules = embeddings if isinstance(embeddings, list) else [embeddings]
    num_rows, length = input_ids.shape

    def lookup_positions(ids: object) -> SoftPositions | None:
        if ids is input_ids:
            # the usual case, decided without comparing values (a host-device synchronisation on a GPU)
            return positions
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != num_rows or ids.shape[1] < length:
            return None
        if torch.equal(ids[:, :length], input_ids):
            # models that pad the ids on the right to a block size (Longformer, Reformer, MRA) look up a longer row
            return positions.padded_to(ids.shape[1])
        if ids.shape[1] == length and torch.equal(ids[:, 1:], input_ids[:, :-1]):
            return positions.shifted_right()
        return None

    def hook(module, args, kwargs, output):
        where = lookup_positions(args[0] if args else kwargs.get("input"))
        if where is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        mixed = put_soft_words(hidden, where, getattr(module, "embed_scale", None))
        return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

    with _removed_on_exit([module.register_forward_hook(hook, with_kwargs=True) for module in modules]):
        yield


@contextmanager
def deep_prompt_hooks(layers: list[nn.Module], offsets: torch.Tensor, positions: SoftPositions) -> Iterator[None]:
    """Add ``offsets[l][word]`` to the hidden state entering the l-th layer call at each soft word's position.

    ``offsets`` is ``[L, n_soft, H]``; only the first L layer calls get an offset.
    """
    num_deep, _, width = offsets.shape
    rows, length = positions.num_rows, positions.length
    # every layer's offsets laid out on the batch at once (one index_add, one index_select backward), so that each
    # layer call costs a single add: a launch-bound GPU step would otherwise pay a few small operations per layer.
    # The price is the layout's memory during the forward (benchmarks/deep_offsets.py measures both)
    canvas = offsets.new_zeros(num_deep, rows * length, width)
    canvas.index_add_(1, positions.index, offsets.index_select(1, positions.words))
    pending = iter(canvas.view(num_deep, rows, length, width).unbind(0))

    def hook(module, args, kwargs):
        offset = next(pending, None)
        if offset is None:
            return None
        hidden_states, where = _hidden_from_call(args, kwargs)
        if (
            hidden_states is None
            or hidden_states.dim() != 3
            or hidden_states.shape[0] != rows
            or hidden_states.shape[1] < length
        ):
            raise RuntimeError(
                f"Deep prompts could not find the hidden states entering {type(module).__name__} "
                f"(expected shape {(rows, length)} + (hidden,)): this architecture hands its layers another layout. "
                "Use deep=False, and report the model type so that peft_softmix/architectures.py lists it."
            )
        if offset.dtype != hidden_states.dtype:
            offset = offset.to(hidden_states.dtype)
        if hidden_states.shape[1] > length:
            # models that pad the sequence on the right inside (Longformer, to its attention window)
            offset = F.pad(offset, (0, 0, 0, hidden_states.shape[1] - length))
        shifted = hidden_states + offset
        if isinstance(where, int):
            return (shifted, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs[where] = shifted
        return args, kwargs

    with _removed_on_exit(
        [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in dict.fromkeys(layers)]
    ):
        yield


@contextmanager
def gather_mask_positions(backbone: nn.Module, mask_positions: torch.Tensor) -> Iterator[None]:
    """Make the backbone return only the hidden state at each row's mask position (``[N, 1, H]``), or at each of
    its ``L`` positions for ``mask_positions`` of shape ``[N, L]`` (``[N, L, H]``).

    LM heads act on each position independently, so the head (the vocabulary projection, most of the compute for
    short prompts) then runs on N (or N x L) positions instead of N x T.
    """

    def hook(module, args, output):
        hidden = output[0] if not isinstance(output, torch.Tensor) else output
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        where = mask_positions.to(hidden.device)
        picked = hidden[rows, where].unsqueeze(1) if where.dim() == 1 else hidden[rows[:, None], where]
        if isinstance(output, torch.Tensor):
            return picked
        if isinstance(output, ModelOutput):
            output[next(iter(output.keys()))] = picked
            return output
        return (picked, *output[1:])

    with _removed_on_exit([backbone.register_forward_hook(hook)]):
        yield
