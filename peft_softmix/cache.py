"""`BoundedCache`: a least-recently-used dict of bounded size, for the queries and objects a processor tokenised.

Every filled template a `SoftMixtureProcessor` tokenises is kept, up to a bound, so that a training epoch or an
evaluation tokenises each query once; the least recently used entry goes first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedCache"]

KT = TypeVar("KT", bound=Hashable)
VT = TypeVar("VT")


class BoundedCache(Generic[KT, VT]):
    """A dict that keeps at most ``max_size`` entries, dropping the least recently used one first."""

    def __init__(self, max_size: int) -> None:
        if not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"A cache needs a max_size of at least 1, got {max_size!r}.")
        self.max_size = max_size
        self._entries: OrderedDict[KT, VT] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __getitem__(self, key: KT) -> VT:
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def get(self, key: KT) -> VT | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def __setitem__(self, key: KT, value: VT) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
