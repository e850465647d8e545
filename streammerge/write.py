"""The writer: output shards at the plan's offsets, then index, config and tokenizer files.

A small state machine (new -> open -> finished | aborted) over a layout fixed by the plan. All
files go to ``OUT.partial`` beside the output; only a complete, fsynced folder is renamed to
``OUT``. Nothing here decides a size or an offset: it writes what the plan says where it says.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import os
import shutil
from typing import Any

from streammerge.errors import OutputError
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME
from streammerge.plan import Plan, shard_header_bytes

_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF})


class WriterState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"


def partial_path(out: str) -> str:
    """Where a run writes before the output is complete."""
    return out.rstrip(os.sep) + ".partial"


def _dump_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


class Writer:
    """Writes one plan's output. Use ``open()``, then ``write``/``copy_range``, then ``finish()``.

    Any failure should be followed by ``abort()``, which removes the partial folder.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.partial = partial_path(plan.out)
        self.state = WriterState.NEW
        self._fds: list[int] = []
        self.copy_file_range_ok = hasattr(os, "copy_file_range")

    def _expect(self, state: WriterState) -> None:
        if self.state is not state:
            raise RuntimeError(f"writer is {self.state.value}, expected {state.value}")

    def _error(self, path: str, e: OSError) -> OutputError:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        return OutputError(f"{path}: cannot write{hint}: {e.strerror or e}")

    def open(self) -> None:
        """Create ``OUT.partial``, reserve every shard at its final size and write the headers."""
        self._expect(WriterState.NEW)
        if os.path.lexists(self.partial):
            if not self.plan.overwrite:
                raise OutputError(f"{self.partial}: left by an earlier failed run; remove it or pass --overwrite")
            _remove(self.partial)
        try:
            os.makedirs(self.partial)
        except OSError as e:
            raise self._error(self.partial, e) from e
        self.state = WriterState.OPEN
        for shard in self.plan.shards:
            path = os.path.join(self.partial, shard.file)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self._fds.append(fd)
                _reserve(fd, shard.size)
                self._pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e

    def _pwrite_all(self, fd: int, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, shard: int, offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at absolute ``offset`` of shard number ``shard``."""
        self._expect(WriterState.OPEN)
        try:
            self._pwrite_all(self._fds[shard], data, offset)
        except OSError as e:
            raise self._error(os.path.join(self.partial, self.plan.shards[shard].file), e) from e

    def copy_range(self, shard: int, offset: int, src_fd: int, src_offset: int, nbytes: int) -> bool:
        """Copy bytes file to file in the kernel; False if the filesystem cannot (caller copies)."""
        self._expect(WriterState.OPEN)
        if not self.copy_file_range_ok:
            return False
        fd = self._fds[shard]
        done = 0
        while done < nbytes:
            try:
                n = os.copy_file_range(src_fd, fd, nbytes - done, src_offset + done, offset + done)
            except OSError as e:
                if e.errno in _NO_COPY_FILE_RANGE and done == 0:
                    self.copy_file_range_ok = False
                    return False
                raise self._error(os.path.join(self.partial, self.plan.shards[shard].file), e) from e
            if n == 0:
                if done == 0:
                    self.copy_file_range_ok = False
                    return False
                raise OutputError(f"{self.plan.shards[shard].file}: source ended early while copying")
            done += n
        return True

    def finish(self) -> None:
        """Flush shards, write index/config/tokenizer files, then move the folder into place."""
        self._expect(WriterState.OPEN)
        plan = self.plan
        try:
            for fd in self._fds:
                os.fsync(fd)
            self._close()
            for c in plan.copy_files:
                shutil.copyfile(c.src, os.path.join(self.partial, c.dst))
            if plan.config is not None:
                _write_file(os.path.join(self.partial, CONFIG_NAME), _dump_json(plan.config))
            if len(plan.shards) > 1:
                _write_file(os.path.join(self.partial, INDEX_NAME), _dump_json(plan.index()))
            _fsync_dir(self.partial)
            self._move_into_place()
        except OSError as e:
            raise self._error(getattr(e, "filename", None) or self.partial, e) from e
        self.state = WriterState.FINISHED

    def _move_into_place(self) -> None:
        out = self.plan.out
        old = None
        if os.path.lexists(out):
            if not self.plan.overwrite:
                raise OutputError(f"{out}: appeared while merging; output kept in {self.partial}")
            old = f"{out}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(self.partial, out)
        _fsync_dir(os.path.dirname(out) or ".")
        if old is not None:
            _remove(old)

    def _close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def abort(self) -> None:
        """Close everything and remove the partial folder; safe to call in any state."""
        if self.state in (WriterState.FINISHED, WriterState.ABORTED):
            return
        self._close()
        if self.state is WriterState.OPEN:
            _remove(self.partial)
        self.state = WriterState.ABORTED


def _reserve(fd: int, size: int) -> None:
    """Allocate the shard's blocks now so a full disk fails before the merge, not halfway."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
