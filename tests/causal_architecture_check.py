"""The architecture-level check of soft prompts on one causal-LM type: a test helper, not part of the package.

`check_causal_architecture` is what `tests/test_causal_architectures.py` runs for the key types and what
``scripts/architecture_matrix.py --kind causal`` writes the "Causal LMs" table of ``docs/supported-architectures.md``
from. It uses the library's own rules and hooks (`find_input_embeddings`, `tied_embedding_modules`, `layer_stack`,
`soft_word_embeddings`, `deep_prompt_hooks`) on a tiny random model and proves, at a soft position p of each row:

- the kind: `model_kind` says "causal";
- shallow: a soft word initialised from its token reproduces the frozen logits; a moved soft word leaves every
  position before p unchanged (bitwise for almost every type; a few that reduce over the whole sequence differ by
  float rounding, recorded in ``gaps``) and changes every position from p on; its gradient is non-zero;
- deep: zero offsets reproduce the frozen logits; offsets at p in every layer call leave positions before p bitwise
  unchanged, change those from p on, and every layer's offset gets a gradient;
- cache: the model takes ``use_cache=True``, and scoring the tokens after a prefix from the prefix's cache gives the
  full forward's logits, for the frozen model and with the soft word and offsets in the prefix (what scoring
  candidates from a key/value cache relies on).

`CausalArchitectureCheck` holds one type's outcome; add a field and a stage to extend it (e.g. the end-to-end
log-probability of an object once the causal scoring path exists).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from peft_softmix.architectures import input_embeddings, layer_stack, model_type, tied_embedding_modules
from peft_softmix.hooks import SoftPositions, count_layer_calls, deep_prompt_hooks, soft_word_embeddings
from peft_softmix.model import put_soft_words
from peft_softmix.model_kinds import model_kind

LENGTH = 10  # tokens per row
SOFT_POSITION = 4  # where the soft word (and the deep offsets) sit in each row
PREFIX = 6  # the cache check runs the first PREFIX tokens, then the rest from their cache
EXACT = 1e-6  # what "reproduces the frozen model" allows (float noise of an identical computation: none)
CACHE_EXACT = 1e-5  # the cache path runs other matrix shapes: rounding, no more
CACHE_NAMES = ("past_key_values", "cache", "cache_params")


@dataclass
class CausalArchitectureCheck:
    """The outcome of `check_causal_architecture` for one causal-LM type.

    Attributes:
        model_type: ``config.model_type``.
        model_class: the causal-LM class checked.
        kind: what `model_kind` said (or its error).
        shallow: soft words work (the first three stages passed).
        deep: deep offsets work as well.
        cache: ``"exact"`` (the cache path gives the full forward's logits, to `CACHE_EXACT`), ``"inexact"`` (it
            runs but differs more), ``"fails"`` (it raises), or None (not reached).
        layers: how many layer calls a forward makes (the deep offsets' depth).
        stage: where the first failure happened (None when all passed).
        error: that failure.
        cache_error: why the cache path failed or differs.
        cache_argument: the forward argument the cache goes back in (``past_key_values``, or ``cache`` for
            state-space types).
        gaps: the largest differences measured, by name.
        seconds: wall time of the check.
    """

    model_type: str = "?"
    model_class: str = "?"
    kind: str | None = None
    shallow: bool = False
    deep: bool = False
    cache: str | None = None
    layers: int | None = None
    stage: str | None = None
    error: str | None = None
    cache_error: str | None = None
    cache_argument: str | None = None
    gaps: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(vocab_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    # ids away from the special tokens (pad 0, bos 1, eos 2)
    return torch.randint(3, vocab_size, (2, LENGTH), generator=generator)


def _positions(rows: int, length: int) -> SoftPositions:
    soft_index = torch.full((rows, length), -1)
    soft_index[:, SOFT_POSITION] = torch.arange(rows)  # soft word r in row r
    return SoftPositions.of(soft_index)


def _logits(model: nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    kwargs.setdefault("use_cache", False)  # a full forward keeps no cache (RWKV's would be updated in place)
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits.float()


def _causal_effect(result: CausalArchitectureCheck, changed: torch.Tensor, frozen: torch.Tensor, what: str) -> None:
    """Positions before the soft position unchanged (bitwise, or to float rounding: the largest difference is
    recorded), every position from it on changed."""
    gap = (changed[:, :SOFT_POSITION] - frozen[:, :SOFT_POSITION]).abs().max().item()
    key = f"before_p_{what.split()[-2]}"  # before_p_soft, before_p_deep
    result.gaps[key] = gap
    if not gap <= EXACT:
        raise AssertionError(f"{what} at position {SOFT_POSITION} changes earlier positions (by {gap:.1e})")
    moved = (changed[:, SOFT_POSITION:] - frozen[:, SOFT_POSITION:]).abs().amax(dim=-1)
    if not bool((moved > 0).all()):
        unmoved = sorted({int(i) + SOFT_POSITION for i in (moved == 0).nonzero()[:, 1]})
        raise AssertionError(f"{what} at position {SOFT_POSITION} leaves positions {unmoved} unchanged")


def check_causal_architecture(make_model: Callable[[], nn.Module]) -> CausalArchitectureCheck:
    """Run the stages above on the model ``make_model`` returns, recording where (and why) it fails."""
    start = time.perf_counter()
    result = CausalArchitectureCheck()
    stage: str | None = "building the model"
    try:
        base = make_model().eval()
        for param in base.parameters():
            param.requires_grad_(False)
        result.model_type, result.model_class = model_type(base), type(base).__name__
        stage = "model kind"
        result.kind = model_kind(base)
        if result.kind != "causal":
            raise AssertionError(f"model_kind says {result.kind!r}")

        stage = "finding the parts"
        embeddings = input_embeddings(base)
        tables = tied_embedding_modules(base, embeddings)
        ids = _rows(embeddings.num_embeddings)
        positions = _positions(*ids.shape)
        stage = "frozen forward"
        with torch.no_grad():
            frozen = _logits(base, ids)

        stage = "hard soft word"
        hard_table = embeddings.weight[ids[:, SOFT_POSITION]].detach().clone()
        with torch.no_grad(), _soft(tables, hard_table, positions, ids):
            hard = _logits(base, ids)
        result.gaps["hard"] = (hard - frozen).abs().max().item()
        if not result.gaps["hard"] <= EXACT:
            raise AssertionError(f"a soft word initialised from its token changes the logits by {result.gaps['hard']}")

        stage = "soft word causality"
        soft_table = (torch.randn_like(hard_table) * hard_table.std()).requires_grad_(True)
        with _soft(tables, soft_table, positions, ids):
            soft = _logits(base, ids)
        _causal_effect(result, soft.detach(), frozen, "a soft word")
        soft[:, -1].logsumexp(-1).sum().backward()
        if soft_table.grad is None or not bool((soft_table.grad.abs().sum(-1) > 0).all()):
            raise AssertionError("no gradient reaches the soft words")
        result.shallow = True
    except Exception as err:  # the matrix records every failure instead of stopping at the first
        result.error = f"{type(err).__name__}: {err}".strip()[:500]
        result.stage, result.seconds = stage, time.perf_counter() - start
        return result
    offsets: torch.Tensor | None = None
    try:
        stage = "deep offsets"
        offsets = _check_deep(result, base, ids, positions, frozen)
        result.deep, stage = True, None
    except Exception as err:
        result.error = f"{type(err).__name__}: {err}".strip()[:500]
    # the cache is a separate column: a type without it can still score candidates one forward each
    _check_cache(result, base, tables, layer_stack(base), ids, soft_table.detach(), offsets)
    result.stage, result.seconds = stage, time.perf_counter() - start
    return result


def _check_deep(
    result: CausalArchitectureCheck, base: nn.Module, ids: torch.Tensor, positions: SoftPositions, frozen: torch.Tensor
) -> torch.Tensor:
    """Zero offsets change nothing; offsets at the soft position act causally and all get gradients."""
    layers = layer_stack(base)
    with torch.no_grad(), count_layer_calls(layers) as counter:
        _logits(base, ids)
    if not counter.calls:
        raise AssertionError("no layer call found for deep offsets")
    result.layers = counter.calls
    zeros = torch.zeros(counter.calls, ids.shape[0], counter.hidden_size)
    with torch.no_grad(), deep_prompt_hooks(layers, zeros, positions):
        still = _logits(base, ids)
    result.gaps["zero_offsets"] = (still - frozen).abs().max().item()
    if not result.gaps["zero_offsets"] <= EXACT:
        raise AssertionError(f"zero deep offsets change the logits by {result.gaps['zero_offsets']}")
    offsets = (torch.randn_like(zeros) * 0.5).requires_grad_(True)
    with deep_prompt_hooks(layers, offsets, positions):
        shifted = _logits(base, ids)
    _causal_effect(result, shifted.detach(), frozen, "a deep offset")
    shifted[:, -1].logsumexp(-1).sum().backward()
    grad = offsets.grad if offsets.grad is not None else torch.zeros_like(offsets)
    missing = (grad.abs().sum(dim=(1, 2)) == 0).nonzero()[:, 0].tolist()
    if missing:
        raise AssertionError(f"no gradient reaches the offsets of layer calls {missing}")
    return offsets.detach()


def _soft(tables: list[nn.Module], table: torch.Tensor, positions: SoftPositions, ids: torch.Tensor):
    return soft_word_embeddings(tables, functools.partial(put_soft_words, table), positions, ids)


def _check_cache(
    result: CausalArchitectureCheck,
    base: nn.Module,
    tables: list[nn.Module],
    layers: list[nn.Module],
    ids: torch.Tensor,
    soft_table: torch.Tensor,
    offsets: torch.Tensor | None,
) -> None:
    """The tokens after a prefix scored from the prefix's cache, against one full forward: frozen, then with the soft
    word and deep offsets in the prefix."""
    prefix, rest = ids[:, :PREFIX], ids[:, PREFIX:]
    full_mask = torch.ones_like(ids)
    # most types take the whole sequence's attention mask and find the continuation's positions from the cache;
    # some state-space ones take no mask for it, or need the positions given
    positions = torch.arange(PREFIX, ids.shape[1])
    for extra in ({}, {"attention_mask": None}, {"attention_mask": None, "cache_position": positions}):
        gap = 0.0
        try:
            with torch.no_grad():
                for soft in (False, True):
                    with _prompts(soft, tables, layers, soft_table, offsets, ids):
                        full = _logits(base, ids)
                    with _prompts(soft, tables, layers, soft_table, offsets, prefix):
                        first = base(input_ids=prefix, attention_mask=torch.ones_like(prefix), use_cache=True)
                    # the cache goes back under the name it came out as (state-space types call it `cache`)
                    name = next((n for n in CACHE_NAMES if getattr(first, n, None) is not None), None)
                    if name is None:
                        raise AssertionError(f"the forward returns no cache ({', '.join(CACHE_NAMES)})")
                    then = base(
                        **{"input_ids": rest, "attention_mask": full_mask, name: getattr(first, name), **extra}
                    )
                    scored = torch.cat([first.logits.float(), then.logits.float()], dim=1)
                    gap = max(gap, (scored - full).abs().max().item())
        except Exception as err:
            if not extra:  # the first failure is the one to report
                result.cache, result.cache_error = "fails", f"{type(err).__name__}: {err}".strip()[:300]
            continue
        result.gaps["cache"] = gap
        result.cache = "exact" if gap <= CACHE_EXACT else "inexact"
        result.cache_error = None
        result.cache_argument = name
        if result.cache == "inexact":
            result.cache_error = f"the cached scores differ from the full forward's by up to {gap:.1e}"
        elif extra:
            given = ", ".join(f"{key}={'None' if value is None else 'its positions'}" for key, value in extra.items())
            result.cache_error = f"exact when the continuation is called with {given}"
        return


def _prompts(soft, tables, layers, soft_table, offsets, ids) -> ExitStack:
    """The soft word (and the deep offsets, unless None) on the rows ``ids``, whose first positions hold the soft
    position; nothing when ``soft`` is False."""
    stack = ExitStack()
    if soft:
        positions = _positions(*ids.shape)
        stack.enter_context(_soft(tables, soft_table, positions, ids))
        if offsets is not None:  # None when the deep stage failed: the cache is checked with the soft word only
            stack.enter_context(deep_prompt_hooks(layers, offsets, positions))
    return stack
