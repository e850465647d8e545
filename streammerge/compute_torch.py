"""The torch compute backend: every unit, on the CPU or a GPU (4/8-bit bases, DoRA, re-quantization).

A tile goes to the device, is dequantized there when the base is 4/8-bit, merged by
:mod:`streammerge.kernels` (float64 accumulation, one rounding), and its bytes come back into a
write buffer. Importing this module imports torch (2-3 s of CPU); :mod:`streammerge.execute`
does it on a background thread when the plan lets numpy start the merge meanwhile.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from streammerge.errors import BudgetTooSmall, StreamMergeError
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
from streammerge.plan import NESTED_BLOCKSIZE, LoraTerm, Plan, QuantSpec, Source, WorkUnit, quant_state_bytes
from streammerge.sources import Pages, SourceFiles, tiles
from streammerge.write import Sink, aligned_start

DEQUANT_THREADS = min(2, os.cpu_count() or 1)
"""CPU threads that dequantize a tile (gathers and scaling split well; the merge itself runs on one)."""

VRAM_FRACTION = 0.8
"""Without --vram-budget, a run may use this fraction of the GPU memory free when it starts."""


def _raw(files: SourceFiles, path: str, offset: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` bytes at ``offset`` of an input file as a zero-copy uint8 tensor."""
    return torch.frombuffer(files.view(path, offset, nbytes), dtype=torch.uint8)


def _elements(files: SourceFiles, src: Source, first_elem: int, count: int) -> torch.Tensor:
    """Elements ``first_elem : first_elem + count`` of ``src`` as a zero-copy 1-D tensor."""
    return torch.frombuffer(files.elements(src, first_elem, count), dtype=TORCH_DTYPES[src.dtype])


class TorchBackend:
    """Computes units with torch on ``device`` (a CUDA device, or the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.device = str(device)
        self.work = Workspace(device)
        self._threads = torch.get_num_threads()
        # One core merges (cache-sized chunks do not gain from more threads); the writer thread
        # keeps the other core busy with the disk.
        torch.set_num_threads(1)

    @classmethod
    def for_run(cls, plan: Plan, device: str, vram_budget: int | None) -> TorchBackend:
        """The backend for a run of ``plan``: on a GPU, only if the plan's device memory fits the budget."""
        dev = resolve_device(device)
        if dev.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # no TF32 shortcuts: the CPU's exact arithmetic
            free, _ = torch.cuda.mem_get_info()
            budget = vram_budget if vram_budget is not None else int(free * VRAM_FRACTION)
            if plan.estimate.peak_device_bytes > budget:
                raise BudgetTooSmall(
                    f"{plan.out}: the merge needs {plan.estimate.peak_device_bytes} bytes of GPU memory, the budget is {budget} "
                    f"({free} free); plan with --vram-budget (smaller tiles) or use --device cpu"
                )
        return cls(dev)

    def run_unit(self, unit: WorkUnit, files: SourceFiles, out: Sink, advance: Callable[[int], None], pages: Pages) -> None:
        with torch.inference_mode():
            _run_unit(unit, files, out, self.work, advance, pages)

    def close(self) -> None:
        torch.set_num_threads(self._threads)


def resolve_device(requested: str) -> torch.device:
    """``auto`` means CUDA when torch sees a GPU, else CPU; ``cuda`` without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise StreamMergeError("device 'cuda' was asked for but torch sees no usable GPU; use --device cpu or auto")
    return torch.device("cuda")


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
        t = _elements(files, src, 0, src.nbytes // TORCH_DTYPES[src.dtype].itemsize).view(src.shape)
        out = t.to(device=device, dtype=ACCUMULATE, copy=True)
        del t
        files.release(src.file, src.offset, src.nbytes)
        return out

    return Factors(a=load(term.a), b=load(term.b), scale=term.scale, transpose=term.transpose)


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
            t = _raw(files, src.file, src.offset, src.nbytes).view(TORCH_DTYPES[src.dtype]).to(device, copy=True)
            files.release(src.file, src.offset, src.nbytes)
            return t

        if quant.kind == "int8":
            return cls(quant, None, load(quant.scb))
        table = nibble_table(load(quant.quant_map))
        if quant.nested_absmax is not None:
            nested_map = load(quant.nested_quant_map)
            scales = double_quant_scales(
                load(quant.absmax), nested_map, load(quant.nested_absmax), quant.nested_blocksize, quant.nested_offset
            )
        else:
            scales = load(quant.absmax)
        return cls(quant, table, scales)

    def tile(self, raw: torch.Tensor, unit: WorkUnit, row0: int, out: torch.Tensor) -> None:
        """Rows ``row0 : row0 + len(out)`` of the weight, dequantized into ``out`` from their stored bytes ``raw``."""
        n = out.shape[0]
        first, count = row0 * unit.row_elems, n * unit.row_elems
        raw = raw.to(out.device)
        if self.table is None:  # int8: one byte per element, one scale per row
            dequant_int8(raw.view(torch.int8).view(n, unit.row_elems), self.scales[row0 : row0 + n], out)
        else:
            blocksize = self.quant.blocksize
            scales = self.scales[first // blocksize : (first + count + blocksize - 1) // blocksize]
            dequant_4bit(raw, self.table, scales, blocksize, out)


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


def _run_unit(unit: WorkUnit, files: SourceFiles, out: Sink, work: Workspace, advance: Callable[[int], None], pages: Pages) -> None:
    """Compute one unit into ``out``. ``pages(path, offset, nbytes)`` is called before each tile's
    input is read (a :meth:`~streammerge.sources.Prefetcher.ready`, or a plain populate)."""
    src = unit.source
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
    for row0, n, first, count, stored in tiles(unit):
        shape = (n, unit.row_elems)
        pages(*stored)
        if dequant is not None:
            tile = work.get("dequant", TORCH_DTYPES[unit.base_dtype], shape)
            with _torch_threads(DEQUANT_THREADS if on_cpu else None):
                dequant.tile(_raw(files, *stored), unit, row0, tile)
        else:
            tile = _elements(files, src, first, count).view(shape)
            if unit.base_dtype != src.dtype:  # a base weight saved with the adapter: as loaded into the base
                tile = tile.to(TORCH_DTYPES[unit.base_dtype])
            if not on_cpu:
                tile = work.get("in", tile.dtype, shape).copy_(tile)
        if requant is not None:
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
            result = host if on_cpu else work.get("out", out_dtype, shape)
            _compute(tile, factors, row0, acc, result, magnitude, adds, first)
            if not on_cpu:
                host.copy_(result)
            del host
            out.write(unit.shard, at, unit.name, buffer, count * out_size, start)
            written = count * out_size
        del tile, result
        files.release(*stored)
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
    t = _elements(files, src, 0, math.prod(src.shape)).to(device=device, dtype=ACCUMULATE, copy=True)
    files.release(src.file, src.offset, src.nbytes)
    return t
