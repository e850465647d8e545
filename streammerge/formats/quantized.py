"""Every quantized-weight format streammerge reads, found by its companions and the config.

bitsandbytes 4/8-bit (:mod:`.bnb`), FP8 (:mod:`.fp8`: block-wise and compressed-tensors) and MXFP4
(:mod:`.mxfp4`: gpt-oss experts). Each kind is one frozen record naming its stored tensor and companions;
:class:`streammerge.quantize.Dequantizer` turns any of them into dequantized tiles.
"""

from __future__ import annotations

from typing import Any

from streammerge.formats.bnb import Quant4bit, Quant8bit
from streammerge.formats.bnb import find_quantized as find_bnb
from streammerge.formats.fp8 import FP8Weight, find_fp8
from streammerge.formats.mxfp4 import MXFP4Weight, find_mxfp4
from streammerge.formats.safetensors import TensorInfo

Quantized = Quant4bit | Quant8bit | FP8Weight | MXFP4Weight


def find_quantized(
    tensors: dict[str, TensorInfo], config: dict[str, Any] | None = None, dtype: str = "BF16", root: str = ""
) -> dict[str, Quantized]:
    """Every quantized weight of a checkpoint, by (logical) weight name (``dtype``: what FP8 and MXFP4 weights dequantize to)."""
    found: dict[str, Quantized] = dict(find_bnb(tensors))
    found.update(find_fp8(tensors, config, dtype, root))
    found.update(find_mxfp4(tensors, config, dtype, root))
    return found


def stored(q: Quantized) -> TensorInfo:
    """The tensor holding a quantized weight's codes (the packed bytes, the int8 or FP8 weight, the MXFP4 blocks)."""
    if isinstance(q, Quant4bit):
        return q.packed
    return q.blocks if isinstance(q, MXFP4Weight) else q.weight
