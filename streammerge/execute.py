"""The executor: runs a :class:`~streammerge.plan.Plan` unit by unit, tile by tile.

Base-weight tiles come in ahead of the merge (:mod:`streammerge.inputs`: read with ``O_DIRECT``
into a small ring of reused buffers, or mapped), go to the compute device
(:mod:`streammerge.device`; through pinned :mod:`streammerge.staging` slots on a GPU), are
dequantized (:mod:`streammerge.quantize`) and merged (:mod:`streammerge.kernels`), and leave
through the :class:`~streammerge.writequeue.WriteQueue` at the offset the plan fixed.
Untouched tensors are copied file to file in the kernel (``copy_file_range``) without ever
entering this process. Each unit picks one per-tile function for its path once.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from streammerge import parts, preflight
from streammerge.device import VramCap, resolve_device
from streammerge.errors import BudgetTooSmall, OutputError, StreamMergeError
from streammerge.formats.safetensors import Source
from streammerge.geometry import ALIGN, STAGING_SLOTS, aligned_start, in_tile_bytes, out_tile_bytes, tile_range
from streammerge.inputs import Reading
from streammerge.inputs.mapped import SourceFiles, Tiles
from streammerge.journal import partial_path
from streammerge.kernels import ACCUMULATE, TORCH_DTYPES, Factors, Workspace, combine_linear, gguf_rows, merge_rows, replace_rows
from streammerge.lock import output_lock, part_lock
from streammerge.pack import PackReport, StreamPacker
from streammerge.plan.gguf import check_gguf_output
from streammerge.plan.layout import check_inputs_unchanged, check_output
from streammerge.plan.model import LoraTerm, Plan, WorkUnit
from streammerge.quantize import Dequantizer, FP8Requantizer, MXFP4Requantizer, Requantizer
from streammerge.sizes import format_bytes
from streammerge.staging import Sink, Staging, pinned_buffer
from streammerge.write import Writer
from streammerge.writequeue import Buffer, WriteQueue

DEQUANT_THREADS = min(2, os.cpu_count() or 1)
"""CPU threads that dequantize a tile (gathers and scaling split well; the merge itself runs on one)."""

MERGE_THREADS = min(2, os.cpu_count() or 1)
"""CPU threads that dequantize and merge a tile, each its own rows on one core. Two beat one even
while the disk threads run: the 3B merge took 13.9 s instead of 18.9 s cold (bf16 base), 13.2 s
instead of 16.7 s from NF4 (interleaved runs, 2-core Xeon, docs/benchmarks.md)."""

SPLIT_MIN_ELEMS = 2**18
"""A CPU tile is split between the merging threads when each half has at least this many elements."""

Progress = Callable[[int, int, str], None]
"""progress(bytes_done, bytes_total, tensor_name), called after every tile."""


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
    peak_device_bytes: int = 0
    """GPU runs: the most memory torch's allocator reserved during the run (0 on the CPU)."""
    device_budget_bytes: int = 0
    """GPU runs: the VRAM budget the run was held to (0 on the CPU)."""
    reads: str = ""
    """How the base tiles came in: "direct" (O_DIRECT) or "mmap" (see :data:`~streammerge.inputs.direct.READ_MODES`)."""


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's CPU thread count set to ``n`` for the block (unchanged if None)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(before)


