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
import socket

from streammerge import parts
from streammerge.errors import OutputError, PlanMismatch
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME
from streammerge.geometry import ALIGN
from streammerge.journal import JOURNAL_FILE, PLAN_FILE, Finished, Journal, partial_path, plan_identity, read_journal
from streammerge.manifest import MANIFEST_FILE, build_manifest
from streammerge.osio import CLOEXEC, direct_disabled, file_crc32, fsync_dir, open_direct, pwrite_all, remove, reserve, write_file
from streammerge.parts import Part
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

    def __init__(self, plan: Plan, resume: bool = False, part: Part | None = None) -> None:
        self.plan = plan
        self.resume = resume
        self.part = part
        """Set when this process writes one part of a split plan (:mod:`streammerge.parts`): only its shards."""
        self.partial = partial_path(plan.out)
        self.state = WriterState.NEW
        self._fds: list[int] = []
        """Per shard, its descriptor (-1 for the shards of other parts)."""
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
        if self.part is not None:
            self._open_part(self.part)
            return
        if os.path.isdir(self.partial) and parts.recorded_count(self.partial) is not None and not self.plan.overwrite:
            n = parts.recorded_count(self.partial)
            raise OutputError(
                f"{self.partial}: was started in {n} parts; run the missing ones (streammerge run PLAN --part K/{n}), "
                "or pass --overwrite to start over as a whole run"
            )
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

    def _make_partial(self, count: int = 0) -> None:
        """Make ``OUT.partial`` appear with its plan file inside (and, for a split run of ``count`` parts,
        its parts file): written into a draft folder, then renamed. For a part, another part may win
        the race to make it: that is fine, the caller checks the folder it made."""
        draft = f"{self.partial}.draft-{_host()}-{os.getpid()}"
        try:
            os.makedirs(draft)
            write_file(os.path.join(draft, PLAN_FILE), plan_identity(self.plan).encode("utf-8"))
            if count:
                write_file(os.path.join(draft, parts.PARTS_FILE), f"{count}\n".encode("ascii"))
            _kill_point("draft-made")
            os.rename(draft, self.partial)
            fsync_dir(os.path.dirname(self.partial) or ".")
        except OSError as e:
            remove(draft)
            if not (count and e.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(self.partial)):
                raise self._error(self.partial, e) from e
        _kill_point("partial-made")

    def _open_part(self, part: Part) -> None:
        """Open this part's shards in the shared ``OUT.partial`` (made by whichever part came first):
        reopened where its journal lists finished units, else made afresh (a part that died before
        journaling anything starts over); the other parts' shards are not touched."""
        if not os.path.isdir(self.partial):
            self._make_partial(part.count)
        parts.check_partial(self.plan, self.partial, part.count)
        self.done = parts.done_units(self.partial, part)
        self.state = WriterState.OPEN
        self._fds = [-1] * len(self.plan.shards)
        self._direct = [None] * len(self.plan.shards)
        for s in part.shards:
            shard = self.plan.shards[s]
            path = os.path.join(self.partial, shard.file)
            try:
                if self.done:
                    fd = self._fds[s] = os.open(path, os.O_WRONLY | CLOEXEC)
                    if os.fstat(fd).st_size != shard.size:
                        raise PlanMismatch(f"{path}: has {os.fstat(fd).st_size} bytes, the plan says {shard.size}; remove {self.partial}")
                else:
                    fd = self._fds[s] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC, 0o644)
                    reserve(fd, shard.size)
                self._direct[s] = _open_direct_write(path)
                pwrite_all(fd, shard_header_bytes(shard), 0)
            except OSError as e:
                raise self._error(path, e) from e
        _kill_point("shards-reserved")
        self._open_journal()

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
            self._journal = Journal(self.partial, self.journal_file)
        except OSError as e:
            raise self._error(os.path.join(self.partial, self.journal_file), e) from e

    @property
    def journal_file(self) -> str:
        return self.part.journal if self.part is not None else JOURNAL_FILE

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
            raise self._error(os.path.join(self.partial, self.journal_file), e) from e
        self.done.update(finished)
        if self.stop_after and len(self.done) >= self.stop_after:
            os._exit(137)  # test hook: die here, as a SIGKILL would

    def finish(self) -> None:
        """Flush shards, write config/index/tokenizer files and the manifest, move the folder into place,
        and only then drop the resume bookkeeping (a run killed in between leaves a complete output).

        A part (``part=``) only flushes and closes its own shards; the output is assembled by
        :func:`streammerge.parts.finish` once every part is done."""
        self._expect(WriterState.OPEN)
        plan = self.plan
        expected = len(self.part.units) if self.part is not None else len(plan.units)
        if len(self.done) != expected:
            raise AssertionError(f"finish with {expected - len(self.done)} units not done")
        _kill_point("before-finish")
        try:
            for fd in self._fds:
                if fd >= 0:
                    os.fsync(fd)
            self._close()
        except OSError as e:
            raise self._error(getattr(e, "filename", None) or self.partial, e) from e
        self.state = WriterState.FINISHED
        if self.part is None:
            crcs = {name: crc for unit_crcs in self.done.values() for name, crc in unit_crcs.items()}
            assemble(plan, self.partial, crcs, [JOURNAL_FILE, PLAN_FILE])

    def _close(self) -> None:
        fds, self._fds = [fd for fd in self._fds if fd >= 0], []
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
        if self.part is not None:  # the folder is shared with the other parts: never removed here
            self.state = WriterState.ABORTED
            return kept
        if self.state is WriterState.OPEN and not kept:
            remove(self.partial)
        self.state = WriterState.ABORTED
        return kept


