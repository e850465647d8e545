"""The merge's view of its inputs: mapped files, and the tile readers behind one :class:`Tiles` contract.

Small inputs (LoRA factors, quantization statistics) and, with ``--read mmap``, the base tiles are
read through read-only mappings (:class:`SourceFiles`; pages of each finished tile are released
with ``madvise(MADV_DONTNEED)`` so they stop counting in RSS). :class:`Prefetcher` maps tiles in
ahead on its own thread; :class:`DirectInput` serves tiles that
:class:`~streammerge.inputs.direct.DirectTiles` read with ``O_DIRECT``, mapping any it could not.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import threading
from collections.abc import Callable
from typing import Protocol, cast

import torch

from streammerge.errors import BadCheckpoint, StreamMergeError
from streammerge.formats.safetensors import Source
from streammerge.geometry import PREFETCH_TILES, Range
from streammerge.inputs.direct import DirectTiles
from streammerge.inputs.lookahead import Lookahead
from streammerge.kernels import TORCH_DTYPES
from streammerge.osio import CLOEXEC, buffer_address, libc_function

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux 5.14+: fault a whole range in with one call."""

_MADVISE = cast(Callable[[int, int, int], int] | None, libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]))
"""libc's ``madvise`` through ctypes, which releases the GIL while the call runs: ``mmap.madvise``
holds it, so a ``MADV_POPULATE_READ`` that waits for the disk would stall the writer thread for as
long. None where there is no libc to load (the stdlib call is used)."""


class Tiles(Protocol):
    """Where the merge gets its input tiles: ``ready`` before a tile is read (in plan order),
    ``raw`` for its bytes (the whole tile or rows of it), ``release`` when it is merged.

    :class:`SourceFiles` maps them in on the merge's thread; :class:`Prefetcher` maps them in
    ahead on its own thread; :class:`DirectInput` reads them with ``O_DIRECT`` ahead.
    """

    def ready(self, path: str, offset: int, nbytes: int) -> None: ...
    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor: ...
    def release(self, path: str, offset: int, nbytes: int) -> None: ...


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
            fd = os.open(path, os.O_RDONLY | CLOEXEC)
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                os.close(fd)
                raise BadCheckpoint(f"{path}: cannot map ({e})") from e
            self._open[path] = (fd, mm, buffer_address(mm))
        return self._open[path]

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes at ``offset`` of a file as a zero-copy uint8 tensor."""
        _, mm = self.get(path)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def tensor(self, src: Source, first_elem: int, count: int) -> torch.Tensor:
        """Elements ``first_elem : first_elem + count`` of ``src`` as a zero-copy 1-D tensor."""
        _, mm = self.get(src.file)
        dtype = TORCH_DTYPES[src.dtype]
        size = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=src.offset + first_elem * size)

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

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        """A tile is about to be read: map it in now (the merge's thread waits for the disk)."""
        self.populate(path, offset, nbytes)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """Drop the mapped pages of a byte range from this process (they stay in the page cache)."""
        self._advise(path, offset, nbytes, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for fd, mm, _ in self._open.values():
            with contextlib.suppress(BufferError):  # a tensor still views it; the mapping goes with it
                mm.close()
            os.close(fd)
        self._open.clear()


class Prefetcher:
    """Faults input tiles into the mappings on its own thread, ``ahead`` tiles before the merge needs them.

    The readahead hint has the bytes on their way into the page cache; this maps them into the
    process (``MADV_POPULATE_READ``, waiting for the disk where it must) while the merge core
    computes the previous tile. At most ``ahead`` tiles beyond the one being merged are mapped, so
    the bound on resident input pages is ``ahead + 1`` tiles. :meth:`ready` is called for every
    tile in the order of ``ranges``.
    """

    def __init__(self, files: SourceFiles, ranges: list[Range], ahead: int = PREFETCH_TILES) -> None:
        self._files = files
        self._ranges = ranges
        self._taken = 0  # tiles handed to the merge
        self._thread: Lookahead[Range, bool] = Lookahead(
            "streammerge-prefetch", ranges, self._populate, size=lambda r: 1, limit=lambda taken: taken + ahead
        )
        self._thread.start()

    def _populate(self, r: Range) -> bool:
        with contextlib.suppress(OSError, StreamMergeError):  # a hint: the merge's own read reports real errors
            self._files.populate(*r)
        return True

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        """Wait until the next tile, which must be (path, offset, nbytes), is mapped in (or map it here)."""
        index = self._taken
        if index >= len(self._ranges) or self._ranges[index] != (path, offset, nbytes):
            raise AssertionError(f"prefetch order: tile {index} is {(path, offset, nbytes)}, expected another")
        mapped = self._thread.wait(index) is not None
        self._taken = index + 1
        self._thread.advance(self._taken)
        if not mapped:
            self._files.populate(path, offset, nbytes)

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        return self._files.raw(path, offset, nbytes)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        self._files.release(path, offset, nbytes)

    def close(self) -> None:
        """Stop the thread (after the tile it is mapping); safe to call twice."""
        self._thread.close()


class DirectInput:
    """Input tiles read with ``O_DIRECT`` by a :class:`~streammerge.inputs.direct.DirectTiles` thread, ahead
    of the merge; a tile it could not read directly is mapped in through ``files`` instead."""

    def __init__(self, files: SourceFiles, direct: DirectTiles) -> None:
        self._files = files
        self._direct = direct
        self._mapped = False  # the tile in use came through the mapping

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        self._mapped = not self._direct.ready(path, offset, nbytes)
        if self._mapped:
            self._files.populate(path, offset, nbytes)

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        found = None if self._mapped else self._direct.view(path, offset, nbytes)
        if found is None:  # not read directly (or not inside the tile, which the merge never asks)
            self._mapped = True  # so that release() drops the mapped pages
            return self._files.raw(path, offset, nbytes)
        buffer, at = found
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=at)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        self._direct.release(path, offset, nbytes)
        if self._mapped:
            self._files.release(path, offset, nbytes)

    def close(self) -> None:
        self._direct.close()


_TABLES: dict[tuple[bytes, str], torch.Tensor] = {}
