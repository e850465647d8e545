"""Tile geometry and the IO constants that the planner, the readers, the executor and the writer share.

A computed unit is a ``(rows, row_elems)`` matrix processed ``tile_rows`` rows at a time; these
pure functions say which input bytes a tile reads, how large the reusable buffers must be, and
where in a buffer a tile goes so that direct IO can use it. The planner sizes its estimate with
the same functions the run uses to allocate, so the two cannot drift apart. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from streammerge.formats.safetensors import DTYPE_SIZES

if TYPE_CHECKING:
    from streammerge.plan.model import WorkUnit

ALIGN = 4096
"""Offset, length and memory alignment of every direct (``O_DIRECT``) read and write: the largest
common logical block size. Each output buffer has this much room beyond a tile, so that the tile
can start at its file offset's block alignment."""
WRITE_BUFFERS = 3
"""Output tiles in flight: one being computed, the others queued for or being written."""
PREFETCH_TILES = 1
"""Input tiles read (or mapped in) ahead of the one being merged, by the executor's reading thread.
More did not help: 3B cold runs with 1, 2 and 3 tiles ahead took 9.4, 9.9 and 10.4 s (one run each,
within this disk's drift)."""
STAGING_SLOTS = 2
"""Pinned host slots an input tile passes through on its way to the GPU (:mod:`streammerge.staging`)."""
COPY_FALLBACK_BYTES = 8 * 2**20
"""Chunk for copying untouched tensors where the kernel cannot copy file to file."""
ACC_CHUNK_BYTES = 4 * 2**20
"""float64 accumulator rows merged at once: small enough to stay in a CPU's L2/L3 cache."""
ACC_SIZE = 8
"""Bytes per element of the float64 accumulator (see streammerge.kernels.ACCUMULATE)."""

Range = tuple[str, int, int]
"""(file, offset, length) of one input tile."""


def tile_range(unit: WorkUnit, row0: int, rows: int) -> Range:
    """The input bytes (file, offset, length) that rows ``row0 : row0 + rows`` of a computed unit read."""
    src = unit.source
    first, count = row0 * unit.row_elems, rows * unit.row_elems
    if unit.quant is not None and unit.quant.kind in ("int8", "fp8"):  # one byte per element
        return src.file, src.offset + first, count
    if unit.quant is not None:  # two 4-bit codes per byte; tiles start on a block boundary
        start, end = first // 2, (first + count + 1) // 2
        return src.file, src.offset + start, end - start
    size = DTYPE_SIZES[src.dtype]
    return src.file, src.offset + first * size, count * size


def tile_ranges(units: Sequence[WorkUnit]) -> list[Range]:
    """Every input tile the computed units among ``units`` read, in the order the executor reads them."""
    return [tile_range(u, row0, min(u.tile_rows, u.rows - row0)) for u in units if u.op != "copy" for row0 in range(0, u.rows, u.tile_rows)]


def out_tile_bytes(units: Sequence[WorkUnit]) -> int:
    """Size of one output tile buffer: the largest output tile of any computed unit."""
    return max((u.tile_rows * out_row_bytes(u) for u in units if u.op != "copy"), default=0)


def out_row_bytes(unit: WorkUnit) -> int:
    """Bytes of one output row of a computed unit (GGUF: in its GGUF type, e.g. 34 per 32 Q8_0 elements)."""
    return unit.gguf.row_bytes if unit.gguf is not None else unit.row_elems * DTYPE_SIZES[unit.out_dtype]


def in_tile_bytes(units: Sequence[WorkUnit]) -> int:
    """Input bytes of the largest input tile of any computed unit (packed bytes for a quantized base)."""
    return max((u.tile_rows * u.row_elems * DTYPE_SIZES[u.source.dtype] for u in units if u.op != "copy"), default=0)


def acc_chunk_bytes(units: Sequence[WorkUnit]) -> int:
    """Size of one float64 accumulator: the largest chunk of any merge."""
    return max((u.chunk_rows * u.row_elems * ACC_SIZE for u in units if u.op == "merge"), default=0)


def aligned_start(offset: int, itemsize: int = 1) -> int:
    """Where in a pool buffer to put data bound for file ``offset``: at ``offset % ALIGN``, so the
    buffer's memory shares the file's block alignment and the writer can write it directly. 0 when
    that start would misalign elements of ``itemsize`` bytes (the writer then uses the page cache)."""
    start = offset % ALIGN
    return start if start % itemsize == 0 else 0


def aligned_span(offset: int, nbytes: int) -> tuple[int, int]:
    """The (start, length) of the whole :data:`ALIGN` blocks that cover ``nbytes`` at ``offset``."""
    start = offset - offset % ALIGN
    end = -(-(offset + nbytes) // ALIGN) * ALIGN
    return start, end - start
