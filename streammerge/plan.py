"""Headers in, plan out: every work unit, output shard and byte offset, decided before any data moves.

The planner reads safetensors headers and small JSON files only. It maps each adapter pair onto
its base tensor, checks shapes, picks an operation per output tensor (``copy`` bytes unchanged,
``cast`` to another dtype, ``merge`` LoRA terms), lays out the output shards and fixes every
tensor's byte offset, then estimates peak memory and output size. The result, :class:`Plan`, is
plain frozen data that round-trips through JSON; the executor makes no layout decisions.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from streammerge.errors import (
    AdapterMismatch,
    BadCheckpoint,
    BudgetTooSmall,
    OutputError,
    PlanMismatch,
    StreamMergeError,
    UnsupportedAdapter,
)
from streammerge.formats.bnb import Quant4bit, Quant8bit, Quantized, find_quantized
from streammerge.formats.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SINGLE_NAME,
    WEIGHT_SUFFIXES,
    Checkpoint,
    check_inside,
    is_quantized,
    open_checkpoint,
)
from streammerge.formats.peft import PEFT_PREFIX, Adapter, LoraPair, open_adapter
from streammerge.formats.safetensors import DTYPE_SIZES, FLOAT_DTYPES, OutputTensor, TensorInfo, build_header, tensor_nbytes
from streammerge.units import parse_dtype, parse_size

PLAN_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_TILE_BYTES = 64 * 2**20
MIN_TILE_BYTES = 64 * 2**10
ACC_CHUNK_BYTES = 4 * 2**20
"""float64 accumulator rows merged at once: small enough to stay in a CPU's L2/L3 cache."""
WRITE_BUFFERS = 3
"""Output tiles in flight: one being computed, the others queued for or being written."""
WRITE_ALIGN = 4096
"""Each output buffer has this much room beyond a tile, to start the tile at its file offset's
block alignment (the writer's direct writes need it)."""
PREFETCH_TILES = 1
"""Input tiles read (or mapped in) ahead of the one being merged, by the executor's reading thread.
More did not help: 3B cold runs with 1, 2 and 3 tiles ahead took 9.4, 9.9 and 10.4 s (one run each,
within this disk's drift)."""
COPY_FALLBACK_BYTES = 8 * 2**20
"""Chunk for copying untouched tensors where the kernel cannot copy file to file."""
RATES = {"startup_s": 4.0, "read_bytes_per_s": 1.0e9, "write_bytes_per_s": 0.45e9, "merge_s_per_elem": 2e-9, "dequant_s_per_elem": 2.5e-9}
"""Measured on the benchmark machines (docs/benchmarks.md: 2-core EPYC and Xeon, virtual disks):
cold reads and writes with fsync on the slower (EPYC) disk (reads and writes share the disk, so
their times add up); the float64 merge and 4-bit dequantization on two merging threads while the
disk threads run (3B cold on the Xeon: 13-14 s for a bf16 base, 13-15 s from NF4); importing
torch. Computing overlaps the disk, so the estimate is the slower of the two plus the start-up."""
RUNTIME_BASE_BYTES = 400 * 2**20
"""Resident memory of the interpreter with torch imported, before any tensor (measured ~230 MB, padded)."""
BNB_IMPORT_BYTES = 160 * 2**20
"""Importing bitsandbytes (only for merged_4bit output) adds ~120 MB of resident memory here."""
TORCH_GPU_BUILD_BYTES = 384 * 2**20
"""Importing a CUDA (or ROCm) build of torch maps more than the CPU build, GPU or not: the same
CPU run peaked at 524 MiB with torch 2.11+cu130 against 249 MiB with 2.13.0+cpu."""
CUDA_RUNTIME_BYTES = 512 * 2**20
"""A GPU run's resident memory beyond that: the CUDA context and cuBLAS (a whole 1B run on an H200
peaked at 875 MiB: 344 MiB on the CPU build, ~275 MiB for the CUDA build, the staging slots, the rest)."""
DEVICE_ALLOCATOR_SLACK_BYTES = 64 * 2**20
"""What torch's CUDA caching allocator may reserve beyond the live buffers of a GPU run: it carves
allocations of 1-10 MiB from 20 MiB segments and rounds larger ones up to 2 MiB."""
STAGING_SLOTS = 2
"""Pinned host slots an input tile passes through on its way to the GPU (:mod:`streammerge.staging`)."""
PER_UNIT_BOOKKEEPING_BYTES = 4096
"""Plan objects and progress state per work unit, resident for the whole run."""
TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges")
TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken")

Op = Literal["copy", "cast", "merge", "dequant"]
MODES = ("merged_16bit", "merged_4bit", "lora")
"""merged_16bit: a 16/32-bit model; merged_4bit: linear weights re-quantized with bitsandbytes (NF4);
lora: only the adapter, normalised (key names, dtype), checked against the base."""
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class Source:
    """Where a tensor's bytes are: file, absolute offset, length, and what they hold."""

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, t: TensorInfo) -> Source:
        return cls(file=t.path, offset=t.offset, nbytes=t.nbytes, dtype=t.dtype, shape=t.shape)


@dataclass(frozen=True)
class LoraTerm:
    """``scale * (b @ a)`` added to the base weight (transposed when the base stores (in, out))."""

    a: Source
    b: Source
    scale: float
    transpose: bool
    adapter: int
    """Index into :attr:`Plan.adapters`."""


@dataclass(frozen=True)
class AddTerm:
    """``scale * vector`` added to a 1-D base tensor (a LoRA bias added to the layer's bias)."""

    source: Source
    scale: float


@dataclass(frozen=True)
class QuantSpec:
    """How to dequantize a bitsandbytes source: 4-bit (nf4/fp4) block scales or int8 row scales."""

    kind: str
    """"nf4", "fp4" or "int8"."""
    blocksize: int
    absmax: Source | None = None
    quant_map: Source | None = None
    nested_absmax: Source | None = None
    nested_quant_map: Source | None = None
    nested_blocksize: int = 0
    nested_offset: float = 0.0
    scb: Source | None = None

    @classmethod
    def of(cls, q: Quantized) -> QuantSpec:
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

    def stats_bytes(self) -> int:
        """Bytes of the statistics held for the whole unit (scales in float32 plus what they come
        from, and the 1 MiB table that decodes pairs of 4-bit bytes)."""
        if self.scb is not None:
            return 2 * self.scb.nbytes
        assert self.absmax is not None
        blocks = math.prod(self.absmax.shape)
        return blocks * 4 + self.absmax.nbytes + (blocks * 8 if self.nested_absmax is not None else 0) + 4096 + 65536 * 4 * 4


