"""The plan as data: frozen dataclasses that round-trip through JSON.

A :class:`Plan` is everything a run needs: one :class:`WorkUnit` per output tensor (where its
input bytes are, what to do with them, exactly where its output bytes go), the output shards
with their headers, the files to copy, the fingerprints of the inputs and the estimate. The
executor and the writer make no layout decisions: they read these records.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from streammerge.errors import PlanMismatch, StreamMergeError
from streammerge.formats.bnb import ABSMAX, NESTED_ABSMAX, NESTED_BLOCKSIZE, NESTED_QUANT_MAP, QUANT_MAP, Quant8bit, state_name
from streammerge.formats.fp8 import FP8Weight
from streammerge.formats.mxfp4 import MXFP4Weight
from streammerge.formats.quantized import Quantized
from streammerge.formats.safetensors import OutputSlot, OutputTensor, Source

PLAN_VERSION = 1

Op = Literal["copy", "cast", "merge", "dequant"]
MODES = ("merged_16bit", "merged_4bit", "merged_fp8", "merged_mxfp4", "lora")
"""merged_16bit: a 16/32-bit model; merged_4bit: linear weights re-quantized with bitsandbytes (NF4);
merged_fp8: an FP8 base's weights re-quantized into its own FP8 format and blocks, fresh scales;
merged_mxfp4: an MXFP4 base's experts re-quantized into ``*_blocks`` + ``*_scales``, fresh exponents;
lora: only the adapter, normalised (key names, dtype), checked against the base."""
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class LoraTerm:
    """``scale * (b @ a)`` added to the base weight (transposed when the base stores (in, out))."""

    a: Source
    b: Source
    scale: float
    transpose: bool
    adapter: int
    """Index into :attr:`Plan.adapters`."""
    a_cols: tuple[int, int, int] | None = None
    """Only these columns of ``a`` (start, stop, step): the slice of a LoRA on a fused parameter that
    one checkpoint tensor holds (e.g. the gate half of a fused gate_up projection stored (in, out))."""
    b_cols: tuple[int, int, int] | None = None
    """Only these columns of ``b``: one expert's rank columns of a LoRA on fused experts (PEFT orders
    B's columns rank-major, expert-minor)."""
    rows: tuple[int, int] | None = None
    """The delta covers only these rows of the tensor's (rows, cols) view (one expert of a 3-D tensor);
    None: all rows."""

    @property
    def a_shape(self) -> tuple[int, int]:
        """Shape of ``a`` once :attr:`a_cols` are taken."""
        return self.a.shape[0], _span_len(self.a.shape[1], self.a_cols)

    @property
    def b_shape(self) -> tuple[int, int]:
        """Shape of ``b`` once :attr:`b_cols` are taken."""
        return self.b.shape[0], _span_len(self.b.shape[1], self.b_cols)


def _span_len(n: int, span: tuple[int, int, int] | None) -> int:
    return n if span is None else len(range(n)[slice(*span)])


@dataclass(frozen=True)
class Change:
    """What one adapter module changes: the base tensors its LoRA goes into."""

    adapter: int
    module: str
    """The module as the adapter names it (in-memory names), or for LoRA on a raw parameter
    (``target_parameters``) that parameter, e.g. ``model.layers.0.mlp.experts.gate_up_proj``."""
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class AddTerm:
    """``scale * vector`` added to a 1-D base tensor (a LoRA bias added to the layer's bias)."""

    source: Source
    scale: float


@dataclass(frozen=True)
class RowsTerm:
    """Rows written over the merged weight (PEFT's trainable tokens): row ``indices[i]`` becomes
    ``source[i]``, rounded once to the output dtype."""

    source: Source
    indices: tuple[int, ...]


