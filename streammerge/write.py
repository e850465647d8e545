"""The writer: output shards at the plan's offsets, then config, index and manifest, then the rename.

A small state machine (new -> open -> finished | aborted) over a layout fixed by the plan. All
files go to ``OUT.partial`` beside the output; only a complete, fsynced folder is renamed to
``OUT``. Nothing here decides a size or an offset: it writes what the plan says where it says.

Crash safety (:mod:`streammerge.journal`): the partial folder appears, by a rename, with the plan
already inside; finished units are journaled after their bytes are fsynced; the plan and journal
leave only after the folder has become ``OUT``. A run killed at any point leaves either nothing,
a partial folder that ``--resume`` continues, or the complete output.
"""

from __future__ import annotations

import enum
import errno
import glob
import json
import os
import shutil

from streammerge.errors import OutputError, PlanMismatch
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME
from streammerge.geometry import ALIGN
from streammerge.journal import JOURNAL_FILE, PLAN_FILE, Finished, Journal, partial_path, plan_identity, read_journal
from streammerge.manifest import MANIFEST_FILE, build_manifest
from streammerge.osio import CLOEXEC, direct_disabled, file_crc32, fsync_dir, open_direct, pwrite_all, remove, reserve, write_file
from streammerge.plan.model import Plan, shard_header_bytes

_NO_COPY_FILE_RANGE = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF})
DIRECT_MIN_BYTES = 2**20
"""Writes shorter than this go through the page cache (headers, statistics, the edges of a tile)."""
STOP_AFTER_ENV = "STREAMMERGE_TEST_STOP_AFTER_UNITS"
"""Test hook: the process dies (as if killed) right after this many units are journaled."""
KILL_AT_ENV = "STREAMMERGE_TEST_KILL_AT"
"""Test hook: the process dies (as if killed) at the named point of the writer (see :data:`KILL_POINTS`)."""
KILL_POINTS = (
    "draft-made",
    "partial-made",
    "shards-reserved",
    "before-journal",
    "before-finish",
    "files-copied",
    "manifest-written",
    "renamed",
)
"""In run order: the draft folder holds the plan; the partial folder appeared; its shards are reserved;
the first units' bytes are fsynced but not journaled; every unit is journaled; config/index/tokenizer
files are in; the manifest is in; the folder is renamed to OUT (its bookkeeping files not yet removed)."""


