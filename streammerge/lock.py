"""One run per output: a lock beside the output folder, so two merges cannot write the same ``OUT.partial``.

The lock is ``flock`` on ``.OUT.streammerge-lock`` in the output's parent folder: the kernel drops
it when the process ends, however it ends, so a crashed run never leaves a stale lock. A whole run
holds it exclusively; the parts of a split plan (:mod:`streammerge.parts`) hold it shared, so they
run side by side but never beside a whole run, and each also holds its own part's lock exclusively
(the same part cannot run twice at once). The file is removed by the last holder to let go.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterator

from streammerge.errors import OutputError
from streammerge.osio import CLOEXEC


def lock_path(out: str, suffix: str = "") -> str:
    out = os.path.abspath(out).rstrip(os.sep)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.streammerge-lock{suffix}")


PARTS_HOLDER = "parts"
"""What the shared holders write into the lock file (an exclusive holder writes its pid)."""


def _who(holder: str) -> str:
    if holder == PARTS_HOLDER:
        return "parts of a split run (streammerge run --part) are"
    return f"another streammerge run{f' (pid {holder})' if holder.isdigit() else ''} is"


@contextlib.contextmanager
def output_lock(out: str, shared: bool = False) -> Iterator[None]:
    """Hold the output's lock for the block (``shared``: as one part of a split plan); OutputError at
    once when a run that excludes this one holds it."""
    with _flock(
        lock_path(out), shared, lambda h: f"{out}: {_who(h)} writing this output; wait for it to finish, or choose another output folder"
    ):
        yield


@contextlib.contextmanager
def part_lock(out: str, label: str) -> Iterator[None]:
    """Hold the lock of part ``label`` ("3/8") of the output: OutputError at once if that part is running elsewhere."""
    suffix = ".part-" + label.replace("/", "-of-")
    with _flock(
        lock_path(out, suffix), False, lambda h: f"{out}: part {label} is already running{f' (pid {h})' if h else ''}; wait for it"
    ):
        yield


@contextlib.contextmanager
def _flock(path: str, shared: bool, busy: Callable[[str], str]) -> Iterator[None]:
    """``flock`` on ``path`` (created if needed) for the block; ``busy(holder)`` is the error when it is
    taken, ``holder`` being what its holder wrote in the file (a pid, or :data:`PARTS_HOLDER`)."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the output's lock file ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise OutputError(busy(holder)) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: take the new one
    try:
        note = PARTS_HOLDER if shared else str(os.getpid())
        os.ftruncate(fd, 0)  # shared holders all write the same bytes
        os.pwrite(fd, note.encode("ascii"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            if shared:  # only the last holder removes the file: it alone can take the lock exclusively now
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)
        os.close(fd)
