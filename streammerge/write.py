"""The writer: output shards at the plan's offsets, a resume journal, then index, config, manifest.

A small state machine (new -> open -> finished | aborted) over a layout fixed by the plan. All
files go to ``OUT.partial`` beside the output; only a complete, fsynced folder is renamed to
``OUT``. Nothing here decides a size or an offset: it writes what the plan says where it says.

Crash safety: ``OUT.partial/.streammerge-plan.json`` records the plan, and
``OUT.partial/.streammerge-journal`` gets one line per finished unit (its tensors' CRC-32), written
only after that unit's bytes are fsynced. A resumed run checks the plan is the same and redoes
only the units the journal does not list, so its output is byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import enum
import errno
import json
import mmap
import os
import queue
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streammerge.direct import NO_DIRECT_ENV
from streammerge.errors import OutputError, PlanMismatch, StreamMergeError
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME
from streammerge.plan import COPY_FALLBACK_BYTES, WRITE_ALIGN, Plan, WorkUnit, shard_header_bytes

_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF})
PLAN_FILE = ".streammerge-plan.json"
JOURNAL_FILE = ".streammerge-journal"
MANIFEST_FILE = "streammerge-manifest.json"
"""Written into the output: every tensor's CRC-32 and every file's size, for ``streammerge verify``."""
COMMIT_BYTES = int(os.environ.get("STREAMMERGE_COMMIT_BYTES", 256 * 2**20))
"""Finished units are journaled (after an fsync) once this many output bytes are pending and
:data:`COMMIT_SECONDS` have passed since the last journal batch, and at the end (environment:
STREAMMERGE_COMMIT_BYTES)."""
COMMIT_SECONDS = float(os.environ.get("STREAMMERGE_COMMIT_SECONDS", 5.0))
"""Each fsync stalls the disk's queue (on a virtual disk, for a host-side flush): journaling every
256 MiB cost a 3B merge 6 to 9 s. An interrupted run loses the work of the last few seconds, at least
:data:`COMMIT_BYTES` (environment: STREAMMERGE_COMMIT_SECONDS)."""
ALIGN = WRITE_ALIGN
"""Direct writes (``O_DIRECT``: from our buffer to the disk, past the page cache) need their file
offset, length and memory address aligned to the device's block size; 4 KiB suits every common one."""
DIRECT_MIN_BYTES = 2**20
"""Writes shorter than this go through the page cache (headers, statistics, the edges of a tile)."""
STOP_AFTER_ENV = "STREAMMERGE_TEST_STOP_AFTER_UNITS"
"""Test hook: the process dies (as if killed) right after this many units are journaled."""


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


def _plan_identity(plan: Plan) -> str:
    """The plan as JSON, without the options that do not change the output bytes."""
    obj = json.loads(plan.to_json())
    for key in ("overwrite", "device", "estimate"):
        obj.pop(key, None)
    return json.dumps(obj, sort_keys=True)