@dataclass(frozen=True)
class QuantSpec:
    """How to dequantize a quantized source: bitsandbytes 4-bit (nf4/fp4) block scales or int8 row
    scales, FP8 codes with one scale per (block_rows, block_cols) block, or MXFP4 experts (one E8M0
    exponent per 32 codes; each expert's stored (N, K) is dequantized and transposed to (K, N), so the
    unit's rows are the E * K rows of the (E, K, N) parameter and tiles hold whole experts)."""

    kind: str
    """"nf4", "fp4", "int8", "fp8" or "mxfp4"."""
    blocksize: int
    absmax: Source | None = None
    quant_map: Source | None = None
    nested_absmax: Source | None = None
    nested_quant_map: Source | None = None
    nested_blocksize: int = 0
    nested_offset: float = 0.0
    scb: Source | None = None
    scale: Source | None = None
    """FP8: the float scales, (ceil(rows / block_rows), ceil(cols / block_cols)) values; MXFP4: the
    E8M0 exponents, (E, N, K / 32) bytes."""
    scale_name: str = ""
    """FP8, MXFP4: the scale tensor's name (for error messages)."""
    block_rows: int = 0
    block_cols: int = 0
    """FP8: the rows and columns one scale covers; MXFP4: block_rows is K, the rows of one expert."""

    @classmethod
    def of(cls, q: Quantized) -> QuantSpec:
        if isinstance(q, MXFP4Weight):
            return cls(kind="mxfp4", blocksize=0, scale=Source.of(q.scale), scale_name=q.scale.name, block_rows=q.shape[1])
        if isinstance(q, FP8Weight):
            return cls(
                kind="fp8", blocksize=0, scale=Source.of(q.scale), scale_name=q.scale.name, block_rows=q.block[0], block_cols=q.block[1]
            )
        if isinstance(q, Quant8bit):
            return cls(kind="int8", blocksize=0, scb=Source.of(q.scb))
        opt = [None if t is None else Source.of(t) for t in (q.nested_absmax, q.nested_quant_map)]
        return cls(
            kind=q.quant_type,
            blocksize=q.blocksize,
            absmax=Source.of(q.absmax),
            quant_map=Source.of(q.quant_map),
            nested_absmax=opt[0],
            nested_quant_map=opt[1],
            nested_blocksize=q.nested_blocksize if q.nested_absmax is not None else 0,
            nested_offset=q.nested_offset,
        )

    @property
    def statistics(self) -> tuple[Source, ...]:
        """The statistics tensors a dequantization reads, in the order the executor loads them."""
        stats = (self.absmax, self.quant_map, self.nested_absmax, self.nested_quant_map, self.scb, self.scale)
        return tuple(s for s in stats if s is not None)

    @property
    def row_step(self) -> int:
        """Tiles start on a multiple of this many rows: whole FP8 block rows (1 otherwise; 4-bit blocks run
        across rows and are aligned by ``blocksize``; MXFP4: whole experts)."""
        return self.block_rows if self.kind in ("fp8", "mxfp4") else 1


@dataclass(frozen=True)
class RequantSpec:
    """Quantize the merged weight back to 4 bit (``--mode merged_4bit``), as bitsandbytes does, to
    FP8 (``--mode merged_fp8``, ``quant_type`` "fp8") with a fresh scale per block, or to MXFP4
    (``--mode merged_mxfp4``, ``quant_type`` "mxfp4"): whole experts of an (E, K, N) parameter, seen
    as its (E * K, N) rows, into (E, N, K / 32, 16) blocks and one fresh E8M0 exponent per 32 k."""

    quant_type: str
    blocksize: int
    double_quant: bool
    logical_shape: tuple[int, int]
    state_dtype: str
    """The dequantized dtype the quant state records (a torch dtype name, e.g. "bfloat16")."""
    state_bytes: int
    """Fixed length of the quant-state JSON (padded with spaces) so its offset is known at plan time."""
    block_rows: int = 0
    block_cols: int = 0
    """FP8: the rows and columns one scale covers; MXFP4: block_rows is K, the rows of one expert."""
    scale_name: str = ""
    """FP8: the scale tensor written beside the weight (``X.weight_scale_inv`` or ``X.weight_scale``); MXFP4: ``X_scales``."""
    scale_dtype: str = ""
    scale_shape: tuple[int, ...] = ()
    """FP8, MXFP4: the scale tensor's dtype and shape, as the base stores them."""
    scale_fmt: str = ""
    """FP8: "inverse" (block FP8: scale_inv = 1 / (448 / amax), codes = x * (448 / amax), as transformers
    quantizes), "pow2" (the same, scale_inv rounded up to a power of two: ``scale_fmt`` ue8m0) or "divide"
    (compressed-tensors: scale = amax / 448 in the scale's dtype, codes = x / scale)."""

    @property
    def blocks(self) -> int:
        if self.quant_type == "mxfp4":  # one exponent per 32 elements
            return math.prod(self.logical_shape) // 32
        if self.quant_type == "fp8":
            return math.ceil(self.logical_shape[0] / self.block_rows) * math.ceil(self.logical_shape[1] / self.block_cols)
        return math.ceil(self.logical_shape[0] * self.logical_shape[1] / self.blocksize)

    @property
    def row_step(self) -> int:
        """Tiles start on a multiple of this many rows (FP8: whole block rows, so each block's amax is in one tile;
        MXFP4: whole experts, whose groups of 32 run down the rows)."""
        return self.block_rows if self.quant_type in ("fp8", "mxfp4") else 1

    def out_offset(self, first: int) -> int:
        """Byte offset in the main output of the element ``first``: one byte per FP8 code, two 4-bit codes per byte."""
        return first if self.quant_type == "fp8" else first // 2

    def stats(self, name: str) -> list[OutputTensor]:
        """The statistics tensors stored beside the weight ``name``: bitsandbytes' for 4 bit, the scales for FP8 and MXFP4."""
        if self.quant_type in ("fp8", "mxfp4"):
            return [OutputTensor(self.scale_name, self.scale_dtype, self.scale_shape)]
        out = [OutputTensor(name + ABSMAX, "U8" if self.double_quant else "F32", (self.blocks,))]
        if self.double_quant:
            out += [
                OutputTensor(name + NESTED_ABSMAX, "F32", (math.ceil(self.blocks / NESTED_BLOCKSIZE),)),
                OutputTensor(name + NESTED_QUANT_MAP, "F32", (256,)),
            ]
        return [
            *out,
            OutputTensor(name + QUANT_MAP, "F32", (16,)),
            OutputTensor(state_name(name, self.quant_type), "U8", (self.state_bytes,)),
        ]


