"""GPU staging: pinned host buffers between the mapped input, the device and the write queue.

On a GPU run every input tile is copied from its mapped pages into one of two pinned slots and
sent to the device asynchronously; the merged tile comes back asynchronously into a pinned
write-pool buffer. The CPU meanwhile maps and stages the next tile. A tile's write is handed to
the :class:`~streammerge.writequeue.WriteQueue` only once its device-to-host copy has landed, and
every write, copy and journal entry reaches the queue in the order the executor issued it (the
queue computes each tensor's CRC-32 over its bytes in order, and journals a unit after its
writes). At most ``keep`` tiles wait on the device; with ``keep`` below the write pool's size the
pool never runs dry.

Without CUDA the same class runs with plain buffers and already-finished events (the tests use
that to check the ordering on any machine).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch

from streammerge.geometry import ALIGN
from streammerge.writequeue import Buffer

if TYPE_CHECKING:
    from streammerge.plan.model import WorkUnit


class Event(Protocol):
    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


class _Done:
    """The event of work that is already finished (CPU staging)."""

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        return None


class Sink(Protocol):
    """Where a unit's bytes go: the background write queue, or memory (``compute_unit``)."""

    def acquire(self) -> Buffer: ...
    def write(self, shard: int, offset: int, tensor: str, buffer: Buffer, nbytes: int, start: int = 0) -> None: ...
    def write_bytes(self, shard: int, offset: int, tensor: str, data: bytes) -> None: ...
    def copy(self, shard: int, offset: int, tensor: str, src_fd: int, src_offset: int, nbytes: int) -> None: ...
    def commit(self, unit: WorkUnit, index: int) -> None: ...


def pinned_buffer(nbytes: int) -> Buffer:
    """``nbytes`` of page-locked host memory starting on an :data:`ALIGN` boundary, as a writable view.

    The view keeps its tensor (and so the pinned allocation) alive.
    """
    t = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=True)
    skip = -t.data_ptr() % ALIGN
    return t[skip : skip + nbytes].numpy().data


class Staging:
    """A :class:`Sink` for GPU runs that stages tiles through pinned memory (see the module doc)."""

    def __init__(self, out: Sink, device: torch.device, in_bytes: int, slots: int = 2, keep: int = 1) -> None:
        self._out = out
        self.device = device
        self._pinned = device.type == "cuda"
        self._slots = [torch.empty(in_bytes, dtype=torch.uint8, pin_memory=self._pinned) for _ in range(slots)]
        self._slot_events: list[Event] = [_Done() for _ in range(slots)]
        self._next = 0
        self._keep = keep
        self._pending: deque[tuple[Event, bool, Callable[[], None]]] = deque()
        self._held = 0  # pending entries that hold a write-pool buffer

    def _event(self) -> Event:
        """An event recorded now on the device's current stream: done when the work queued so far is."""
        if not self._pinned:
            return _Done()
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        return event

    def to_device(self, raw: torch.Tensor, dest: torch.Tensor) -> torch.Tensor:
        """Copy the bytes of the CPU uint8 tensor ``raw`` into the device uint8 tensor ``dest``.

        Goes through the next pinned slot (waiting until its previous transfer has left it); returns
        as soon as the transfer is queued. ``raw``'s memory may be released on return.
        """
        i, n = self._next, raw.numel()
        self._next = (i + 1) % len(self._slots)
        self._slot_events[i].synchronize()
        if self._slots[i].numel() < n:  # a plan never needs this; grow rather than fail
            self._slots[i] = torch.empty(n, dtype=torch.uint8, pin_memory=self._pinned)
        slot = self._slots[i][:n]
        slot.copy_(raw)
        dest.copy_(slot, non_blocking=True)
        self._slot_events[i] = self._event()
        return dest

    def write_from_device(
        self, result: torch.Tensor, host: torch.Tensor, shard: int, offset: int, tensor: str, buffer: Buffer, start: int
    ) -> None:
        """Copy the device tensor ``result`` into ``host`` (a view of ``buffer``, from :meth:`acquire`)
        asynchronously, and write ``host``'s bytes at ``offset`` once the copy has landed."""
        host.copy_(result, non_blocking=True)
        nbytes = host.numel() * host.element_size()
        self._defer(self._event(), True, lambda: self._out.write(shard, offset, tensor, buffer, nbytes, start))

    def _defer(self, event: Event, holds_buffer: bool, job: Callable[[], None]) -> None:
        self._pending.append((event, holds_buffer, job))
        self._held += holds_buffer
        self._drain(blocking_above=None)

    def _drain(self, blocking_above: int | None) -> None:
        """Hand finished entries to the sink in order; with ``blocking_above``, also wait for the
        oldest ones until at most that many entries holding a buffer are left."""
        while self._pending:
            event, holds, job = self._pending[0]
            if not event.query():
                if blocking_above is None or self._held <= blocking_above:
                    return
                event.synchronize()
            self._pending.popleft()
            self._held -= holds
            job()

    def acquire(self) -> Buffer:
        self._drain(blocking_above=self._keep - 1)  # the new buffer makes at most `keep` in flight
        return self._out.acquire()

    def write(self, shard: int, offset: int, tensor: str, buffer: Buffer, nbytes: int, start: int = 0) -> None:
        self._defer(_Done(), True, lambda: self._out.write(shard, offset, tensor, buffer, nbytes, start))

    def write_bytes(self, shard: int, offset: int, tensor: str, data: bytes) -> None:
        self._defer(_Done(), False, lambda: self._out.write_bytes(shard, offset, tensor, data))

    def copy(self, shard: int, offset: int, tensor: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        self._defer(_Done(), False, lambda: self._out.copy(shard, offset, tensor, src_fd, src_offset, nbytes))

    def commit(self, unit: WorkUnit, index: int) -> None:
        self._defer(_Done(), False, lambda: self._out.commit(unit, index))

    def flush(self) -> None:
        """Wait for every device copy and hand everything still pending to the sink."""
        self._drain(blocking_above=-1)