def _dump_json(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        os._exit(137)  # test hook: die here, as a SIGKILL would


class WriterState(enum.Enum):
    NEW = "new"
    OPEN = "open"
    FINISHED = "finished"
    ABORTED = "aborted"


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
        self._journal: Journal | None = None
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
        """Create ``OUT.partial`` (or reopen it to resume), reserve every shard and write the headers.

        A partial folder with no finished unit holds nothing worth keeping: a resume starts it afresh.
        """
        self._expect(WriterState.NEW)
        _remove_stale_drafts(self.partial)
        if self.resume and os.path.isdir(self.partial):
            if read_journal(os.path.join(self.partial, JOURNAL_FILE)):
                self._reopen()
                return
            remove(self.partial)
        if os.path.lexists(self.partial):
            if not self.plan.overwrite:
                raise OutputError(f"{self.partial}: left by an earlier run; pass --resume to continue it or --overwrite to start over")
            remove(self.partial)
        self._make_partial()
        self.state = WriterState.OPEN
        for shard in self.plan.shards:
            path = os.path.join(self.partial, shard.file)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | CLOEXEC, 0o644)
                self._fds.append(fd)
                self._direct.append(_open_direct_write(path))
                reserve(fd, shard.size)
                pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e
        _kill_point("shards-reserved")
        self._open_journal()

    def _make_partial(self) -> None:
        """Make ``OUT.partial`` appear with its plan file inside: written into a draft folder, then renamed."""
        draft = f"{self.partial}.draft-{os.getpid()}"
        try:
            os.makedirs(draft)
            write_file(os.path.join(draft, PLAN_FILE), plan_identity(self.plan).encode("utf-8"))
            _kill_point("draft-made")
            os.rename(draft, self.partial)
            fsync_dir(os.path.dirname(self.partial) or ".")
        except OSError as e:
            remove(draft)
            raise self._error(self.partial, e) from e
        _kill_point("partial-made")

    def _reopen(self) -> None:
        try:
            with open(os.path.join(self.partial, PLAN_FILE), encoding="utf-8") as f:
                saved = f.read()
        except OSError as e:
            raise PlanMismatch(f"{self.partial}: cannot resume, no readable {PLAN_FILE} ({e.strerror or e}); remove the folder") from e
        if saved != plan_identity(self.plan):
            raise PlanMismatch(
                f"{self.partial}: was started with other inputs or options (a file changed, or different --dtype/--mode/...); "
                "resume with the same command, or remove it / pass --overwrite to start over"
            )
        self.done = read_journal(os.path.join(self.partial, JOURNAL_FILE))
        self.state = WriterState.OPEN
        for shard in self.plan.shards:
            path = os.path.join(self.partial, shard.file)
            try:
                fd = os.open(path, os.O_WRONLY | CLOEXEC)
                self._fds.append(fd)
                self._direct.append(_open_direct_write(path))
                if os.fstat(fd).st_size != shard.size:
                    raise PlanMismatch(f"{path}: has {os.fstat(fd).st_size} bytes, the plan says {shard.size}; remove {self.partial}")
                pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e
        self._open_journal()

    def _open_journal(self) -> None:
        try:
            self._journal = Journal(self.partial)
        except OSError as e:
            raise self._error(os.path.join(self.partial, JOURNAL_FILE), e) from e

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
        pwrite_all(fd, view, offset)
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
        return file_crc32(os.path.join(self.partial, self.plan.shards[shard].file), offset, nbytes)

    def commit(self, finished: Finished) -> None:
        """Record units as finished: their shards' data is fsynced first, then their journal lines."""
        self._expect(WriterState.OPEN)
        assert self._journal is not None
        units = self.plan.units
        try:
            for shard in sorted({units[i].shard for i, _ in finished}):
                os.fdatasync(self._fds[shard])
            _kill_point("before-journal")
            self._journal.append(finished, [units[i].name for i, _ in finished])
        except OSError as e:
            raise self._error(os.path.join(self.partial, JOURNAL_FILE), e) from e
        self.done.update(finished)
        if self.stop_after and len(self.done) >= self.stop_after:
            os._exit(137)  # test hook: die here, as a SIGKILL would

    def finish(self) -> None:
        """Flush shards, write config/index/tokenizer files and the manifest, move the folder into place,
        and only then drop the resume bookkeeping (a run killed in between leaves a complete output)."""
        self._expect(WriterState.OPEN)
        plan = self.plan
        if len(self.done) != len(plan.units):
            raise AssertionError(f"finish with {len(plan.units) - len(self.done)} units not done")
        _kill_point("before-finish")
        try:
            for fd in self._fds:
                os.fsync(fd)
            self._close()
            for c in plan.copy_files:
                shutil.copyfile(c.src, os.path.join(self.partial, c.dst))
            if plan.config is not None:
                write_file(os.path.join(self.partial, CONFIG_NAME), _dump_json(plan.config))
            if len(plan.shards) > 1:
                write_file(os.path.join(self.partial, INDEX_NAME), _dump_json(plan.index()))
            _kill_point("files-copied")
            crcs = {name: crc for unit_crcs in self.done.values() for name, crc in unit_crcs.items()}
            write_file(os.path.join(self.partial, MANIFEST_FILE), _dump_json(build_manifest(plan, crcs)))
            fsync_dir(self.partial)
            _kill_point("manifest-written")
            self._move_into_place()
            _kill_point("renamed")
            for name in (JOURNAL_FILE, PLAN_FILE):
                os.remove(os.path.join(plan.out, name))
            fsync_dir(plan.out)
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
        fsync_dir(os.path.dirname(out) or ".")
        if old is not None:
            remove(old)

    def _close(self) -> None:
        fds, self._fds = self._fds, []
        fds += [fd for fd in self._direct if fd is not None]
        self._direct = []
        if self._journal is not None:
            self._journal.close()
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
            remove(self.partial)
        self.state = WriterState.ABORTED
        return kept


def _open_direct_write(path: str) -> int | None:
    """A descriptor of ``path`` for O_DIRECT writes, or None where the OS or filesystem has none."""
    if direct_disabled():
        return None
    try:
        return open_direct(path, write=True)
    except OSError:
        return None


def _remove_stale_drafts(partial: str) -> None:
    """Remove draft folders of runs that died before their partial folder appeared (their process is gone)."""
    for draft in glob.glob(glob.escape(partial) + ".draft-*"):
        pid = draft.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            remove(draft)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
