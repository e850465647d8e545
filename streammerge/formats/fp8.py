"""FP8 weights in a transformers checkpoint: block-wise FP8 (DeepSeek-V3, Qwen3-*-FP8) and compressed-tensors FP8.

Block-wise FP8 (``quantization_config.quant_method == "fp8"``, ``weight_block_size`` [bm, bn]) of a linear ``X``
of shape (out, in)::

    X.weight             F8_E4M3 (out, in)
    X.weight_scale_inv   F32 (or BF16/F16) (ceil(out/bm), ceil(in/bn)): one scale per block; edge blocks may be partial
    X.activation_scale   F32 scalar (static activation scheme only; kept as is by merged_fp8)

    W[i, j] = float32(X.weight[i, j]) * float32(X.weight_scale_inv[i // bm, j // bn]), rounded once to the model dtype

With ``weight_block_size`` null the scale is one value per tensor. compressed-tensors FP8
(``quant_method == "compressed-tensors"``, ``format == "float-quantized"``, 8-bit float weights)::

    X.weight             F8_E4M3 (out, in)
    X.weight_scale       (out, 1) per channel, (1,) or () per tensor, (ceil(out/bm), ceil(in/bn)) per block
    X.input_scale        static activation scale (kept as is by merged_fp8)

with the same formula. A weight is FP8 when its config says so *and* its scale companion is there;
an F8 tensor alone is not dequantized. Only headers and the config are read here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadCheckpoint
from streammerge.formats.safetensors import TensorInfo

FP8_METHODS = ("fp8", "compressed-tensors")
SCALE_INV, SCALE = "_scale_inv", "_scale"
"""Suffixes of a weight's scale tensor (appended to ``X.weight``): block FP8, compressed-tensors."""
ACTIVATION_SUFFIXES = (".activation_scale", ".input_scale")
"""Static activation scales beside a module's weight: meaningless for a 16-bit model, kept in FP8 output."""
FP8_DTYPES = ("F8_E4M3",)
SCALE_DTYPES = ("F32", "BF16", "F16")
FP8_MAX = 448.0
"""Largest finite float8_e4m3fn value: a block's scale is amax / FP8_MAX."""


@dataclass(frozen=True)
class FP8Weight:
    """An FP8 weight, its scales and the block each scale covers."""

    name: str
    weight: TensorInfo
    scale: TensorInfo
    block: tuple[int, int]
    """Rows and columns one scale covers (clamped to the shape: a per-tensor scale covers (out, in), a
    per-channel one (1, in))."""
    fmt: str
    """"fp8" (block-wise, ``weight_scale_inv``) or "compressed-tensors" (``weight_scale``)."""
    dtype: str
    """Safetensors dtype of the dequantized weight (the model's dtype)."""
    shape: tuple[int, int]
    activation: tuple[TensorInfo, ...] = ()

    @property
    def quant_type(self) -> str:
        return "fp8"

    @property
    def grid(self) -> tuple[int, int]:
        """The scales' (rows, columns)."""
        return math.ceil(self.shape[0] / self.block[0]), math.ceil(self.shape[1] / self.block[1])

    def companions(self) -> list[TensorInfo]:
        return [self.scale, *self.activation]


def _block_size(qc: dict[str, Any], where: str) -> tuple[int, int] | None:
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise BadCheckpoint(f"{where}: quantization_config.weight_block_size must be [rows, cols] positive integers, found {block!r}")
    return block[0], block[1]


