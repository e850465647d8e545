"""Quantized bases: what a model sees of them, and what ``--mode merged_4bit`` / ``merged_fp8`` / ``merged_mxfp4`` write.

The planner's view of a bitsandbytes checkpoint (logical dtypes and shapes, statistics hidden),
the default output dtype, which weights are re-quantized and with which settings, and the
quantization_config and quant-state JSON the output carries. Pure functions of headers and config.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from streammerge.formats.bnb import Quant4bit, Quant8bit, state_json
from streammerge.formats.checkpoint import Checkpoint
from streammerge.formats.fp8 import SCALE, SCALE_INV, FP8Weight
from streammerge.formats.mxfp4 import BLOCKS, GROUP, MXFP4Weight
from streammerge.formats.quantized import Quantized
from streammerge.formats.safetensors import FLOAT_DTYPES, TensorInfo
from streammerge.plan.estimate import dequant_costs
from streammerge.plan.model import RequantSpec, WorkUnit
from streammerge.sizes import format_bytes, parse_dtype

DTYPE_CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
"""Safetensors dtype names as config.json and quant states spell them."""

_LINEAR_SKIP = ("embed", "wte", "wpe", "lm_head", "norm", "score", ".router.", ".gate.weight")
"""Name parts of 2-D weights that are not linear layers transformers would quantize (MoE routers,
``mlp.gate`` / ``block_sparse_moe.gate`` / ``mlp.router``, are raw parameters in transformers 5)."""


def requant_choices(
    ckpt: Checkpoint, quantized: dict[str, Quantized], out_dtype: str, fused: frozenset[str] = frozenset()
) -> dict[str, RequantSpec]:
    """Which weights ``--mode merged_4bit`` writes in 4 bit, and how.

    From a 4-bit base: exactly its 4-bit weights, each with its own quant type and block size.
    Otherwise: every 2-D ``*.weight`` that is not an embedding, norm, output head, MoE router or
    (``fused``) a per-expert tensor transformers fuses into a 3-D parameter, in NF4 with double
    quantization and blocksize 64 (what QLoRA uses).
    """
    state_dtype = DTYPE_CONFIG_NAMES[out_dtype]
    four_bit = {name: q for name, q in quantized.items() if isinstance(q, Quant4bit)}
    chosen: dict[str, RequantSpec] = {}
    for t in ckpt.ordered():
        q = four_bit.get(t.name)
        if four_bit and q is None:
            continue
        if q is None and (len(t.shape) != 2 or not t.name.endswith(".weight") or any(p in t.name for p in _LINEAR_SKIP) or t.name in fused):
            continue
        if t.dtype not in FLOAT_DTYPES:
            continue
        quant_type, blocksize, double = (q.quant_type, q.blocksize, q.nested_absmax is not None) if q else ("nf4", 64, True)
        shape = (t.shape[0], t.shape[1])
        state = state_json(quant_type, blocksize, state_dtype, shape, double, 0.0)
        chosen[t.name] = RequantSpec(quant_type, blocksize, double, shape, state_dtype, len(state) + 32)
    return chosen


def fp8_requant_choices(quantized: dict[str, Quantized], config: dict[str, Any] | None) -> dict[str, RequantSpec]:
    """Which weights ``--mode merged_fp8`` writes in FP8: exactly the base's FP8 weights, each in its own
    format and blocks, its scale tensor under the same name, dtype and shape."""
    qc = (config or {}).get("quantization_config")
    pow2 = isinstance(qc, dict) and qc.get("scale_fmt") == "ue8m0"
    chosen: dict[str, RequantSpec] = {}
    for name, q in quantized.items():
        if not isinstance(q, FP8Weight):
            continue
        suffix = SCALE_INV if q.fmt == "fp8" else SCALE
        fmt = "divide" if q.fmt == "compressed-tensors" else "pow2" if pow2 else "inverse"
        chosen[name] = RequantSpec(
            quant_type="fp8", blocksize=0, double_quant=False, logical_shape=q.shape, state_dtype=DTYPE_CONFIG_NAMES.get(q.dtype, "bfloat16"),
            state_bytes=0, block_rows=q.block[0], block_cols=q.block[1], scale_name=name + suffix, scale_dtype=q.scale.dtype,
            scale_shape=q.scale.shape, scale_fmt=fmt,
        )  # fmt: skip
    return chosen


def mxfp4_requant_choices(quantized: dict[str, Quantized]) -> dict[str, RequantSpec]:
    """Which weights ``--mode merged_mxfp4`` writes in MXFP4: exactly the base's MXFP4 experts, as (E * K, N) rows
    re-quantized whole experts at a time, their exponents under the base's ``X_scales`` name, dtype and shape."""
    chosen: dict[str, RequantSpec] = {}
    for name, q in quantized.items():
        if not isinstance(q, MXFP4Weight):
            continue
        experts, k, n = q.shape
        chosen[name] = RequantSpec(
            quant_type="mxfp4", blocksize=0, double_quant=False, logical_shape=(experts * k, n),
            state_dtype=DTYPE_CONFIG_NAMES.get(q.dtype, "bfloat16"), state_bytes=0, block_rows=k, block_cols=GROUP,
            scale_name=q.scale.name, scale_dtype=q.scale.dtype, scale_shape=q.scale.shape,
        )  # fmt: skip
    return chosen


def quant_state_bytes(spec: RequantSpec, offset: float) -> bytes:
    """The quant-state JSON of a re-quantized weight, padded with spaces to its planned length."""
    raw = state_json(spec.quant_type, spec.blocksize, spec.state_dtype, spec.logical_shape, spec.double_quant, offset)
    if len(raw) > spec.state_bytes:
        raise AssertionError(f"quant state {raw!r} longer than planned {spec.state_bytes} bytes")
    return raw + b" " * (spec.state_bytes - len(raw))


