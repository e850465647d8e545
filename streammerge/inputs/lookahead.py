"""A bounded look-ahead thread: run jobs in order ahead of a consumer, never too far ahead.

The input readers all have this shape: a thread works through the run's inputs in plan order
(mapping pages in, reading tiles with O_DIRECT, asking the kernel to read ahead), at most a
window beyond the position the merge has consumed, and the merge waits for an item only when it
gets there. Positions count items or bytes, as each reader's ``size`` says. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P")
T = TypeVar("T")


class Lookahead(Generic[P, T]):
    """Runs ``job(item)`` for each of ``items`` in order on its own thread.

    An item starts only while its start position (the sum of ``size`` of the items before it) is
    below ``limit(consumed)``, where ``consumed`` is what the consumer last gave :meth:`advance`;
    an item wholly behind ``consumed`` is skipped (a resumed run skips finished work). The consumer
    takes an item's result with :meth:`wait` (None where the job returned None, was skipped, or
    the thread stopped first). Exceptions in a job are the job's to handle: the thread stops.
    """

    def __init__(
        self, name: str, items: Iterable[P], job: Callable[[P], T | None], size: Callable[[P], int], limit: Callable[[int], int]
    ) -> None:
        self._items = items
        self._job = job
        self._size = size
        self._limit = limit
        self._cond = threading.Condition()
        self._consumed = 0
        self._finished = 0  # items done (or skipped) by the thread
        self._results: dict[int, T] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def _work(self) -> None:
        position = 0
        try:
            for index, item in enumerate(self._items):
                n = self._size(item)
                with self._cond:
                    self._cond.wait_for(lambda p=position: self._stop or p < self._limit(self._consumed))  # type: ignore[misc]
                    if self._stop:
                        return
                    behind = position + n <= self._consumed
                position += n
                result = None if behind else self._job(item)
                with self._cond:
                    if result is not None:
                        self._results[index] = result
                    self._finished = index + 1
                    self._cond.notify_all()
        finally:
            with self._cond:  # however the thread ends, nobody waits for it any more
                self._stop = True
                self._cond.notify_all()

    def wait(self, index: int) -> T | None:
        """Wait until item ``index`` is done (or the thread has stopped); its result, once."""
        with self._cond:
            self._cond.wait_for(lambda: self._stop or self._finished > index)
            return self._results.pop(index, None)

    def done(self, index: int) -> bool:
        """Whether the thread finished item ``index`` (not: stopped before it)."""
        with self._cond:
            return self._finished > index

    def advance(self, consumed: int) -> None:
        """The consumer is at position ``consumed``: the window moves along."""
        with self._cond:
            self._consumed = max(self._consumed, consumed)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread (after the job it is doing); safe to call twice."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._started:
            self._thread.join()
