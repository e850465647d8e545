"""Operating-system IO the readers, the writer and verify share: O_DIRECT opens, libc calls, durable files.

Nothing here knows about plans or tensors. ``O_DIRECT`` (reads and writes between the disk and
our buffers, past the page cache) needs offsets, lengths and addresses aligned to the device's
block size; :data:`streammerge.geometry.ALIGN` suits every common one. Torch-free.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import zlib
from typing import Any

NO_DIRECT_ENV = "STREAMMERGE_NO_DIRECT"
"""Set (to anything), no O_DIRECT at all: ``--read auto`` maps the inputs, and the writer writes
through the page cache."""

CLOEXEC = getattr(os, "O_CLOEXEC", 0)
CRC_CHUNK_BYTES = 8 * 2**20
"""Bytes read at a time when checksumming a file range."""


def direct_disabled() -> str | None:
    """Why no O_DIRECT may be used at all here (no such flag, or :data:`NO_DIRECT_ENV` set), else None."""
    if not hasattr(os, "O_DIRECT"):
        return "this system has no O_DIRECT"
    if os.environ.get(NO_DIRECT_ENV):
        return f"{NO_DIRECT_ENV} is set"
    return None


def open_direct(path: str, write: bool = False) -> int:
    """A descriptor of ``path`` opened with O_DIRECT (read-only, or write-only); raises OSError."""
    return os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | getattr(os, "O_DIRECT", 0) | CLOEXEC)


def libc_function(name: str, argtypes: list[Any], restype: Any = ctypes.c_int) -> Any:
    """libc's ``name`` through ctypes (which releases the GIL while the call runs), or None where
    there is no libc to load or no such function."""
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = restype
    return fn


def buffer_address(buffer: Any) -> int:
    """The memory address of a writable buffer (an mmap), without keeping a view of it."""
    view = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(view)
    del view
    return address


def pwrite_all(fd: int, data: memoryview | bytes, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (``os.pwrite`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def file_crc32(path: str, offset: int, nbytes: int) -> int:
    """CRC-32 of ``nbytes`` bytes of ``path`` from ``offset``, read in :data:`CRC_CHUNK_BYTES` pieces."""
    crc = 0
    with open(path, "rb") as f:
        for start in range(0, nbytes, CRC_CHUNK_BYTES):
            crc = zlib.crc32(os.pread(f.fileno(), min(CRC_CHUNK_BYTES, nbytes - start), offset + start), crc)
    return crc


def reserve(fd: int, size: int) -> None:
    """Allocate a file's blocks now so a full disk fails before the merge, not halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def write_file(path: str, data: bytes) -> None:
    """Write a whole small file and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
    """fsync a folder, so the names created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path: str) -> None:
    """Remove a file or a whole folder; a path already gone is fine."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
