"""Every quantized-weight format streammerge reads, found by its companions and the config.

bitsandbytes 4/8-bit (:mod:`.bnb`) and FP8 (:mod:`.fp8`: block-wise and compressed-tensors).
"""

from __future__ import annotations

from typing import Any

from streammerge.formats.bnb import Quant4bit, Quant8bit
from streammerge.formats.bnb import find_quantized as find_bnb
from streammerge.formats.fp8 import FP8Weight, find_fp8
from streammerge.formats.safetensors import TensorInfo

Quantized = Quant4bit | Quant8bit | FP8Weight


def find_quantized(
    tensors: dict[str, TensorInfo], config: dict[str, Any] | None = None, dtype: str = "BF16", root: str = ""
) -> dict[str, Quantized]:
    """Every quantized weight of a checkpoint, by weight name (``dtype``: what FP8 weights dequantize to)."""
    found: dict[str, Quantized] = dict(find_bnb(tensors))
    found.update(find_fp8(tensors, config, dtype, root))
    return found


def stored(q: Quantized) -> TensorInfo:
    """The tensor holding a quantized weight's codes (the packed bytes, the int8 or FP8 weight)."""
    return q.packed if isinstance(q, Quant4bit) else q.weight