@dataclass(frozen=True)
class OutputSlot:
    """An extra output tensor a unit writes (the statistics of a re-quantized weight)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RequantSpec:
    """Quantize the merged weight back to 4 bit (``--mode merged_4bit``), as bitsandbytes does."""

    quant_type: str
    blocksize: int
    double_quant: bool
    logical_shape: tuple[int, int]
    state_dtype: str
    """The dequantized dtype the quant state records (a torch dtype name, e.g. "bfloat16")."""
    state_bytes: int
    """Fixed length of the quant-state JSON (padded with spaces) so its offset is known at plan time."""

    def stats(self, name: str) -> list[OutputTensor]:
        """The statistics tensors bitsandbytes stores beside the packed weight ``name``."""
        n = self.logical_shape[0] * self.logical_shape[1]
        blocks = math.ceil(n / self.blocksize)
        out = [OutputTensor(name + ".absmax", "U8" if self.double_quant else "F32", (blocks,))]
        if self.double_quant:
            out += [
                OutputTensor(name + ".nested_absmax", "F32", (math.ceil(blocks / NESTED_BLOCKSIZE),)),
                OutputTensor(name + ".nested_quant_map", "F32", (256,)),
            ]
        out += [
            OutputTensor(name + ".quant_map", "F32", (16,)),
            OutputTensor(f"{name}.quant_state.bitsandbytes__{self.quant_type}", "U8", (self.state_bytes,)),
        ]
        return out


NESTED_BLOCKSIZE = 256
"""bitsandbytes' block size for double-quantizing the block scales."""


@dataclass(frozen=True)
class WorkUnit:
    """One output tensor: its source, what to do, and exactly where its bytes go."""

    name: str
    op: Op
    source: Source
    lora: tuple[LoraTerm, ...]
    out_dtype: str
    base_dtype: str
    """The dtype the base model holds this weight in. A source in another dtype (a weight PEFT
    saved with the adapter) is rounded to it first, as loading it into the base model would."""
    shape: tuple[int, ...]
    shard: int
    offset: int
    nbytes: int
    rows: int
    row_elems: int
    tile_rows: int
    """The unit is processed as a (rows, row_elems) matrix, ``tile_rows`` rows at a time."""
    chunk_rows: int
    """Rows of one float64 accumulator chunk within a tile (merges only)."""
    work_bytes: int
    """Bytes this unit's tile needs beyond the runtime (mapped source, accumulator, output, factors)."""
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
    combination: str = "cat"
    """How several LoRA terms combine: "cat" sums the deltas; "linear" multiplies the weighted sums of
    the B's and of the A's (PEFT's ``linear``), each term's ``scale`` being its weight times its scaling."""

    @property
    def inputs(self) -> tuple[Source, ...]:
        """Every input the unit reads: the source, each term's A and B, the quantization statistics,
        the DoRA magnitude and added vectors. The readahead and the executor both measure their
        position in these bytes."""
        q = self.quant
        stats = () if q is None else (q.absmax, q.quant_map, q.nested_absmax, q.nested_quant_map, q.scb)
        vectors = (self.magnitude, *(a.source for a in self.adds))
        return (self.source, *(s for term in self.lora for s in (term.a, term.b)), *(s for s in (*stats, *vectors) if s is not None))

    @property
    def read_bytes(self) -> int:
        return sum(s.nbytes for s in self.inputs)


