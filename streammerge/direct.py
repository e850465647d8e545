"""Direct reads: base-weight tiles read from the disk with ``O_DIRECT`` into a ring of reusable buffers.

The other way in is mmap (:class:`streammerge.execute.SourceFiles`): the kernel reads a tile
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
import ctypes.util
import mmap
import os
import threading
from collections.abc import Callable, Sequence
from typing import cast

from streammerge.errors import StreamMergeError
from streammerge.plan import Plan, tile_ranges

ALIGN = 4096
"""Offset, length and address alignment of every direct read (the largest common logical block size)."""

NO_DIRECT_ENV = "STREAMMERGE_NO_DIRECT"
"""Set (to anything), no O_DIRECT at all: ``--read auto`` maps the inputs, and the writer writes
through the page cache."""

Range = tuple[str, int, int]
"""(file, offset, length) of one input tile."""


def _open_direct(path: str) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0) | getattr(os, "O_CLOEXEC", 0))


def direct_problem(path: str) -> str | None:
    """Why ``path`` cannot be read with ``O_DIRECT``, or None when an aligned read of its first block works."""
    if not hasattr(os, "O_DIRECT"):
        return "this system has no O_DIRECT"
    if os.environ.get(NO_DIRECT_ENV):
        return f"{NO_DIRECT_ENV} is set"
    buf = mmap.mmap(-1, ALIGN)
    try:
        fd = _open_direct(path)
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


def _span(offset: int, nbytes: int) -> tuple[int, int]:
    """The aligned (start, length) a direct read of ``nbytes`` at ``offset`` covers."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    return start, end - start


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
        size = max((_span(offset, nbytes)[1] for _, offset, nbytes in self.ranges), default=0)
        self._buffers = [mmap.mmap(-1, size) for _ in range(min(self._slots, len(self.ranges)))] if size else []
        self._heads: dict[int, int | None] = {}
        """Tile index -> where its first byte is in its buffer (None: the direct read failed)."""
        self._taken = 0  # tiles handed out by ready()
        self._released = 0  # tiles whose buffer is free again
        self._cond = threading.Condition()
        self._stop = False
        self._fds: dict[str, int | None] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.ranges:
            self._thread = threading.Thread(target=self._work, name="streammerge-direct-read", daemon=True)
            self._thread.start()

    def _fd(self, path: str) -> int | None:
        if path not in self._fds:
            try:
                self._fds[path] = _open_direct(path)
            except OSError:
                self._fds[path] = None
        return self._fds[path]

    def _read(self, index: int) -> int | None:
        """Read tile ``index`` into its buffer; where its first byte landed, or None if it could not be read directly."""
        path, offset, nbytes = self.ranges[index]
        fd = self._fd(path)
        if fd is None:
            return None
        start, length = _span(offset, nbytes)
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

    def _work(self) -> None:
        try:
            for index in range(len(self.ranges)):
                with self._cond:
                    self._cond.wait_for(lambda i=index: self._stop or i < self._released + self._slots)  # type: ignore[misc]
                    if self._stop:
                        return
                head = self._read(index)
                with self._cond:
                    self._heads[index] = head
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()

    def ready(self, path: str, offset: int, nbytes: int) -> bool:
        """Wait for the next tile, which must be ``(path, offset, nbytes)``; False if it was not read
        directly (the caller reads it another way)."""
        index = self._taken
        if index >= len(self.ranges) or self.ranges[index] != (path, offset, nbytes):
            raise AssertionError(f"direct read order: tile {index} is {(path, offset, nbytes)}, expected another")
        with self._cond:
            self._cond.wait_for(lambda: self._stop or index in self._heads)
            self._taken = index + 1
            return self._heads.get(index) is not None

    def view(self, path: str, offset: int, nbytes: int) -> tuple[mmap.mmap, int] | None:
        """The buffer holding ``nbytes`` at ``offset`` of ``path`` and where they start in it, if they
        lie within the tile in use and it was read directly; else None."""
        with self._cond:
            index = self._taken - 1
            head = self._heads.get(index) if index >= max(self._released, 0) else None
        if head is None:
            return None
        tile_path, tile_offset, tile_bytes = self.ranges[index]
        if path != tile_path or not tile_offset <= offset <= offset + nbytes <= tile_offset + tile_bytes:
            return None
        return self._buffers[index % self._slots], head + offset - tile_offset

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """The tile in use (``(path, offset, nbytes)``) is finished: its buffer may take the next read."""
        index = self._taken - 1
        if index < 0 or self.ranges[index] != (path, offset, nbytes):
            return
        with self._cond:
            self._released = max(self._released, index + 1)
            self._heads.pop(index, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread (after the read in progress) and free the buffers; safe to call twice."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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


def _libc_mincore() -> Callable[[int, int, ctypes.Array[ctypes.c_ubyte]], int] | None:
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, "ctypes.Array[ctypes.c_ubyte]"], int], fn)


def cached_fraction(ranges: Sequence[Range], samples: int = 64, sample_bytes: int = 64 * 1024) -> float:
    """The fraction of the page-cache pages of ``samples`` evenly chosen ranges (their first
    ``sample_bytes``) that are resident, by ``mincore`` on a mapping that is never read; 0 where
    it cannot tell. Linux reports the page cache of files this process may write or owns; for
    others only pages it maps, so a foreign cached model counts as not cached (direct reads)."""
    mincore = _libc_mincore()
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
                view = ctypes.c_char.from_buffer(mm)
                maps[path] = (mm, ctypes.addressof(view))
                del view
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
