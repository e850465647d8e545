"""Direct reads: base-weight tiles read from the disk with ``O_DIRECT`` into a ring of reusable buffers.

The other way in is mmap (:class:`streammerge.inputs.mapped.SourceFiles`): the kernel reads a tile
into the page cache and the merge reads the mapped pages. Every page the disk filled then costs
a CPU its first touch. On bare metal that is a page fault; on a virtual machine whose host
reclaims free guest memory (a balloon with free-page reporting, as on the benchmark VMs) it is
a trip to the hypervisor, measured at ~5 us per 4 KiB page: about 8 s of CPU for the 5.75 GB of a
3B model, taken from the two merging threads. ``cat`` of the same files spent 15 s in the kernel.

Here a thread reads each tile with ``preadv`` on an ``O_DIRECT`` descriptor, straight from the
disk into one of ``ahead + 1`` anonymous buffers that are reused for the whole run: the CPU never
touches a fresh page, and the page cache is not filled with a model that is read once. The same
5.75 GB came in at 1.65 GB/s with under 0.3 s of CPU (docs/benchmarks.md).

``O_DIRECT`` needs the file offset, the length and the memory address aligned to the device's
block size: each tile is read from the :data:`ALIGN` boundary below its first byte to the one
above its last, and the merge gets a view of the bytes it asked for. A filesystem that refuses
``O_DIRECT`` (tmpfs, some network and FUSE filesystems) or a read that fails leaves that tile to
the mmap path, which reports real errors. A model that is mostly in the page cache already
(:func:`cached_fraction`) is better mapped: ``--read auto`` (:func:`use_direct`) then maps it.

Torch-free on purpose: :func:`streammerge.run` starts it before torch is imported, so the first
tiles arrive during the import.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Sequence

from streammerge.errors import StreamMergeError
from streammerge.geometry import ALIGN, Range, aligned_span, tile_ranges
from streammerge.inputs.lookahead import Lookahead
from streammerge.osio import buffer_address, direct_disabled, libc_function, open_direct
from streammerge.plan.model import Plan


def direct_problem(path: str) -> str | None:
    """Why ``path`` cannot be read with ``O_DIRECT``, or None when an aligned read of its first block works."""
    disabled = direct_disabled()
    if disabled:
        return disabled
    buf = mmap.mmap(-1, ALIGN)
    try:
        fd = open_direct(path)
    except OSError as e:
        buf.close()
        return f"{path}: {e.strerror or e}"
    try:
        os.preadv(fd, [buf], 0)
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    finally:
        buf.close()
        os.close(fd)
    return None


class DirectTiles:
    """Reads ``ranges`` in order on its own thread, at most ``ahead`` tiles beyond the one in use.

    Call :meth:`ready` for every range in order, read the tile through :meth:`view`, then
    :meth:`release` it; the thread reuses a tile's buffer only after its release. Memory: ``ahead + 1``
    buffers of the largest aligned tile, allocated once.

    Example::

        tiles = DirectTiles(ranges)
        tiles.start()
        for r in ranges:
            if tiles.ready(*r):
                buffer, at = tiles.view(*r)  # r's bytes are buffer[at : at + r[2]]
            tiles.release(*r)
        tiles.close()
    """

    def __init__(self, ranges: Sequence[Range], ahead: int = 1) -> None:
        self.ranges = list(ranges)
        self._slots = max(1, ahead + 1)
        size = max((aligned_span(offset, nbytes)[1] for _, offset, nbytes in self.ranges), default=0)
        self._buffers = [mmap.mmap(-1, size) for _ in range(min(self._slots, len(self.ranges)))] if size else []
        self._taken = 0  # tiles handed out by ready()
        self._released = 0  # tiles whose buffer is free again
        self._head: int | None = None
        """Where the first byte of the tile in use is in its buffer (None: not read directly)."""
        self._fds: dict[str, int | None] = {}
        # A tile's buffer is reused only after its release: at most ``slots`` tiles beyond the released ones.
        self._thread: Lookahead[int, int] = Lookahead(
            "streammerge-direct-read", range(len(self.ranges)), self._read, size=lambda i: 1, limit=lambda done: done + self._slots
        )

    def start(self) -> None:
        if self.ranges:
            self._thread.start()

    def _fd(self, path: str) -> int | None:
        if path not in self._fds:
            try:
                self._fds[path] = open_direct(path)
            except OSError:
                self._fds[path] = None
        return self._fds[path]

    def _read(self, index: int) -> int | None:
        """Read tile ``index`` into its buffer; where its first byte landed, or None if it could not be read directly."""
        path, offset, nbytes = self.ranges[index]
        fd = self._fd(path)
        if fd is None:
            return None
        start, length = aligned_span(offset, nbytes)
        view = memoryview(self._buffers[index % self._slots])
        try:
            got = 0
            while got < length:
                n = os.preadv(fd, [view[got:length]], start + got)
                got += max(n, 0)
                if n <= 0 or got % ALIGN:
                    break  # end of file (the aligned span may run past it): never read on from an unaligned offset
        except OSError:
            return None
        finally:
            view.release()
        return offset - start if got >= offset - start + nbytes else None

    def ready(self, path: str, offset: int, nbytes: int) -> bool:
        """Wait for the next tile, which must be ``(path, offset, nbytes)``; False if it was not read
        directly (the caller reads it another way)."""
        index = self._taken
        if index >= len(self.ranges) or self.ranges[index] != (path, offset, nbytes):
            raise AssertionError(f"direct read order: tile {index} is {(path, offset, nbytes)}, expected another")
        self._head = self._thread.wait(index)
        self._taken = index + 1
        return self._head is not None

    def view(self, path: str, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """The buffer holding ``nbytes`` at ``offset`` of ``path`` and where they start in it, if they
        lie within the tile in use and it was read directly; else None."""
        index = self._taken - 1
        if self._head is None or index < self._released:
            return None
        tile_path, tile_offset, tile_bytes = self.ranges[index]
        if path != tile_path or not tile_offset <= offset <= offset + nbytes <= tile_offset + tile_bytes:
            return None
        return self._buffers[index % self._slots], self._head + offset - tile_offset

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """The tile in use (``(path, offset, nbytes)``) is finished: its buffer may take the next read."""
        index = self._taken - 1
        if index < 0 or self.ranges[index] != (path, offset, nbytes):
            return
        self._released = max(self._released, index + 1)
        self._head = None
        self._thread.advance(self._released)

    def close(self) -> None:
        """Stop the thread (after the read in progress) and free the buffers; safe to call twice."""
        self._thread.close()
        for fd in self._fds.values():
            if fd is not None:
                os.close(fd)
        self._fds.clear()
        for buffer in self._buffers:
            with contextlib.suppress(BufferError):  # a tensor still views it; the mapping goes with it
                buffer.close()
        self._buffers = []


READ_MODES = ("auto", "direct", "mmap")
"""How the merge reads base-weight tiles: ``direct`` (O_DIRECT, this module), ``mmap`` (the page
cache), ``auto`` (mmap when the tiles are mostly in the page cache already or a base file
refuses O_DIRECT, else direct)."""

CACHED_ENOUGH = 0.5
"""``auto`` reads through the page cache when at least this fraction of the sampled tile pages is
in it already: a model just downloaded or merged a minute ago needs no disk at all that way."""


def cached_fraction(ranges: Sequence[Range], samples: int = 64, sample_bytes: int = 64 * 1024) -> float:
    """The fraction of the page-cache pages of ``samples`` evenly chosen ranges (their first
    ``sample_bytes``) that are resident, by ``mincore`` on a mapping that is never read; 0 where
    it cannot tell. Linux reports the page cache of files this process may write or owns; for
    others only pages it maps, so a foreign cached model counts as not cached (direct reads)."""
    mincore = libc_function("mincore", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p])
    if mincore is None or not ranges:
        return 0.0
    step = max(1, len(ranges) // samples)
    resident = total = 0
    maps: dict[str, tuple[mmap.mmap, int]] = {}
    try:
        for path, offset, nbytes in list(ranges)[::step][:samples]:
            if path not in maps:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private and never written: no copy is made
                maps[path] = (mm, buffer_address(mm))
            mm, address = maps[path]
            start = offset - offset % mmap.PAGESIZE
            end = min(len(mm), offset + min(nbytes, sample_bytes))
            pages = -(-(end - start) // mmap.PAGESIZE)
            vec = (ctypes.c_ubyte * pages)()
            if pages <= 0 or mincore(address + start, end - start, vec) != 0:
                continue
            resident += sum(b & 1 for b in vec)
            total += pages
    except (OSError, ValueError):
        return 0.0
    finally:
        for mm, _ in maps.values():
            with contextlib.suppress(BufferError):
                mm.close()
    return resident / total if total else 0.0


def use_direct(plan: Plan, requested: str = "auto") -> bool:
    """Whether a run of ``plan`` reads its base tiles with ``O_DIRECT`` (see :data:`READ_MODES`).

    Raises StreamMergeError for an unknown mode, or for ``direct`` where a base file refuses it.
    """
    if requested not in READ_MODES:
        raise StreamMergeError(f"read mode {requested!r} must be one of {', '.join(READ_MODES)}")
    files = sorted({u.source.file for u in plan.units if u.op != "copy"})
    if requested == "mmap" or not files:
        return False
    for path in files:
        problem = direct_problem(path)
        if problem is not None:
            if requested == "direct":
                raise StreamMergeError(f"--read direct: {problem}; use --read mmap (or auto)")
            return False
    return requested == "direct" or cached_fraction(tile_ranges(list(plan.units))) < CACHED_ENOUGH
