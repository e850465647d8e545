"""bitsandbytes-quantized weights in a transformers checkpoint: find them and their statistics.

4-bit (NF4/FP4) linear ``X`` of logical shape (out, in), n = out*in elements:

    X.weight                          packed codes, ceil(n/2) bytes (U8, or another dtype holding the same bytes)
    X.weight.absmax                   one scale per block of ``blocksize`` flat elements (F32; U8 with double quant)
    X.weight.quant_map                F32 (16,) code table
    X.weight.nested_absmax            F32, one per ``nested_blocksize`` blocks (double quant only)
    X.weight.nested_quant_map         F32 (256,) (double quant only)
    X.weight.quant_state.bitsandbytes__nf4 (or __fp4)   U8 UTF-8 JSON: quant_type, blocksize, dtype, shape, nested_*

8-bit (LLM.int8) linear ``X``: ``X.weight`` I8 (out, in), ``X.SCB`` F32 (out,) row scales, and
``X.weight_format`` U8 scalar (0 = row-major). A weight is recognised by its companions, never by its
dtype. Only the small quant-state JSON is read; no tensor data.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadCheckpoint
from streammerge.formats.safetensors import TensorInfo

STATE_PREFIX = ".quant_state.bitsandbytes__"
ABSMAX, QUANT_MAP, NESTED_ABSMAX, NESTED_QUANT_MAP = ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"
"""Suffixes of a 4-bit weight's statistics tensors (appended to the weight's name)."""
NESTED_BLOCKSIZE = 256
"""bitsandbytes' block size for double-quantizing the block scales."""
QUANT_TYPES = ("nf4", "fp4")
JSON_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MAX_STATE_BYTES = 64 * 1024


@dataclass(frozen=True)
class Quant4bit:
    """A 4-bit weight and everything needed to dequantize it."""

    name: str
    packed: TensorInfo
    absmax: TensorInfo
    quant_map: TensorInfo
    nested_absmax: TensorInfo | None
    nested_quant_map: TensorInfo | None
    state: TensorInfo
    quant_type: str
    blocksize: int
    dtype: str
    """Safetensors dtype of the dequantized weight (the JSON's "dtype")."""
    shape: tuple[int, int]
    nested_blocksize: int
    nested_offset: float

    def companions(self) -> list[TensorInfo]:
        extra = [self.absmax, self.quant_map, self.state, self.nested_absmax, self.nested_quant_map]
        return [t for t in extra if t is not None]


@dataclass(frozen=True)
class Quant8bit:
    """An LLM.int8 weight: int8 rows and one float32 scale per row."""

    name: str
    weight: TensorInfo
    scb: TensorInfo
    weight_format: TensorInfo | None

    def companions(self) -> list[TensorInfo]:
        return [t for t in (self.scb, self.weight_format) if t is not None]


Quantized = Quant4bit | Quant8bit


def state_name(weight: str, quant_type: str) -> str:
    """The name of a 4-bit weight's quant-state tensor."""
    return f"{weight}{STATE_PREFIX}{quant_type}"


def state_json(quant_type: str, blocksize: int, dtype: str, shape: tuple[int, int], double: bool, offset: float) -> bytes:
    """The quant-state JSON bitsandbytes writes for a 4-bit weight (same keys, same order)."""
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if double:
        state |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset}
    return json.dumps(state).encode("utf-8")


def read_state_json(t: TensorInfo) -> dict[str, Any]:
    """Read the few hundred bytes of a quant-state JSON tensor."""
    where = f"{t.path}: tensor {t.name!r}"
    if t.dtype != "U8" or len(t.shape) != 1 or t.nbytes > MAX_STATE_BYTES:
        raise BadCheckpoint(
            f"{where}: a bitsandbytes quant state must be a 1-D U8 tensor under {MAX_STATE_BYTES} bytes, found {t.dtype} {list(t.shape)}"
        )
    try:
        with open(t.path, "rb") as f:
            raw = os.pread(f.fileno(), t.nbytes, t.offset)
        state = json.loads(raw.decode("utf-8"))
    except OSError as e:
        raise BadCheckpoint(f"{where}: cannot read ({e.strerror or e})") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise BadCheckpoint(f"{where}: quant state is not valid JSON ({e})") from e
    if not isinstance(state, dict):
        raise BadCheckpoint(f"{where}: quant state must be a JSON object")
    return state


def _need(tensors: dict[str, TensorInfo], name: str, weight: str) -> TensorInfo:
    t = tensors.get(name)
    if t is None:
        raise BadCheckpoint(f"quantized weight {weight!r} has no companion tensor {name!r} (checkpoint incomplete?)")
    return t


def _expect(t: TensorInfo, dtype: str, shape: tuple[int, ...], what: str) -> None:
    if t.dtype != dtype or t.shape != shape:
        raise BadCheckpoint(f"{t.path}: tensor {t.name!r} ({what}) is {t.dtype} {list(t.shape)}, expected {dtype} {list(shape)}")


