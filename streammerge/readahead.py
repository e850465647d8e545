"""Keep the disk busy ahead of the merge: ask the kernel to read the next input bytes early.

``posix_fadvise(WILLNEED)`` starts asynchronous reads into the page cache (not into this
process's memory, so RSS does not grow). A window of ``window_bytes`` ahead of the unit being
merged is kept requested; the first window is requested before torch is even imported, so the
import and the first reads overlap. Torch-free on purpose.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from streammerge.plan import Plan, Source

READAHEAD_BYTES = 256 * 2**20


def _ranges(plan: Plan) -> Iterator[Source]:
    for unit in plan.units:
        yield unit.source
        for term in unit.lora:
            yield term.a
            yield term.b


class Readahead:
    """Requests input ranges in plan order, up to ``window_bytes`` beyond the position consumed."""

    def __init__(self, plan: Plan, window_bytes: int = READAHEAD_BYTES) -> None:
        self.window = window_bytes
        self._ranges = list(_ranges(plan))
        self._next = 0
        self._requested = 0
        self._fds: dict[str, int] = {}
        self.enabled = hasattr(os, "posix_fadvise")

    def advance(self, consumed: int) -> None:
        """The merge has consumed ``consumed`` input bytes; keep the window ahead of it full."""
        while self.enabled and self._next < len(self._ranges) and self._requested < consumed + self.window:
            src = self._ranges[self._next]
            self._next += 1
            self._requested += src.nbytes
            try:
                fd = self._fds.get(src.file)
                if fd is None:
                    fd = self._fds[src.file] = os.open(src.file, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                os.posix_fadvise(fd, src.offset, src.nbytes, os.POSIX_FADV_WILLNEED)
            except OSError:
                self.enabled = False  # only a hint; the reads themselves will report real errors

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
