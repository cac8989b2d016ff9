"""Denormal floats on CPUs: a mixture's backward pass makes many, and a CPU computes with them many times slower.

The gradient a mixture sends to template k's row is its posterior, pi_k p_k(y|x) / p(y|x). A template that gives
the object a far lower probability than the best one (a whole sentence scored token by token on a causal LM easily
sits 90 nats below) gets a posterior under float32's smallest normal number (1.2e-38), and every product with it in
the backward pass is a denormal. x86 CPUs take a slow path for each of them: on the causal probe LM a K = 5 training
step's backward matrix products ran 3-5x slower than the same products on normal numbers (docs/performance.md).

Flushing denormals to zero changes only values below 1.2e-38, far under anything an optimiser step can see, so the
library's training loop runs with it on (`flush_denormals`), and puts the thread's setting back afterwards. GPUs are
left alone: their kernels do not slow down on denormals.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["flush_denormals", "flushing_denormals"]

_DENORMAL = 1e-39  # below float32's smallest normal number, 1.18e-38


def flushing_denormals() -> bool:
    """Whether this thread's CPU arithmetic flushes denormals to zero now (torch has a setter but no getter)."""
    return float(torch.tensor(_DENORMAL, dtype=torch.float32) * 1.0) == 0.0


@contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[None]:
    """Flush denormal floats to zero on this thread's CPU arithmetic inside the block, then restore the setting.

    The library's training loop (`RelationTrainer`) runs its epochs in it; a hand-written loop over a mixture's loss
    can do the same. Does nothing when ``enabled`` is false or the CPU cannot flush (``torch.set_flush_denormal``
    returns False there).
    """
    if not enabled:
        yield
        return
    before = flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
