"""The fold sessions of a Segmenter: created on first use, at most ``capacity`` alive at a time.

:class:`FoldSessions` is a sequence of engines (``len``, ``[i]``, slices) over the bundle's fold specs. With the
memory plan's ``resident`` design the capacity is the number of folds: every session is made once and kept. With
the ``grouped`` design (:class:`flare.runtime.inference.memory_plan.Design`) the capacity is the group size: asking
for a fold that is not alive drops the least recently used one first (its device memory goes back to ONNX
Runtime's arena, where the next session's weights reuse it), so that at most ``capacity`` sessions ever hold
device memory. Creation is serialised (a lock): the Segmenter builds the first group on a background thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, overload

__all__ = ["FoldSessions"]


class FoldSessions(Sequence[Any]):
    """Engines for ``specs``, made by ``make(spec)`` when first asked for, at most ``capacity`` alive."""

    def __init__(self, specs: Sequence[Any], make: Callable[[Any], Any], capacity: int | None = None, *,
                 _shared: tuple[OrderedDict[int, Any], threading.RLock, list[int]] | None = None,
                 _indices: Sequence[int] | None = None) -> None:
        self.specs = list(specs)
        self.make = make
        self._alive, self._lock, self._counts = _shared or (OrderedDict(), threading.RLock(), [0, 0])
        self.indices = list(range(len(self.specs))) if _indices is None else list(_indices)
        self._capacity = [len(self.specs) if capacity is None else max(1, int(capacity))]

    @property
    def capacity(self) -> int:
        return self._capacity[0]

    @capacity.setter
    def capacity(self, value: int) -> None:
        """A new capacity (at least 1); sessions beyond it are dropped now, least recently used first."""
        with self._lock:
            self._capacity[0] = max(1, int(value))
            while len(self._alive) > self._capacity[0]:
                self._drop_one()

    @property
    def created(self) -> int:
        """Sessions created so far (all views together)."""
        return self._counts[0]

    @property
    def dropped(self) -> int:
        return self._counts[1]

    def alive(self) -> list[int]:
        """Indices (into the bundle's folds) of the sessions alive now, least recently used first."""
        with self._lock:
            return list(self._alive)

    def peek(self) -> Any:
        """An engine that is alive (the most recently used), without making or dropping any: for its backend and
        precision. Makes the first one only when none is alive."""
        with self._lock:
            if self._alive:
                return next(reversed(self._alive.values()))
        return self[0]

    def alive_engines(self) -> list[Any]:
        """The engines alive now (none made): what an out-of-memory retry may shrink."""
        with self._lock:
            return list(self._alive.values())

    def _drop_one(self) -> None:
        self._alive.popitem(last=False)
        self._counts[1] += 1

    def _get(self, index: int) -> Any:
        with self._lock:
            if index in self._alive:
                self._alive.move_to_end(index)
                return self._alive[index]
            while len(self._alive) >= self.capacity:
                self._drop_one()
            engine = self.make(self.specs[index])
            self._counts[0] += 1
            self._alive[index] = engine
            return engine

    def __len__(self) -> int:
        return len(self.indices)

    @overload
    def __getitem__(self, i: int) -> Any: ...

    @overload
    def __getitem__(self, i: slice) -> FoldSessions: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):  # a view on the same sessions (flare-serve's --folds per request)
            view = FoldSessions(self.specs, self.make, _shared=(self._alive, self._lock, self._counts),
                                _indices=self.indices[i])
            view._capacity = self._capacity
            return view
        return self._get(self.indices[i])

    def prefetch(self, count: int) -> FoldSessions:
        """Make the first ``count`` sessions (up to the capacity) now; returns ``self``."""
        for k in range(min(count, self.capacity, len(self))):
            self[k]
        return self
