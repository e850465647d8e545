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
import queue
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from streammerge.errors import OutputError
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME
from streammerge.plan import COPY_FALLBACK_BYTES, Plan, shard_header_bytes

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
            fd = self._fds[shard]
            self._pwrite_all(fd, data, offset)
            # Start writing these pages to disk now rather than all at the final fsync, and keep
            # the output from crowding the page cache (Linux: DONTNEED starts async writeback).
            os.posix_fadvise(fd, offset, len(memoryview(data)), os.POSIX_FADV_DONTNEED)
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


@dataclass(frozen=True)
class _Write:
    shard: int
    offset: int
    buffer: bytearray
    nbytes: int


@dataclass(frozen=True)
class _Copy:
    shard: int
    offset: int
    src_fd: int
    src_offset: int
    nbytes: int


class WriteQueue:
    """Writes in a background thread, so disk writes overlap the merge of the next tile.

    Output tiles live in a fixed pool of ``buffers`` bytearrays of ``buffer_bytes`` each: the
    executor takes a free one with :meth:`acquire`, fills it and hands it to :meth:`write`; the
    thread writes it and puts it back. At most ``buffers`` tiles exist at once, so memory stays
    bounded however fast the merge runs. An error in the thread is raised in the caller at the
    next call.
    """

    def __init__(self, writer: Writer, buffers: int, buffer_bytes: int) -> None:
        self.writer = writer
        self.buffer_bytes = buffer_bytes
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._unmade = buffers if buffer_bytes else 0
        self._jobs: queue.Queue[_Write | _Copy | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="streammerge-writer", daemon=True)
        self._thread.start()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def acquire(self) -> bytearray:
        """A free output buffer; blocks while every buffer is queued or being written."""
        self._check()
        if self._free.empty() and self._unmade:
            self._unmade -= 1
            return bytearray(self.buffer_bytes)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                self._check()

    def write(self, shard: int, offset: int, buffer: bytearray, nbytes: int) -> None:
        """Queue the first ``nbytes`` of ``buffer`` for writing at ``offset`` of ``shard``."""
        self._check()
        self._jobs.put(_Write(shard, offset, buffer, nbytes))

    def write_now(self, shard: int, offset: int, data: bytes) -> None:
        """Write small data at once from the calling thread (positioned writes do not collide)."""
        self._check()
        self.writer.write(shard, offset, data)

    def copy(self, shard: int, offset: int, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Queue a file-to-file copy of an untouched tensor."""
        self._check()
        self._jobs.put(_Copy(shard, offset, src_fd, src_offset, nbytes))

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is None and not self._stop:
                try:
                    self._do(job)
                except BaseException as e:
                    self._error = e
            if isinstance(job, _Write):
                self._free.put(job.buffer)

    def _do(self, job: _Write | _Copy) -> None:
        if isinstance(job, _Write):
            with memoryview(job.buffer)[: job.nbytes] as view:
                self.writer.write(job.shard, job.offset, view)
            return
        if self.writer.copy_range(job.shard, job.offset, job.src_fd, job.src_offset, job.nbytes):
            return
        for start in range(0, job.nbytes, COPY_FALLBACK_BYTES):
            data = os.pread(job.src_fd, min(COPY_FALLBACK_BYTES, job.nbytes - start), job.src_offset + start)
            if not data:
                raise OutputError(f"{self.writer.plan.shards[job.shard].file}: source ended early while copying")
            self.writer.write(job.shard, job.offset + start, data)

    def close(self) -> None:
        """Wait for every queued job; raise the first error any of them hit."""
        self._jobs.put(None)
        self._thread.join()
        self._check()

    def cancel(self) -> None:
        """Drop queued jobs and stop the thread (after the job it is doing); never raises."""
        self._stop = True
        self._jobs.put(None)
        self._thread.join()
