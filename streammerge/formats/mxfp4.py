"""MXFP4 weights in a transformers checkpoint: gpt-oss's mixture-of-experts projections.

With ``quantization_config.quant_method == "mxfp4"``, a fused expert parameter ``X`` (``...experts.gate_up_proj``,
``...experts.down_proj``) of logical shape (E, K, N) is stored as::

    X_blocks   U8 (E, N, K / 32, 16)   two FP4 e2m1 codes per byte, the low nibble first (element 2b, then 2b + 1)
    X_scales   U8 or F8_E8M0 (E, N, K / 32)   one E8M0 exponent s per group of 32 consecutive k: scale 2^(s - 127)

    X[e, k, n] = FP4[code of element k of group (e, n, k // 32)] * 2^(s - 127), in float32, rounded once to the model dtype

(``FP4`` = 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, codes 8-15 negative). The groups run along K and the
dequantized parameter is the transpose of the stored (E, N, K): ``gate_up_proj`` (E, hidden, 2 * intermediate),
``down_proj`` (E, intermediate, hidden), as transformers' ``convert_moe_packed_tensors`` produces it and
``save_pretrained`` writes a dequantized gpt-oss. A weight is MXFP4 when the config says so *and* its
``_scales`` companion is there with the matching grid; a U8 tensor alone is never decoded. Headers only here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadCheckpoint
from streammerge.formats.safetensors import TensorInfo

MXFP4_METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
GROUP = 32
"""Elements per shared exponent (the OCP MX block size), 16 bytes of codes."""
SCALE_DTYPES = ("U8", "F8_E8M0")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""The e2m1 value of each 4-bit code."""
FP4_MAX = 6.0


@dataclass(frozen=True)
class MXFP4Weight:
    """A fused expert parameter stored as MXFP4 blocks and E8M0 scales."""

    name: str
    """The logical parameter's name (``X``, without ``_blocks``)."""
    blocks: TensorInfo
    scale: TensorInfo
    dtype: str
    """Safetensors dtype of the dequantized weight (the model's dtype)."""
    shape: tuple[int, int, int]
    """Logical (E, K, N): the stored (E, N, K) transposed."""

    @property
    def quant_type(self) -> str:
        return "mxfp4"

    def companions(self) -> list[TensorInfo]:
        return [self.scale]


def find_mxfp4(tensors: dict[str, TensorInfo], config: dict[str, Any] | None, dtype: str, root: str) -> dict[str, MXFP4Weight]:
    """Every MXFP4 parameter of a checkpoint whose config says mxfp4, by logical name; ``dtype`` is the model's dtype."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != MXFP4_METHOD:
        return {}
    found: dict[str, MXFP4Weight] = {}
    for key, blocks in tensors.items():
        if not key.endswith(BLOCKS):
            continue
        name = key.removesuffix(BLOCKS)
        scale = tensors.get(name + SCALES)
        if scale is None:
            raise BadCheckpoint(f"{blocks.path}: tensor {key!r} has no E8M0 scales {name + SCALES!r} beside it (checkpoint incomplete?)")
        if name in tensors:
            raise BadCheckpoint(f"{blocks.path}: tensor {name!r} is stored both dequantized and as MXFP4 blocks {key!r}")
        if blocks.dtype != "U8" or len(blocks.shape) != 4 or blocks.shape[3] != GROUP // 2 or 0 in blocks.shape:
            raise BadCheckpoint(
                f"{blocks.path}: tensor {key!r} (MXFP4 blocks) is {blocks.dtype} {list(blocks.shape)}, expected U8 (experts, rows, groups, 16)"
            )
        experts, rows, groups, _ = blocks.shape
        if scale.dtype not in SCALE_DTYPES or scale.shape != (experts, rows, groups):
            raise BadCheckpoint(
                f"{scale.path}: tensor {scale.name!r} (MXFP4 scales) is {scale.dtype} {list(scale.shape)}, "
                f"expected {'/'.join(SCALE_DTYPES)} {[experts, rows, groups]} for blocks {list(blocks.shape)}"
            )
        found[name] = MXFP4Weight(name=name, blocks=blocks, scale=scale, dtype=dtype, shape=(experts, groups * GROUP, rows))
    orphans = [key for key in tensors if key.endswith(SCALES) and key.removesuffix(SCALES) not in found]
    if orphans:
        t = tensors[orphans[0]]
        raise BadCheckpoint(
            f"{t.path}: tensor {orphans[0]!r} looks like MXFP4 scales but has no {orphans[0].removesuffix(SCALES) + BLOCKS!r}"
        )
    return found
