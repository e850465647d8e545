"""The executor: runs a :class:`~streammerge.plan.Plan` unit by unit, tile by tile.

Base-weight tiles come in ahead of the merge, either read with ``O_DIRECT`` into a small ring of
reused buffers (:mod:`streammerge.direct`, the default unless they are cached already) or through
mmap (pages of each finished tile are released with ``madvise(MADV_DONTNEED)`` so they stop
counting in RSS); the small inputs (LoRA factors, quantization statistics) are mapped. Tiles go
to the compute device, are merged by :mod:`streammerge.kernels`, and leave through the
:class:`~streammerge.write.Writer` at the offset the plan fixed. Untouched tensors are copied
file to file in the kernel (``copy_file_range``) without ever entering this process.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import ctypes.util
import math
import mmap
import os
import resource
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, cast

import torch

from streammerge import preflight
from streammerge.direct import DirectTiles, use_direct
from streammerge.errors import BadCheckpoint, BudgetTooSmall, OutputError, StreamMergeError
from streammerge.kernels import (
    ACCUMULATE,
    TORCH_DTYPES,
    Factors,
    Workspace,
    as_bytes,
    combine_linear,
    dequant_4bit,
    dequant_int8,
    double_quant_scales,
    merge_rows,
    nibble_table,
)
from streammerge.plan import (
    NESTED_BLOCKSIZE,
    PREFETCH_TILES,
    STAGING_SLOTS,
    LoraTerm,
    Plan,
    QuantSpec,
    Source,
    WorkUnit,
    check_inputs_unchanged,
    check_output,
    in_tile_bytes,
    nvidia_device_node,
    out_tile_bytes,
    quant_state_bytes,
    tile_range,
    tile_ranges,
)
from streammerge.readahead import Readahead
from streammerge.staging import Sink, Staging, pinned_buffer
from streammerge.write import ALIGN, Buffer, WriteQueue, Writer, aligned_start

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
"""Linux 5.14+: fault a whole range in with one call."""

DEQUANT_THREADS = min(2, os.cpu_count() or 1)
"""CPU threads that dequantize a tile (gathers and scaling split well; the merge itself runs on one)."""

MERGE_THREADS = min(2, os.cpu_count() or 1)
"""CPU threads that dequantize and merge a tile, each its own rows on one core. Two beat one even
while the disk threads run: the 3B merge took 13.9 s instead of 18.9 s cold (bf16 base), 13.2 s
instead of 16.7 s from NF4 (interleaved runs, 2-core Xeon, docs/benchmarks.md)."""

SPLIT_MIN_ELEMS = 2**18
"""A CPU tile is split between the merging threads when each half has at least this many elements."""

VRAM_FRACTION = 0.8
"""Without --vram-budget, a run may use this fraction of the GPU memory free when it starts."""

Progress = Callable[[int, int, str], None]
"""progress(bytes_done, bytes_total, tensor_name), called after every tile."""


class Tiles(Protocol):
    """Where the merge gets its input tiles: ``ready`` before a tile is read (in plan order),
    ``raw`` for its bytes (the whole tile or rows of it), ``release`` when it is merged.

    :class:`SourceFiles` maps them in on the merge's thread; :class:`Prefetcher` maps them in
    ahead on its own thread; :class:`DirectInput` reads them with ``O_DIRECT`` ahead.
    """

    def ready(self, path: str, offset: int, nbytes: int) -> None: ...
    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor: ...
    def release(self, path: str, offset: int, nbytes: int) -> None: ...


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
    """How the base tiles came in: "direct" (O_DIRECT) or "mmap" (see :data:`~streammerge.direct.READ_MODES`)."""


def resolve_device(requested: str) -> tuple[torch.device, str | None]:
    """The device to merge on, and a note when ``auto`` had to fall back to the CPU.

    ``auto`` means CUDA when torch can start it, else the CPU; the note says why when a GPU seemed
    to be there (torch sees one, torch is a CUDA build, or there is an NVIDIA device node) but
    could not be used. ``cuda`` without a usable GPU is an error.
    """
    if requested == "cpu":
        return torch.device("cpu"), None
    problem = _cuda_problem()
    if problem is None:
        return torch.device("cuda"), None
    if requested == "cuda":
        raise StreamMergeError(f"device 'cuda' was asked for but {problem}; use --device cpu or auto")
    expected = torch.cuda.is_available() or torch.version.cuda is not None or nvidia_device_node()
    return torch.device("cpu"), (f"no usable GPU ({problem}): merged on the CPU" if expected else None)


def _cuda_problem() -> str | None:
    """Why torch cannot merge on a GPU here, or None when it can (the CUDA context starts)."""
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    try:
        torch.cuda.mem_get_info()  # starts the context: a driver or architecture mismatch shows here
    except RuntimeError as e:
        return f"CUDA does not start: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
    return None


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` through ctypes, which releases the GIL while the call runs.

    ``mmap.madvise`` holds the GIL: a ``MADV_POPULATE_READ`` that waits for the disk would stall
    the writer thread for as long. None where there is no libc to load (the stdlib call is used).
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], fn)


_MADVISE = _libc_madvise()


class SourceFiles:
    """Read-only (copy-on-write, never written) mappings of the input files, opened on first use."""

    def __init__(self) -> None:
        self._open: dict[str, tuple[int, mmap.mmap, int]] = {}
        self._populate_ok = True
        self._lock = threading.Lock()  # the prefetch thread opens files too

    def get(self, path: str) -> tuple[int, mmap.mmap]:
        fd, mm, _ = self._get(path)
        return fd, mm

    def _get(self, path: str) -> tuple[int, mmap.mmap, int]:
        with self._lock:
            return self._open.get(path) or self._map(path)

    def _map(self, path: str) -> tuple[int, mmap.mmap, int]:
        if path not in self._open:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as e:
                os.close(fd)
                raise BadCheckpoint(f"{path}: cannot map ({e})") from e
            view = ctypes.c_char.from_buffer(mm)  # only to learn the address; released at once
            address = ctypes.addressof(view)
            del view
            self._open[path] = (fd, mm, address)
        return self._open[path]

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` bytes at ``offset`` of a file as a zero-copy uint8 tensor."""
        _, mm = self.get(path)
        return torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)

    def tensor(self, src: Source, first_elem: int, count: int) -> torch.Tensor:
        """Elements ``first_elem : first_elem + count`` of ``src`` as a zero-copy 1-D tensor."""
        _, mm = self.get(src.file)
        dtype = TORCH_DTYPES[src.dtype]
        size = torch.empty((), dtype=dtype).element_size()
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=src.offset + first_elem * size)

    def _advise(self, path: str, offset: int, nbytes: int, advice: int) -> bool:
        """madvise a byte range of a mapped file (widened to whole pages); False if the kernel refuses."""
        _, mm, address = self._get(path)
        start = offset - offset % mmap.PAGESIZE
        end = min(len(mm), offset + nbytes)
        if end <= start:
            return True
        if _MADVISE is not None:
            return _MADVISE(address + start, end - start, advice) == 0
        try:
            mm.madvise(advice, start, end - start)
        except OSError:
            return False
        return True

    def populate(self, path: str, offset: int, nbytes: int) -> None:
        """Map a byte range's pages in one call (MADV_POPULATE_READ) instead of one fault per page.

        The call waits for the disk without holding the GIL, so the writer thread keeps writing.
        """
        if self._populate_ok and not self._advise(path, offset, nbytes, MADV_POPULATE_READ):
            self._populate_ok = False  # kernels before 5.14: pages fault in one by one instead

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        """A tile is about to be read: map it in now (the merge's thread waits for the disk)."""
        self.populate(path, offset, nbytes)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        """Drop the mapped pages of a byte range from this process (they stay in the page cache)."""
        self._advise(path, offset, nbytes, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for fd, mm, _ in self._open.values():
            with contextlib.suppress(BufferError):  # a tensor still views it; the mapping goes with it
                mm.close()
            os.close(fd)
        self._open.clear()


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
    def load(src: Source) -> torch.Tensor:
        t = files.tensor(src, 0, src.nbytes // TORCH_DTYPES[src.dtype].itemsize).view(src.shape)
        out = t.to(device=device, dtype=ACCUMULATE, copy=True)
        del t
        files.release(src.file, src.offset, src.nbytes)
        return out

    return Factors(a=load(term.a), b=load(term.b), scale=term.scale, transpose=term.transpose)


class Prefetcher:
    """Faults input tiles into the mappings on its own thread, ``ahead`` tiles before the merge needs them.

    The readahead hint has the bytes on their way into the page cache; this maps them into the
    process (``MADV_POPULATE_READ``, waiting for the disk where it must) while the merge core
    computes the previous tile. At most ``ahead`` tiles beyond the one being merged are mapped, so
    the bound on resident input pages is ``ahead + 1`` tiles. :meth:`ready` is called for every
    tile in the order of ``ranges``.
    """

    def __init__(self, files: SourceFiles, ranges: list[tuple[str, int, int]], ahead: int = PREFETCH_TILES) -> None:
        self._files = files
        self._ranges = ranges
        self._ahead = ahead
        self._cond = threading.Condition()
        self._populated = 0  # tiles mapped in by the thread
        self._taken = 0  # tiles handed to the merge
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="streammerge-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for index, (path, offset, nbytes) in enumerate(self._ranges):
                with self._cond:
                    self._cond.wait_for(lambda i=index: self._stop or i < self._taken + self._ahead)  # type: ignore[misc]
                    if self._stop:
                        return
                with contextlib.suppress(OSError, StreamMergeError):  # a hint: the merge's own read reports real errors
                    self._files.populate(path, offset, nbytes)
                with self._cond:
                    self._populated = index + 1
                    self._cond.notify_all()
        finally:
            with self._cond:  # however the thread ends, nobody waits for it any more
                self._stop = True
                self._cond.notify_all()

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        """Wait until the next tile, which must be (path, offset, nbytes), is mapped in (or map it here)."""
        index = self._taken
        if index >= len(self._ranges) or self._ranges[index] != (path, offset, nbytes):
            raise AssertionError(f"prefetch order: tile {index} is {(path, offset, nbytes)}, expected another")
        with self._cond:
            self._cond.wait_for(lambda: self._stop or self._populated > index)
            self._taken = index + 1
            self._cond.notify_all()
            mapped = self._populated > index
        if not mapped:
            self._files.populate(path, offset, nbytes)

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        return self._files.raw(path, offset, nbytes)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        self._files.release(path, offset, nbytes)

    def close(self) -> None:
        """Stop the thread (after the tile it is mapping); safe to call twice."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()


class DirectInput:
    """Input tiles read with ``O_DIRECT`` by a :class:`~streammerge.direct.DirectTiles` thread, ahead
    of the merge; a tile it could not read directly is mapped in through ``files`` instead."""

    def __init__(self, files: SourceFiles, direct: DirectTiles) -> None:
        self._files = files
        self._direct = direct
        self._mapped = False  # the tile in use came through the mapping

    def ready(self, path: str, offset: int, nbytes: int) -> None:
        self._mapped = not self._direct.ready(path, offset, nbytes)
        if self._mapped:
            self._files.populate(path, offset, nbytes)

    def raw(self, path: str, offset: int, nbytes: int) -> torch.Tensor:
        found = None if self._mapped else self._direct.view(path, offset, nbytes)
        if found is None:  # not read directly (or not inside the tile, which the merge never asks)
            self._mapped = True  # so that release() drops the mapped pages
            return self._files.raw(path, offset, nbytes)
        buffer, at = found
        return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=at)

    def release(self, path: str, offset: int, nbytes: int) -> None:
        self._direct.release(path, offset, nbytes)
        if self._mapped:
            self._files.release(path, offset, nbytes)

    def close(self) -> None:
        self._direct.close()


_TABLES: dict[tuple[bytes, str], torch.Tensor] = {}


def _nibble_table(quant_map: torch.Tensor) -> torch.Tensor:
    """:func:`~streammerge.kernels.nibble_table` of a quant map, built once per distinct map: every
    NF4 weight of a model has the same 16 values, and building the table took ~3 ms per weight."""
    key = (bytes(as_bytes(quant_map.cpu())), str(quant_map.device))
    if key not in _TABLES:
        if len(_TABLES) >= 8:
            _TABLES.clear()
        _TABLES[key] = nibble_table(quant_map)
    return _TABLES[key]


@dataclass
class _Dequantizer:
    """A quantized unit's statistics, loaded once per unit; produces dequantized row tiles."""

    quant: QuantSpec
    table: torch.Tensor | None
    scales: torch.Tensor

    @classmethod
    def load(cls, files: SourceFiles, quant: QuantSpec, device: torch.device) -> _Dequantizer:
        def load(src: Source | None) -> torch.Tensor:
            assert src is not None
            t = files.raw(src.file, src.offset, src.nbytes).view(TORCH_DTYPES[src.dtype]).to(device, copy=True)
            files.release(src.file, src.offset, src.nbytes)
            return t

        if quant.kind == "int8":
            return cls(quant, None, load(quant.scb))
        table = _nibble_table(load(quant.quant_map))
        if quant.nested_absmax is not None:
            nested_map = load(quant.nested_quant_map)
            scales = double_quant_scales(
                load(quant.absmax), nested_map, load(quant.nested_absmax), quant.nested_blocksize, quant.nested_offset
            )
        else:
            scales = load(quant.absmax)
        return cls(quant, table, scales)

    def tile(self, raw: torch.Tensor, unit: WorkUnit, row0: int, out: torch.Tensor, work: Workspace, role: str) -> None:
        """Rows ``row0 : row0 + len(out)`` of the weight, dequantized into ``out`` from their stored bytes ``raw``
        (temporaries from ``work`` under ``role``: one per merging thread)."""
        n = out.shape[0]
        first, count = row0 * unit.row_elems, n * unit.row_elems
        raw = raw.to(out.device)
        if self.table is None:  # int8: one byte per element, one scale per row
            dequant_int8(raw.view(torch.int8).view(n, unit.row_elems), self.scales[row0 : row0 + n], out, work, role)
        else:
            blocksize = self.quant.blocksize
            scales = self.scales[first // blocksize : (first + count + blocksize - 1) // blocksize]
            dequant_4bit(raw, self.table, scales, blocksize, out, work, role)


class _Requantizer:
    """Quantizes a unit's merged tiles back to 4 bit with bitsandbytes; writes the statistics at the end."""

    def __init__(self, unit: WorkUnit) -> None:
        import bitsandbytes.functional as bnb_f  # only plans with merged_4bit output pay for this import

        assert unit.requant is not None
        self.bnb = bnb_f
        self.unit = unit
        self.spec = unit.requant
        blocks = math.ceil(unit.rows * unit.row_elems / self.spec.blocksize)
        self.absmax = torch.empty(blocks, dtype=torch.float32)
        self.code: torch.Tensor | None = None

    def tile(self, merged: torch.Tensor, first: int) -> torch.Tensor:
        """Pack one merged float32 tile (starting on a block boundary); returns its codes (uint8, CPU)."""
        packed, state = self.bnb.quantize_4bit(
            merged.reshape(-1),
            blocksize=self.spec.blocksize,
            quant_type=self.spec.quant_type,
            compress_statistics=False,
            quant_storage=torch.uint8,
        )
        block0 = first // self.spec.blocksize
        self.absmax[block0 : block0 + state.absmax.numel()] = state.absmax.cpu()
        self.code = state.code.cpu()
        return packed.reshape(-1).cpu()

    def statistics(self) -> dict[str, bytes]:
        """The bytes of every statistics tensor, by name (the double quantization needs all block scales)."""
        assert self.code is not None
        spec, name = self.spec, self.unit.name
        stats: dict[str, torch.Tensor] = {name + ".quant_map": self.code}
        offset = 0.0
        if spec.double_quant:
            mean = self.absmax.mean()
            qabsmax, nested = self.bnb.quantize_blockwise(self.absmax - mean, blocksize=NESTED_BLOCKSIZE)
            offset = float(mean)
            stats |= {name + ".absmax": qabsmax, name + ".nested_absmax": nested.absmax, name + ".nested_quant_map": nested.code}
        else:
            stats[name + ".absmax"] = self.absmax
        out = {k: bytes(as_bytes(v.contiguous().cpu())) for k, v in stats.items()}
        out[f"{name}.quant_state.bitsandbytes__{spec.quant_type}"] = quant_state_bytes(spec, offset)
        return out


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
    if unit.quant is not None and unit.quant.kind != "int8":  # each half starts on a block boundary
        step = unit.quant.blocksize // math.gcd(unit.row_elems, unit.quant.blocksize)
    half = rows // 2 // step * step
    return half if 0 < half < rows else 0


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
    thread when one is given (each half dequantized and merged on one core).
    """
    src = unit.source
    stage = out if isinstance(out, Staging) else None
    tiles = tiles or files
    if unit.op == "copy":
        fd, _ = files.get(src.file)
        out.copy(unit.shard, unit.offset, unit.name, fd, src.offset, src.nbytes)
        advance(src.nbytes)
        return
    out_dtype = TORCH_DTYPES[unit.out_dtype]
    out_size = out_dtype.itemsize
    factors = [_load_factors(files, term, work.device) for term in unit.lora]
    if unit.combination == "linear" and len(factors) > 1:
        factors = [combine_linear(factors)]
    magnitude = _load_vector(files, unit.magnitude, work.device) if unit.magnitude else None
    adds = [(_load_vector(files, a.source, work.device), a.scale) for a in unit.adds]
    acc = work.get("acc", ACCUMULATE, (unit.chunk_rows, unit.row_elems)) if factors else None
    dequant = _Dequantizer.load(files, unit.quant, work.device) if unit.quant else None
    requant = _Requantizer(unit) if unit.requant else None
    if requant is not None:
        out_dtype, out_size = torch.float32, 4  # the merged tile, before bitsandbytes packs it
    on_cpu = work.device.type == "cpu"

    def load(r0: int, k: int, role: str, threads: int | None) -> torch.Tensor:
        """Rows ``r0 : r0 + k`` of the base weight as the merge reads them (dequantized, on the device)."""
        raw = tiles.raw(*tile_range(unit, r0, k))
        if stage is not None:
            raw = stage.to_device(raw, work.get("staged" + role, torch.uint8, (raw.numel(),)))
        if dequant is not None:
            tile = work.get("dequant" + role, TORCH_DTYPES[unit.base_dtype], (k, unit.row_elems))
            with _torch_threads(threads):
                dequant.tile(raw, unit, r0, tile, work, role)
            return tile
        tile = raw.view(TORCH_DTYPES[src.dtype]).view(k, unit.row_elems)
        if unit.base_dtype != src.dtype:  # a base weight saved with the adapter: as loaded into the base
            tile = tile.to(TORCH_DTYPES[unit.base_dtype])
        return tile

    for row0 in range(0, unit.rows, unit.tile_rows):
        n = min(unit.tile_rows, unit.rows - row0)
        first, count = row0 * unit.row_elems, n * unit.row_elems
        shape = (n, unit.row_elems)
        stored = tile_range(unit, row0, n)
        tiles.ready(*stored)
        half = split_rows(unit, n) if helper is not None and stage is None and requant is None else 0
        tile = load(row0, n, "", DEQUANT_THREADS if on_cpu else None) if not half else None
        if requant is not None:
            assert tile is not None
            result = work.get("requant", out_dtype, shape)
            _compute(tile, factors, row0, acc, result, magnitude, adds, first)
            packed = requant.tile(result, first)
            buffer = out.acquire()
            at = unit.offset + first // 2
            start = aligned_start(at)
            torch.frombuffer(buffer, dtype=torch.uint8, count=packed.numel(), offset=start).copy_(packed)
            out.write(unit.shard, at, unit.name, buffer, packed.numel(), start)
            written = packed.numel()
        else:
            buffer = out.acquire()
            at = unit.offset + first * out_size
            start = aligned_start(at, out_size)
            host = torch.frombuffer(buffer, dtype=out_dtype, count=count, offset=start).view(shape)
            result = host if stage is None else work.get("out", out_dtype, shape)
            if tile is not None:
                _compute(tile, factors, row0, acc, result, magnitude, adds, first)
            else:  # the helper thread merges the second half of the rows while this one merges the first

                def second(h: int = half, r0: int = row0, out_rows: torch.Tensor = result) -> None:
                    with torch.inference_mode():
                        acc2 = work.get("acc2", ACCUMULATE, (unit.chunk_rows, unit.row_elems)) if factors else None
                        rest = load(r0 + h, out_rows.shape[0] - h, "2", None)
                        _compute(rest, factors, r0 + h, acc2, out_rows[h:], magnitude, adds, (r0 + h) * unit.row_elems)

                assert helper is not None
                done = helper.submit(second)
                try:
                    _compute(load(row0, half, "", None), factors, row0, acc, result[:half], magnitude, adds, first)
                finally:
                    concurrent.futures.wait([done])  # never hand on a buffer the helper still writes
                done.result()
            if stage is not None:
                stage.write_from_device(result, host, unit.shard, at, unit.name, buffer, start)
            else:
                out.write(unit.shard, at, unit.name, buffer, count * out_size, start)
            del host
            written = count * out_size
        del tile, result
        tiles.release(*stored)
        advance(written)
    if requant is not None:
        slots = {x.name: x for x in unit.extra}
        for name, data in requant.statistics().items():
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


class _VramCap:
    """The GPU memory budget of a run, checked against the plan and enforced on torch's allocator.

    The budget is ``vram_budget`` or :data:`VRAM_FRACTION` of the memory free when the run starts.
    A plan whose estimate exceeds it is refused on construction, before anything is written.
    While :meth:`apply` holds, the caching allocator may reserve at most the budget on top of what
    the process already held (``set_per_process_memory_fraction``), so a wrong estimate fails with
    an error, never by taking more; :meth:`lift` restores the previous fraction. The allocator's
    peak statistics are reset, so :meth:`peak` measures this run.
    """

    def __init__(self, plan: Plan, vram_budget: int | None) -> None:
        free, self._total = torch.cuda.mem_get_info()
        self.budget = vram_budget if vram_budget is not None else int(free * VRAM_FRACTION)
        if plan.estimate.peak_device_bytes > self.budget:
            raise BudgetTooSmall(
                f"{plan.out}: the merge needs {plan.estimate.peak_device_bytes} bytes of GPU memory, the budget is {self.budget} "
                f"({free} free); plan with --vram-budget (smaller tiles) or use --device cpu"
            )
        self._before: float | None = None
        self._held = 0

    def apply(self) -> None:
        torch.backends.cuda.matmul.allow_tf32 = False  # no TF32 shortcuts: the CPU's exact arithmetic
        getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        self._before = float(getter()) if getter is not None else 1.0
        self._held = torch.cuda.memory_reserved()
        torch.cuda.set_per_process_memory_fraction(min(1.0, (self._held + self.budget) / self._total))
        torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        """The most the allocator reserved beyond what the process held when the run started."""
        return max(0, torch.cuda.max_memory_reserved() - self._held)

    def lift(self) -> None:
        if self._before is not None:
            torch.cuda.set_per_process_memory_fraction(self._before)
            self._before = None


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
    reads: str = "auto",
    direct: DirectTiles | None = None,
) -> Report:
    """Execute ``plan``: write the merged model to ``plan.out``, atomically.

    The output appears only when complete; on any error (or Ctrl-C) the partial folder is removed
    and the error re-raised. ``device`` overrides the plan's device ("auto", "cpu", "cuda").
    ``readahead`` is a :class:`~streammerge.readahead.Readahead`, started early (one is made if not).
    With ``resume``, an ``OUT.partial`` left by an interrupted run of the same plan is continued:
    only the units its journal does not list are redone. ``reads`` is how base tiles come in
    (:data:`~streammerge.direct.READ_MODES`: ``auto`` reads them with ``O_DIRECT`` unless they
    are mostly in the page cache already or the filesystem refuses it); ``direct`` is a :class:`~streammerge.direct.DirectTiles`
    already started on this plan's tiles (it is used if its tiles are the ones left to do, and closed).

    Example::

        plan = streammerge.plan("./base", ["./my-lora"], out="./merged")
        report = streammerge.run(plan)
        print(f"{report.bytes_written / report.seconds / 1e6:.0f} MB/s")
    """
    start = time.perf_counter()
    check_inputs_unchanged(plan)
    check_output(plan.out, [plan.base, *plan.adapters], plan.overwrite)
    preflight.check(plan)
    dev, fallback = resolve_device(device or plan.device)
    direct_reads = direct is not None or use_direct(plan, reads)  # given a started DirectTiles, the caller has chosen
    cap = _VramCap(plan, vram_budget) if dev.type == "cuda" else None
    total = sum(u.nbytes for u in plan.units)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total, current)

    current = ""
    ahead = readahead or Readahead(plan, skip_tiles=direct_reads)
    ahead.start()
    consumed = 0
    writer = Writer(plan, resume=resume)
    files = SourceFiles()
    work = Workspace(dev)
    threads = torch.get_num_threads()
    # One core merges (cache-sized chunks do not gain from more threads); the writer thread
    # keeps the other core busy with the disk.
    torch.set_num_threads(1)
    queue: WriteQueue | None = None
    tiles: Prefetcher | DirectInput | None = None
    # On the CPU a second thread merges half of every large tile (see split_rows).
    two_cores = dev.type == "cpu" and MERGE_THREADS > 1
    helper = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="streammerge-merge") if two_cores else None
    try:
        if cap is not None:
            cap.apply()
        writer.open()
        staged = _staged(dev)
        pool = pinned_buffer if staged and dev.type == "cuda" else None
        queue = WriteQueue(writer, plan.write_buffers, out_tile_bytes(plan.units), allocate=pool)
        # On a GPU, up to two merged tiles may be on their way back while the next is staged.
        keep = max(1, min(2, plan.write_buffers - 1))
        sink: Sink = Staging(queue, dev, in_tile_bytes(plan.units), slots=STAGING_SLOTS, keep=keep) if staged else queue
        resumed = len(writer.done)
        todo = [u for i, u in enumerate(plan.units) if i not in writer.done]
        ranges = tile_ranges(todo)
        if direct_reads:
            if direct is None or direct.ranges != ranges:
                if direct is not None:
                    direct.close()
                direct = DirectTiles(ranges, ahead=PREFETCH_TILES)
            direct.start()
            tiles = DirectInput(files, direct)
        else:
            tiles = Prefetcher(files, ranges)
        with torch.inference_mode():
            for index, unit in enumerate(plan.units):
                current = unit.name
                if index in writer.done:  # finished by the interrupted run this one resumes
                    advance(unit.nbytes + sum(x.nbytes for x in unit.extra))
                else:
                    _run_unit(unit, files, sink, work, advance, tiles, helper)
                    sink.commit(unit, index)
                consumed += unit.read_bytes
                ahead.advance(consumed)
            if isinstance(sink, Staging):
                sink.flush()
        tiles.close()
        queue.close()
        files.close()
        writer.finish()
    except BaseException as e:
        if tiles is not None:
            tiles.close()
        if direct is not None:
            direct.close()
        if queue is not None:
            queue.cancel()
            queue.flush_on_failure()
        files.close()
        kept = writer.abort()
        error: BaseException = e
        if cap is not None and isinstance(e, torch.OutOfMemoryError):
            error = BudgetTooSmall(
                f"{plan.out}: the GPU memory budget ({cap.budget} bytes) ran out at {current}, above the plan's estimate of "
                f"{plan.estimate.peak_device_bytes}; plan with a smaller --tile-size, or use --device cpu"
            )
        if kept and isinstance(error, (StreamMergeError, OSError)):
            raise OutputError(
                f"{error}; the finished part is kept in {writer.partial}: run the same command with --resume to continue, or remove it"
            ) from e
        if error is not e:
            raise error from e
        raise
    finally:
        if helper is not None:
            helper.shutdown()
        torch.set_num_threads(threads)
        ahead.close()
        if cap is not None:
            cap.lift()
    return Report(
        out=plan.out,
        device=str(dev),
        seconds=time.perf_counter() - start,
        bytes_written=sum(s.size for s in plan.shards),
        units=dict(Counter(u.op for u in plan.units)),
        peak_rss_bytes=_peak_rss_bytes(),
        notes=plan.notes
        + ((fallback,) if fallback else ())
        + ((f"resumed: {resumed} of {len(plan.units)} units were already done",) if resumed else ()),
        peak_device_bytes=cap.peak() if cap is not None else 0,
        device_budget_bytes=cap.budget if cap is not None else 0,
        reads="direct" if direct_reads else "mmap",
    )