def read_journal(path: str) -> dict[int, dict[str, int]]:
    """Finished units (index -> tensor CRC-32s) of a journal; a torn last line is ignored."""
    done: dict[int, dict[str, int]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # the process died while writing this line: the unit is not done
                entry = json.loads(line)
                done[int(entry["unit"])] = {str(k): int(v) for k, v in entry["crc"].items()}
    except FileNotFoundError:
        pass
    except (ValueError, KeyError, TypeError) as e:
        raise PlanMismatch(f"{path}: resume journal is damaged ({e}); remove the .partial folder and start again") from e
    return done


class Writer:
    """Writes one plan's output. Use ``open()``, then ``write``/``copy_range``/``commit``, then ``finish()``.

    Any failure should be followed by ``abort()``, which keeps the partial folder (and its
    journal) for ``--resume`` when some work is done, and removes it otherwise.
    """

    def __init__(self, plan: Plan, resume: bool = False) -> None:
        self.plan = plan
        self.resume = resume
        self.partial = partial_path(plan.out)
        self.state = WriterState.NEW
        self._fds: list[int] = []
        self._direct: list[int | None] = []
        """Per shard, a second descriptor opened with O_DIRECT (None where the filesystem refuses it)."""
        self._journal: int | None = None
        self.done: dict[int, dict[str, int]] = {}
        """Units finished by this or an earlier (resumed) run, with their tensors' CRC-32."""
        self.copy_file_range_ok = hasattr(os, "copy_file_range")
        self.stop_after = int(os.environ.get(STOP_AFTER_ENV, "0") or 0)

    def _expect(self, state: WriterState) -> None:
        if self.state is not state:
            raise RuntimeError(f"writer is {self.state.value}, expected {state.value}")

    def _error(self, path: str, e: OSError) -> OutputError:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        return OutputError(f"{path}: cannot write{hint}: {e.strerror or e}")

    def open(self) -> None:
        """Create ``OUT.partial`` (or reopen it to resume), reserve every shard and write the headers."""
        self._expect(WriterState.NEW)
        if self.resume and os.path.isdir(self.partial):
            self._reopen()
            return
        if os.path.lexists(self.partial):
            if not self.plan.overwrite:
                raise OutputError(f"{self.partial}: left by an earlier run; pass --resume to continue it or --overwrite to start over")
            _remove(self.partial)
        try:
            os.makedirs(self.partial)
            _write_file(os.path.join(self.partial, PLAN_FILE), _plan_identity(self.plan).encode("utf-8"))
        except OSError as e:
            raise self._error(self.partial, e) from e
        self.state = WriterState.OPEN
        for shard in self.plan.shards:
            path = os.path.join(self.partial, shard.file)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o644)
                self._fds.append(fd)
                self._direct.append(_open_direct(path))
                _reserve(fd, shard.size)
                self._pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e
        self._open_journal()

    def _reopen(self) -> None:
        try:
            with open(os.path.join(self.partial, PLAN_FILE), encoding="utf-8") as f:
                saved = f.read()
        except OSError as e:
            raise PlanMismatch(f"{self.partial}: cannot resume, no readable {PLAN_FILE} ({e.strerror or e}); remove the folder") from e
        if saved != _plan_identity(self.plan):
            raise PlanMismatch(
                f"{self.partial}: was started with other inputs or options (a file changed, or different --dtype/--mode/...); "
                "resume with the same command, or remove it / pass --overwrite to start over"
            )
        self.done = read_journal(os.path.join(self.partial, JOURNAL_FILE))
        self.state = WriterState.OPEN
        for shard in self.plan.shards:
            path = os.path.join(self.partial, shard.file)
            try:
                fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
                self._fds.append(fd)
                self._direct.append(_open_direct(path))
                if os.fstat(fd).st_size != shard.size:
                    raise PlanMismatch(f"{path}: has {os.fstat(fd).st_size} bytes, the plan says {shard.size}; remove {self.partial}")
                self._pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e
        self._open_journal()

    def _open_journal(self) -> None:
        path = os.path.join(self.partial, JOURNAL_FILE)
        try:
            self._journal = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0), 0o644)
            # drop a torn last line so the next entry starts on its own line
            size = os.fstat(self._journal).st_size
            if size:
                with open(path, "rb") as f:
                    data = f.read()
                keep = data.rfind(b"\n") + 1
                if keep != size:
                    os.truncate(path, keep)
        except OSError as e:
            raise self._error(path, e) from e

    def _pwrite_all(self, fd: int, data: memoryview | bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def write(self, shard: int, offset: int, data: memoryview | bytes, aligned: bool = False) -> None:
        """Write ``data`` at absolute ``offset`` of shard number ``shard``.

        ``aligned`` says the memory of ``data`` shares the file offset's :data:`ALIGN` alignment
        (a pool buffer filled from ``offset % ALIGN``): then the whole 4 KiB blocks in the middle
        go straight to the disk with O_DIRECT and only the partial blocks at the edges through
        the page cache. Blocks are never shared between the two ways, so they cannot go stale.
        Direct writes cost no page-cache copy and no writeback work: on a 2-core machine that
        CPU time is what the merge needs.
        """
        self._expect(WriterState.OPEN)
        view = memoryview(data)
        try:
            direct = self._direct[shard] if aligned else None
            if direct is not None and len(view) >= DIRECT_MIN_BYTES:
                start = -offset % ALIGN
                body = (len(view) - start) // ALIGN * ALIGN
                done = self._pwrite_direct(shard, direct, view[start : start + body], offset + start)
                self._pwrite_buffered(shard, view[:start], offset)
                self._pwrite_buffered(shard, view[start + done :], offset + start + done)
            else:
                self._pwrite_buffered(shard, view, offset)
        except OSError as e:
            raise self._error(os.path.join(self.partial, self.plan.shards[shard].file), e) from e

    def _pwrite_buffered(self, shard: int, view: memoryview, offset: int) -> None:
        if not view:
            return
        fd = self._fds[shard]
        self._pwrite_all(fd, view, offset)
        # Start writing these pages to disk now rather than all at the final fsync, and keep
        # the output from crowding the page cache (Linux: DONTNEED starts async writeback).
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def _pwrite_direct(self, shard: int, fd: int, view: memoryview, offset: int) -> int:
        """Write whole aligned blocks with O_DIRECT; returns how many bytes went (the caller writes the rest).

        Stops at a short write that leaves the rest unaligned, and turns direct writes off for the
        shard if the filesystem refuses them after all (EINVAL).
        """
        done = 0
        while done < len(view):
            try:
                n = os.pwrite(fd, view[done:], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                os.close(fd)
                self._direct[shard] = None
                return done
            done += n
            if n == 0 or done % ALIGN:
                break
        return done

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

    def crc_of(self, shard: int, offset: int, nbytes: int) -> int:
        """CRC-32 of bytes already written (for tensors the kernel copied without us seeing them)."""
        path = os.path.join(self.partial, self.plan.shards[shard].file)
        crc = 0
        with open(path, "rb") as f:
            for start in range(0, nbytes, COPY_FALLBACK_BYTES):
                crc = zlib.crc32(os.pread(f.fileno(), min(COPY_FALLBACK_BYTES, nbytes - start), offset + start), crc)
        return crc

    def commit(self, finished: list[tuple[int, dict[str, int]]]) -> None:
        """Record units as finished: their shards' data is fsynced first, then their journal lines."""
        self._expect(WriterState.OPEN)
        assert self._journal is not None
        units = self.plan.units
        lines = "".join(json.dumps({"unit": i, "name": units[i].name, "crc": crcs}, separators=(",", ":")) + "\n" for i, crcs in finished)
        try:
            for shard in sorted({units[i].shard for i, _ in finished}):
                os.fdatasync(self._fds[shard])
            data = memoryview(lines.encode("utf-8"))
            while data:
                data = data[os.write(self._journal, data) :]
            os.fdatasync(self._journal)
        except OSError as e:
            raise self._error(os.path.join(self.partial, JOURNAL_FILE), e) from e
        self.done.update(finished)
        if self.stop_after and len(self.done) >= self.stop_after:
            os._exit(137)  # test hook: die here, as a SIGKILL would

    def finish(self) -> None:
        """Flush shards, write index/config/tokenizer files and the manifest, then move the folder into place."""
        self._expect(WriterState.OPEN)
        plan = self.plan
        if len(self.done) != len(plan.units):
            raise AssertionError(f"finish with {len(plan.units) - len(self.done)} units not done")
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
            _write_file(os.path.join(self.partial, MANIFEST_FILE), _dump_json(self.manifest()))
            for name in (JOURNAL_FILE, PLAN_FILE):
                os.remove(os.path.join(self.partial, name))
            _fsync_dir(self.partial)
            self._move_into_place()
        except OSError as e:
            raise self._error(getattr(e, "filename", None) or self.partial, e) from e
        self.state = WriterState.FINISHED

    def manifest(self) -> dict[str, Any]:
        """What ``streammerge verify`` checks: files with sizes, every tensor's shard, offset, size and CRC-32."""
        crcs = {name: crc for unit_crcs in self.done.values() for name, crc in unit_crcs.items()}
        tensors = {}
        for u in self.plan.units:
            for name, offset, nbytes in ((u.name, u.offset, u.nbytes), *((x.name, x.offset, x.nbytes) for x in u.extra)):
                tensors[name] = {"file": self.plan.shards[u.shard].file, "offset": offset, "bytes": nbytes, "crc32": crcs[name]}
        plan = self.plan
        return {
            "format": "streammerge-manifest/1",
            "options": {"dtype": plan.dtype, "mode": plan.mode, "weights": list(plan.weights), "combination": plan.combination},
            "files": {s.file: s.size for s in plan.shards},
            "tensors": tensors,
        }

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
        fds += [fd for fd in self._direct if fd is not None]
        self._direct = []
        if self._journal is not None:
            fds.append(self._journal)
            self._journal = None
        for fd in fds:
            os.close(fd)

    def abort(self) -> bool:
        """Close everything; keep the partial folder when units are journaled (returns True), else remove it."""
        if self.state in (WriterState.FINISHED, WriterState.ABORTED):
            return False
        self._close()
        kept = self.state is WriterState.OPEN and bool(self.done)
        if self.state is WriterState.OPEN and not kept:
            _remove(self.partial)
        self.state = WriterState.ABORTED
        return kept


def _open_direct(path: str) -> int | None:
    """A descriptor of ``path`` for O_DIRECT writes, or None where the OS or filesystem has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag or os.environ.get(NO_DIRECT_ENV):
        return None
    try:
        return os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None


def aligned_start(offset: int, itemsize: int = 1) -> int:
    """Where in a pool buffer to put data bound for file ``offset``: at ``offset % ALIGN``, so the
    buffer's memory shares the file's block alignment and the writer can write it directly. 0 when
    that start would misalign elements of ``itemsize`` bytes (the writer then uses the page cache)."""
    start = offset % ALIGN
    return start if start % itemsize == 0 else 0


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
    pending: list[tuple[int, dict[str, int]]] = field(default_factory=list)
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

    def __init__(self, writer: Writer, buffers: int, buffer_bytes: int, allocate: Callable[[int], Buffer] | None = None) -> None:
        self.writer = writer
        self.buffer_bytes = buffer_bytes
        self._allocate = allocate or _anonymous_map
        self._free: queue.Queue[Buffer] = queue.Queue()
        self._unmade = buffers if buffer_bytes else 0
        self._jobs: queue.Queue[_Write | _Copy | _Commit | None] = queue.Queue()
        self._error: BaseException | None = None
        self._stop = False
        self._crcs = _Crcs()
        self._last_commit = time.monotonic()
        self._batches: queue.Queue[list[tuple[int, dict[str, int]]] | None] = queue.Queue()
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
        nbytes = unit.nbytes + sum(x.nbytes for x in unit.extra)
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
