"""safetensors headers: parse and validate what is on disk, lay out what we will write.

A file is an 8-byte little-endian header length N, N bytes of JSON, then the data section. The
JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets
relative to the data section; an optional ``__metadata__`` maps strings to strings. Tensors must
tile the data section exactly (no holes, no overlaps, nothing after the last one) and each byte
range must equal dtype size x shape. We refuse what the reference reader refuses, with our own
messages, and never allocate from an unchecked length. We are stricter in two places: duplicate
JSON keys (the reference keeps the last; two definitions of a tensor are ambiguous) and empty
tensor names.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadCheckpoint

MAX_HEADER_BYTES = 100_000_000
"""The reference reader refuses longer headers; so do we."""
MAX_JSON_DEPTH = 128
"""The reference's JSON parser refuses deeper nesting."""
U64_MAX = 2**64 - 1

DTYPE_BITS: dict[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "F8_E8M0": 8,
    "U16": 16,
    "I16": 16,
    "F16": 16,
    "BF16": 16,
    "U32": 32,
    "I32": 32,
    "F32": 32,
    "U64": 64,
    "I64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
"""Bits per element of every dtype the reference reader accepts (F4/F6 pack below a byte)."""
DTYPE_SIZES: dict[str, int] = {k: v // 8 for k, v in DTYPE_BITS.items() if v % 8 == 0 and k != "C64"}
"""Bytes per element of the dtypes streammerge can decode or cast; others are only copied."""
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
"""Floating dtypes streammerge computes in; float8 tensors are only ever copied."""


@dataclass(frozen=True)
class Source:
    """Where a tensor's bytes are: file, absolute offset, length, and what they hold."""

    file: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, t: Source) -> Source:
        """Just the location of ``t`` (a :class:`TensorInfo` without its name)."""
        return Source(file=t.file, offset=t.offset, nbytes=t.nbytes, dtype=t.dtype, shape=t.shape)


@dataclass(frozen=True)
class TensorInfo(Source):
    """One tensor of a safetensors file: its name and where its bytes are."""

    name: str

    @property
    def path(self) -> str:
        """The file holding the tensor (the same as :attr:`file`)."""
        return self.file


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    path: str
    file_size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str]

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a C-contiguous tensor: dtype bits x number of elements / 8 (a 0-d tensor has one)."""
    return DTYPE_BITS[dtype] * math.prod(shape) // 8


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read and validate the header of one safetensors file, reading no tensor data.

    Example::

        header = read_header("model.safetensors")
        print([(t.name, t.dtype, t.shape) for t in header.tensors])
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise BadCheckpoint(f"{path}: not a safetensors file ({file_size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(path, n, file_size)
            raw = f.read(n)
    except OSError as e:
        raise BadCheckpoint(f"{path}: cannot read ({e.strerror or e})") from e
    if len(raw) != n:
        raise BadCheckpoint(f"{path}: file shrank while reading its header")
    return parse_header(raw, path=path, file_size=file_size)


def _check_header_length(path: str, n: int, file_size: int) -> None:
    if n > MAX_HEADER_BYTES:
        raise BadCheckpoint(f"{path}: header length {n} is absurd (limit {MAX_HEADER_BYTES}); not a safetensors file?")
    if 8 + n > file_size:
        raise BadCheckpoint(f"{path}: header length {n} runs past the end of the file ({file_size} bytes); truncated or not safetensors")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Negative(str):
    """A negative integer literal ("-0" included): never a valid size or offset, which are unsigned."""

    def __repr__(self) -> str:
        return str(self)


def _unsigned_int(text: str) -> int | _Negative:
    return _Negative(text) if text.startswith("-") else int(text)


def _json_depth(raw: bytes) -> int:
    """Deepest nesting of [ and { outside strings, by a scan that cannot recurse."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def parse_header(raw: bytes, *, path: str, file_size: int) -> Header:
    """Validate header JSON ``raw`` of a file of ``file_size`` bytes. Pure: no IO.

    Raises :class:`BadCheckpoint` naming ``path`` and the tensor for anything the reference reader
    would refuse.
    """
    _check_header_length(path, len(raw), file_size)
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise BadCheckpoint(f"{path}: header is not valid JSON (nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_int=_unsigned_int)
    except UnicodeDecodeError as e:
        raise BadCheckpoint(f"{path}: header is not UTF-8 (byte {e.start})") from e
    except (json.JSONDecodeError, ValueError, RecursionError) as e:
        raise BadCheckpoint(f"{path}: header is not valid JSON ({_short(str(e))})") from e
    if not isinstance(obj, dict):
        raise BadCheckpoint(f"{path}: header must be a JSON object, found {type(obj).__name__}")

    metadata = obj.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise BadCheckpoint(f"{path}: __metadata__ must map strings to strings")
    if not all(_is_utf8(k) and _is_utf8(v) for k, v in metadata.items()):
        raise BadCheckpoint(f"{path}: __metadata__ holds a string that is not valid Unicode (a lone surrogate escape)")

    tensors = [_parse_entry(path, name, entry, data_start) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.offset, t.nbytes))
    cursor = data_start
    for t in tensors:
        if t.offset != cursor:
            what = "overlaps the previous tensor" if t.offset < cursor else f"leaves a hole of {t.offset - cursor} bytes before it"
            raise BadCheckpoint(f"{path}: tensor {t.name!r} at data offset {t.offset - data_start} {what}")
        cursor += t.nbytes
    if cursor != file_size:
        if cursor > file_size:
            last = tensors[-1].name if tensors else "?"
            raise BadCheckpoint(f"{path}: tensor {last!r} ends at byte {cursor} but the file has {file_size} bytes (truncated?)")
        raise BadCheckpoint(
            f"{path}: {file_size - cursor} bytes after the last tensor are not described by the header (data section {data_size} bytes)"
        )
    return Header(path=path, file_size=file_size, data_start=data_start, tensors=tuple(tensors), metadata=dict(metadata))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _element_count(shape: list[Any]) -> int | None:
    """Elements of a shape, or None if a dimension or the running product leaves u64 (as the reference checks)."""
    count = 1
    for d in shape:
        if not _is_int(d) or d < 0 or d > U64_MAX:
            return None
        count *= d
        if count > U64_MAX:
            return None
    return count


def _parse_entry(path: str, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor {_short(repr(name))}"
    if not name:
        raise BadCheckpoint(f"{path}: a tensor has an empty name")
    if not _is_utf8(name):
        raise BadCheckpoint(f"{path}: a tensor name is not valid Unicode (a lone surrogate escape): {_short(repr(name))}")
    if not isinstance(entry, dict):
        raise BadCheckpoint(f"{where}: entry must be an object, found {type(entry).__name__}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise BadCheckpoint(f"{where}: unsupported or missing dtype {_short(repr(dtype))}")
    if not isinstance(shape, list):
        raise BadCheckpoint(f"{where}: shape must be a list of integers, found {_short(repr(shape))}")
    count = _element_count(shape)
    if count is None:
        raise BadCheckpoint(f"{where}: shape {_short(repr(shape))} is not a list of unsigned 64-bit sizes whose product fits 64 bits")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and 0 <= o <= U64_MAX for o in offsets)):
        raise BadCheckpoint(f"{where}: data_offsets must be [begin, end] unsigned integers, found {_short(repr(offsets))}")
    begin, end = offsets
    if end < begin:
        raise BadCheckpoint(f"{where}: data_offsets end {end} is before begin {begin}")
    shape_t = tuple(shape)
    bits = DTYPE_BITS[dtype] * count
    if bits % 8 or bits // 8 > U64_MAX:
        raise BadCheckpoint(f"{where}: {dtype} x {count} elements is not a whole number of bytes")
    expected = bits // 8
    if end - begin != expected:
        raise BadCheckpoint(f"{where}: holds {end - begin} bytes but {dtype} x {_short(str(list(shape_t)))} needs {expected}")
    return TensorInfo(file=path, name=name, dtype=dtype, shape=shape_t, offset=data_start + begin, nbytes=expected)


@dataclass(frozen=True)
class OutputTensor:
    """What the writer needs to lay one tensor out: name, dtype and shape (bytes follow from them)."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class OutputSlot(OutputTensor):
    """An output tensor with its place fixed: absolute offset in its file and length."""

    offset: int
    nbytes: int


def build_header(tensors: list[OutputTensor], metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """Lay out a safetensors file whose data follow ``tensors`` in the given order.

    Returns the complete header (8-byte length + JSON padded with spaces so data start on an
    8-byte boundary) and each tensor's absolute byte offset in the file. Pure.

    Example::

        head, offsets = build_header([OutputTensor("w", "BF16", (2, 3))], {"format": "pt"})
        assert offsets == [len(head)]
    """
    entries: dict[str, Any] = {}
    if metadata:
        entries["__metadata__"] = dict(metadata)
    rel: list[int] = []
    cursor = 0
    for t in tensors:
        n = tensor_nbytes(t.dtype, t.shape)
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [cursor, cursor + n]}
        rel.append(cursor)
        cursor += n
    body = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    head = struct.pack("<Q", len(body)) + body
    return head, [len(head) + r for r in rel]