def _int(state: dict[str, Any], key: str, where: str) -> int:
    v = state.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise BadCheckpoint(f"{where}: quant state field {key!r} must be a positive integer, found {v!r}")
    return v


def parse_4bit(tensors: dict[str, TensorInfo], state_t: TensorInfo) -> Quant4bit:
    """Validate one 4-bit weight from its quant-state tensor and its companions."""
    name, _, suffix = state_t.name.rpartition(STATE_PREFIX)
    where = f"{state_t.path}: tensor {state_t.name!r}"
    if suffix not in QUANT_TYPES:
        raise BadCheckpoint(f"{where}: unknown 4-bit quant type {suffix!r}; streammerge knows nf4 and fp4")
    state = read_state_json(state_t)
    if state.get("quant_type") != suffix:
        raise BadCheckpoint(f"{where}: quant_type {state.get('quant_type')!r} disagrees with the key's {suffix!r}")
    blocksize = _int(state, "blocksize", where)
    if blocksize < 2 or blocksize & (blocksize - 1):
        raise BadCheckpoint(f"{where}: blocksize {blocksize} is not a power of two (bitsandbytes uses 32 to 4096)")
    dtype = JSON_DTYPES.get(str(state.get("dtype")))
    if dtype is None:
        raise BadCheckpoint(f"{where}: dtype {state.get('dtype')!r} is not one of {', '.join(JSON_DTYPES)}")
    shape = state.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
        raise BadCheckpoint(f"{where}: shape must be [out, in] positive integers, found {shape!r}")
    n = shape[0] * shape[1]
    blocks = math.ceil(n / blocksize)
    packed = _need(tensors, name, name)
    if packed.nbytes != math.ceil(n / 2):
        raise BadCheckpoint(
            f"{packed.path}: tensor {name!r} holds {packed.nbytes} bytes of 4-bit codes but its quant state says shape {shape} ({math.ceil(n / 2)} bytes)"
        )
    quant_map = _need(tensors, name + QUANT_MAP, name)
    _expect(quant_map, "F32", (16,), "4-bit code table")
    absmax = _need(tensors, name + ABSMAX, name)
    nested = "nested_blocksize" in state or name + NESTED_ABSMAX in tensors
    nested_absmax = nested_quant_map = None
    nested_blocksize, nested_offset = NESTED_BLOCKSIZE, 0.0
    if nested:
        nested_blocksize = _int(state, "nested_blocksize", where)
        offset = state.get("nested_offset")
        if not isinstance(offset, (int, float)) or isinstance(offset, bool) or not math.isfinite(offset):
            raise BadCheckpoint(f"{where}: nested_offset must be a finite number, found {offset!r}")
        nested_offset = float(offset)
        _expect(absmax, "U8", (blocks,), "double-quantized block scales")
        nested_absmax = _need(tensors, name + NESTED_ABSMAX, name)
        _expect(nested_absmax, "F32", (math.ceil(blocks / nested_blocksize),), "nested scales")
        nested_quant_map = _need(tensors, name + NESTED_QUANT_MAP, name)
        _expect(nested_quant_map, "F32", (256,), "nested code table")
    else:
        _expect(absmax, "F32", (blocks,), "block scales")
    return Quant4bit(
        name=name,
        packed=packed,
        absmax=absmax,
        quant_map=quant_map,
        nested_absmax=nested_absmax,
        nested_quant_map=nested_quant_map,
        state=state_t,
        quant_type=suffix,
        blocksize=blocksize,
        dtype=dtype,
        shape=(shape[0], shape[1]),
        nested_blocksize=nested_blocksize,
        nested_offset=nested_offset,
    )


def parse_8bit(tensors: dict[str, TensorInfo], scb: TensorInfo) -> Quant8bit:
    """Validate one LLM.int8 weight from its ``SCB`` row scales."""
    module = scb.name.removesuffix(".SCB")
    name = module + ".weight"
    weight = _need(tensors, name, scb.name)
    if weight.dtype != "I8" or len(weight.shape) != 2:
        raise BadCheckpoint(
            f"{weight.path}: tensor {name!r} has row scales {scb.name!r} but is {weight.dtype} {list(weight.shape)}, not a 2-D I8 weight"
        )
    _expect(scb, "F32", (weight.shape[0],), "int8 row scales")
    fmt = tensors.get(name + "_format")
    if fmt is not None and (fmt.dtype != "U8" or fmt.shape != ()):
        raise BadCheckpoint(f"{fmt.path}: tensor {fmt.name!r} must be a U8 scalar")
    return Quant8bit(name=name, weight=weight, scb=scb, weight_format=fmt)


def find_quantized(tensors: dict[str, TensorInfo]) -> dict[str, Quantized]:
    """Every bitsandbytes-quantized weight of a checkpoint, by weight name."""
    found: dict[str, Quantized] = {}
    for key, t in tensors.items():
        if STATE_PREFIX in key:
            q4 = parse_4bit(tensors, t)
            found[q4.name] = q4
        elif key.endswith(".SCB"):
            q8 = parse_8bit(tensors, t)
            found[q8.name] = q8
    return found
