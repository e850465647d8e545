"""Keep the disk busy ahead of the merge: ask the kernel to read the next input bytes early.

``posix_fadvise(WILLNEED)`` starts asynchronous reads into the page cache (not into this
process's memory, so RSS does not grow). A thread keeps a window of ``window_bytes`` ahead of
the position the merge has consumed requested, in plan order. It starts before torch is even
imported (with a larger first window), so the import and the first reads overlap. Torch-free on
purpose.

Linux reads at most ``max(read_ahead_kb, max_sectors_kb)`` per WILLNEED call (8 MiB on the
benchmark machine) and silently drops the rest of a larger range, so ranges are requested in
:data:`CHUNK_BYTES` pieces.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from streammerge.inputs.lookahead import Lookahead
from streammerge.osio import CLOEXEC
from streammerge.plan.model import Plan

READAHEAD_BYTES = 256 * 2**20
"""How far ahead of the merge reads are requested."""
START_BYTES = 512 * 2**20
"""The window before the merge has consumed anything: the torch import leaves the disk idle for seconds."""
CHUNK_BYTES = 4 * 2**20
"""Bytes per WILLNEED request: at most what the kernel honours in one call."""


Piece = tuple[str, int, int, bool]
"""(file, offset, length, wanted) of one readahead request."""


def _ranges(plan: Plan, chunk: int, skip_tiles: bool = False) -> Iterator[Piece]:
    """(file, offset, length, wanted) pieces of every input range, in the order the executor reads
    them; with ``skip_tiles`` the base weights of computed units (read with O_DIRECT, past the page
    cache) are not wanted."""
    for unit in plan.units:
        for src in unit.inputs:
            wanted = not (skip_tiles and src is unit.source and unit.op != "copy")
            for start in range(0, src.nbytes, chunk):
                yield src.file, src.offset + start, min(chunk, src.nbytes - start), wanted


class Readahead:
    """Requests input ranges in plan order on its own thread, up to ``window_bytes`` beyond the position consumed.

    Example::

        ahead = Readahead(plan)
        ahead.start()
        ...
        ahead.advance(bytes_consumed)  # after each unit
        ahead.close()
    """

    def __init__(
        self,
        plan: Plan,
        window_bytes: int = READAHEAD_BYTES,
        start_bytes: int = START_BYTES,
        chunk_bytes: int = CHUNK_BYTES,
        skip_tiles: bool = False,
    ) -> None:
        self.window = window_bytes
        self.start_window = max(start_bytes, window_bytes)
        self.skip_tiles = skip_tiles
        """The base tiles are read with O_DIRECT (:mod:`streammerge.inputs.direct`): request only the rest."""
        self._fds: dict[str, int] = {}
        self._failed = False
        self.enabled = hasattr(os, "posix_fadvise")
        self._thread: Lookahead[Piece, bool] = Lookahead(
            "streammerge-readahead", _ranges(plan, chunk_bytes, skip_tiles), self._request, size=lambda p: p[2], limit=self._limit
        )

    def start(self) -> None:
        """Start requesting (the first window is larger: nothing is consumed while torch loads)."""
        if self.enabled:
            self._thread.start()

    def advance(self, consumed: int) -> None:
        """The merge has consumed ``consumed`` input bytes (in plan order): move the window along."""
        self._thread.advance(consumed)

    def _limit(self, consumed: int) -> int:
        return consumed + (self.window if consumed else self.start_window)

    def _request(self, piece: Piece) -> None:
        path, offset, nbytes, wanted = piece
        if not wanted or self._failed:
            return
        try:
            fd = self._fds.get(path)
            if fd is None:
                fd = self._fds[path] = os.open(path, os.O_RDONLY | CLOEXEC)
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
        except OSError:
            self._failed = True  # only a hint; the reads themselves will report real errors

    def close(self) -> None:
        """Stop the thread and close its files; safe to call twice."""
        self._thread.close()
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