def assemble(plan: Plan, partial: str, crcs: dict[str, int], bookkeeping: list[str]) -> None:
    """Finish an output whose shards are all written and fsynced in ``partial``: copy the tokenizer and
    other files, write config, index and the manifest (``crcs``: every tensor's CRC-32), rename the
    folder to ``plan.out``, and only then remove the ``bookkeeping`` files from it. GGUF output: see :func:`_assemble_gguf`."""
    if plan.format == "gguf":
        _assemble_gguf(plan, partial)
        return
    try:
        for shard in plan.shards:  # written by this process or, for parts, by others: durable before the rename
            fd = os.open(os.path.join(partial, shard.file), os.O_RDONLY | CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for c in plan.copy_files:
            shutil.copyfile(c.src, os.path.join(partial, c.dst))
        if plan.config is not None:
            write_file(os.path.join(partial, CONFIG_NAME), _dump_json(plan.config))
        if len(plan.shards) > 1:
            write_file(os.path.join(partial, INDEX_NAME), _dump_json(plan.index()))
        _kill_point("files-copied")
        write_file(os.path.join(partial, MANIFEST_FILE), _dump_json(build_manifest(plan, crcs)))
        fsync_dir(partial)
        _kill_point("manifest-written")
        _move_into_place(plan, partial)
        _kill_point("renamed")
        for name in bookkeeping:
            remove(os.path.join(plan.out, name))
        fsync_dir(plan.out)
    except OSError as e:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise OutputError(f"{getattr(e, 'filename', None) or partial}: cannot write{hint}: {e.strerror or e}") from e


def _assemble_gguf(plan: Plan, partial: str) -> None:
    """Finish GGUF output: the fsynced files are renamed from ``partial`` to beside ``plan.out``, the
    first file (the one llama.cpp opens, which names the others) last, so a complete-looking model
    appears only once all of it is in place; then the partial folder (plan, journal) is removed.
    No config, tokenizer or manifest is written: the GGUF file holds the metadata."""
    folder = os.path.dirname(plan.out) or "."
    try:
        for shard in plan.shards:
            fd = os.open(os.path.join(partial, shard.file), os.O_RDONLY | CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _kill_point("manifest-written")
        for shard in reversed(plan.shards):
            dest = os.path.join(folder, shard.file)
            if os.path.lexists(dest) and not plan.overwrite:
                raise OutputError(f"{dest}: appeared while merging; output kept in {partial}")
            os.replace(os.path.join(partial, shard.file), dest)
        fsync_dir(folder)
        _kill_point("renamed")
        remove(partial)
        fsync_dir(folder)
    except OSError as e:
        hint = " (disk full)" if e.errno == errno.ENOSPC else ""
        raise OutputError(f"{getattr(e, 'filename', None) or partial}: cannot write{hint}: {e.strerror or e}") from e


def _move_into_place(plan: Plan, partial: str) -> None:
    out = plan.out
    old = None
    if os.path.lexists(out):
        if not plan.overwrite:
            raise OutputError(f"{out}: appeared while merging; output kept in {partial}")
        old = f"{out}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(partial, out)
    fsync_dir(os.path.dirname(out) or ".")
    if old is not None:
        remove(old)


def _open_direct_write(path: str) -> int | None:
    """A descriptor of ``path`` for O_DIRECT writes, or None where the OS or filesystem has none."""
    if direct_disabled():
        return None
    try:
        return open_direct(path, write=True)
    except OSError:
        return None


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "host"


def _remove_stale_drafts(partial: str) -> None:
    """Remove draft folders of runs on this machine that died before their partial folder appeared
    (their process is gone; drafts of other machines sharing the folder are theirs to clean)."""
    prefix = glob.escape(partial) + f".draft-{glob.escape(_host())}-"
    for draft in glob.glob(prefix + "*"):
        pid = draft[len(partial) + len(f".draft-{_host()}-") :]
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
