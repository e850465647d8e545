"""bitsandbytes weights tile by tile: dequantize a base weight's rows, quantize merged rows back to 4 bit.

:class:`Dequantizer` loads a unit's statistics once (block scales, double-quantized scales, the
code table) and dequantizes each tile from its packed bytes with :mod:`streammerge.kernels`;
:class:`Requantizer` packs merged float32 tiles with bitsandbytes' own quantizer and produces the
statistics tensors at the end of the unit, laid out as the plan fixed them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streammerge.formats.bnb import ABSMAX, NESTED_ABSMAX, NESTED_BLOCKSIZE, NESTED_QUANT_MAP, QUANT_MAP, state_name
from streammerge.formats.safetensors import Source
from streammerge.inputs.mapped import SourceFiles
from streammerge.kernels import TORCH_DTYPES, Workspace, as_bytes, dequant_4bit, dequant_int8, double_quant_scales, nibble_table
from streammerge.plan.model import QuantSpec, WorkUnit
from streammerge.plan.quant import quant_state_bytes

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


class Requantizer:
    """Quantizes a unit's merged tiles back to 4 bit with bitsandbytes; writes the statistics at the end."""

    def __init__(self, unit: WorkUnit) -> None:
        import bitsandbytes.functional as bnb_f  # only plans with merged_4bit output pay for this import

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
        return packed.reshape(-1).cpu()

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
