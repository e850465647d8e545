"""Units and files: one work unit per output tensor, laid out in shards with fixed offsets.

Decides for each output tensor what to do (``copy`` bytes unchanged, ``cast`` to another dtype,
``dequant``, ``merge`` LoRA terms) and its tile size, assigns units to shards in order and fixes
every byte offset, and lists the other files of the output (config, tokenizer) and the
fingerprints of the inputs. Pure but for reading directory listings and file sizes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

from streammerge.errors import BadCheckpoint, OutputError, PlanMismatch
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, WEIGHT_SUFFIXES, Checkpoint, check_inside
from streammerge.formats.mxfp4 import BLOCKS
from streammerge.formats.peft import CONFIG_NAME as ADAPTER_CONFIG_NAME
from streammerge.formats.peft import Adapter
from streammerge.formats.quantized import Quantized, stored
from streammerge.formats.safetensors import FLOAT_DTYPES, OutputSlot, Source, TensorInfo, build_header, tensor_nbytes
from streammerge.geometry import ACC_CHUNK_BYTES, ACC_SIZE
from streammerge.plan.estimate import unit_cost
from streammerge.plan.mapping import BaseUpdate
from streammerge.plan.model import CopyFile, Fingerprint, Op, Plan, QuantSpec, RequantSpec, Shard, WorkUnit
from streammerge.plan.quant import DTYPE_CONFIG_NAMES

TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "chat_template", "vocab", "merges")
TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken")


def make_unit(
    t: TensorInfo,
    update: BaseUpdate,
    out_dtype: str,
    tile_bytes: int,
    quantized: Quantized | None = None,
    requant: RequantSpec | None = None,
    combination: str = "cat",
) -> WorkUnit:
    """One output tensor, not placed yet: keep the base's dtype unless another was asked for; read
    from the adapter's saved copy of the base weight when there is one; dequantize a quantized one."""
    lora = update.terms
    dtype = t.dtype if out_dtype == "auto" or t.dtype not in FLOAT_DTYPES else out_dtype
    base_dtype = t.dtype
    quant = None if quantized is None or update.source is not None else QuantSpec.of(quantized)
    if update.source is not None:  # a full tensor from the adapter (possibly resized) replaces the base's
        t = dataclasses.replace(update.source, name=t.name)
        source = Source.of(t)
    elif quantized is not None:
        source = Source.of(stored(quantized))
    else:
        source = Source.of(t)
    shape = t.shape
    mxfp4_out = requant is not None and requant.quant_type == "mxfp4"
    op: Op = (
        "merge"
        if lora or update.adds or update.token_rows
        else "dequant"
        if quant
        else ("copy" if dtype == t.dtype and not requant else "cast")
    )
    if (op in ("merge", "dequant") or requant is not None) and len(shape) == 2:
        rows, row_elems = shape[0], shape[1]
    elif len(shape) > 2 and (mxfp4_out or (requant is None and (op == "merge" or (quant is not None and quant.kind == "mxfp4")))):
        # fused experts (E, d1, d2): E * d1 rows (MXFP4: dequantized / re-quantized whole experts at a time)
        rows, row_elems = math.prod(shape[:-1]), shape[-1]
    else:  # copy/cast do not care about the shape: stream the flat elements
        rows, row_elems = math.prod(shape), 1
    name = t.name
    if requant is not None and requant.quant_type == "fp8":  # the main output is the FP8 codes
        dtype = "F8_E4M3"
    elif mxfp4_out:  # the main output is the blocks of the (E, K, N) parameter, under the base's name
        experts, k, n = shape
        name, dtype, shape = t.name + BLOCKS, "U8", (experts, n, k // 32, 16)
    elif requant is not None:  # the main output is the packed codes
        dtype, shape = "U8", (math.ceil(math.prod(shape) / 2), 1)
    unit = WorkUnit(
        name=name, op=op, source=source, lora=lora, out_dtype=dtype, base_dtype=base_dtype, shape=shape, rows=rows,
        row_elems=row_elems, tile_rows=rows, chunk_rows=rows, work_bytes=0, quant=quant, requant=requant,
        magnitude=update.magnitude, adds=update.adds, token_rows=update.token_rows,
        combination=combination if len(lora) > 1 else "cat",
    )  # fmt: skip
    return size_tiles(unit, tile_bytes)


def size_tiles(unit: WorkUnit, tile_bytes: int) -> WorkUnit:
    """Give a unit as many rows per tile as ``tile_bytes`` of its per-row cost allow (at least one;
    4-bit tiles start on a block boundary), and the float64 accumulator chunk of a merge."""
    rows, row_elems = unit.rows, unit.row_elems
    tile_rows = max(1, min(rows, tile_bytes // max(1, unit_cost(unit).per_row)))
    for blocksize in (unit.quant.blocksize if unit.quant else 0, unit.requant.blocksize if unit.requant else 0):
        if blocksize:  # 4-bit blocks run over the flattened weight, across rows
            step = blocksize // math.gcd(row_elems, blocksize)
            tile_rows = min(rows, max(step, tile_rows - tile_rows % step))
    # FP8 tiles hold whole block rows: needed to re-quantize (a block's amax), kept for dequantizing but
    # where one scale covers all rows (per tensor), whose tiles may start anywhere.
    dequant_step = unit.quant.row_step if unit.quant and unit.quant.row_step < rows else 1
    step = math.lcm(dequant_step, unit.requant.row_step if unit.requant else 1, unit.gguf.row_step if unit.gguf else 1)
    if step > 1:
        tile_rows = min(rows, max(step, tile_rows - tile_rows % step))
    chunk_rows = max(1, min(tile_rows, ACC_CHUNK_BYTES // max(1, row_elems * ACC_SIZE))) if unit.op == "merge" else tile_rows
    sized = dataclasses.replace(unit, tile_rows=tile_rows, chunk_rows=chunk_rows)
    return dataclasses.replace(sized, work_bytes=unit_cost(sized).at(tile_rows))


def layout_shards(units: Sequence[WorkUnit], max_shard_bytes: int, single_name: str = SINGLE_NAME) -> tuple[list[WorkUnit], list[Shard]]:
    """Assign units to shards in order, starting a new shard when the next tensor would overflow.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own. Shards are named as
    transformers names them: ``model.safetensors`` alone, else ``model-0000i-of-0000N.safetensors``.
    With another ``single_name`` (an adapter file) everything goes into that one file.
    Pure: returns the units placed (shard, absolute byte offsets), and the shards with their headers.
    """
    groups: list[list[WorkUnit]] = []
    current = 0
    for u in units:
        n = sum(tensor_nbytes(t.dtype, t.shape) for t in u.outputs())
        if not groups or (groups[-1] and current + n > max_shard_bytes):
            groups.append([])
            current = 0
        groups[-1].append(u)
        current += n
    if not groups:
        raise BadCheckpoint("the base holds no tensors")
    if single_name != SINGLE_NAME and len(groups) > 1:
        groups = [[u for g in groups for u in g]]
    names = [single_name] if len(groups) == 1 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    placed: list[WorkUnit] = []
    shards: list[Shard] = []
    for index, (name, group) in enumerate(zip(names, groups, strict=True)):
        layout = [t for u in group for t in u.outputs()]
        head, offsets = build_header(layout, {"format": "pt"})
        size = len(head) + sum(tensor_nbytes(t.dtype, t.shape) for t in layout)
        shards.append(Shard(file=name, header=head[:8].hex() + head[8:].decode("ascii"), size=size, tensors=tuple(t.name for t in layout)))
        slots = iter(zip(layout, offsets, strict=True))
        for u in group:
            (main, offset), *extra = [next(slots) for _ in u.outputs()]
            slot = [OutputSlot(t.name, t.dtype, t.shape, o, tensor_nbytes(t.dtype, t.shape)) for t, o in extra]
            placed.append(
                dataclasses.replace(u, shard=index, offset=offset, nbytes=tensor_nbytes(main.dtype, main.shape), extra=tuple(slot))
            )
    return placed, shards


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
        result["dtype"] = result["torch_dtype"] = DTYPE_CONFIG_NAMES[out_dtype]
    return result


def _is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES) or name == INDEX_NAME or name.endswith(".index.json")


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(TOKENIZER_FILE_PREFIXES) or name.endswith(TOKENIZER_FILE_SUFFIXES)


def files_to_copy(base: str, adapters: list[str]) -> list[CopyFile]:
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


def fingerprints(ckpt: Checkpoint, adapters: list[Adapter], copy_files: list[CopyFile]) -> tuple[Fingerprint, ...]:
    paths = [h.path for h in ckpt.headers] + [a.weights_path for a in adapters] + [c.src for c in copy_files]
    # the adapters' configs too: their alpha, rank and targets are in the plan's scales and units
    paths += [p for a in adapters if os.path.isfile(p := os.path.join(a.root, ADAPTER_CONFIG_NAME))]
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


def adapter_files(root: str) -> list[CopyFile]:
    """Everything of an adapter folder but its weights: adapter_config.json (kept as is), README, tokenizer."""
    return [
        CopyFile(src=check_inside(root, os.path.join(root, name)), dst=name)
        for name in sorted(os.listdir(root))
        if not name.startswith(".") and not _is_weight_file(name) and os.path.isfile(os.path.join(root, name))
    ]


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
