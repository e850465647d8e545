"""Quantized weights tile by tile: dequantize a base weight's rows, quantize merged rows back.

:class:`Dequantizer` loads a unit's statistics once (block scales, double-quantized scales, the
code table; FP8 block scales, checked finite and positive) and dequantizes each tile from its
stored bytes with :mod:`streammerge.kernels`; :class:`Requantizer` packs merged float32 tiles with
bitsandbytes' own quantizer, :class:`FP8Requantizer` into FP8 with fresh block scales,
:class:`MXFP4Requantizer` whole experts into MXFP4 blocks with fresh exponents, and each produces
the statistics tensors at the end of the unit, laid out as the plan fixed them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from streammerge.errors import BadCheckpoint, StreamMergeError
from streammerge.formats.bnb import ABSMAX, NESTED_ABSMAX, NESTED_BLOCKSIZE, NESTED_QUANT_MAP, QUANT_MAP, state_name
from streammerge.formats.safetensors import Source
from streammerge.inputs.mapped import SourceFiles
from streammerge.kernels import (
    TORCH_DTYPES,
    Workspace,
    as_bytes,
    dequant_4bit,
    dequant_fp8,
    dequant_int8,
    dequant_mxfp4,
    double_quant_scales,
    fp4_pair_table,
    nibble_table,
    quant_fp8,
    quant_mxfp4,
)
from streammerge.plan.model import QuantSpec, WorkUnit
from streammerge.plan.quant import quant_state_bytes


def import_bnb_functional() -> Any:
    """``bitsandbytes.functional``, imported without the warning its CPU backend logs at import
    when an optional kernel repository is not trusted (we do not use that kernel): it would land in
    the middle of the progress bar. Only plans with merged_4bit output pay for this import."""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnb_f
    finally:
        noisy.setLevel(level)
    return bnb_f


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
class Dequantizer:
    """A quantized unit's statistics, loaded once per unit; produces dequantized row tiles."""

    quant: QuantSpec
    table: torch.Tensor | None
    scales: torch.Tensor

    @classmethod
    def load(cls, files: SourceFiles, quant: QuantSpec, device: torch.device) -> Dequantizer:
        def load(src: Source | None) -> torch.Tensor:
            assert src is not None
            t = files.raw(src.file, src.offset, src.nbytes).view(TORCH_DTYPES[src.dtype]).to(device, copy=True)
            files.release(src.file, src.offset, src.nbytes)
            return t

        if quant.kind == "int8":
            return cls(quant, None, load(quant.scb))
        if quant.kind == "fp8":
            assert quant.scale is not None
            return cls(quant, None, fp8_scales(load(quant.scale), quant))
        if quant.kind == "mxfp4":
            return cls(quant, fp4_pair_table(device), mxfp4_exponents(load(quant.scale), quant))
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
        if self.quant.kind == "mxfp4":
            assert self.table is not None
            k = self.quant.block_rows  # rows of one expert; tiles hold whole experts
            dequant_mxfp4(raw, self.scales[row0 // k : (row0 + n) // k], self.table, out.view(n, unit.row_elems), work, role)
        elif self.quant.kind == "fp8":
            q = self.quant
            dequant_fp8(raw, self.scales, row0, q.block_rows, q.block_cols, out.view(n, unit.row_elems), work, role)
        elif self.table is None:  # int8: one byte per element, one scale per row
            dequant_int8(raw.view(torch.int8).view(n, unit.row_elems), self.scales[row0 : row0 + n], out, work, role)
        else:
            blocksize = self.quant.blocksize
            scales = self.scales[first // blocksize : (first + count + blocksize - 1) // blocksize]
            dequant_4bit(raw, self.table, scales, blocksize, out, work, role)


def fp8_scales(raw: torch.Tensor, quant: QuantSpec) -> torch.Tensor:
    """An FP8 weight's scales as a float32 (grid rows, grid columns) tensor; a NaN, infinite, zero or negative
    scale is refused with the file and tensor named (it would silently zero or poison its block)."""
    assert quant.scale is not None
    values = raw.float().reshape(-1)
    bad = ~(torch.isfinite(values) & (values > 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise BadCheckpoint(
            f"{quant.scale.file}: tensor {quant.scale_name!r}: FP8 scale {i} is {float(values[i])} "
            f"({int(bad.sum())} of {values.numel()} scales are not finite and positive)"
        )
    shape = quant.scale.shape  # per-tensor and per-channel scales may be stored flat: one grid column
    return values.view(-1, shape[1] if len(shape) == 2 else 1)


def mxfp4_exponents(raw: torch.Tensor, quant: QuantSpec) -> torch.Tensor:
    """An MXFP4 parameter's E8M0 exponents as uint8 (E, N, K / 32); 255 (E8M0's NaN) is refused with
    the file and tensor named (it would poison its 32 values)."""
    assert quant.scale is not None
    exponents = raw.view(torch.uint8).view(quant.scale.shape)
    bad = exponents == 255
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise BadCheckpoint(
            f"{quant.scale.file}: tensor {quant.scale_name!r}: MXFP4 scale {i} is 0xFF, E8M0's NaN "
            f"({int(bad.sum())} of {exponents.numel()} scales)"
        )
    return exponents


class FP8Requantizer:
    """Quantizes a unit's merged float32 tiles into FP8 with a fresh scale per block; the scales are written at the end."""

    def __init__(self, unit: WorkUnit, work: Workspace) -> None:
        assert unit.requant is not None
        self.unit = unit
        self.spec = unit.requant
        self.work = work
        grid = (-(-self.spec.logical_shape[0] // self.spec.block_rows), -(-self.spec.logical_shape[1] // self.spec.block_cols))
        self.scales = torch.empty(grid, dtype=TORCH_DTYPES[self.spec.scale_dtype])

    def tile(self, merged: torch.Tensor, first: int) -> torch.Tensor:
        """FP8 codes (uint8, CPU) of one merged float32 tile starting on a block row."""
        spec = self.spec
        row0 = first // spec.logical_shape[1]
        codes, scales = quant_fp8(merged, spec.block_rows, spec.block_cols, spec.scale_fmt, self.scales.dtype, self.work)
        g0 = row0 // spec.block_rows
        self.scales[g0 : g0 + scales.shape[0]] = scales.cpu()
        return codes.reshape(-1).cpu()

    def statistics(self) -> dict[str, bytes]:
        return {self.spec.scale_name: bytes(as_bytes(self.scales))}


class MXFP4Requantizer:
    """Quantizes a unit's merged float32 tiles (whole experts) into MXFP4 blocks; the exponents are written at the end."""

    def __init__(self, unit: WorkUnit, work: Workspace) -> None:
        assert unit.requant is not None
        self.unit = unit
        self.spec = unit.requant
        self.work = work
        self.exponents = torch.empty(self.spec.scale_shape, dtype=torch.uint8)

    def tile(self, merged: torch.Tensor, first: int) -> torch.Tensor:
        """The blocks (uint8, CPU, flat) of one merged float32 tile of whole experts."""
        spec = self.spec
        bad = ~torch.isfinite(merged)
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise StreamMergeError(
                f"{self.unit.name}: merged value at row {first // spec.logical_shape[1] + row}, column {col} is "
                f"{float(merged[row, col])}: MXFP4 has no scale for it (check the adapter for NaN/inf)"
            )
        blocks, exponents = quant_mxfp4(merged, spec.block_rows, self.work)
        e0 = first // spec.logical_shape[1] // spec.block_rows
        self.exponents[e0 : e0 + exponents.shape[0]] = exponents.cpu()
        return blocks.reshape(-1).cpu()

    def statistics(self) -> dict[str, bytes]:
        return {self.spec.scale_name: bytes(as_bytes(self.exponents))}


class Requantizer:
    """Quantizes a unit's merged tiles back to 4 bit with bitsandbytes; writes the statistics at the end."""

    def __init__(self, unit: WorkUnit) -> None:
        bnb_f = import_bnb_functional()

        assert unit.requant is not None
        self.bnb = bnb_f
        self.unit = unit
        self.spec = unit.requant
        self.absmax = torch.empty(self.spec.blocks, dtype=torch.float32)
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
        codes: torch.Tensor = packed.reshape(-1).cpu()
        return codes

    def statistics(self) -> dict[str, bytes]:
        """The bytes of every statistics tensor, by name (the double quantization needs all block scales)."""
        assert self.code is not None
        spec, name = self.spec, self.unit.name
        stats: dict[str, torch.Tensor] = {name + QUANT_MAP: self.code}
        offset = 0.0
        if spec.double_quant:
            mean = self.absmax.mean()
            qabsmax, nested = self.bnb.quantize_blockwise(self.absmax - mean, blocksize=NESTED_BLOCKSIZE)
            offset = float(mean)
            stats |= {name + ABSMAX: qabsmax, name + NESTED_ABSMAX: nested.absmax, name + NESTED_QUANT_MAP: nested.code}
        else:
            stats[name + ABSMAX] = self.absmax
        out = {k: bytes(as_bytes(v.contiguous().cpu())) for k, v in stats.items()}
        out[state_name(name, spec.quant_type)] = quant_state_bytes(spec, offset)
        return out