def _load_factors(files: SourceFiles, term: LoraTerm, device: torch.device) -> Factors:
    def load(src: Source, cols: tuple[int, int, int] | None) -> torch.Tensor:
        t = files.tensor(src, 0, src.nbytes // TORCH_DTYPES[src.dtype].itemsize).view(src.shape)
        if cols is not None:  # only the columns this term uses are converted (one expert's rank columns)
            t = t[:, slice(*cols)]
        out = t.to(device=device, dtype=ACCUMULATE, copy=True).contiguous()
        del t
        files.release(src.file, src.offset, src.nbytes)
        return out

    a, b = load(term.a, term.a_cols), load(term.b, term.b_cols)
    return Factors(a=a, b=b, scale=term.scale, transpose=term.transpose, rows=term.rows)


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

    def commit(self, unit: WorkUnit, index: int) -> None:
        return None


def compute_unit(plan: Plan, index: int, device: str = "cpu") -> bytes:
    """The bytes unit ``index`` of ``plan`` would write for its tensor, computed in memory (for verify)."""
    unit = plan.units[index]
    sink = _MemorySink(unit, max(out_tile_bytes(plan.units), 1))
    files = SourceFiles()
    dev, _ = resolve_device(device)
    try:
        with torch.inference_mode():
            if _staged(dev):
                staging = Staging(sink, dev, in_tile_bytes([unit]))
                _run_unit(unit, files, staging, Workspace(dev), lambda n: None)
                staging.flush()
            else:
                _run_unit(unit, files, sink, Workspace(dev), lambda n: None)
    finally:
        files.close()
    return bytes(sink.data)


def _staged(device: torch.device) -> bool:
    """Whether tiles go through pinned :class:`~streammerge.staging.Staging` (on a GPU) or are merged in place."""
    return device.type != "cpu"


def split_rows(unit: WorkUnit, rows: int) -> int:
    """Where to split a tile of ``rows`` rows between two merging threads: about half, on a 4-bit
    block boundary; 0 (do not split) when the tile is too small to be worth a second thread."""
    if rows * unit.row_elems < 2 * SPLIT_MIN_ELEMS:
        return 0
    step = 1
    if unit.quant is not None and unit.quant.kind in ("nf4", "fp4"):  # each half starts on a 4-bit block boundary
        step = unit.quant.blocksize // math.gcd(unit.row_elems, unit.quant.blocksize)
    half = rows // 2 // step * step
    return half if 0 < half < rows else 0


@dataclass
class _UnitRun:
    """One computed unit while it runs: what it loaded for the whole unit, and where tiles go."""

    unit: WorkUnit
    tiles: Tiles
    out: Sink
    work: Workspace
    factors: list[Factors]
    magnitude: torch.Tensor | None
    adds: list[tuple[torch.Tensor, float]]
    token_rows: list[tuple[torch.Tensor, torch.Tensor]]
    acc: torch.Tensor | None
    dequant: Dequantizer | None
    requant: Requantizer | FP8Requantizer | MXFP4Requantizer | None

    @classmethod
    def start(cls, unit: WorkUnit, files: SourceFiles, out: Sink, work: Workspace, tiles: Tiles) -> _UnitRun:
        factors = [_load_factors(files, term, work.device) for term in unit.lora]
        if unit.combination == "linear" and len(factors) > 1:
            factors = combine_linear(factors)
        return cls(
            unit=unit,
            tiles=tiles,
            out=out,
            work=work,
            factors=factors,
            magnitude=_load_vector(files, unit.magnitude, work.device) if unit.magnitude else None,
            adds=[(_load_vector(files, a.source, work.device), a.scale) for a in unit.adds],
            token_rows=[
                (
                    torch.tensor(r.indices, dtype=torch.int64, device=work.device),
                    _load_vector(files, r.source, work.device).view(r.source.shape),
                )
                for r in unit.token_rows
            ],
            acc=work.get("acc", ACCUMULATE, (unit.chunk_rows, unit.row_elems)) if factors else None,
            dequant=Dequantizer.load(files, unit.quant, work.device) if unit.quant else None,
            requant=_requantizer(unit, work),
        )

    @property
    def stage(self) -> Staging | None:
        return self.out if isinstance(self.out, Staging) else None

    def load(self, r0: int, k: int, role: str = "", threads: int | None = None) -> torch.Tensor:
        """Rows ``r0 : r0 + k`` of the base weight as the merge reads them (dequantized, on the device);
        temporaries under ``role`` (one per merging thread)."""
        unit, work = self.unit, self.work
        raw = self.tiles.raw(*tile_range(unit, r0, k))
        if self.stage is not None:
            raw = self.stage.to_device(raw, work.get("staged" + role, torch.uint8, (raw.numel(),)))
        if self.dequant is not None:
            tile = work.get("dequant" + role, TORCH_DTYPES[unit.base_dtype], (k, unit.row_elems))
            with _torch_threads(threads):
                self.dequant.tile(raw, unit, r0, tile, work, role)
            return tile
        tile = raw.view(TORCH_DTYPES[unit.source.dtype]).view(k, unit.row_elems)
        if unit.base_dtype != unit.source.dtype:  # a base weight saved with the adapter: as loaded into the base
            tile = tile.to(TORCH_DTYPES[unit.base_dtype])
        return tile

    def compute(self, tile: torch.Tensor, r0: int, acc: torch.Tensor | None, result: torch.Tensor) -> None:
        _compute(tile, self.factors, r0, acc, result, self.magnitude, self.adds, r0 * self.unit.row_elems)
        if self.token_rows:
            replace_rows(result, r0, self.token_rows)

    def out_tile(self, r0: int, k: int) -> tuple[Buffer, int, int, torch.Tensor]:
        """A pool buffer for rows ``r0 : r0 + k`` of the output: (buffer, file offset, start in the
        buffer, the rows as a tensor viewing it)."""
        unit = self.unit
        dtype = TORCH_DTYPES[unit.out_dtype]
        buffer = self.out.acquire()
        at = unit.offset + r0 * unit.row_elems * dtype.itemsize
        start = aligned_start(at, dtype.itemsize)
        host = torch.frombuffer(buffer, dtype=dtype, count=k * unit.row_elems, offset=start).view(k, unit.row_elems)
        return buffer, at, start, host


def _requantizer(unit: WorkUnit, work: Workspace) -> Requantizer | FP8Requantizer | MXFP4Requantizer | None:
    """What packs a unit's merged tiles for a quantized output (merged_4bit, merged_fp8, merged_mxfp4), if anything."""
    if unit.requant is None:
        return None
    if unit.requant.quant_type == "fp8":
        return FP8Requantizer(unit, work)
    return MXFP4Requantizer(unit, work) if unit.requant.quant_type == "mxfp4" else Requantizer(unit)


TileStep = Callable[[_UnitRun, int, int], int]
"""Merge rows ``row0 : row0 + n`` of a unit and hand them to the writer; returns the bytes written."""


def _plain_tile(run: _UnitRun, row0: int, n: int) -> int:
    """On the CPU, one thread: merged from the input straight into the output buffer."""
    buffer, at, start, host = run.out_tile(row0, n)
    run.compute(run.load(row0, n, "", DEQUANT_THREADS), row0, run.acc, host)
    nbytes = host.numel() * host.element_size()
    del host
    run.out.write(run.unit.shard, at, run.unit.name, buffer, nbytes, start)
    return nbytes


def _split_tile(helper: concurrent.futures.ThreadPoolExecutor) -> TileStep:
    """On the CPU, two threads: the helper merges the second half of the rows while this one merges
    the first (each dequantizes and merges on one core); small tiles go the plain way."""

    def step(run: _UnitRun, row0: int, n: int) -> int:
        half = split_rows(run.unit, n)
        if not half:
            return _plain_tile(run, row0, n)
        unit = run.unit
        buffer, at, start, host = run.out_tile(row0, n)

        def second(rows: torch.Tensor = host[half:]) -> None:
            with torch.inference_mode():
                acc2 = run.work.get("acc2", ACCUMULATE, (unit.chunk_rows, unit.row_elems)) if run.factors else None
                run.compute(run.load(row0 + half, n - half, "2"), row0 + half, acc2, rows)

        done = helper.submit(second)
        try:
            run.compute(run.load(row0, half), row0, run.acc, host[:half])
        finally:
            concurrent.futures.wait([done])  # never hand on a buffer the helper still writes
        done.result()
        nbytes = host.numel() * host.element_size()
        del host
        run.out.write(unit.shard, at, unit.name, buffer, nbytes, start)
        return nbytes

    return step


def _staged_tile(run: _UnitRun, row0: int, n: int) -> int:
    """On a GPU: the input goes up through a pinned slot, the result comes back asynchronously."""
    assert run.stage is not None
    buffer, at, start, host = run.out_tile(row0, n)
    result = run.work.get("out", host.dtype, tuple(host.shape))
    run.compute(run.load(row0, n), row0, run.acc, result)
    run.stage.write_from_device(result, host, run.unit.shard, at, run.unit.name, buffer, start)
    nbytes = host.numel() * host.element_size()
    del host
    return nbytes


def _requant_tile(run: _UnitRun, row0: int, n: int) -> int:
    """Merged in float32, then packed to 4 bit by bitsandbytes or quantized to FP8 or MXFP4 (on the CPU or a GPU)."""
    unit = run.unit
    assert run.requant is not None and unit.requant is not None
    first = row0 * unit.row_elems
    result = run.work.get("requant", torch.float32, (n, unit.row_elems))
    run.compute(run.load(row0, n, "", DEQUANT_THREADS if run.work.device.type == "cpu" else None), row0, run.acc, result)
    packed = run.requant.tile(result, first)
    buffer = run.out.acquire()
    at = unit.offset + unit.requant.out_offset(first)
    start = aligned_start(at)
    torch.frombuffer(buffer, dtype=torch.uint8, count=packed.numel(), offset=start).copy_(packed)
    run.out.write(unit.shard, at, unit.name, buffer, packed.numel(), start)
    return packed.numel()


def _gguf_tile(run: _UnitRun, row0: int, n: int) -> int:
    """GGUF output: merged in the model dtype (the safetensors merge's bytes), then converted on the CPU
    as llama.cpp's converter converts a tensor (:func:`streammerge.kernels.gguf_rows`)."""
    unit = run.unit
    spec = unit.gguf
    assert spec is not None
    merged = run.work.get("gguf", TORCH_DTYPES[spec.merge_dtype], (n, unit.row_elems))
    run.compute(run.load(row0, n, "", DEQUANT_THREADS if run.work.device.type == "cpu" else None), row0, run.acc, merged)
    data = gguf_rows(merged.cpu(), spec.qtype, spec.work_dtype, spec.head_rows, spec.shift)
    if len(data) != n * spec.row_bytes:
        raise AssertionError(f"{unit.name}: {len(data)} GGUF bytes for {n} rows, planned {n * spec.row_bytes}")
    buffer = run.out.acquire()
    at = unit.offset + row0 * spec.row_bytes
    start = aligned_start(at)
    memoryview(buffer)[start : start + len(data)] = data
    run.out.write(unit.shard, at, unit.name, buffer, len(data), start)
    return len(data)


def _tile_step(run: _UnitRun, helper: concurrent.futures.ThreadPoolExecutor | None) -> TileStep:
    """The one per-tile function of this unit's path."""
    if run.unit.gguf is not None:
        return _gguf_tile
    if run.requant is not None:
        return _requant_tile
    if run.stage is not None:
        return _staged_tile
    return _split_tile(helper) if helper is not None else _plain_tile


def _run_unit(
    unit: WorkUnit,
    files: SourceFiles,
    out: Sink,
    work: Workspace,
    advance: Callable[[int], None],
    tiles: Tiles | None = None,
    helper: concurrent.futures.ThreadPoolExecutor | None = None,
) -> None:
    """Compute (or copy) one unit into ``out``, its input tiles from ``tiles`` (by default mapped in
    through ``files`` when the merge needs them).

    With a :class:`Staging` sink (GPU runs) each tile's input goes to ``work.device`` through its
    pinned slots and the result comes back asynchronously; otherwise the tile is merged on the CPU,
    straight from the mapped input into the output buffer, its rows split with the ``helper``
    thread when one is given.
    """
    if unit.op == "copy":
        fd, _ = files.get(unit.source.file)
        out.copy(unit.shard, unit.offset, unit.name, fd, unit.source.offset, unit.source.nbytes)
        advance(unit.source.nbytes)
        return
    tiles = tiles or files
    run = _UnitRun.start(unit, files, out, work, tiles)
    step = _tile_step(run, helper)
    for row0 in range(0, unit.rows, unit.tile_rows):
        n = min(unit.tile_rows, unit.rows - row0)
        stored = tile_range(unit, row0, n)
        tiles.ready(*stored)
        written = step(run, row0, n)
        tiles.release(*stored)
        advance(written)
    if run.requant is not None:
        slots = {x.name: x for x in unit.extra}
        for name, data in run.requant.statistics().items():
            slot = slots[name]
            if len(data) != slot.nbytes:
                raise AssertionError(f"{name}: {len(data)} bytes, planned {slot.nbytes}")
            out.write_bytes(unit.shard, slot.offset, name, data)


def _compute(
    tile: torch.Tensor,
    factors: list[Factors],
    row0: int,
    acc: torch.Tensor | None,
    result: torch.Tensor,
    magnitude: torch.Tensor | None,
    adds: list[tuple[torch.Tensor, float]],
    first: int,
) -> None:
    """The merge of one tile into ``result`` (rounded once), or a plain conversion when nothing adapts it."""
    if acc is not None:
        merge_rows(tile, factors, row0, acc, result, magnitude)
    elif adds:  # small 1-D tensors (biases): float64 sum, one rounding
        total = tile.reshape(-1).to(ACCUMULATE, copy=True)
        for vector, scale in adds:
            total.add_(vector[first : first + total.numel()], alpha=scale)
        result.view(-1).copy_(total)
    else:
        result.copy_(tile)


def _load_vector(files: SourceFiles, src: Source, device: torch.device) -> torch.Tensor:
    """A small 1-D tensor (DoRA magnitude, LoRA bias) in float64."""
    t = files.tensor(src, 0, math.prod(src.shape)).to(device=device, dtype=ACCUMULATE, copy=True)
    files.release(src.file, src.offset, src.nbytes)
    return t


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextlib.contextmanager
def _cpu_threads(dev: torch.device) -> Iterator[concurrent.futures.ThreadPoolExecutor | None]:
    """torch on one thread for the run (cache-sized chunks do not gain from more; the writer thread
    keeps the other core busy with the disk), and on the CPU a helper thread that merges half of
    every large tile (see :func:`split_rows`)."""
    helper = None
    if dev.type == "cpu" and MERGE_THREADS > 1:
        helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streammerge-merge")
    with _torch_threads(1):
        try:
            yield helper
        finally:
            if helper is not None:
                helper.shutdown()


@contextlib.contextmanager
def _vram_cap(cap: VramCap | None) -> Iterator[None]:
    if cap is None:
        yield
        return
    cap.apply()
    try:
        yield
    finally:
        cap.lift()


def run(
    plan: Plan,
    *,
    progress: Progress | None = None,
    device: str | None = None,
    reading: Reading | None = None,
    resume: bool = False,
    vram_budget: int | None = None,
    reads: str = "auto",
    part: tuple[int, int] | None = None,
    pack_to: str | None = None,
) -> Report:
    """Execute ``plan``: write the merged model to ``plan.out``, atomically.

    The output appears only when complete; on any error (or Ctrl-C) the partial folder is removed,
    or kept for ``--resume`` when finished units are journaled, and the error re-raised.
    ``device`` overrides the plan's device ("auto", "cpu", "cuda"). ``reading`` is a
    :class:`~streammerge.inputs.Reading` already started on this plan (one is made from ``reads``,
    a :data:`~streammerge.inputs.direct.READ_MODES` choice, if not); it is closed at the end.
    With ``resume``, an ``OUT.partial`` left by an interrupted run of the same plan is continued:
    only the units its journal does not list are redone.

    ``part=(k, n)`` runs only part k of n (:mod:`streammerge.parts`): its shards go into the shared
    ``OUT.partial``, continued from its own journal if it was interrupted (``resume`` is implied),
    and the output is assembled when this part completes the set. A finished part does nothing.

    ``pack_to`` (``merge --pack``) also writes the output packed there (:mod:`streammerge.pack`):
    compressed from the writer's stream as the tiles go to the disk, or, for a resumed run or a
    part, packed from the finished output afterwards.

    Example::

        plan = streammerge.plan("./base", ["./my-lora"], out="./merged")
        report = streammerge.run(plan)
        print(f"{report.bytes_written / report.seconds / 1e6:.0f} MB/s")
    """
    start = time.perf_counter()
    piece = None if part is None else parts.part(plan, *part)
    if piece is not None and parts.already_complete(plan):
        return Report(
            out=plan.out,
            device="none",
            seconds=time.perf_counter() - start,
            bytes_written=0,
            units={},
            peak_rss_bytes=_peak_rss_bytes(),
            notes=(f"part {piece.label}: {plan.out} is already complete, nothing to do",),
        )
    check_inputs_unchanged(plan)  # on every worker of a split run, too
    if pack_to is not None and os.path.lexists(pack_to) and not plan.overwrite:
        raise OutputError(f"{pack_to}: already exists; pass --overwrite to replace it")
    dev, fallback = resolve_device(device or plan.device)
    cap = VramCap(plan, vram_budget) if dev.type == "cuda" else None
    writer = Writer(plan, resume=resume, part=piece)
    mine = range(len(plan.units)) if piece is None else piece.units
    total = sum(plan.units[i].nbytes for i in mine)
    done, current = 0, ""

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, current)

    queue: WriteQueue | None = None
    packer: StreamPacker | None = None
    packed: PackReport | None = None
    assembled = ""
    with contextlib.ExitStack() as stack:  # closed last to first, however the run ends
        # One run per output; then the output checks hold. Parts share it, each holding its own part's lock.
        stack.enter_context(output_lock(plan.out, shared=piece is not None))
        if piece is not None:
            stack.enter_context(part_lock(plan.out, piece.label))
        check_output(plan.out, [plan.base, *plan.adapters], plan.overwrite)
        if plan.format == "gguf":
            check_gguf_output(plan.out, [s.file for s in plan.shards], plan.overwrite)
        preflight.check(plan, None if piece is None else piece.shards)
        if reading is None:
            reading = Reading(plan if piece is None else parts.sub_plan(plan, piece), reads, resume or piece is not None)
            reading.start()
        stack.callback(reading.close)
        helper = stack.enter_context(_cpu_threads(dev))
        stack.enter_context(_vram_cap(cap))
        files = stack.enter_context(contextlib.closing(SourceFiles()))
        work = Workspace(dev)
        try:
            writer.open()
            staged = _staged(dev)
            pool = pinned_buffer if staged and dev.type == "cuda" else None
            resumed = len(writer.done)
            if pack_to is not None and piece is None and not resumed:
                packer = stream = StreamPacker(plan, pack_to, overwrite=plan.overwrite)
                stack.callback(lambda: None if packed is not None else stream.abort())
            queue = WriteQueue(writer, plan.write_buffers, out_tile_bytes(plan.units), allocate=pool, packer=packer)
            # On a GPU, up to two merged tiles may be on their way back while the next is staged.
            keep = max(1, min(2, plan.write_buffers - 1))
            sink: Sink = Staging(queue, dev, in_tile_bytes(plan.units), slots=STAGING_SLOTS, keep=keep) if staged else queue
            tiles = reading.tiles(files, [plan.units[i] for i in mine if i not in writer.done])
            consumed = 0
            with torch.inference_mode():
                for index in mine:
                    unit = plan.units[index]
                    current = unit.name
                    if index in writer.done:  # finished by the interrupted run this one resumes
                        advance(unit.written_bytes)
                    else:
                        _run_unit(unit, files, sink, work, advance, tiles, helper)
                        sink.commit(unit, index)
                    consumed += unit.read_bytes
                    reading.advance(consumed)
                if isinstance(sink, Staging):
                    sink.flush()
            reading.close()
            queue.close()
            files.close()
            writer.finish()
            if piece is not None:
                assembled = _finish_parts(plan, piece)
            if packer is not None:
                packed = packer.finish(plan.out)
        except BaseException as e:
            error = _failure(plan, writer, queue, cap, current, e)
            if error is e:
                raise
            raise error from e
    notes = plan.notes + ((fallback,) if fallback else ())
    if resumed:
        notes += (f"resumed: {resumed} of {len(mine)} units were already done",)
    if assembled:
        notes += (assembled,)
    if pack_to is not None and packed is None and piece is None:
        from streammerge.pack import pack

        packed = pack(plan.out, pack_to, overwrite=plan.overwrite)  # a resumed run: from the finished output
    if packed is not None:
        how = "from the merge's stream" if packer is not None else "after the merge"
        notes += (f"packed {packed.dest} {how}: {packed.raw_bytes} -> {packed.packed_bytes} bytes ({packed.ratio:.3f}x)",)
    return Report(
        out=plan.out,
        device=str(dev),
        seconds=time.perf_counter() - start,
        bytes_written=sum(s.size for s in plan.shards) if piece is None else piece.bytes(plan),
        units=dict(Counter(plan.units[i].op for i in mine)),
        peak_rss_bytes=_peak_rss_bytes(),
        notes=notes,
        peak_device_bytes=cap.peak() if cap is not None else 0,
        device_budget_bytes=cap.budget if cap is not None else 0,
        reads=reading.mode,
    )