def _ct_weights(qc: dict[str, Any], where: str) -> dict[str, Any]:
    """The one weights scheme of a compressed-tensors FP8 config (8-bit float, symmetric)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise BadCheckpoint(f"{where}: compressed-tensors quantization_config has no config_groups")
    schemes = []
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise BadCheckpoint(f"{where}: compressed-tensors config group {name!r} has no weights scheme")
        schemes.append(weights)
        gfmt = group.get("format", fmt)
        if weights.get("type") != "float" or weights.get("num_bits") != 8 or gfmt not in (None, "float-quantized"):
            raise BadCheckpoint(
                f"{where}: compressed-tensors group {name!r} is {weights.get('num_bits')}-bit {weights.get('type')} ({gfmt}); "
                "streammerge reads 8-bit float (float-quantized) weights only"
            )
        if weights.get("symmetric") is False:
            raise BadCheckpoint(f"{where}: compressed-tensors group {name!r} is asymmetric (zero points); streammerge reads symmetric FP8")
        if weights.get("strategy") not in ("tensor", "channel", "block"):
            raise BadCheckpoint(
                f"{where}: compressed-tensors group {name!r} has strategy {weights.get('strategy')!r}; tensor, channel or block expected"
            )
    if any(s != schemes[0] for s in schemes[1:]):
        raise BadCheckpoint(f"{where}: compressed-tensors config groups with different weight schemes are not supported")
    return schemes[0]


def quant_method(config: dict[str, Any] | None) -> str | None:
    qc = (config or {}).get("quantization_config")
    return str(qc.get("quant_method")) if isinstance(qc, dict) else None


def find_fp8(tensors: dict[str, TensorInfo], config: dict[str, Any] | None, dtype: str, root: str) -> dict[str, FP8Weight]:
    """Every FP8 weight of a checkpoint whose config says FP8, by weight name; ``dtype`` is the model's dtype."""
    method = quant_method(config)
    if method not in FP8_METHODS:
        return {}
    qc: dict[str, Any] = (config or {})["quantization_config"]
    where = f"{root}/config.json"
    if method == "fp8":
        suffix, block = SCALE_INV, _block_size(qc, where)
        strategy = "block" if block else "tensor"
    else:
        scheme = _ct_weights(qc, where)
        suffix, strategy = SCALE, str(scheme["strategy"])
        block = None
        if strategy == "block":
            raw = scheme.get("block_structure")
            block = _block_size({"weight_block_size": raw}, where + " (block_structure)")
            if block is None:
                raise BadCheckpoint(f"{where}: compressed-tensors strategy 'block' needs block_structure [rows, cols]")
    found: dict[str, FP8Weight] = {}
    for key, scale in tensors.items():
        if not key.endswith(".weight" + suffix):
            continue
        name = key.removesuffix(suffix)
        w = tensors.get(name)
        if w is None:
            raise BadCheckpoint(f"{scale.path}: scale tensor {key!r} has no weight {name!r} beside it (checkpoint incomplete?)")
        if w.dtype not in FP8_DTYPES or len(w.shape) != 2:
            raise BadCheckpoint(
                f"{w.path}: tensor {name!r} has FP8 scales {key!r} but is {w.dtype} {list(w.shape)}, not a 2-D {'/'.join(FP8_DTYPES)} weight"
            )
        rows, cols = w.shape
        if strategy == "tensor":
            bm, bn = rows, cols
        elif strategy == "channel":
            bm, bn = 1, cols
        else:
            assert block is not None
            bm, bn = min(block[0], rows), min(block[1], cols)
        grid = (math.ceil(rows / bm), math.ceil(cols / bn))
        allowed: list[tuple[int, ...]] = [grid]
        if strategy == "tensor":
            allowed += [(), (1,)]
        elif strategy == "channel":
            allowed += [(rows,)]
        if scale.dtype not in SCALE_DTYPES or scale.shape not in allowed:
            raise BadCheckpoint(
                f"{scale.path}: tensor {key!r} (FP8 scales, {strategy}) is {scale.dtype} {list(scale.shape)}, "
                f"expected {'/'.join(SCALE_DTYPES)} {list(grid)} for weight {list(w.shape)}"
            )
        module = name.removesuffix(".weight")
        activation = tuple(tensors[module + s] for s in ACTIVATION_SUFFIXES if module + s in tensors)
        found[name] = FP8Weight(
            name=name, weight=w, scale=scale, block=(bm, bn), fmt=method, dtype=dtype, shape=(rows, cols), activation=activation
        )
    for key, t in tensors.items():
        if t.dtype in FP8_DTYPES and key.endswith(".weight") and key not in found:
            # merged_16bit would copy its raw codes as numbers and drop the quantization_config
            raise BadCheckpoint(f"{t.path}: {t.dtype} weight {key!r} has no {key + suffix!r} beside it (checkpoint incomplete?)")
        if key.endswith(".weight_zero_point"):
            raise BadCheckpoint(f"{t.path}: tensor {key!r}: FP8 weights with zero points are not supported (symmetric FP8 only)")
    return found
