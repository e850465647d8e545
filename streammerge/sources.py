"""The input side of a run: read-only mappings of the input files, and the tiles they are read in.

Bytes come in through mmap; :class:`Prefetcher` faults each tile's pages in (``MADV_POPULATE_READ``)
on its own thread a tile ahead of the merge, and the pages of a finished tile are released with
``madvise(MADV_DONTNEED)`` so they stop counting in RSS. Torch-free: the compute backends view
these bytes as their own arrays without a copy.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple, cast

from streammerge.errors import BadCheckpoint, StreamMergeError
from streammerge.formats.safetensors import DTYPE_SIZES
from streammerge.plan import PREFETCH_TILES, Source, WorkUnit

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux 5.14+: fault a whole range in with one call."""

Pages = Callable[[str, int, int], None]
"""pages(path, offset, nbytes): make an input tile's bytes resident before the merge reads them."""


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` through ctypes, which releases the GIL while the call runs.

    ``mmap.madvise`` holds the GIL: a ``MADV_POPULATE_READ`` that waits for the disk would stall
    the writer thread for as long. None where there is no libc to load (the stdlib call is used).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


_MADVISE = _libc_madvise()


class SourceFiles:
    """Read-only (copy-on-write, never written) mappings of the input files, opened on first use."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, mmap.mmap, int]] = {}
        self._populate_ok = True
        self._lock = threading.Lock()  # the prefetch thread opens files too

    def get(self, path: str) -> tuple[int, mmap.mmap]:
        fd, mm, _ = self._get(path)
        return fd, mm

    def _get(self, path: str) -> tuple[int, mmap.mmap, int]:
        with self._lock:
            return self._open.get(path) or self._map(path)

    def _map(self, path: str) -> tuple[int, mmap.mmap, int]:
        if path not in self._open:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                os.close(fd)
                raise BadCheckpoint(f"{path}: cannot map ({e})") from e
            view = ctypes.c_char.from_buffer(mm)  # only to learn the address; released at once
            address = ctypes.addressof(view)
            del view
            self._open[path] = (fd, mm, address)
        return self._open[path]

    def view(self, path: str, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` bytes at ``offset`` of a file, zero-copy (a compute backend reads it as its own array)."""
        _, mm = self.get(path)
        if offset < 0 or offset + nbytes > len(mm):
            raise BadCheckpoint(f"{path}: bytes {offset}..{offset + nbytes} are past the end of the file ({len(mm)} bytes)")
        return memoryview(mm)[offset : offset + nbytes]

    def elements(self, src: Source, first_elem: int, count: int) -> memoryview:
        """The bytes of elements ``first_elem : first_elem + count`` of ``src``."""
        size = DTYPE_SIZES[src.dtype]
        return self.view(src.file, src.offset + first_elem * size, count * size)

    def _advise(self, path: str, offset: int, nbytes: int, advice: int) -> bool:
        """madvise a byte range of a mapped file (widened to whole pages); False if the kernel refuses."""
        _, mm, address = self._get(path)
        start = offset - offset % mmap.PAGESIZE
        end = min(len(mm), offset + nbytes)
        if end <= start:
            return True
        if _MADVISE is not None:
            return _MADVISE(address + start, end - start, advice) == 0
        try:
            mm.madvise(advice, start, end - start)
        except OSError:
            return False
        return True

    def populate(self, path: str, offset: int, nbytes: int) -> None:
        """Map a byte range's pages in one call (MADV_POPULATE_READ) instead of one fault per page.

        The call waits for the disk without holding the GIL, so the writer thread keeps writing.
        """
        if self._populate_ok and not self._advise(path, offset, nbytes, MADV_POPULATE_READ):
            self._populate_ok = False  # kernels before 5.14: pages fault in one by one instead

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """Drop the mapped pages of a byte range from this process (they stay in the page cache)."""
        self._advise(path, offset, nbytes, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for fd, mm, _ in self._open.values():
            with contextlib.suppress(BufferError):  # a tensor still views it; the mapping goes with it
                mm.close()
            os.close(fd)
        self._open.clear()


def tile_range(unit: WorkUnit, row0: int, rows: int) -> tuple[str, int, int]:
    """The input bytes (file, offset, length) that rows ``row0 : row0 + rows`` of a computed unit read."""
    src = unit.source
    first, count = row0 * unit.row_elems, rows * unit.row_elems
    if unit.quant is not None and unit.quant.kind == "int8":  # one byte per element
        return src.file, src.offset + first, count
    if unit.quant is not None:  # two 4-bit codes per byte; tiles start on a block boundary
        start, end = first // 2, (first + count + 1) // 2
        return src.file, src.offset + start, end - start
    size = DTYPE_SIZES[src.dtype]
    return src.file, src.offset + first * size, count * size


class Tile(NamedTuple):
    """One row tile of a computed unit: rows ``row0 : row0 + rows``, its elements
    of the flattened tensor (``first : first + elems``), and the input bytes they are read from (:func:`tile_range`)."""

    row0: int
    rows: int
    first: int
    elems: int
    stored: tuple[str, int, int]


def tiles(unit: WorkUnit) -> Iterator[Tile]:
    """The row tiles of a computed unit, in order."""
    for row0 in range(0, unit.rows, unit.tile_rows):
        n = min(unit.tile_rows, unit.rows - row0)
        yield Tile(row0, n, row0 * unit.row_elems, n * unit.row_elems, tile_range(unit, row0, n))


def tile_ranges(units: list[WorkUnit]) -> list[tuple[str, int, int]]:
    """Every input tile the computed units among ``units`` read, in the order the executor reads them."""
    return [t.stored for u in units if u.op != "copy" for t in tiles(u)]


class Prefetcher:
    """Faults input tiles into the mappings on its own thread, ``ahead`` tiles before the merge needs them.

    The readahead hint has the bytes on their way into the page cache; this maps them into the
    process (``MADV_POPULATE_READ``, waiting for the disk where it must) while the merge core
    computes the previous tile. At most ``ahead`` tiles beyond the one being merged are mapped, so
    the bound on resident input pages is ``ahead + 1`` tiles. :meth:`ready` is called for every
    tile in the order of ``ranges``.
    """

    def __init__(self, files: SourceFiles, ranges: list[tuple[str, int, int]], ahead: int = PREFETCH_TILES) -> None:
        self._files = files
        self._ranges = ranges
        self._ahead = ahead
        self._cond = threading.Condition()
        self._populated = 0  # tiles mapped in by the thread
        self._taken = 0  # tiles handed to the merge
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="streammerge-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for index, (path, offset, nbytes) in enumerate(self._ranges):
                with self._cond:
                    self._cond.wait_for(lambda i=index: self._stop or i < self._taken + self._ahead)  # type: ignore[misc]
                    if self._stop:
                        return
                with contextlib.suppress(OSError, StreamMergeError):  # a hint: the merge's own read reports real errors
                    self._files.populate(path, offset, nbytes)
                with self._cond:
                    self._populated = index + 1
                    self._cond.notify_all()
        finally:
            with self._cond:  # however the thread ends, nobody waits for it any more
                self._stop = True
                self._cond.notify_all()

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        """Wait until the next tile, which must be (path, offset, nbytes), is mapped in (or map it here)."""
        index = self._taken
        if index >= len(self._ranges) or self._ranges[index] != (path, offset, nbytes):
            raise AssertionError(f"prefetch order: tile {index} is {(path, offset, nbytes)}, expected another")
        with self._cond:
            self._cond.wait_for(lambda: self._stop or self._populated > index)
            self._taken = index + 1
            self._cond.notify_all()
            mapped = self._populated > index
        if not mapped:
            self._files.populate(path, offset, nbytes)

    def close(self) -> None:
        """Stop the thread (after the tile it is mapping); safe to call twice."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()