def _finish_parts(plan: Plan, piece: parts.Part) -> str:
    """After part ``piece`` is done: assemble the output if it was the last one, else say what is left."""
    partial = partial_path(plan.out)
    left = parts.missing(plan, piece.count, partial)
    if left:
        waiting = ", ".join(p.label for p, _ in left)
        return f"part {piece.label} done; the output is assembled when the last part finishes (still running or to run: {waiting})"
    return f"part {piece.label}: " + parts.finish(plan)


def _failure(plan: Plan, writer: Writer, queue: WriteQueue | None, cap: VramCap | None, current: str, e: BaseException) -> BaseException:
    """Stop writing after a failed run: journal the units whose writes all finished, keep the
    partial folder when any are (else remove it). Returns the exception to raise: ``e``, or one
    that says what to do (a GPU budget that ran out; the command that resumes the kept part)."""
    if queue is not None:
        queue.cancel()
        queue.flush_on_failure()
    kept = writer.abort()
    error: BaseException = e
    if cap is not None and isinstance(e, torch.OutOfMemoryError):
        error = BudgetTooSmall(
            f"{plan.out}: the GPU memory budget ({format_bytes(cap.budget)}) ran out at {current}, above the plan's estimate of "
            f"{format_bytes(plan.estimate.peak_device_bytes)}; plan with a smaller --tile-size, or use --device cpu"
        )
    if writer.part is not None and kept and isinstance(error, (StreamMergeError, OSError)):
        error = OutputError(
            f"{error}; part {writer.part.label}: its finished units are kept in {writer.partial}: run the same command again to continue it"
        )
    elif kept and isinstance(error, (StreamMergeError, OSError)):
        error = OutputError(
            f"{error}; the finished part is kept in {writer.partial}: run the same command with --resume to continue, or remove it"
        )
    return error
