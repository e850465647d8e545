"""GGUF output: the merge's units renamed, typed and laid out in GGUF files, headers and offsets fixed.

The merge itself is planned as for safetensors (each unit's merged rows in the model dtype, exactly
the bytes a safetensors merge writes); here each unit gets its GGUF name (gguf's tensor map), its
type (as llama.cpp's convert_hf_to_gguf.py picks it for ``--outtype``), its conversion
(:class:`~streammerge.plan.model.GGUFSpec`) and its place. The header, metadata and tensor infos are
laid out by :class:`gguf.GGUFWriter` itself (alignment, key encoding, and its split rule with
gguf-split's ``split.*`` keys), written to memory: the plan keeps those bytes and every tensor's
absolute offset, so the writer only fills in tensor data. Pure but for reading config and tokenizer files.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from streammerge.errors import BadCheckpoint, OutputError, StreamMergeError
from streammerge.formats import gguf as meta
from streammerge.plan.layout import size_tiles
from streammerge.plan.model import GGUF_HEADER_PREFIX, CopyFile, GGUFSpec, Shard, WorkUnit

OUTTYPE_CHOICES = ("auto", *meta.OUTTYPES)


@dataclasses.dataclass(frozen=True)
class GGUFOptions:
    """What the command line says about GGUF output."""

    outtype: str = "auto"
    """bf16, f16, q8_0, f32, or auto: bf16 when the first 2-D weight is bfloat16, else f16 (as the converter)."""
    pre: str | None = None
    """tokenizer.ggml.pre for a tokenizer.json BPE vocabulary (llama.cpp's pre-tokenizer name)."""


class _InMemory(gguf.GGUFWriter):
    """A GGUFWriter whose files are byte buffers: it lays out headers, never writes tensor data."""

    def open_output_file(self, path: Path | None = None) -> None:
        self.fout = [io.BytesIO() for _ in self.tensors]  # type: ignore[misc]
        self.state = gguf.gguf_writer.WriterState.EMPTY

    def headers(self) -> list[bytes]:
        self.write_header_to_file()
        self.write_kv_data_to_file()
        self.write_ti_data_to_file()
        assert self.fout is not None
        return [f.getvalue() for f in self.fout]  # type: ignore[attr-defined]


def file_type(option: str, units: Sequence[WorkUnit]) -> gguf.LlamaFileType:
    """The file type for ``--outtype``; "auto" looks at the first weight of 2 or more dimensions, as the converter does."""
    if option != "auto":
        return meta.OUTTYPES[option]
    first = next((u for u in units if len(u.shape) >= 2), None)
    dtype = first.out_dtype if first is not None else ""
    return gguf.LlamaFileType.MOSTLY_BF16 if dtype == "BF16" else gguf.LlamaFileType.MOSTLY_F16


def shard_files(out: str, count: int) -> list[str]:
    """The output files: ``out`` itself, or gguf-split's ``STEM-0000i-of-0000N.gguf`` beside it."""
    w = gguf.GGUFWriter(None, "llama")
    w.tensors = [{} for _ in range(count)]
    return [str(p) for p in w.format_shard_names(Path(out))]


def gguf_layout(
    units: Sequence[WorkUnit],
    config: dict[str, Any] | None,
    opts: GGUFOptions,
    out: str,
    max_shard_bytes: int,
    tile_bytes: int,
    base: str,
    files: Sequence[CopyFile],
) -> tuple[list[WorkUnit], list[Shard], list[str]]:
    """Turn the merge's units (unplaced, in checkpoint order) into GGUF units with their places.

    ``config`` is the merged model's config.json and ``files`` the other files a safetensors merge of
    ``base`` would write beside it (tokenizer files, an adapter's winning over the base's; generation
    config; model card): the metadata is read from that view of the merged folder, as the converter
    reads the merged folder. Returns the units, the shards (files named as gguf-split names them when
    ``max_shard_bytes`` is not 0) and notes for the plan.
    """
    if config is None:
        raise BadCheckpoint(f"{base}: no config.json; GGUF output needs the architecture and hyperparameters")
    meta.family_of(config, base)
    with tempfile.TemporaryDirectory(prefix="streammerge-gguf-") as tmp:
        view = _merged_view(tmp, base, config, files)
        try:
            return _layout(units, config, opts, out, max_shard_bytes, tile_bytes, view)
        except StreamMergeError as e:  # name the folders the user gave, not the temporary view
            raise type(e)(str(e).replace(view, f"{base} (merged with its adapters)")) from e


def _merged_view(tmp: str, base: str, config: dict[str, Any], files: Sequence[CopyFile]) -> str:
    """A folder named like ``base`` holding links to ``files`` and the merged config.json."""
    view = os.path.join(tmp, os.path.basename(base.rstrip(os.sep)) or "model")
    os.makedirs(view)
    for f in files:
        os.symlink(f.src, os.path.join(view, f.dst))
    with open(os.path.join(view, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh)
    if not any(os.path.isfile(os.path.join(view, n)) for n in ("tokenizer.json", "tokenizer.model")):
        raise BadCheckpoint(f"{base}: no tokenizer.json or tokenizer.model (base or adapter folders); GGUF output needs the tokenizer")
    return view


def _layout(
    units: Sequence[WorkUnit],
    config: dict[str, Any],
    opts: GGUFOptions,
    out: str,
    max_shard_bytes: int,
    tile_bytes: int,
    view: str,
) -> tuple[list[WorkUnit], list[Shard], list[str]]:
    arch_name, family = meta.family_of(config, view)
    card_dir = tokenizer_dir = view
    h = meta.hparams_of(config)
    names = gguf.get_tensor_name_map(family.arch, meta.block_count(h))
    ftype = file_type(opts.outtype, units)
    keep = [u for u in units if not meta.is_skipped(family, u.name)]
    # the converter's order: checkpoint files by name, each file's tensors by name
    keep.sort(key=lambda u: (os.path.basename(u.source.file), u.name))
    converted = [_convert(u, family, h, names, ftype, tile_bytes, tokenizer_dir) for u in keep]
    w = _InMemory(None, gguf.MODEL_ARCH_NAMES[family.arch], split_max_size=max_shard_bytes)
    rope = meta.llama3_rope_factors(h) if family.arch == gguf.MODEL_ARCH.LLAMA else None
    constants: dict[str, bytes] = {}
    if rope is not None:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        data = np.asarray(rope, dtype=np.float32)
        constants[name] = data.tobytes()
        w.add_tensor_info(name, data.shape, data.dtype, data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32)
    seen: set[str] = set()
    for u in converted:
        if u.name in seen:
            raise BadCheckpoint(f"{u.gguf.hf_name if u.gguf else u.name}: maps to GGUF tensor {u.name} twice")
        seen.add(u.name)
        assert u.gguf is not None
        w.add_tensor_info(u.name, u.shape, np.dtype(np.float32), u.nbytes, raw_dtype=gguf.GGMLQuantizationType[u.gguf.qtype])
    meta.add_metadata(w, arch_name, family, config, ftype, card_dir, tokenizer_dir, opts.pre)
    vocab_notes = _vocab_mismatch(w, converted)
    heads = w.headers()
    files = shard_files(out, len(w.tensors))
    by_name = {u.name: u for u in converted}
    placed: list[WorkUnit] = []
    shards: list[Shard] = []
    align = w.data_alignment
    for index, (head, tensors, path) in enumerate(zip(heads, w.tensors, files, strict=True)):
        start = _pad(len(head), align)
        prefix = bytearray(head) + bytes(start - len(head))
        offset = start
        for name, info in tensors.items():
            if name in constants:  # computed at plan time: part of the bytes written with the header
                if offset != len(prefix):
                    raise AssertionError(f"{name}: constant tensor after the first unit")
                prefix += constants[name] + bytes(_pad(info.nbytes, align) - info.nbytes)
            else:
                placed.append(dataclasses.replace(by_name[name], shard=index, offset=offset))
            offset += _pad(info.nbytes, align)
        shards.append(
            Shard(
                file=os.path.basename(path),
                header=GGUF_HEADER_PREFIX + base64.b64encode(bytes(prefix)).decode("ascii"),
                size=offset,
                tensors=tuple(tensors),
            )
        )
    notes = [
        f"GGUF {gguf.MODEL_ARCH_NAMES[family.arch]} ({arch_name}), file type {ftype.name.partition('_')[2]}: "
        f"{len(placed) + len(constants)} tensors in {len(shards)} file(s), as llama.cpp's convert_hf_to_gguf.py converts the merged model"
    ]
    return placed, shards, notes + vocab_notes


def _vocab_mismatch(w: gguf.GGUFWriter, units: Sequence[WorkUnit]) -> list[str]:
    """A warning when the tokenizer lists fewer or more tokens than the embedding has rows: llama.cpp refuses to
    load such a file (``token_embd.weight has wrong shape``), as it refuses the converter's (which writes the same)."""
    field = w.kv_data[0].get(gguf.Keys.Tokenizer.LIST)
    embedding = next((u for u in units if u.name == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"), None)
    if field is None or embedding is None or len(field.value) == embedding.shape[0]:  # rows as written (Gemma 3 trims them)
        return []
    return [
        f"warning: the tokenizer has {len(field.value)} tokens but {embedding.gguf.hf_name if embedding.gguf else embedding.name} "
        f"has {embedding.shape[0]} rows; llama.cpp will refuse to load this file (as it would the converter's): give the "
        "model a tokenizer with one token per row (or resize the embeddings to the tokenizer)"
    ]


def _convert(
    u: WorkUnit,
    family: meta.Family,
    h: dict[str, Any],
    names: gguf.TensorNameMap,
    ftype: gguf.LlamaFileType,
    tile_bytes: int,
    tokenizer_dir: str,
) -> WorkUnit:
    if u.requant is not None or u.out_dtype not in ("F16", "BF16", "F32"):
        raise StreamMergeError(f"{u.name}: GGUF output takes 16/32-bit merged tensors, this one is {u.out_dtype}")
    name = meta.gguf_name(names, u.name)
    bid = meta.block_id(u.name)
    shape = u.shape
    if family.trim_embedding and "embed_tokens.weight" in u.name:
        shape = (min(shape[0], meta.embedding_rows(tokenizer_dir, h)), *shape[1:])
    qtype = meta.tensor_qtype(family, name, bid, len(shape), shape[-1] if shape else 1, ftype)
    head_rows = 0
    if family.permute_qk and u.name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        n_head = int(h["num_attention_heads"])
        n_kv = h.get("num_key_value_heads", h.get("n_kv_heads"))
        if "k_proj" in u.name and n_kv is not None and int(n_kv) != n_head:
            n_head = int(n_kv)
        if shape[0] % (2 * n_head):
            raise BadCheckpoint(f"{u.name}: {shape[0]} rows do not split into {n_head} heads of rotary pairs")
        head_rows = shape[0] // n_head
    if len(shape) >= 2:  # rows of the last dimension: Q8_0 blocks run along it
        rows, row_elems = math.prod(shape[:-1]), shape[-1]
    else:  # 1-D (always F32): one element per row, so q/k biases un-permute like weights
        rows, row_elems = math.prod(shape), 1
    block, type_bytes = gguf.GGML_QUANT_SIZES[qtype]
    spec = GGUFSpec(
        qtype=qtype.name,
        merge_dtype=u.out_dtype,
        work_dtype="F16" if u.out_dtype == "F16" else "F32",
        row_bytes=row_elems // block * type_bytes,
        head_rows=head_rows,
        shift=family.norm_shift if u.name.endswith("norm.weight") else 0.0,
        hf_name=u.name,
    )
    op = u.op
    if op == "copy" and (qtype.name not in ("F16", "F32") or qtype.name != u.source.dtype or head_rows or spec.shift or shape != u.shape):
        op = "cast"  # converted tile by tile; F16/F32 tensors kept as they are stay kernel copies (the converter's bytes)
    unit = dataclasses.replace(u, name=name, op=op, out_dtype=qtype.name, shape=shape, rows=rows, row_elems=row_elems, gguf=spec)
    unit = size_tiles(unit, tile_bytes)
    return dataclasses.replace(unit, nbytes=rows * spec.row_bytes)


def _pad(n: int, align: int) -> int:
    return -(-n // align) * align


def check_gguf_output(out: str, files: Sequence[str], overwrite: bool) -> None:
    """Refuse a .gguf output whose files exist (unless overwrite) or whose folder is missing."""
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: folder {parent} does not exist")
    for f in files:
        path = os.path.join(parent, f)
        if os.path.lexists(path) and not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        if os.path.isdir(path):
            raise OutputError(f"{path}: is a folder; GGUF output is a file")