@dataclass(frozen=True)
class Shard:
    file: str
    header: str
    """The complete header as written: 8-byte length prefix as 16 hex digits, then the JSON text."""
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
    """Rough wall time on a CPU like the one the benchmarks ran on (see :data:`RATES`); the disk decides."""


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
    """merged_16bit, merged_4bit or lora (see :data:`MODES`)."""
    flavours: tuple[tuple[str, ...], ...]
    """What each adapter holds (lora, rslora, dora, embedding lora, modules_to_save, ...)."""
    weights: tuple[float, ...]
    combination: str
    max_shard_bytes: int
    write_buffers: int
    """How many output tiles may be in flight (see :func:`out_tile_bytes` for their size)."""
    units: tuple[WorkUnit, ...]
    shards: tuple[Shard, ...]
    copy_files: tuple[CopyFile, ...]
    config: dict[str, Any] | None
    """config.json to write (quantization_config dropped, dtype set), or None if the base has none."""
    inputs: tuple[Fingerprint, ...]
    estimate: Estimate
    notes: tuple[str, ...] = field(default=())

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
        total = sum(u.nbytes + sum(x.nbytes for x in u.extra) for u in self.units)
        params = sum(math.prod(u.requant.logical_shape if u.requant else u.shape) for u in self.units)
        names = [(name, u.shard) for u in self.units for name in (u.name, *(x.name for x in u.extra))]
        weight_map = {name: self.shards[shard].file for name, shard in sorted(names)}
        return {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": weight_map}


def _tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x)


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

        units = tuple(
            WorkUnit(
                **{
                    **u,
                    "source": src(u["source"]),
                    "shape": _tuple(u["shape"]),
                    "lora": tuple(LoraTerm(**{**t, "a": src(t["a"]), "b": src(t["b"])}) for t in u["lora"]),
                    "quant": quant(u.get("quant")),
                    "requant": None
                    if u.get("requant") is None
                    else RequantSpec(**{**u["requant"], "logical_shape": _tuple(u["requant"]["logical_shape"])}),
                    "extra": tuple(OutputSlot(**{**x, "shape": _tuple(x["shape"])}) for x in u.get("extra", ())),
                    "magnitude": None if u.get("magnitude") is None else src(u["magnitude"]),
                    "adds": tuple(AddTerm(source=src(a["source"]), scale=a["scale"]) for a in u.get("adds", ())),
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
            }
        )
    except StreamMergeError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise PlanMismatch(f"{where}: not a streammerge plan ({type(e).__name__}: {e})") from e


# ----------------------------------------------------------------------------------------------
# Planning


def plan(
    base: str | os.PathLike[str],
    adapters: str | os.PathLike[str] | list[str] | list[os.PathLike[str]] | tuple[str, ...],
    out: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    tile_size: int | str = DEFAULT_TILE_BYTES,
    device: str = "auto",
    overwrite: bool = False,
    mode: str = "merged_16bit",
    weights: list[float] | tuple[float, ...] | None = None,
    combination: str = "cat",
    max_ram: int | str | None = None,
    vram_budget: int | str | None = None,
) -> Plan:
    """Plan merging LoRA ``adapters`` into the safetensors model ``base``, writing to ``out``.

    Reads headers and JSON only. ``dtype`` is "auto" (keep each tensor's dtype; for a quantized
    base its compute dtype) or one of bfloat16/bf16, float16/fp16, float32/fp32; sizes accept ints
    or strings like "5GB", "512MiB". ``mode`` is one of :data:`MODES`. Several adapters are
    combined with ``weights`` (default 1 each): ``combination="cat"`` adds ``sum_i w_i s_i B_i @ A_i``
    (PEFT's ``add_weighted_adapter(..., combination_type="cat")``, exact, any ranks);
    ``"linear"`` reproduces PEFT's ``linear`` (weighted sums of the A's and of the B's, equal ranks).
    ``max_ram`` / ``vram_budget`` shrink the tiles until the estimate fits, or refuse with
    :class:`BudgetTooSmall` when even the smallest tiles do not.

    Example::

        p = streammerge.plan("./base", ["./my-lora"], out="./merged", dtype="bfloat16")
        print(p.estimate.peak_host_bytes, p.estimate.output_bytes)
        p.save("plan.json")
    """
    out_dtype = parse_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size, "max shard size")
    tile_bytes = parse_size(tile_size, "tile size")
    if device not in ("auto", "cpu", "cuda"):
        raise StreamMergeError(f"device must be auto, cpu or cuda, not {device!r}")
    if mode not in MODES:
        raise StreamMergeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [os.fspath(adapters)]
    if not adapters:
        raise StreamMergeError("give at least one adapter folder")
    ckpt = open_checkpoint(base)
    method = is_quantized(ckpt)
    if method not in (None, "bitsandbytes", "bitsandbytes 4-bit", "bitsandbytes 8-bit"):
        raise BadCheckpoint(f"{ckpt.root}: base is quantized with {method}; streammerge reads bitsandbytes 4/8-bit and unquantized bases")
    quantized = find_quantized(ckpt.tensors)
    if out_dtype == "auto" and (quantized or mode == "merged_4bit") and mode != "lora":
        out_dtype = quantized_default_dtype(ckpt.config, quantized)
    raw_tensors = ckpt.tensors
    ckpt = logical_view(ckpt, quantized)
    opened = [open_adapter(a) for a in adapters]
    out_path = os.path.abspath(os.fspath(out))
    check_output(out_path, [ckpt.root, *(a.root for a in opened)], overwrite)

    adapter_weights = _check_weights(weights, len(opened))
    if combination not in COMBINATIONS:
        raise StreamMergeError(f"combination must be one of {', '.join(COMBINATIONS)}, not {combination!r}")
    updates = map_updates(ckpt, opened, adapter_weights, combination)
    notes = [f"{len(ckpt.ignored)} tensors stored in shards but absent from the index are not written (the index is authoritative)"] * bool(
        ckpt.ignored
    )
    notes += updates.notes
    if mode == "lora" and len(opened) > 1:
        raise StreamMergeError("--mode lora writes one adapter; give exactly one")
    requant = requant_choices(ckpt, quantized, out_dtype) if mode == "merged_4bit" else {}
    # merged_4bit from a 4-bit base: weights no adapter touches keep their packed bytes and statistics
    # exactly (a dequantize/re-quantize round trip would move ~2% of their values).
    untouched = {n: q for n, q in quantized.items() if isinstance(q, Quant4bit) and n in requant and n not in updates.by_name}
    for name in untouched:
        del requant[name]

    def raw_copies(t: TensorInfo) -> list[TensorInfo]:
        q = untouched[t.name]
        return [raw_tensors[t.name], *sorted(q.companions(), key=lambda c: c.name)]

    if requant and importlib.util.find_spec("bitsandbytes") is None:
        raise StreamMergeError("--mode merged_4bit quantizes with bitsandbytes, which is not installed: pip install 'streammerge[quant]'")

    def lay_out(tile: int) -> tuple[list[WorkUnit], list[Shard]]:
        if mode == "lora":
            specs = [_unit_spec(t, BaseUpdate(), out_dtype, tile) for t in adapter_tensors(opened[0])]
            return layout_shards(specs, max_shard_bytes, single_name=ADAPTER_WEIGHTS_NAME)
        specs = []
        for t in [*ckpt.ordered(), *updates.extra_tensors]:
            if t.name in untouched:
                specs += [_unit_spec(raw, BaseUpdate(), "auto", tile) for raw in raw_copies(t)]
            else:
                update = updates.by_name.get(t.name, BaseUpdate())
                specs.append(_unit_spec(t, update, out_dtype, tile, quantized.get(t.name), requant.get(t.name), combination))
        return layout_shards(specs, max_shard_bytes)

    if mode == "lora":
        copy_files, config = _adapter_files(opened[0].root), None
    else:
        copy_files = _files_to_copy(ckpt.root, [a.root for a in opened])
        config = output_config(ckpt.config, out_dtype, requant_config(ckpt.config, quantized, out_dtype) if requant or untouched else None)
        if config is not None:
            config.update(updates.config_edits)
    # Tiles shrink (halving) until the estimate fits --max-ram / --vram-budget.
    ram_budget = None if max_ram is None else parse_size(max_ram, "max RAM")
    vram = None if vram_budget is None else parse_size(vram_budget, "VRAM budget")
    while True:
        units, shards = lay_out(tile_bytes)
        estimate = estimate_run(units, shards, copy_files, config, tile_bytes, device)
        over_ram = ram_budget is not None and estimate.peak_host_bytes > ram_budget
        over_vram = vram is not None and estimate.peak_device_bytes > vram
        if not (over_ram or over_vram):
            break
        if tile_bytes <= MIN_TILE_BYTES:
            what, need, have = ("RAM", estimate.peak_host_bytes, ram_budget) if over_ram else ("VRAM", estimate.peak_device_bytes, vram)
            raise BudgetTooSmall(
                f"{ckpt.root}: needs at least {need} bytes of {what} even with {MIN_TILE_BYTES}-byte tiles (largest unit "
                f"{estimate.largest_unit}); the budget is {have}. Raise the budget."
            )
        tile_bytes = max(MIN_TILE_BYTES, tile_bytes // 2)
    if mode != "lora":
        notes += quantized_notes(quantized, any(u.op == "merge" and u.quant for u in units), units)
        dora = [u for u in units if u.magnitude is not None]
        if dora:
            notes.append(
                f"DoRA on {len(dora)} weights: each row's norm is taken within its tile (tiles hold whole rows), "
                "so one pass suffices; the magnitudes add "
                f"{sum(u.rows * 16 for u in dora) >> 10} KiB"
            )
        if requant:
            notes.append(f"{len(requant)} weights are re-quantized to 4 bit ({next(iter(requant.values())).quant_type}) after merging")
        if untouched:
            notes.append(f"{len(untouched)} 4-bit weights no adapter touches are copied packed, bit for bit")
    inputs = _fingerprints(ckpt, opened, copy_files)
    return Plan(
        version=PLAN_VERSION,
        base=ckpt.root,
        adapters=tuple(a.root for a in opened),
        out=out_path,
        dtype=out_dtype,
        device=device,
        overwrite=overwrite,
        mode=mode,
        flavours=tuple(a.flavours for a in opened),
        weights=tuple(adapter_weights),
        combination=combination,
        max_shard_bytes=max_shard_bytes,
        write_buffers=WRITE_BUFFERS,
        units=tuple(units),
        shards=tuple(shards),
        copy_files=tuple(copy_files),
        config=config,
        inputs=inputs,
        estimate=estimate,
        notes=tuple(notes),
    )


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
COMBINATIONS = ("cat", "linear")


def _check_weights(weights: list[float] | tuple[float, ...] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    values = list(weights)
    if len(values) != count or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in values):
        raise StreamMergeError(f"give one finite weight per adapter: {count} adapters, weights {values}")
    return [float(w) for w in values]


def adapter_tensors(adapter: Adapter) -> list[TensorInfo]:
    """The adapter's tensors under PEFT's normalised key names (no adapter name), in file order (``--mode lora``)."""
    named: dict[str, str] = {t.name: t.name for t in adapter.replacements.values()}
    for p in adapter.pairs:
        a, b = ("lora_embedding_A", "lora_embedding_B") if p.embedding else ("lora_A.weight", "lora_B.weight")
        named[p.a.name], named[p.b.name] = f"{PEFT_PREFIX}{p.module}.{a}", f"{PEFT_PREFIX}{p.module}.{b}"
        if p.magnitude is not None:
            named[p.magnitude.name] = f"{PEFT_PREFIX}{p.module}.lora_magnitude_vector"
        if p.bias is not None:
            named[p.bias.name] = f"{PEFT_PREFIX}{p.module}.lora_B.bias"
    everything = [t for p in adapter.pairs for t in (p.a, p.b, p.magnitude, p.bias) if t is not None]
    tensors = sorted([*everything, *adapter.replacements.values()], key=lambda t: t.offset)
    return [dataclasses.replace(t, name=named[t.name]) for t in tensors]


def _adapter_files(root: str) -> list[CopyFile]:
    """Everything of an adapter folder but its weights: adapter_config.json (kept as is), README, tokenizer."""
    return [
        CopyFile(src=check_inside(root, os.path.join(root, name)), dst=name)
        for name in sorted(os.listdir(root))
        if not name.startswith(".") and not _is_weight_file(name) and os.path.isfile(os.path.join(root, name))
    ]


_LINEAR_SKIP = ("embed", "wte", "wpe", "lm_head", "norm", "score")
"""Name parts of 2-D weights that are not linear layers transformers would quantize."""


def requant_choices(ckpt: Checkpoint, quantized: dict[str, Quantized], out_dtype: str) -> dict[str, RequantSpec]:
    """Which weights ``--mode merged_4bit`` writes in 4 bit, and how.

    From a 4-bit base: exactly its 4-bit weights, each with its own quant type and block size.
    Otherwise: every 2-D ``*.weight`` that is not an embedding, norm or output head, in NF4 with
    double quantization and blocksize 64 (what QLoRA uses).
    """
    state_dtype = _DTYPE_CONFIG_NAMES[out_dtype]
    four_bit = {name: q for name, q in quantized.items() if isinstance(q, Quant4bit)}
    chosen: dict[str, RequantSpec] = {}
    for t in ckpt.ordered():
        q = four_bit.get(t.name)
        if four_bit and q is None:
            continue
        if q is None and (len(t.shape) != 2 or not t.name.endswith(".weight") or any(p in t.name for p in _LINEAR_SKIP)):
            continue
        if t.dtype not in FLOAT_DTYPES:
            continue
        quant_type, blocksize, double = (q.quant_type, q.blocksize, q.nested_absmax is not None) if q else ("nf4", 64, True)
        shape = (t.shape[0], t.shape[1])
        state = _quant_state_json(quant_type, blocksize, state_dtype, shape, double, 0.0)
        chosen[t.name] = RequantSpec(quant_type, blocksize, double, shape, state_dtype, len(state) + 32)
    return chosen


def _quant_state_json(quant_type: str, blocksize: int, dtype: str, shape: tuple[int, int], double: bool, offset: float) -> bytes:
    """The quant-state JSON bitsandbytes writes (same keys, same order)."""
    state: dict[str, Any] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if double:
        state |= {"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": offset}
    return json.dumps(state).encode("utf-8")


def quant_state_bytes(spec: RequantSpec, offset: float) -> bytes:
    """The quant-state JSON of a re-quantized weight, padded with spaces to its planned length."""
    raw = _quant_state_json(spec.quant_type, spec.blocksize, spec.state_dtype, spec.logical_shape, spec.double_quant, offset)
    if len(raw) > spec.state_bytes:
        raise AssertionError(f"quant state {raw!r} longer than planned {spec.state_bytes} bytes")
    return raw + b" " * (spec.state_bytes - len(raw))


def requant_config(config: dict[str, Any] | None, quantized: dict[str, Quantized], out_dtype: str) -> dict[str, Any]:
    """quantization_config for a merged_4bit output: the base's own when it was 4-bit, else QLoRA's defaults."""
    qc = (config or {}).get("quantization_config")
    if any(isinstance(q, Quant4bit) for q in quantized.values()) and isinstance(qc, dict):
        return {**qc, "bnb_4bit_compute_dtype": _DTYPE_CONFIG_NAMES[out_dtype]}
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": _DTYPE_CONFIG_NAMES[out_dtype],
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def quantized_default_dtype(config: dict[str, Any] | None, quantized: dict[str, Quantized]) -> str:
    """Output dtype when none is asked for: bnb_4bit_compute_dtype for 4-bit bases, else the model's dtype, else bf16."""
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
        if isinstance(q, Quant4bit):
            t = dataclasses.replace(t, dtype=q.dtype, shape=q.shape)
        elif isinstance(q, Quant8bit):
            dtype = quantized_default_dtype({k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}, {})
            t = dataclasses.replace(t, dtype=dtype)
        tensors[name] = t
    order = [tensors[t.name] for t in ckpt.ordered() if t.name in tensors]
    return dataclasses.replace(ckpt, tensors=tensors, order=tuple(order))


def quantized_notes(quantized: dict[str, Quantized], merged: bool, units: list[WorkUnit] | None = None) -> list[str]:
    if not quantized:
        return []
    kinds = Counter(q.quant_type if isinstance(q, Quant4bit) else "int8" for q in quantized.values())
    cost = ""
    if units:
        tile = max(
            (u.tile_rows * u.row_elems * (DTYPE_SIZES[u.base_dtype] + QUANT_ROW_COST[u.quant.kind]) for u in units if u.quant), default=0
        )
        stats = max((u.quant.stats_bytes() for u in units if u.quant), default=0)
        cost = f" (dequantization needs up to {tile >> 20} MiB per tile + {stats >> 20} MiB of block scales per tensor, in the estimate)"
    notes = [f"quantized base: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))} weights are dequantized tile by tile{cost}"]
    if merged:
        notes.append(
            "the merged weights carry the quantization rounding of the base; merging into the original 16-bit base, "
            "when you have it, is more exact"
        )
    return notes


def check_output(out: str, inputs: list[str], overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite), or that is, holds, or lies inside an input."""
    real_out = os.path.realpath(out)
    for root in inputs:
        real_in = os.path.realpath(root)
        if real_out == real_in or real_out.startswith(real_in + os.sep):
            raise OutputError(f"{out}: output folder lies inside input folder {root}; choose a folder outside the inputs")
        if real_in.startswith(real_out + os.sep):
            raise OutputError(f"{out}: output folder contains input folder {root}; choose another output folder")
    if os.path.lexists(out) and not overwrite:
        raise OutputError(f"{out}: output folder already exists; pass --overwrite to replace it")
    parent = os.path.dirname(real_out)
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: parent folder {parent} does not exist")


def find_base_tensor(ckpt: Checkpoint, module: str, param: str = "weight") -> TensorInfo | None:
    """The base tensor of a module PEFT names: ``<module>.weight``, else the unique tensor ending so."""
    exact = ckpt.tensors.get(f"{module}.{param}")
    if exact is not None:
        return exact
    suffix = f".{module}.{param}"
    found = [t for name, t in ckpt.tensors.items() if name.endswith(suffix)]
    if len(found) == 1:
        return found[0]
    # The base may be saved without the wrapper prefix PEFT saw (e.g. "model."): try dropping it.
    head, _, rest = module.partition(".")
    return ckpt.tensors.get(f"{rest}.{param}") if head and rest else None


@dataclass(frozen=True)
class BaseUpdate:
    """What the adapters do to one base tensor."""

    terms: tuple[LoraTerm, ...] = ()
    source: TensorInfo | None = None
    """A full tensor saved with an adapter that replaces the base's (modules_to_save, trained bias, saved base layer)."""
    magnitude: Source | None = None
    """DoRA magnitude: rows of W + delta are rescaled to it."""
    adds: tuple[AddTerm, ...] = ()
    """Vectors added times a scale (lora_bias)."""


INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


@dataclass(frozen=True)
class Updates:
    """Everything the adapters change, by base tensor name, plus the config edits that follow."""

    by_name: dict[str, BaseUpdate]
    extra_tensors: tuple[TensorInfo, ...]
    """Tensors the output needs that the base does not store (an untied lm_head)."""
    config_edits: dict[str, Any]
    notes: tuple[str, ...]


def _input_embedding(ckpt: Checkpoint) -> TensorInfo | None:
    found = [t for name, t in ckpt.tensors.items() if name.endswith(INPUT_EMBEDDING_SUFFIXES) and len(t.shape) == 2]
    return found[0] if len(found) == 1 else None


def map_updates(ckpt: Checkpoint, adapters: list[Adapter], weights: list[float], combination: str) -> Updates:
    """Map every adapter tensor to the base tensor it changes, checking shapes.

    Tied embeddings: when the base stores no ``lm_head.weight`` (or says ``tie_word_embeddings``)
    and an adapter changes either side, both tensors are written, each with its own changes, and
    the config unties them: more correct than merging one side's delta into the shared tensor.
    """
    embed = _input_embedding(ckpt)
    tied_config = bool((ckpt.config or {}).get("tie_word_embeddings", False))
    virtual_head = None
    if (
        embed is not None
        and OUTPUT_EMBEDDING not in ckpt.tensors
        and (tied_config or ckpt.config is None or "tie_word_embeddings" not in ckpt.config)
    ):
        virtual_head = dataclasses.replace(embed, name=OUTPUT_EMBEDDING)
    lookup = dict(ckpt.tensors)
    if virtual_head is not None:
        lookup[OUTPUT_EMBEDDING] = virtual_head
    view = dataclasses.replace(ckpt, tensors=lookup)

    terms: dict[str, list[LoraTerm]] = {}
    sources: dict[str, TensorInfo] = {}
    magnitudes: dict[str, Source] = {}
    adds: dict[str, list[AddTerm]] = {}
    edits: dict[str, Any] = {}
    for adapter in adapters:  # every replacement first: LoRA shapes are checked against the final tensors
        for name, saved in adapter.replacements.items():
            target = view.tensors.get(name) or find_base_tensor(view, name.rsplit(".", 1)[0], name.rsplit(".", 1)[1])
            if target is None:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {saved.name!r} replaces {name!r}, which the base {ckpt.root} does not have"
                )
            if target.name in sources:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {saved.name!r} replaces {target.name!r}, which another adapter replaces too"
                )
            if saved.shape != target.shape:
                resizable = target is virtual_head or target is embed or target.name == OUTPUT_EMBEDDING
                if not (resizable and len(saved.shape) == 2 and saved.shape[1] == target.shape[1]):
                    raise AdapterMismatch(
                        f"{adapter.weights_path}: tensor {saved.name!r} has shape {list(saved.shape)} but base tensor {target.name!r} is {list(target.shape)}"
                    )
                edits["vocab_size"] = saved.shape[0]  # the vocabulary was resized during training
            sources[target.name] = saved
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        for pair in adapter.pairs:
            target = find_base_tensor(view, pair.module)
            if target is None:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {pair.a.name!r} adapts {pair.module + '.weight'!r}, which the base {ckpt.root} does not have"
                    f"{_targeting_hint(adapter, pair.module)}"
                )
            shape = sources[target.name].shape if target.name in sources else target.shape
            transpose = pair.embedding or adapter.fan_in_fan_out
            _check_pair_shape(adapter, pair, target, shape, transpose)
            terms.setdefault(target.name, []).append(
                LoraTerm(a=Source.of(pair.a), b=Source.of(pair.b), scale=weight * pair.scale, transpose=transpose, adapter=index)
            )
            if pair.magnitude is not None:
                if transpose:
                    raise UnsupportedAdapter(
                        f"{adapter.weights_path}: tensor {pair.magnitude.name!r}: DoRA on a fan_in_fan_out (Conv1D) layer is not supported"
                    )
                magnitudes[target.name] = Source.of(pair.magnitude)
            if pair.bias is not None:
                bias_name = target.name.removesuffix(".weight") + ".bias"
                bias = view.tensors.get(bias_name)
                if bias is None or bias.shape != pair.bias.shape:
                    raise AdapterMismatch(
                        f"{adapter.weights_path}: tensor {pair.bias.name!r} (lora_bias) needs a base bias {bias_name!r} of {list(pair.bias.shape)}"
                    )
                adds.setdefault(bias_name, []).append(AddTerm(Source.of(pair.bias), weight * pair.scale))
    for name in magnitudes:
        if len(terms[name]) > 1:
            raise UnsupportedAdapter(
                f"{ckpt.root}: tensor {name!r} has a DoRA adapter and other adapters; DoRA cannot be combined with them"
            )
    if combination == "linear":
        for name, ts in terms.items():
            if len({t.a.shape[0] for t in ts}) > 1:
                raise AdapterMismatch(
                    f"tensor {name!r}: --combination linear needs equal ranks, found {sorted({t.a.shape[0] for t in ts})}; use cat"
                )

    if "vocab_size" in edits:  # a resized vocabulary must be resized on both sides
        sides = [n for n in (embed.name if embed is not None else None, OUTPUT_EMBEDDING) if n and (n in lookup)]
        rows = {n: (sources[n].shape[0] if n in sources else lookup[n].shape[0]) for n in sides}
        if len(set(rows.values())) > 1:
            raise AdapterMismatch(
                f"{ckpt.root}: the adapters resize the vocabulary to {edits['vocab_size']} but leave "
                + ", ".join(f"{n} at {r} rows" for n, r in rows.items() if r != edits["vocab_size"])
                + "; both embeddings must be saved with the adapter (modules_to_save)"
            )
    changed = set(terms) | set(sources) | set(adds)
    extra: tuple[TensorInfo, ...] = ()
    notes: list[str] = []
    heads = {OUTPUT_EMBEDDING, embed.name if embed is not None else ""}
    if changed & heads and (virtual_head is not None or tied_config):
        edits["tie_word_embeddings"] = False
        notes.append("the adapter changes one side of tied input/output embeddings: both are written and the config unties them")
        if virtual_head is not None:
            extra = (virtual_head,)
    names = set(terms) | set(sources) | set(magnitudes) | set(adds)
    updates = {n: BaseUpdate(tuple(terms.get(n, ())), sources.get(n), magnitudes.get(n), tuple(adds.get(n, ()))) for n in names}
    return Updates(updates, extra, edits, tuple(notes))


