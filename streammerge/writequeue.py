"""Writes in a background thread, so disk writes overlap the merge of the next tile.

The executor hands output tiles (in a fixed pool of reusable buffers), small byte strings and
file-to-file copies to a :class:`WriteQueue`; its thread passes them to the
:class:`~streammerge.write.Writer` in order, computes every tensor's CRC-32 on the way, and
journals finished units in batches on a second thread (each batch after an fsync).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import mmap
import os
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streammerge.errors import OutputError, StreamMergeError
from streammerge.geometry import ALIGN, COPY_FALLBACK_BYTES
from streammerge.journal import Finished
from streammerge.plan.model import WorkUnit
from streammerge.write import Writer

if TYPE_CHECKING:
    from streammerge.pack import StreamPacker

COMMIT_BYTES = int(os.environ.get("STREAMMERGE_COMMIT_BYTES", 256 * 2**20))
"""Finished units are journaled (after an fsync) once this many output bytes are pending and
:data:`COMMIT_SECONDS` have passed since the last journal batch, and at the end (environment:
STREAMMERGE_COMMIT_BYTES)."""
COMMIT_SECONDS = float(os.environ.get("STREAMMERGE_COMMIT_SECONDS", 5.0))
"""Each fsync stalls the disk's queue (on a virtual disk, for a host-side flush): journaling every
256 MiB cost a 3B merge 6 to 9 s. An interrupted run loses the work of the last few seconds, at least
:data:`COMMIT_BYTES` (environment: STREAMMERGE_COMMIT_SECONDS)."""

Buffer = bytearray | mmap.mmap | memoryview
"""A writable output buffer: the pool's are page-aligned anonymous mappings, or on a GPU run
page-aligned views of pinned memory (see ``WriteQueue(allocate=...)``)."""


def _anonymous_map(nbytes: int) -> Buffer:
    return mmap.mmap(-1, nbytes)


@dataclass(frozen=True)
class _Write:
    shard: int
    offset: int
    tensor: str
    data: Buffer | bytes
    nbytes: int
    pooled: bool
    start: int = 0


@dataclass(frozen=True)
class _Copy:
    shard: int
    offset: int
    tensor: str
    src_fd: int
    src_offset: int
    nbytes: int


@dataclass(frozen=True)
class _Commit:
    unit: int
    tensors: tuple[str, ...]
    nbytes: int
    force: bool = False


@dataclass
class _Crcs:
    by_tensor: dict[str, int] = field(default_factory=dict)
    pending: Finished = field(default_factory=list)
    pending_bytes: int = 0


class WriteQueue:
    """Writes in a background thread, so disk writes overlap the merge of the next tile.

    Output tiles live in a fixed pool of ``buffers`` page-aligned buffers of ``buffer_bytes`` (+
    :data:`ALIGN`) each: the executor takes a free one with :meth:`acquire`, fills it from
    :func:`aligned_start` and hands it to :meth:`write`; the thread writes it (directly, see
    :meth:`Writer.write`) while a helper thread computes its CRC-32, and puts it back. At most
    ``buffers`` tiles exist at once, so memory stays bounded however fast the merge runs. Jobs run
    in order, so each tensor's CRC-32 is computed over its bytes in order, and :meth:`commit`
    journals a unit after all its writes. An error in the thread is raised in the caller at the
    next call. ``allocate(nbytes)`` makes a pool buffer (page-aligned, ``nbytes`` long); by
    default an anonymous mapping.
    """

    def __init__(
        self,
        writer: Writer,
        buffers: int,
        buffer_bytes: int,
        allocate: Callable[[int], Buffer] | None = None,
        packer: StreamPacker | None = None,
    ) -> None:
        self.writer = writer
        self.packer = packer
        """``merge --pack``: sees every byte written, in the writer's thread (see :class:`~streammerge.pack.StreamPacker`)."""
        self.buffer_bytes = buffer_bytes
        self._allocate = allocate or _anonymous_map
        self._free: queue.Queue[Buffer] = queue.Queue()
        self._unmade = buffers if buffer_bytes else 0
        self._jobs: queue.Queue[_Write | _Copy | _Commit | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = False
        self._crcs = _Crcs()
        self._last_commit = time.monotonic()
        self._batches: queue.Queue[Finished | None] = queue.Queue()
        self._crc_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streammerge-crc")
        self._thread = threading.Thread(target=self._work, name="streammerge-writer", daemon=True)
        self._committer = threading.Thread(target=self._commit_work, name="streammerge-journal", daemon=True)
        self._thread.start()
        self._committer.start()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def acquire(self) -> Buffer:
        """A free output buffer (``buffer_bytes + ALIGN`` long); blocks while every buffer is queued or being written."""
        self._check()
        if self._free.empty() and self._unmade:
            self._unmade -= 1
            return self._allocate(self.buffer_bytes + ALIGN)
        while True:
            try:
                return self._free.get(timeout=0.1)
            except queue.Empty:
                self._check()

    def write(self, shard: int, offset: int, tensor: str, buffer: Buffer, nbytes: int, start: int = 0) -> None:
        """Queue ``buffer[start : start + nbytes]`` (a pool buffer) for writing at ``offset`` of ``shard``."""
        self._check()
        self._jobs.put(_Write(shard, offset, tensor, buffer, nbytes, pooled=True, start=start))

    def write_bytes(self, shard: int, offset: int, tensor: str, data: bytes) -> None:
        """Queue small data that is not a pool buffer (a re-quantized weight's statistics)."""
        self._check()
        self._jobs.put(_Write(shard, offset, tensor, data, len(data), pooled=False))

    def copy(self, shard: int, offset: int, tensor: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        """Queue a file-to-file copy of an untouched tensor."""
        self._check()
        self._jobs.put(_Copy(shard, offset, tensor, src_fd, src_offset, nbytes))

    def commit(self, unit: WorkUnit, index: int) -> None:
        """Queue the journal entry of unit ``index``, after all its writes (journaled in batches)."""
        self._check()
        nbytes = unit.written_bytes
        force = bool(self.writer.stop_after)  # the test hook counts units one by one
        self._jobs.put(_Commit(index, (unit.name, *(x.name for x in unit.extra)), nbytes, force))

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
            if isinstance(job, _Write) and job.pooled:
                assert not isinstance(job.data, bytes)
                self._free.put(job.data)

    def _do(self, job: _Write | _Copy | _Commit) -> None:
        crcs = self._crcs.by_tensor
        if isinstance(job, _Commit):
            self._crcs.pending.append((job.unit, {name: crcs.pop(name, 0) for name in job.tensors}))
            self._crcs.pending_bytes += job.nbytes
            due = self._crcs.pending_bytes >= COMMIT_BYTES and time.monotonic() - self._last_commit >= COMMIT_SECONDS
            if job.force or due:
                self._flush_commits()
            return
        if isinstance(job, _Write):
            aligned = job.pooled and job.start == job.offset % ALIGN
            with memoryview(job.data)[job.start : job.start + job.nbytes] as view:
                crc = self._crc_pool.submit(zlib.crc32, view, crcs.get(job.tensor, 0))  # overlaps the write
                try:
                    self.writer.write(job.shard, job.offset, view, aligned=aligned)
                    if self.packer is not None:
                        self.packer.add(job.shard, job.offset, view)
                finally:
                    crcs[job.tensor] = crc.result()
            return
        if not self.writer.copy_range(job.shard, job.offset, job.src_fd, job.src_offset, job.nbytes):
            for start in range(0, job.nbytes, COPY_FALLBACK_BYTES):
                data = os.pread(job.src_fd, min(COPY_FALLBACK_BYTES, job.nbytes - start), job.src_offset + start)
                if not data:
                    raise OutputError(f"{self.writer.plan.shards[job.shard].file}: source ended early while copying")
                self.writer.write(job.shard, job.offset + start, data)
        crcs[job.tensor] = self.writer.crc_of(job.shard, job.offset, job.nbytes)
        if self.packer is not None:
            self.packer.add_from_file(
                job.shard, job.offset, os.path.join(self.writer.partial, self.writer.plan.shards[job.shard].file), job.nbytes
            )

    def _flush_commits(self) -> None:
        """Hand the finished units to the journal thread: its fsync waits for the disk while writing goes on."""
        if self._crcs.pending:
            self._batches.put(self._crcs.pending)
        self._crcs.pending, self._crcs.pending_bytes = [], 0
        self._last_commit = time.monotonic()

    def _commit_work(self) -> None:
        while True:
            batch = self._batches.get()
            if batch is None:
                return
            if self._error is None or self._stop:
                try:
                    self.writer.commit(batch)
                except BaseException as e:
                    if self._error is None:
                        self._error = e

    def _finish_journal(self) -> None:
        self._flush_commits()
        self._batches.put(None)
        self._committer.join()

    def close(self) -> None:
        """Wait for every queued job and journal the last units; raise the first error any job hit."""
        self._jobs.put(None)
        self._thread.join()
        self._crc_pool.shutdown()
        self._check()
        self._finish_journal()
        self._check()

    def flush_on_failure(self) -> None:
        """After a failure: journal the units whose writes all finished, so a resume skips them.

        Only units whose commit job ran are pending, and that job runs after all their writes, so
        they are complete even when a later write failed. If journaling fails too, nothing is kept.
        """
        with contextlib.suppress(OSError, StreamMergeError):
            self._finish_journal()

    def cancel(self) -> None:
        """Drop queued jobs and stop the thread (after the job it is doing); never raises."""
        self._stop = True
        self._jobs.put(None)
        self._thread.join()
        self._crc_pool.shutdown()
