"""One run per output: an exclusive lock beside the output folder, so two merges cannot write the same ``OUT.partial``.

The lock is ``flock`` on ``.OUT.streammerge-lock`` in the output's parent folder: the kernel drops
it when the process ends, however it ends, so a crashed run never leaves a stale lock. The file is
removed when the run lets go of it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

from streammerge.errors import OutputError
from streammerge.osio import CLOEXEC


def lock_path(out: str) -> str:
    out = os.path.abspath(out).rstrip(os.sep)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.streammerge-lock")


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold the output's lock for the block; OutputError at once when another process holds it."""
    path = lock_path(out)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"{path}: cannot create the output's lock file ({e.strerror or e})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            raise OutputError(
                f"{out}: another streammerge run{f' (pid {holder})' if holder else ''} is writing this output; "
                "wait for it to finish, or choose another output folder"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file as we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)
