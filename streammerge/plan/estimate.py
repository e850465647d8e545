"""The cost model: what one unit needs while it runs, and what the whole run needs at its peak.

One function, :func:`unit_cost`, says what a unit's tile costs per row and what the unit holds
for its whole run; the planner sizes tiles with it (``--tile-size`` bounds the per-row part) and
the estimate adds the same figure to the runtime and the shared buffers. Upper bounds, checked
against measured peaks by the tests and the benchmarks.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from streammerge.formats.safetensors import DTYPE_SIZES, tensor_nbytes
from streammerge.geometry import (
    ACC_SIZE,
    ALIGN,
    COPY_FALLBACK_BYTES,
    PREFETCH_TILES,
    STAGING_SLOTS,
    WRITE_BUFFERS,
    acc_chunk_bytes,
    in_tile_bytes,
    out_tile_bytes,
)
from streammerge.plan.model import GGUF_HEADER_PREFIX, CopyFile, Estimate, LoraTerm, Shard, WorkUnit
from streammerge.probe import merges_on_gpu, torch_is_gpu_build

RATES = {"startup_s": 0.2, "read_bytes_per_s": 1.0e9, "write_bytes_per_s": 0.45e9, "merge_s_per_elem": 2e-9, "dequant_s_per_elem": 2.5e-9}
"""Measured on the benchmark machines (docs/benchmarks.md: 2-core EPYC and Xeon, virtual disks):
cold reads and writes with fsync on the slower (EPYC) disk (reads and writes share the disk, so
their times add up); the float64 merge and 4-bit dequantization on two merging threads while the
disk threads run (3B cold on the Xeon: 13-14 s for a bf16 base, 13-15 s from NF4); a run's fixed
costs once torch is imported (the import itself, 1-3 s, comes before and is not counted, as in
:attr:`~streammerge.execute.Report.seconds`). Computing overlaps the disk, so the estimate is the
slower of the two plus the fixed costs."""
RUNTIME_BASE_BYTES = 320 * 2**20
"""Resident memory of the interpreter with torch imported, before any tensor: 219 MiB measured with
torch 2.13.0+cpu on Python 3.11 (a whole merge of a 1.5 MiB model peaked at ~250 MiB), padded."""
TRANSFORMERS_NAMING_BYTES = 192 * 2**20
"""Planning that names a checkpoint's keys through transformers (MoE, VLMs: see plan/naming.py) imports it and
builds the model on the meta device in the merging process: +124-126 MiB measured (gpt-oss, DeepSeek-V3,
Qwen3-VL-MoE, transformers 5.25), padded."""
BNB_IMPORT_BYTES = 160 * 2**20
"""Importing bitsandbytes (only for merged_4bit output) adds ~130 MB of resident memory here."""
GGUF_RUNTIME_BYTES = 192 * 2**20
"""GGUF output: transformers and tokenizers imported to read a tokenizer.json vocabulary as the converter does
(a 21-tensor GGUF merge peaked ~90 MiB above its safetensors twin here), and the vocabulary as Python
lists while the header is laid out (tens of MB for a 128k-token vocabulary), padded. The header bytes
themselves are counted from the plan (held as text and as bytes)."""
TORCH_GPU_BUILD_BYTES = 384 * 2**20
"""Importing a CUDA (or ROCm) build of torch maps more than the CPU build, GPU or not: the same
CPU run peaked at 524 MiB with torch 2.11+cu130 against 249 MiB with 2.13.0+cpu."""
CUDA_RUNTIME_BYTES = 512 * 2**20
"""A GPU run's resident memory beyond that: the CUDA context and cuBLAS (a whole 1B run on an H200
peaked at 875 MiB: 344 MiB on the CPU build, ~275 MiB for the CUDA build, the staging slots, the rest)."""
DEVICE_ALLOCATOR_SLACK_BYTES = 64 * 2**20
"""What torch's CUDA caching allocator may reserve beyond the live buffers of a GPU run: it carves
allocations of 1-10 MiB from 20 MiB segments and rounds larger ones up to 2 MiB."""
PER_UNIT_BOOKKEEPING_BYTES = 4096
"""Plan objects and progress state per work unit, resident for the whole run."""
QUANT_ROW_COST = {"nf4": 4 + 4 + 1, "fp4": 4 + 4 + 1, "int8": 4 + 4, "fp8": 4 + 1, "mxfp4": 2 + 4 + 1}
"""Temporaries per element while dequantizing a tile: float32 values, indices or int8 widening (FP8: the
float32 product and its block scales expanded over the rows; MXFP4: a code index per byte and the float32
values before their transpose), slack."""
REQUANT_ELEM_BYTES = 4 + 2
"""Per element of a tile re-quantized to 4 bit: the merged tile in float32, then bitsandbytes'
packed codes and temporaries."""
FP8_REQUANT_ELEM_BYTES = 4 + 4 + 1 + 1 + 2
"""Per element of a tile re-quantized to FP8: the merged tile in float32, the float32 scaled copy
(padded to whole blocks at the edges), the codes and their CPU copy, slack for the block reductions."""
GGUF_ELEM_BYTES = 4 + 4 + 4 + 12
"""GGUF output, per element of a tile: the float32 (or float16) copy, the un-permuted copy, the shifted
copy, and ``gguf.quants``' numpy temporaries (bf16 rounding goes through uint32 and uint64 arrays;
Q8_0 scales and rounds in float32)."""
MXFP4_REQUANT_ELEM_BYTES = 4 + 4 + 1 + 4 + 1 + 1 + 1
"""Per element of a tile re-quantized to MXFP4: the merged tile in float32, its transposed float32 copy, the
signs, the int32 code indices, the codes, the packed blocks with their CPU copy, slack for the group reductions."""


@dataclass(frozen=True)
class UnitCost:
    """What a unit needs while it runs: ``per_row`` bytes for each row of its tile, ``fixed`` for the whole unit."""

    per_row: int
    fixed: int

    def at(self, tile_rows: int) -> int:
        return tile_rows * self.per_row + self.fixed


def unit_cost(u: WorkUnit) -> UnitCost:
    """The memory of one unit: per row of a tile, its input bytes (packed, read or mapped), the
    source rounded to the base's dtype or dequantized with its temporaries, and the output row;
    for the whole unit, the float64 accumulator chunk, the LoRA factors, the quantization
    statistics and the vectors (DoRA magnitudes, added biases). Copies cost nothing here (the
    kernel copies them file to file)."""
    if u.op == "copy":
        return UnitCost(0, 0)
    out_size = DTYPE_SIZES.get(u.out_dtype, 1)
    if u.requant is not None:
        out_size = {"fp8": FP8_REQUANT_ELEM_BYTES, "mxfp4": MXFP4_REQUANT_ELEM_BYTES}.get(u.requant.quant_type, REQUANT_ELEM_BYTES)
    if u.quant is not None:
        per_row = u.row_elems * (1 + DTYPE_SIZES[u.base_dtype] + QUANT_ROW_COST[u.quant.kind] + out_size)
    else:
        per_row = u.row_elems * (DTYPE_SIZES.get(u.source.dtype, 1) + out_size)
        if u.source.dtype != u.base_dtype:
            per_row += u.row_elems * DTYPE_SIZES[u.base_dtype]  # the source rounded to the base's dtype
    if u.gguf is not None:  # the merged row in the model dtype, then the converter's float copies and quantizer temporaries
        per_row += u.gguf.row_bytes - u.row_elems * out_size + u.row_elems * (DTYPE_SIZES[u.gguf.merge_dtype] + GGUF_ELEM_BYTES)
    fixed = sum(_factor_bytes(t) for t in u.lora)
    if u.combination == "linear":  # the weighted sums of the A's and of the B's, and their temporaries
        fixed += 3 * sum(math.prod(t.a.shape) + math.prod(t.b.shape) for t in u.lora) * ACC_SIZE
    if u.op == "merge":
        fixed += u.chunk_rows * u.row_elems * ACC_SIZE
    if u.quant is not None:
        fixed += _stats_bytes(u)
    if u.requant is not None:  # the block scales kept for the whole unit, and the statistics written at its end
        fixed += u.requant.blocks * 4 * 3 + sum(tensor_nbytes(t.dtype, t.shape) for t in u.requant.stats(u.name))
    if u.magnitude is not None:
        fixed += u.rows * ACC_SIZE * 2
    fixed += sum(3 * ACC_SIZE * math.prod(a.source.shape) for a in u.adds)
    fixed += sum(ACC_SIZE * (math.prod(r.source.shape) + len(r.indices)) + r.source.nbytes for r in u.token_rows)
    return UnitCost(per_row, fixed)


def unit_bytes(u: WorkUnit) -> int:
    """:func:`unit_cost` of a unit at its planned tile size."""
    return unit_cost(u).at(u.tile_rows)


def _factor_bytes(term: LoraTerm) -> int:
    """A and B held in float64 for the whole unit, plus their mapped pages while being read."""
    elems = math.prod(term.a_shape) + math.prod(term.b_shape)
    return elems * ACC_SIZE + term.a.nbytes + term.b.nbytes


def _stats_bytes(u: WorkUnit) -> int:
    """Bytes of the statistics held for the whole unit (scales in float32 plus what they come
    from, and the 1 MiB table that decodes pairs of 4-bit bytes)."""
    q = u.quant
    assert q is not None
    if q.scale is not None:  # the stored scales, their float32 grid and the validity masks
        return q.scale.nbytes + math.prod(q.scale.shape) * (4 + 4)
    if q.scb is not None:
        return 2 * q.scb.nbytes
    assert q.absmax is not None
    blocks = math.prod(q.absmax.shape)
    return blocks * 4 + q.absmax.nbytes + (blocks * 8 if q.nested_absmax is not None else 0) + 4096 + 65536 * 4 * 4


def dequant_costs(units: Sequence[WorkUnit]) -> tuple[int, int]:
    """(largest dequantized tile with its temporaries, largest statistics of one unit) of the quantized units."""
    tile = max(
        (u.tile_rows * u.row_elems * (DTYPE_SIZES[u.base_dtype] + QUANT_ROW_COST[u.quant.kind]) for u in units if u.quant), default=0
    )
    return tile, max((_stats_bytes(u) for u in units if u.quant), default=0)


def estimate_run(
    units: Sequence[WorkUnit],
    shards: Sequence[Shard],
    copy_files: Sequence[CopyFile],
    config: dict[str, Any] | None,
    tile_bytes: int,
    device: str,
    imported_transformers: bool = False,
) -> Estimate:
    """Upper bounds for the run.

    Peak RSS = runtime (interpreter + torch) + per-unit bookkeeping + the shared buffers (the
    output tiles in flight, the second merging thread's accumulator, the copy chunk, the input
    tiles read ahead) + the largest :func:`unit_bytes`, + transformers when planning imported it, + the tokenizer's
    import and the header for GGUF output. A GPU build of torch costs more at import;
    a run on a GPU adds the CUDA runtime and the pinned staging slots.
    """
    computed = [u for u in units if u.op != "copy"]
    largest = max(units, key=unit_bytes)
    peak_unit = unit_bytes(largest) if computed else 0
    requant_tile = max((u.tile_rows * u.row_elems * 4 for u in units if u.requant), default=0)
    # The input tiles ahead of the merge (mapped, or read with O_DIRECT into buffers that also
    # hold the block-aligned edges of every tile, the current one included).
    prefetched = PREFETCH_TILES * in_tile_bytes(units) + (PREFETCH_TILES + 1) * 2 * ALIGN
    buffers = WRITE_BUFFERS * (out_tile_bytes(units) + ALIGN) + acc_chunk_bytes(units) + COPY_FALLBACK_BYTES + prefetched
    host = RUNTIME_BASE_BYTES + PER_UNIT_BOOKKEEPING_BYTES * len(units) + buffers + peak_unit
    if any(u.requant and u.requant.quant_type not in ("fp8", "mxfp4") for u in units):
        host += BNB_IMPORT_BYTES
    if imported_transformers:  # resident in a merge that planned in the same process (an upper bound for `run`)
        host += TRANSFORMERS_NAMING_BYTES
    gguf_headers = [len(s.header) for s in shards if s.header.startswith(GGUF_HEADER_PREFIX)]
    if gguf_headers:  # the tokenizer's import, the headers held as base64 text, one as bytes while it is written
        host += GGUF_RUNTIME_BYTES + sum(gguf_headers) + max(gguf_headers)
    if torch_is_gpu_build():
        host += TORCH_GPU_BUILD_BYTES
    if computed and merges_on_gpu(device):
        host += CUDA_RUNTIME_BYTES + STAGING_SLOTS * in_tile_bytes(units)
    # On a GPU: the largest unit's tile and what it holds, a second re-quantized tile on its way
    # back, and what the caching allocator reserves around them.
    device_bytes = 0 if device == "cpu" or not computed else peak_unit + requant_tile + DEVICE_ALLOCATOR_SLACK_BYTES
    meta = len(json.dumps(config or {}, indent=2)) + 64 * len(units) + 4096
    output = sum(s.size for s in shards) + sum(os.path.getsize(c.src) for c in copy_files) + meta
    read = sum(u.read_bytes for u in units)
    merged = sum(u.rows * u.row_elems for u in units if u.op == "merge")
    dequantized = sum(u.rows * u.row_elems for u in units if u.quant is not None)
    seconds = RATES["startup_s"] + max(
        read / RATES["read_bytes_per_s"] + output / RATES["write_bytes_per_s"],
        merged * RATES["merge_s_per_elem"] + dequantized * RATES["dequant_s_per_elem"],
    )
    return Estimate(
        peak_host_bytes=host,
        peak_device_bytes=device_bytes,
        output_bytes=output,
        read_bytes=read,
        tile_bytes=tile_bytes,
        units=dict(Counter(u.op for u in units)),
        largest_unit=largest.name,
        seconds=round(seconds, 2),
    )