@dataclass(frozen=True)
class GGUFSpec:
    """How a merged tensor becomes a GGUF tensor, as llama.cpp's convert_hf_to_gguf.py converts it:
    the merged rows (in :attr:`merge_dtype`, exactly the safetensors output) in :attr:`work_dtype`,
    q/k rows un-permuted per head, :attr:`shift` added (Gemma norms), then quantized by
    ``gguf.quants.quantize`` to :attr:`qtype` row by row."""

    qtype: str
    """The GGUF tensor type: F32, F16, BF16 or Q8_0."""
    merge_dtype: str
    work_dtype: str
    """F16 for a float16 model, else F32 (the converter computes in these)."""
    row_bytes: int
    """Bytes of one output row of :attr:`WorkUnit.row_elems` elements in :attr:`qtype`."""
    head_rows: int = 0
    """Llama q/k: rows of one head, reordered from HF's rotate-half halves to interleaved pairs; 0: none."""
    shift: float = 0.0
    hf_name: str = ""
    """The checkpoint's name of the tensor (the unit's name is the GGUF one)."""

    @property
    def row_step(self) -> int:
        """Tiles hold whole heads (the un-permutation moves rows within one head)."""
        return self.head_rows or 1


@dataclass(frozen=True)
class WorkUnit:
    """One output tensor: its source, what to do, and exactly where its bytes go.

    The planner first makes units without a place (``shard``/``offset`` -1); the shard layout
    (:func:`streammerge.plan.layout.layout_shards`) then fixes every unit's shard and offset.
    """

    name: str
    op: Op
    source: Source
    lora: tuple[LoraTerm, ...]
    out_dtype: str
    base_dtype: str
    """The dtype the base model holds this weight in. A source in another dtype (a weight PEFT
    saved with the adapter) is rounded to it first, as loading it into the base model would."""
    shape: tuple[int, ...]
    rows: int
    row_elems: int
    tile_rows: int
    """The unit is processed as a (rows, row_elems) matrix, ``tile_rows`` rows at a time."""
    chunk_rows: int
    """Rows of one float64 accumulator chunk within a tile (merges only)."""
    work_bytes: int
    """Bytes this unit needs while it runs, beyond the runtime and the shared buffers: one tile of
    everything it touches and what it holds for the whole unit (:func:`streammerge.plan.estimate.unit_bytes`)."""
    quant: QuantSpec | None = None
    """Set when the source is a bitsandbytes-quantized weight: dequantize each tile first."""
    requant: RequantSpec | None = None
    """Set in merged_4bit mode for weights written 4-bit: ``out_dtype``/``shape`` are then the packed bytes."""
    extra: tuple[OutputSlot, ...] = ()
    """Further tensors this unit writes (a re-quantized weight's statistics), all in the same shard."""
    magnitude: Source | None = None
    """DoRA: each row of ``W + delta`` is rescaled to this magnitude (norm over the row, float64)."""
    adds: tuple[AddTerm, ...] = ()
    """Vectors added times their scale (lora_bias), for 1-D units."""
    token_rows: tuple[RowsTerm, ...] = ()
    """Rows replaced after the merge (trainable tokens), 2-D units only."""
    combination: str = "cat"
    """How several LoRA terms combine: "cat" sums the deltas; "linear" multiplies the weighted sums of
    the B's and of the A's (PEFT's ``linear``), each term's ``scale`` being its weight times its scaling."""
    shard: int = -1
    offset: int = -1
    nbytes: int = -1
    """Index into :attr:`Plan.shards`, absolute offset in that file and length of the main tensor."""
    gguf: GGUFSpec | None = None
    """GGUF output: how the merged rows become the GGUF tensor (``out_dtype`` is then its GGUF type)."""

    def outputs(self) -> list[OutputTensor]:
        """Every tensor the unit writes, in file order: the main one, then its statistics."""
        return [OutputTensor(self.name, self.out_dtype, self.shape), *(self.requant.stats(self.name) if self.requant else [])]

    @property
    def inputs(self) -> tuple[Source, ...]:
        """Every input the unit reads: the source, each term's A and B, the quantization statistics,
        the DoRA magnitude and added vectors. The readahead and the executor both measure their
        position in these bytes."""
        stats = () if self.quant is None else self.quant.statistics
        vectors = (self.magnitude, *(a.source for a in self.adds), *(r.source for r in self.token_rows))
        return (self.source, *(s for term in self.lora for s in (term.a, term.b)), *stats, *(s for s in vectors if s is not None))

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs)

    @property
    def written_bytes(self) -> int:
        """Bytes of every tensor the unit writes (the main one and its statistics)."""
        return self.nbytes + sum(x.nbytes for x in self.extra)