def requant_config(config: dict[str, Any] | None, quantized: dict[str, Quantized], out_dtype: str) -> dict[str, Any]:
    """quantization_config for a merged_4bit output: the base's own when it was 4-bit, else QLoRA's defaults."""
    qc = (config or {}).get("quantization_config")
    if any(isinstance(q, Quant4bit) for q in quantized.values()) and isinstance(qc, dict):
        return {**qc, "bnb_4bit_compute_dtype": DTYPE_CONFIG_NAMES[out_dtype]}
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": DTYPE_CONFIG_NAMES[out_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def quantized_default_dtype(config: dict[str, Any] | None, quantized: dict[str, Quantized]) -> str:
    """Output dtype when none is asked for: bnb_4bit_compute_dtype for 4-bit bases, else the model's dtype, else bf16
    (FP8 bases: the dtype their weights dequantize to)."""
    config = config or {}
    qc = config.get("quantization_config") or {}
    candidates = [config.get("dtype"), config.get("torch_dtype"), "bfloat16"]
    if any(isinstance(q, Quant4bit) for q in quantized.values()):
        candidates.insert(0, qc.get("bnb_4bit_compute_dtype") if isinstance(qc, dict) else None)
    for name in candidates:
        if isinstance(name, str) and name.removeprefix("torch.") in ("bfloat16", "float16", "float32"):
            return parse_dtype(name)
    return "BF16"


def logical_view(ckpt: Checkpoint, quantized: dict[str, Quantized]) -> Checkpoint:
    """The checkpoint as a model sees it: quantized weights with their logical dtype and shape,
    their statistics (absmax, quant maps, SCB, ...) gone. Byte locations stay those of the packed data."""
    if not quantized:
        return ckpt
    companions = {t.name for q in quantized.values() for t in q.companions()}
    tensors: dict[str, TensorInfo] = {}
    for name, t in ckpt.tensors.items():
        if name in companions:
            continue
        q = quantized.get(name)
        mx = quantized.get(name.removesuffix(BLOCKS)) if name.endswith(BLOCKS) else None
        if isinstance(mx, MXFP4Weight):  # the blocks stand for the logical (E, K, N) parameter, under its own name
            name, t = mx.name, dataclasses.replace(t, name=mx.name, dtype=mx.dtype, shape=mx.shape)
        elif isinstance(q, (Quant4bit, FP8Weight)):
            t = dataclasses.replace(t, dtype=q.dtype, shape=q.shape)
        elif isinstance(q, Quant8bit):
            dtype = quantized_default_dtype({k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}, {})
            t = dataclasses.replace(t, dtype=dtype)
        tensors[name] = t

    def logical(name: str) -> str:
        return name.removesuffix(BLOCKS) if isinstance(quantized.get(name.removesuffix(BLOCKS)), MXFP4Weight) else name

    order = [tensors[logical(t.name)] for t in ckpt.ordered() if logical(t.name) in tensors]
    return dataclasses.replace(ckpt, tensors=tensors, order=tuple(order))


def quantized_notes(quantized: dict[str, Quantized], merged: bool, units: list[WorkUnit] | None = None) -> list[str]:
    if not quantized:
        return []
    kinds = Counter(q.quant_type if isinstance(q, (Quant4bit, FP8Weight, MXFP4Weight)) else "int8" for q in quantized.values())
    cost = ""
    if units:
        tile, stats = dequant_costs(units)
        cost = f" (dequantization needs up to {format_bytes(tile)} per tile + {format_bytes(stats)} of block scales per tensor, in the estimate)"
    notes = [f"quantized base: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} weights are dequantized tile by tile{cost}"]
    if merged:
        notes.append(
            "the merged weights carry the quantization rounding of the base; merging into the original 16-bit base, "
            "when you have it, is more exact"
        )
    return notes


def fp8_notes(requant: dict[str, RequantSpec]) -> list[str]:
    """What ``--mode merged_fp8`` costs in accuracy (figures measured by tests/test_fp8.py against the float64 merge)."""
    blocks = sorted({(s.block_rows, s.block_cols, s.scale_fmt) for s in requant.values()})
    how = ", ".join(f"{r}x{c} {'pow-2 ' if f == 'pow2' else ''}blocks" for r, c, f in blocks)
    return [
        f"{len(requant)} merged weights are re-quantized to FP8 e4m3 ({how}, fresh scales amax/448): each value is rounded "
        "to 3 mantissa bits again, at most half a step (1/16 of its magnitude, or of the block's smallest normal step) from "
        "the float64 merge; measured on tiny Llamas: RMS error 2.6-2.7% of the weights' RMS, against 0.17% for merged_16bit "
        "(bf16), the size of the base's own FP8 rounding; LoRA deltas under half a step are lost"
    ]


def mxfp4_notes(requant: dict[str, RequantSpec]) -> list[str]:
    """What ``--mode merged_mxfp4`` costs in accuracy (figures measured by tests/test_mxfp4.py against the float64 merge)."""
    return [
        f"{len(requant)} merged expert weights are re-quantized to MXFP4 (e2m1 codes, one fresh power-of-two scale per 32 "
        "values: amax/6 rounded up, as triton_kernels' downcast_to_mxfp_torch; values rounded to nearest, ties away from zero); "
        "each value lands within half an e2m1 step of the float64 merge (a quarter of the scale below 2, up to a whole "
        "scale between 4 and 6); measured on tiny gpt-oss: RMS error 11.6-11.8% of the weights' RMS, against 0.17% "
        "for merged_16bit (bf16) and 11.8% for the base's own MXFP4 rounding; LoRA deltas under half a step are lost"
    ]