def _targeting_hint(adapter: Adapter, module: str) -> str:
    cfg = adapter.config
    parts = [f"{k}={cfg[k]!r}" for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern") if cfg.get(k)]
    base = cfg.get("base_model_name_or_path")
    hint = f" (adapter config: {', '.join(parts)})" if parts else ""
    return hint + (f"; the adapter was trained on {base!r}" if base else "") + " (different model?)"


def _check_pair_shape(adapter: Adapter, pair: LoraPair, target: TensorInfo, shape: tuple[int, ...], transpose: bool) -> None:
    where = f"{adapter.weights_path}: tensor {pair.a.name!r} for base tensor {target.name!r}"
    if target.dtype not in FLOAT_DTYPES:
        raise AdapterMismatch(f"{where}: base tensor has dtype {target.dtype}; only F16/BF16/F32/F64 weights can take a LoRA delta")
    out_features, in_features = pair.b.shape[0], pair.a.shape[1]
    expected = (in_features, out_features) if transpose else (out_features, in_features)
    if shape != expected:
        layout = "(vocab, hidden)" if pair.embedding else "(in, out) as fan_in_fan_out=true says" if transpose else "(out, in)"
        hint = " (the base looks transposed: check fan_in_fan_out)" if shape == expected[::-1] and not pair.embedding else ""
        raise AdapterMismatch(f"{where}: LoRA gives {layout} = {list(expected)} but the base tensor is {list(shape)}{hint}")


@dataclass(frozen=True)
class _UnitSpec:
    """A work unit before the layout fixes its shard and offset."""

    name: str
    op: Op
    source: Source
    lora: tuple[LoraTerm, ...]
    out_dtype: str
    base_dtype: str
    shape: tuple[int, ...]
    rows: int
    row_elems: int
    tile_rows: int
    chunk_rows: int
    work_bytes: int
    quant: QuantSpec | None = None
    requant: RequantSpec | None = None
    magnitude: Source | None = None
    adds: tuple[AddTerm, ...] = ()
    combination: str = "cat"

    def outputs(self) -> list[OutputTensor]:
        main = OutputTensor(self.name, self.out_dtype, self.shape)
        return [main] + (self.requant.stats(self.name) if self.requant else [])


ACC_SIZE = 8
"""Bytes per element of the float64 accumulator (see streammerge.kernels.ACCUMULATE)."""


QUANT_ROW_COST = {"nf4": 4 + 4 + 1, "fp4": 4 + 4 + 1, "int8": 4 + 4}
"""Temporaries per element while dequantizing a tile: float32 values, indices or int8 widening, slack."""


def _unit_spec(
    t: TensorInfo,
    update: BaseUpdate,
    out_dtype: str,
    tile_bytes: int,
    quantized: Quantized | None = None,
    requant: RequantSpec | None = None,
    combination: str = "cat",
) -> _UnitSpec:
    """One output tensor: keep the base's dtype unless another was asked for; read from the
    adapter's saved copy of the base weight when there is one; dequantize a quantized one."""
    lora = update.terms
    dtype = t.dtype if out_dtype == "auto" or t.dtype not in FLOAT_DTYPES else out_dtype
    base_dtype = t.dtype
    quant = None if quantized is None or update.source is not None else QuantSpec.of(quantized)
    if update.source is not None:  # a full tensor from the adapter (possibly resized) replaces the base's
        t = dataclasses.replace(update.source, name=t.name)
        source = Source.of(t)
    elif quantized is not None:
        stored = quantized.packed if isinstance(quantized, Quant4bit) else quantized.weight
        source = Source(file=stored.path, offset=stored.offset, nbytes=stored.nbytes, dtype=stored.dtype, shape=stored.shape)
    else:
        source = Source.of(t)
    shape = t.shape
    adds = update.adds
    op: Op = "merge" if lora or adds else "dequant" if quant else ("copy" if dtype == t.dtype and not requant else "cast")
    s_out = DTYPE_SIZES.get(dtype, 1)  # sub-byte dtypes are only copied
    if requant is not None:
        s_out = 4 + 2  # the merged tile in float32, then bitsandbytes' packed codes and temporaries
    if (op in ("merge", "dequant") or requant is not None) and len(shape) == 2:
        rows, row_elems = shape[0], shape[1]
    else:  # copy/cast do not care about the shape: stream the flat elements
        rows, row_elems = math.prod(shape), 1
    if quant is not None:
        # packed source bytes, the dequantized tile in the base's dtype, its temporaries, the output
        row_cost = row_elems * (DTYPE_SIZES[base_dtype] + QUANT_ROW_COST[quant.kind] + s_out + 1)
    else:
        row_cost = row_elems * (DTYPE_SIZES.get(t.dtype, 1) + s_out)  # mapped source row + output row
        if t.dtype != base_dtype:
            row_cost += row_elems * DTYPE_SIZES[base_dtype]  # the source rounded to the base's dtype
    tile_rows = max(1, min(rows, tile_bytes // max(1, row_cost)))
    for blocksize in (quant.blocksize if quant else 0, requant.blocksize if requant else 0):
        if blocksize:  # 4-bit tiles start on a block boundary (blocks run over the flattened weight, across rows)
            step = blocksize // math.gcd(row_elems, blocksize)
            tile_rows = min(rows, max(step, tile_rows - tile_rows % step))
    chunk_rows = max(1, min(tile_rows, ACC_CHUNK_BYTES // max(1, row_elems * ACC_SIZE))) if op == "merge" else tile_rows
    work = 0 if op == "copy" else tile_rows * row_cost + sum(_factor_bytes(term) for term in lora)
    if op == "merge":
        work += chunk_rows * row_elems * ACC_SIZE
    if quant is not None:
        work += quant.stats_bytes()
    out_shape: tuple[int, ...] = shape
    if requant is not None:  # the main output is the packed codes; the block scales are kept for the unit
        work += math.ceil(math.prod(shape) / requant.blocksize) * 4 * 3
        dtype, out_shape = "U8", (math.ceil(math.prod(shape) / 2), 1)
    if update.magnitude is not None or adds:
        work += rows * 8 * 2 + sum(a.source.nbytes * 3 for a in adds)  # magnitudes / added vectors in float64
    return _UnitSpec(
        t.name, op, source, lora, dtype, base_dtype, out_shape, rows, row_elems, tile_rows, chunk_rows, work, quant, requant,
        update.magnitude, adds, combination if len(lora) > 1 else "cat",
    )  # fmt: skip


def _factor_bytes(term: LoraTerm) -> int:
    """A and B held in float64 for the whole unit, plus their mapped pages while being read."""
    elems = math.prod(term.a.shape) + math.prod(term.b.shape)
    return elems * ACC_SIZE + term.a.nbytes + term.b.nbytes


def layout_shards(specs: list[_UnitSpec], max_shard_bytes: int, single_name: str = SINGLE_NAME) -> tuple[list[WorkUnit], list[Shard]]:
    """Assign units to shards in order, starting a new shard when the next tensor would overflow.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own. Shards are named as
    transformers names them: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``.
    With another ``single_name`` (an adapter file) everything goes into that one file.
    Pure: returns units with their absolute byte offsets, and the shards with their headers.
    """
    groups: list[list[_UnitSpec]] = []
    current = 0
    for s in specs:
        n = sum(tensor_nbytes(t.dtype, t.shape) for t in s.outputs())
        if not groups or (groups[-1] and current + n > max_shard_bytes):
            groups.append([])
            current = 0
        groups[-1].append(s)
        current += n
    if not groups:
        raise BadCheckpoint("the base holds no tensors")
    if single_name != SINGLE_NAME and len(groups) > 1:
        groups = [[s for g in groups for s in g]]
    names = [single_name] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    units: list[WorkUnit] = []
    shards: list[Shard] = []
    for index, (name, group) in enumerate(zip(names, groups, strict=True)):
        layout = [t for s in group for t in s.outputs()]
        head, offsets = build_header(layout, {"format": "pt"})
        size = len(head) + sum(tensor_nbytes(t.dtype, t.shape) for t in layout)
        shards.append(Shard(file=name, header=head[:8].hex() + head[8:].decode("ascii"), size=size, tensors=tuple(t.name for t in layout)))
        slots = iter(zip(layout, offsets, strict=True))
        for s in group:
            (_, offset), *extra = [next(slots) for _ in s.outputs()]
            units.append(
                WorkUnit(
                    name=s.name, op=s.op, source=s.source, lora=s.lora, out_dtype=s.out_dtype, base_dtype=s.base_dtype, shape=s.shape,
                    shard=index, offset=offset, nbytes=tensor_nbytes(s.out_dtype, s.shape), rows=s.rows, row_elems=s.row_elems,
                    tile_rows=s.tile_rows, chunk_rows=s.chunk_rows, work_bytes=s.work_bytes, quant=s.quant, requant=s.requant,
                    magnitude=s.magnitude, adds=s.adds, combination=s.combination,
                    extra=tuple(OutputSlot(t.name, t.dtype, t.shape, o, tensor_nbytes(t.dtype, t.shape)) for t, o in extra),
                )
            )  # fmt: skip
    return units, shards


def shard_header_bytes(shard: Shard) -> bytes:
    """Decode :attr:`Shard.header` back into the bytes written at the start of the shard file."""
    return bytes.fromhex(shard.header[:16]) + shard.header[16:].encode("ascii")


_DTYPE_CONFIG_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def output_config(config: dict[str, Any] | None, out_dtype: str, quantization: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """config.json for the merged model: the given quantization_config (none for 16-bit output);
    dtype set when one was asked for."""
    if config is None:
        return None
    result = {k: v for k, v in config.items() if k != "quantization_config"}
    if quantization is not None:
        result["quantization_config"] = quantization
    if out_dtype != "auto":
        # transformers 5 reads "dtype", older versions "torch_dtype": write both.
        result["dtype"] = result["torch_dtype"] = _DTYPE_CONFIG_NAMES[out_dtype]
    return result


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name == INDEX_NAME or name.endswith(".index.json")


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(TOKENIZER_FILE_PREFIXES) or name.endswith(TOKENIZER_FILE_SUFFIXES)


def _files_to_copy(base: str, adapters: list[str]) -> list[CopyFile]:
    """Base files that are not weights (tokenizer, generation config, ...); an adapter's tokenizer wins."""
    chosen: dict[str, str] = {}
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if name != CONFIG_NAME and not name.startswith(".") and not _is_weight_file(name) and os.path.isfile(path):
            chosen[name] = check_inside(base, path)
    for root in adapters:
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if _is_tokenizer_file(name) and os.path.isfile(path):
                chosen[name] = check_inside(root, path)
    return [CopyFile(src=src, dst=name) for name, src in sorted(chosen.items())]


def _fingerprint(path: str) -> Fingerprint:
    st = os.stat(path)
    return Fingerprint(path=path, size=st.st_size, mtime_ns=st.st_mtime_ns)


def _fingerprints(ckpt: Checkpoint, adapters: list[Adapter], copy_files: list[CopyFile]) -> tuple[Fingerprint, ...]:
    paths = [h.path for h in ckpt.headers] + [a.weights_path for a in adapters] + [c.src for c in copy_files]
    config = os.path.join(ckpt.root, CONFIG_NAME)
    if ckpt.config is not None:
        paths.append(config)
    return tuple(_fingerprint(p) for p in dict.fromkeys(paths))


def check_inputs_unchanged(p: Plan) -> None:
    """Refuse to run a plan whose input files changed (size or mtime) since it was made."""
    for fp in p.inputs:
        try:
            now = _fingerprint(fp.path)
        except OSError as e:
            raise PlanMismatch(f"{fp.path}: input of the plan is gone ({e.strerror or e}); plan again") from e
        if (now.size, now.mtime_ns) != (fp.size, fp.mtime_ns):
            raise PlanMismatch(f"{fp.path}: input changed since the plan was made (size or mtime); plan again")


def out_tile_bytes(units: tuple[WorkUnit, ...] | list[WorkUnit]) -> int:
    """Size of one output tile buffer: the largest output tile of any computed unit."""
    return max((u.tile_rows * u.row_elems * DTYPE_SIZES[u.out_dtype] for u in units if u.op != "copy"), default=0)


def in_tile_bytes(units: tuple[WorkUnit, ...] | list[WorkUnit]) -> int:
    """Mapped input bytes of the largest input tile of any computed unit (packed bytes for a quantized base)."""
    return max((u.tile_rows * u.row_elems * DTYPE_SIZES[u.source.dtype] for u in units if u.op != "copy"), default=0)


def tile_range(unit: WorkUnit, row0: int, rows: int) -> tuple[str, int, int]:
    """The input bytes (file, offset, length) that rows ``row0 : row0 + rows`` of a computed unit read."""
    src = unit.source
    first, count = row0 * unit.row_elems, rows * unit.row_elems
    if unit.quant is not None and unit.quant.kind == "int8":  # one byte per element
        return src.file, src.offset + first, count
    if unit.quant is not None:  # two 4-bit codes per byte; tiles start on a block boundary
        start, end = first // 2, (first + count + 1) // 2
        return src.file, src.offset + start, end - start
    size = DTYPE_SIZES[src.dtype]
    return src.file, src.offset + first * size, count * size


def tile_ranges(units: list[WorkUnit]) -> list[tuple[str, int, int]]:
    """Every input tile the computed units among ``units`` read, in the order the executor reads them."""
    return [tile_range(u, row0, min(u.tile_rows, u.rows - row0)) for u in units if u.op != "copy" for row0 in range(0, u.rows, u.tile_rows)]


def acc_chunk_bytes(units: tuple[WorkUnit, ...] | list[WorkUnit]) -> int:
    """Size of the float64 accumulator: the largest chunk of any merge."""
    return max((u.chunk_rows * u.row_elems * ACC_SIZE for u in units if u.op == "merge"), default=0)


def torch_is_gpu_build() -> bool:
    """Whether the installed torch is a CUDA or ROCm build (its GPU libraries are on disk), without importing it."""
    spec = importlib.util.find_spec("torch")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    return any(
        glob.glob(os.path.join(folder, "lib", pattern)) for folder in folders for pattern in ("libtorch_cuda*.so*", "libtorch_hip*.so*")
    )


def nvidia_device_node() -> bool:
    """Whether this machine has an NVIDIA GPU device node (``/dev/nvidia0`` ...); no torch needed."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def merges_on_gpu(device: str) -> bool:
    """Whether a plan for ``device`` will run on a GPU here: ``cuda``, or ``auto`` where an NVIDIA
    device node exists (the planner does not import torch to ask)."""
    return device == "cuda" or (device == "auto" and nvidia_device_node())


def estimate_run(
    units: list[WorkUnit], shards: list[Shard], copy_files: list[CopyFile], config: dict[str, Any] | None, tile_bytes: int, device: str
) -> Estimate:
    """Upper bounds for the run.

    Peak RSS = runtime (interpreter + torch) + per-unit bookkeeping + the reusable buffers (the
    output tiles in flight, the accumulator, the copy chunk, the input tiles read ahead) + the
    largest transient: one tile of mapped source pages plus one unit's LoRA factors. A GPU build
    of torch costs more at import; a run on a GPU adds the CUDA runtime and the pinned staging slots.
    """
    largest = max(units, key=lambda u: u.work_bytes)

    def transient(u: WorkUnit) -> int:
        """Per-unit memory: one tile of mapped source pages (of the rounded copy too) and the factors."""
        elems = u.tile_rows * u.row_elems
        if u.requant is not None:  # bitsandbytes' packed codes and block scales of a tile, the unit's statistics
            extra = elems + math.ceil(u.rows * u.row_elems / u.requant.blocksize) * 4 * 3 + sum(x.nbytes for x in u.extra)
        else:
            extra = 0
        if u.quant is not None:  # packed bytes, dequantized tile, temporaries, statistics
            per_elem = 1 + DTYPE_SIZES[u.base_dtype] + QUANT_ROW_COST[u.quant.kind]
            return extra + elems * per_elem + u.quant.stats_bytes() + _unit_vectors(u)
        rounded = elems * DTYPE_SIZES[u.base_dtype] if u.base_dtype != u.source.dtype else 0
        return extra + elems * DTYPE_SIZES[u.source.dtype] + rounded + _unit_vectors(u)

    def _unit_vectors(u: WorkUnit) -> int:
        """LoRA factors (and, for the linear combination, their weighted sums and temporaries),
        DoRA magnitudes and added vectors held in float64 for the unit."""
        factors = sum(_factor_bytes(t) for t in u.lora)
        if u.combination == "linear":
            factors += 3 * sum(math.prod(t.a.shape) + math.prod(t.b.shape) for t in u.lora) * ACC_SIZE
        vectors = (u.rows * ACC_SIZE if u.magnitude is not None else 0) + sum(3 * ACC_SIZE * math.prod(a.source.shape) for a in u.adds)
        return factors + vectors

    computed = [u for u in units if u.op != "copy"]
    peak_transient = max((transient(u) for u in computed), default=0)
    dequant_tile = max((u.tile_rows * u.row_elems * DTYPE_SIZES[u.base_dtype] for u in units if u.quant), default=0)
    requant_tile = max((u.tile_rows * u.row_elems * 4 for u in units if u.requant), default=0)
    # The input tiles ahead of the merge (mapped, or read with O_DIRECT into buffers that also
    # hold the block-aligned edges of every tile, the current one included).
    prefetched = PREFETCH_TILES * in_tile_bytes(units) + (PREFETCH_TILES + 1) * 2 * WRITE_ALIGN
    buffers = (
        WRITE_BUFFERS * (out_tile_bytes(units) + WRITE_ALIGN)
        + 2 * acc_chunk_bytes(units)  # one per merging thread
        + dequant_tile
        + requant_tile
        + COPY_FALLBACK_BYTES
        + prefetched
    )
    host = RUNTIME_BASE_BYTES + PER_UNIT_BOOKKEEPING_BYTES * len(units) + buffers + peak_transient
    if any(u.requant for u in units):
        host += BNB_IMPORT_BYTES
    if torch_is_gpu_build():
        host += TORCH_GPU_BUILD_BYTES
    if computed and merges_on_gpu(device):
        host += CUDA_RUNTIME_BYTES + STAGING_SLOTS * in_tile_bytes(units)
    # On a GPU: the staged input tile, the output tile, the accumulator and the factors, and what
    # the caching allocator reserves around them.
    device_bytes = (
        0
        if device == "cpu" or not computed
        else out_tile_bytes(units) + acc_chunk_bytes(units) + 2 * requant_tile + peak_transient + DEVICE_ALLOCATOR_SLACK_BYTES
    )
    meta = len(json.dumps(config or {}, indent=2)) + 64 * len(units) + 4096
    output = sum(s.size for s in shards) + sum(os.path.getsize(c.src) for c in copy_files) + meta
    read = sum(u.read_bytes for u in units)
    merged = sum(u.rows * u.row_elems for u in units if u.op == "merge")
    dequantized = sum(u.rows * u.row_elems for u in units if u.quant is not None)
    seconds = RATES["startup_s"] + max(
        read / RATES["read_bytes_per_s"] + output / RATES["write_bytes_per_s"],
        merged * RATES["merge_s_per_elem"] + dequantized * RATES["dequant_s_per_elem"],
    )
    return Estimate(
        peak_host_bytes=host,
        peak_device_bytes=device_bytes,
        output_bytes=output,
        read_bytes=read,
        tile_bytes=tile_bytes,
        units=dict(Counter(u.op for u in units)),
        largest_unit=largest.name,
        seconds=round(seconds, 1),
    )