@dataclass(frozen=True)
class Shard:
    file: str
    header: str
    """The complete header as written: 8-byte length prefix as 16 hex digits, then the JSON text.
    GGUF: ``base64:`` and every byte before the first unit's tensor (header, metadata, tensor infos,
    padding, and tensors computed at plan time such as ``rope_freqs.weight``)."""
    size: int
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class CopyFile:
    src: str
    dst: str


@dataclass(frozen=True)
class Fingerprint:
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Estimate:
    """What the run will need. ``peak_host_bytes`` is an upper bound of the run's peak RSS."""

    peak_host_bytes: int
    peak_device_bytes: int
    output_bytes: int
    read_bytes: int
    tile_bytes: int
    units: dict[str, int]
    largest_unit: str
    seconds: float = 0.0
    """Rough wall time of the run itself (as :attr:`Report.seconds` measures it, after torch has
    started) on a CPU like the benchmarks' (see :data:`streammerge.plan.estimate.RATES`); the disk decides."""


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, as data. Save with :meth:`save`, reload with :meth:`load`."""

    version: int
    base: str
    adapters: tuple[str, ...]
    out: str
    dtype: str
    """Requested output dtype: a safetensors dtype name, or "auto" (each tensor keeps its own)."""
    device: str
    overwrite: bool
    mode: str
    """merged_16bit, merged_4bit, merged_fp8, merged_mxfp4 or lora (see :data:`MODES`)."""
    flavours: tuple[tuple[str, ...], ...]
    """What each adapter holds (lora, rslora, dora, embedding lora, modules_to_save, ...)."""
    weights: tuple[float, ...]
    combination: str
    max_shard_bytes: int
    write_buffers: int
    """How many output tiles may be in flight (see :func:`streammerge.geometry.out_tile_bytes` for their size)."""
    units: tuple[WorkUnit, ...]
    shards: tuple[Shard, ...]
    copy_files: tuple[CopyFile, ...]
    config: dict[str, Any] | None
    """config.json to write (quantization_config dropped, dtype set), or None if the base has none."""
    inputs: tuple[Fingerprint, ...]
    estimate: Estimate
    notes: tuple[str, ...] = field(default=())
    changes: tuple[Change, ...] = field(default=())
    """Per adapter module (LoRA pairs only), the base tensors it changes."""
    format: str = "safetensors"
    """"safetensors" (``out`` is a model folder) or "gguf" (``out`` is the .gguf file; split files beside it)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the plan as JSON; ``Plan.load`` gives back an equal plan."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, ValueError) as e:
            raise PlanMismatch(f"{os.fspath(path)}: cannot read plan ({e})") from e
        return plan_from_dict(obj, where=os.fspath(path))

    def index(self) -> dict[str, Any]:
        """The ``model.safetensors.index.json`` content of the output."""
        total = sum(u.written_bytes for u in self.units)
        params = sum(math.prod(u.requant.logical_shape if u.requant else u.shape) for u in self.units)
        names = [(name, u.shard) for u in self.units for name in (u.name, *(x.name for x in u.extra))]
        weight_map = {name: self.shards[shard].file for name, shard in sorted(names)}
        return {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": weight_map}


GGUF_HEADER_PREFIX = "base64:"


def shard_header_bytes(shard: Shard) -> bytes:
    """Decode :attr:`Shard.header` back into the bytes written at the start of the shard file."""
    if shard.header.startswith(GGUF_HEADER_PREFIX):
        return base64.b64decode(shard.header[len(GGUF_HEADER_PREFIX) :])
    return bytes.fromhex(shard.header[:16]) + shard.header[16:].encode("ascii")


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x)


