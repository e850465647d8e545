"""The executor: runs a :class:`~streammerge.plan.Plan` unit by unit, tile by tile.

Bytes come in through mmap (:mod:`streammerge.sources`), are merged by a compute backend, and
leave through the :class:`~streammerge.write.Writer` at the offset the plan fixed. Untouched
tensors are copied file to file in the kernel (``copy_file_range``) without entering this process.

Two backends compute. :mod:`streammerge.compute_torch` does everything (GPUs, 4/8-bit bases,
re-quantization) but importing torch costs 2-3 s of CPU, a third of a 1B merge, with the disk
idle. So when every computed unit is a plain 16/32-bit merge or cast on the CPU,
:mod:`streammerge.compute_numpy` starts at once while torch is imported on a background thread,
and torch's faster kernel takes over from the next unit once it is loaded (:class:`_Backends`).
Both produce the same bytes. This module is torch-free.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from streammerge import preflight
from streammerge.errors import OutputError, StreamMergeError
from streammerge.plan import Plan, WorkUnit, check_inputs_unchanged, check_output, out_tile_bytes, runs_on_cpu, torch_reason
from streammerge.readahead import Readahead
from streammerge.sources import Pages, Prefetcher, SourceFiles, tile_ranges
from streammerge.write import ALIGN, Buffer, Sink, WriteQueue, Writer

Progress = Callable[[int, int, str], None]
"""progress(bytes_done, bytes_total, tensor_name), called after every tile."""

BACKEND_ENV = "STREAMMERGE_BACKEND"
"""``auto`` (the default), ``numpy`` or ``torch``: which backend computes which unit, see :class:`_Backends`."""

LOADING_SWITCH_INTERVAL = 1e-4
"""Python's thread switch interval (s) while torch is imported beside a numpy merge. The import is
CPU-bound Python that holds the GIL; numpy releases it inside each call, and with the default 5 ms
waits that long to get it back after every call (measured: 24 ns per element instead of 6)."""


@dataclass(frozen=True)
class Report:
    """What a run did."""

    out: str
    device: str
    seconds: float
    bytes_written: int
    units: dict[str, int]
    peak_rss_bytes: int
    notes: tuple[str, ...] = field(default=())


class Backend(Protocol):
    """Computes the units that are not plain copies: reads their tiles from ``files``, writes to ``out``."""

    device: str

    def run_unit(self, unit: WorkUnit, files: SourceFiles, out: Sink, advance: Callable[[int], None], pages: Pages) -> None: ...
    def close(self) -> None: ...


class _TorchLoader:
    """Imports the torch backend on a daemon thread; :meth:`ready` once it is loaded."""

    def __init__(self) -> None:
        self._interval = sys.getswitchinterval()
        self._done = threading.Event()
        self.error: BaseException | None = None
        sys.setswitchinterval(LOADING_SWITCH_INTERVAL)
        self._thread = threading.Thread(target=self._load, name="streammerge-import-torch", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            import streammerge.compute_torch  # noqa: F401
        except BaseException as e:  # no torch: numpy merges everything
            self.error = e
        finally:
            sys.setswitchinterval(self._interval)
            self._done.set()

    def ready(self) -> bool:
        return self._done.is_set() and self.error is None


class _Backends:
    """Which backend computes each unit of a run.

    The default (:data:`BACKEND_ENV` unset or ``auto``): when every computed unit is a plain
    16/32-bit merge or cast on the CPU, numpy computes the units that start before torch is
    loaded on a background thread, torch those after; otherwise torch computes them all.
    ``numpy`` (and ``load_torch=False``): numpy computes every unit it can, torch only those that
    need it (:func:`~streammerge.plan.torch_reason`). ``torch``: torch computes them all. Unit by
    unit, so every tensor is computed by one backend; both give the same bytes.
    """

    def __init__(self, plan: Plan, device: str, vram_budget: int | None, *, load_torch: bool = True) -> None:
        forced = os.environ.get(BACKEND_ENV, "auto")
        if forced not in ("auto", "numpy", "torch"):
            raise StreamMergeError(f"{BACKEND_ENV}={forced!r}: use numpy, torch or auto")
        computed = [u for u in plan.units if u.op != "copy"]
        numpy_able = [torch_reason(u) is None for u in computed]
        first_numpy = forced == "numpy" or not load_torch
        use_numpy = runs_on_cpu(device) and forced != "torch" and any(numpy_able) and (first_numpy or all(numpy_able))
        self._plan, self._device, self._vram_budget = plan, device, vram_budget
        self._torch: Backend | None = None
        self._numpy: Backend | None = None
        self._loader: _TorchLoader | None = None
        if use_numpy:
            from streammerge.compute_numpy import NumpyBackend

            self._numpy = NumpyBackend()
            if not first_numpy:
                self._loader = _TorchLoader()
        elif computed:
            self._torch = self._open_torch()
        self.device = self._torch.device if self._torch is not None else "cpu"

    def _open_torch(self) -> Backend:
        from streammerge.compute_torch import TorchBackend

        return TorchBackend.for_run(self._plan, self._device, self._vram_budget)

    def for_unit(self, unit: WorkUnit) -> Backend:
        """numpy for a unit it can compute until torch is loaded (for good with ``numpy``), else torch."""
        if self._numpy is not None and torch_reason(unit) is None and (self._loader is None or not self._loader.ready()):
            return self._numpy
        if self._torch is None:
            self._torch = self._open_torch()
        return self._torch

    def close(self) -> None:
        for backend in (self._torch, self._numpy):
            if backend is not None:
                backend.close()


class _MemorySink:
    """Collects one unit's main tensor in memory."""

    def __init__(self, unit: WorkUnit, buffer_bytes: int) -> None:
        self.unit = unit
        self.buffer_bytes = buffer_bytes
        self.data = bytearray(unit.nbytes)

    def acquire(self) -> Buffer:
        return bytearray(self.buffer_bytes + ALIGN)

    def write(self, shard: int, offset: int, tensor: str, buffer: Buffer, nbytes: int, start: int = 0) -> None:
        if tensor == self.unit.name:
            at = offset - self.unit.offset
            self.data[at : at + nbytes] = buffer[start : start + nbytes]

    def write_bytes(self, shard: int, offset: int, tensor: str, data: bytes) -> None:
        self.write(shard, offset, tensor, bytearray(data), len(data))

    def copy(self, shard: int, offset: int, tensor: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        self.write(shard, offset, tensor, bytearray(os.pread(src_fd, nbytes, src_offset)), nbytes)


def _copy_unit(unit: WorkUnit, files: SourceFiles, out: Sink, advance: Callable[[int], None]) -> None:
    """An untouched tensor: its bytes, file to file."""
    src = unit.source
    fd, _ = files.get(src.file)
    out.copy(unit.shard, unit.offset, unit.name, fd, src.offset, src.nbytes)
    advance(src.nbytes)


def compute_unit(plan: Plan, index: int, device: str = "cpu") -> bytes:
    """The bytes unit ``index`` of ``plan`` would write for its tensor, computed in memory (for verify)."""
    unit = plan.units[index]
    sink = _MemorySink(unit, max(out_tile_bytes(plan.units), 1))
    files = SourceFiles()
    try:
        if unit.op == "copy":
            _copy_unit(unit, files, sink, lambda n: None)
        else:
            backends = _Backends(plan, device, None, load_torch=False)
            try:
                backends.for_unit(unit).run_unit(unit, files, sink, lambda n: None, files.populate)
            finally:
                backends.close()
    finally:
        files.close()
    return bytes(sink.data)


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run(
    plan: Plan,
    *,
    progress: Progress | None = None,
    device: str | None = None,
    readahead: Readahead | None = None,
    resume: bool = False,
    vram_budget: int | None = None,
) -> Report:
    """Execute ``plan``: write the merged model to ``plan.out``, atomically.

    The output appears only when complete; on any error (or Ctrl-C) the partial folder is removed
    and the error re-raised. ``device`` overrides the plan's device ("auto", "cpu", "cuda").
    ``readahead`` is a :class:`~streammerge.readahead.Readahead`, started early (one is made if not).
    With ``resume``, an ``OUT.partial`` left by an interrupted run of the same plan is continued:
    only the units its journal does not list are redone.

    Example::

        plan = streammerge.plan("./base", ["./my-lora"], out="./merged")
        report = streammerge.run(plan)
        print(f"{report.bytes_written / report.seconds / 1e6:.0f} MB/s")
    """
    start = time.perf_counter()
    check_inputs_unchanged(plan)
    check_output(plan.out, [plan.base, *plan.adapters], plan.overwrite)
    preflight.check(plan)
    backends = _Backends(plan, device or plan.device, vram_budget)
    total = sum(u.nbytes for u in plan.units)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, current)

    current = ""
    ahead = readahead or Readahead(plan)
    ahead.start()
    consumed = 0
    writer = Writer(plan, resume=resume)
    files = SourceFiles()
    queue: WriteQueue | None = None
    prefetch: Prefetcher | None = None
    try:
        writer.open()
        queue = WriteQueue(writer, plan.write_buffers, out_tile_bytes(plan.units))
        resumed = len(writer.done)
        todo = [u for i, u in enumerate(plan.units) if i not in writer.done]
        prefetch = Prefetcher(files, tile_ranges(todo))
        for index, unit in enumerate(plan.units):
            current = unit.name
            if index in writer.done:  # finished by the interrupted run this one resumes
                advance(unit.nbytes + sum(x.nbytes for x in unit.extra))
            else:
                if unit.op == "copy":
                    _copy_unit(unit, files, queue, advance)
                else:
                    backends.for_unit(unit).run_unit(unit, files, queue, advance, prefetch.ready)
                queue.commit(unit, index)
            consumed += unit.source.nbytes + sum(t.a.nbytes + t.b.nbytes for t in unit.lora)
            ahead.advance(consumed)
        prefetch.close()
        queue.close()
        files.close()
        writer.finish()
    except BaseException as e:
        if prefetch is not None:
            prefetch.close()
        if queue is not None:
            queue.cancel()
            queue.flush_on_failure()
        files.close()
        kept = writer.abort()
        if kept and isinstance(e, (StreamMergeError, OSError)):
            raise OutputError(
                f"{e}; the finished part is kept in {writer.partial}: run the same command with --resume to continue, or remove it"
            ) from e
        raise
    finally:
        backends.close()
        ahead.close()
    return Report(
        out=plan.out,
        device=backends.device,
        seconds=time.perf_counter() - start,
        bytes_written=sum(s.size for s in plan.shards),
        units=dict(Counter(u.op for u in plan.units)),
        peak_rss_bytes=_peak_rss_bytes(),
        notes=plan.notes + ((f"resumed: {resumed} of {len(plan.units)} units were already done",) if resumed else ()),
    )