def _term(t: dict[str, Any], src: Any) -> LoraTerm:
    spans = {k: None if t.get(k) is None else _tuple(t[k]) for k in ("a_cols", "b_cols", "rows")}
    return LoraTerm(**{**t, "a": src(t["a"]), "b": src(t["b"]), **spans})


def plan_from_dict(obj: Any, where: str = "plan") -> Plan:
    """Rebuild a :class:`Plan` from its JSON form, refusing plans of another version."""
    try:
        if obj.get("version") != PLAN_VERSION:
            raise PlanMismatch(f"{where}: plan version {obj.get('version')!r}, this streammerge reads version {PLAN_VERSION}")

        def src(d: dict[str, Any]) -> Source:
            return Source(**{**d, "shape": _tuple(d["shape"])})

        def quant(d: dict[str, Any] | None) -> QuantSpec | None:
            if d is None:
                return None
            fields: dict[str, Any] = {k: (src(v) if isinstance(v, dict) else v) for k, v in d.items()}
            return QuantSpec(**fields)

        def requant(d: dict[str, Any] | None) -> RequantSpec | None:
            if d is None:
                return None
            return RequantSpec(**{**d, "logical_shape": _tuple(d["logical_shape"]), "scale_shape": _tuple(d.get("scale_shape", ()))})

        units = tuple(
            WorkUnit(
                **{
                    **u,
                    "source": src(u["source"]),
                    "shape": _tuple(u["shape"]),
                    "lora": tuple(_term(t, src) for t in u["lora"]),
                    "quant": quant(u.get("quant")),
                    "requant": requant(u.get("requant")),
                    "extra": tuple(OutputSlot(**{**x, "shape": _tuple(x["shape"])}) for x in u.get("extra", ())),
                    "magnitude": None if u.get("magnitude") is None else src(u["magnitude"]),
                    "adds": tuple(AddTerm(source=src(a["source"]), scale=a["scale"]) for a in u.get("adds", ())),
                    "gguf": None if u.get("gguf") is None else GGUFSpec(**u["gguf"]),
                    "token_rows": tuple(RowsTerm(src(r["source"]), _tuple(r["indices"])) for r in u.get("token_rows", ())),
                }
            )
            for u in obj["units"]
        )
        return Plan(
            **{
                **obj,
                "adapters": _tuple(obj["adapters"]),
                "flavours": tuple(_tuple(f) for f in obj["flavours"]),
                "weights": _tuple(obj["weights"]),
                "units": units,
                "shards": tuple(Shard(**{**s, "tensors": _tuple(s["tensors"])}) for s in obj["shards"]),
                "copy_files": tuple(CopyFile(**c) for c in obj["copy_files"]),
                "inputs": tuple(Fingerprint(**i) for i in obj["inputs"]),
                "estimate": Estimate(**obj["estimate"]),
                "notes": _tuple(obj.get("notes", ())),
                "changes": tuple(Change(c["adapter"], c["module"], _tuple(c["tensors"])) for c in obj.get("changes", ())),
            }
        )
    except StreamMergeError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise PlanMismatch(f"{where}: not a streammerge plan ({type(e).__name__}: {e})") from e
