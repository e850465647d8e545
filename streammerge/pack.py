"""Packed checkpoints for transfer: byte-grouped zstd per tile, restored byte for byte.

``pack(OUT, DEST)`` writes every ``*.safetensors`` file of the folder ``OUT`` as ``NAME.safetensors.smz`` into
``DEST`` (the other files, small JSON and tokenizer files, are copied as they are); ``unpack(DEST,
OUT2)`` gives back the very same files, each tensor checked against the CRC-32 the output's
``streammerge-manifest.json`` recorded when it was merged, and every chunk against its own CRC-32.

Why byte groups: a bf16 weight's high byte (sign and exponent) takes few values and compresses
well, its low byte (mantissa) is close to random. Interleaved, zstd sees neither pattern; split into
planes (the first bytes of all values, then the second bytes), the exponent plane shrinks to about
a third and the mantissa plane is stored as it is (ZipNN's idea, and Hugging Face's storage's).
Each value is first rotated left by one bit, so the sign joins the mantissa and the top byte holds
the exponent alone (as ZipNN does). A plane zstd cannot shrink is stored raw, which also makes
packing faster.

An ``.smz`` file, self-describing::

    b"SMZPACK1"
    chunks: for each, its planes' bytes, one after another (a zstd frame each, or raw)
    index: UTF-8 JSON, {"format": "streammerge-pack/1", "file", "size", "level", "chunks": [
             {"at": offset in the file, "n": length, "tensor": name ("" for the header),
              "width": bytes per element grouped (1: none; else each
              little-endian value rotated left one bit, then split into width planes), "crc32": of the n raw bytes,
              "planes": [[offset in the .smz, length, "zstd" | "raw"], ...]}, ...]}
    the index's length (8 bytes, little-endian), then b"SMZINDX1"

Chunks cover the file without gaps (the header, then each tensor in ``chunk_bytes`` pieces, never
across tensors) and are compressed on ``threads`` threads (zstd lets go of the GIL), at most
``2 * threads`` chunks in memory at once, so memory is bounded by the chunk size, not the model.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from streammerge.errors import BadCheckpoint, OutputError, StreamMergeError
from streammerge.formats.safetensors import DTYPE_BITS, FLOAT_DTYPES, read_header
from streammerge.journal import partial_path
from streammerge.manifest import MANIFEST_FILE, read_manifest
from streammerge.osio import CLOEXEC, fsync_dir, pwrite_all, remove, reserve

MAGIC = b"SMZPACK1"
TAIL = b"SMZINDX1"
FORMAT = "streammerge-pack/1"
SUFFIX = ".smz"
CHUNK_BYTES = 16 * 2**20
"""Raw bytes per chunk: each is read, split, compressed and written on its own."""
DEFAULT_LEVEL = 1
MAX_CHUNK_BYTES = 2**30
"""The largest chunk :func:`read_index` accepts (and :func:`pack` writes): unpack holds
``2 * threads`` of them, so a hostile index cannot make it allocate more."""
RAW_IF_ABOVE = 0.97
"""A plane whose zstd frame is larger than this fraction of it is stored raw."""


def _zstd() -> Any:
    try:
        import zstandard
    except ImportError as e:  # pragma: no cover - a dependency
        raise StreamMergeError("pack/unpack need the zstandard package: pip install zstandard") from e
    return zstandard


@dataclass(frozen=True)
class PackReport:
    """What :func:`pack` or :func:`unpack` did: bytes in and out, seconds, files."""

    src: str
    dest: str
    raw_bytes: int
    packed_bytes: int
    seconds: float
    files: int
    checked_tensors: int = 0
    """unpack: tensors checked against the manifest's CRC-32."""

    @property
    def ratio(self) -> float:
        return self.raw_bytes / max(self.packed_bytes, 1)


def _width(dtype: str) -> int:
    """Bytes grouped per element: the element size for floats of 2+ bytes, else 1 (no grouping)."""
    bits = DTYPE_BITS[dtype]
    return bits // 8 if dtype in FLOAT_DTYPES and bits >= 16 else 1


def _chunks(path: str, chunk_bytes: int) -> Iterator[tuple[int, int, str, int]]:
    """(offset, length, tensor, width) of every chunk of the safetensors file ``path``, in file order."""
    header = read_header(path)
    yield 0, header.data_start, "", 1
    for t in sorted(header.tensors, key=lambda t: t.offset):
        width = _width(t.dtype)
        step = max(width, chunk_bytes // width * width)
        for start in range(0, t.nbytes, step):
            yield t.offset + start, min(step, t.nbytes - start), t.name, width


_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _planes(raw: bytes, width: int) -> list[bytes]:
    """The byte planes of a chunk of ``width``-byte floats, each value rotated left by one bit first.

    The rotation moves the sign bit to the bottom, so the top byte holds the exponent alone (bf16,
    f32, f64) rather than the sign and seven exponent bits: ZipNN's trick, worth ~4% on bf16."""
    if width == 1:
        return [raw]
    values = np.frombuffer(raw, dtype=_UINT[width])
    rotated = np.left_shift(values, 1)
    rotated |= np.right_shift(values, 8 * width - 1)
    grid = rotated.view(np.uint8).reshape(-1, width)
    return [grid[:, j].tobytes() for j in range(width)]


def _join(planes: list[bytes], width: int) -> bytes:
    """The chunk :func:`_planes` split: the planes interleaved again, each value rotated back."""
    if width == 1:
        return planes[0]
    grid = np.empty((len(planes[0]), width), dtype=np.uint8)
    for j, p in enumerate(planes):
        grid[:, j] = np.frombuffer(p, dtype=np.uint8)
    rotated = grid.reshape(-1).view(_UINT[width])
    values = np.right_shift(rotated, 1)
    values |= np.left_shift(rotated, 8 * width - 1)
    joined: bytes = values.tobytes()
    return joined


def _ordered(jobs: Iterator[Any], work: Callable[[Any], Any], threads: int) -> Iterator[tuple[Any, Any]]:
    """``(job, work(job))`` in job order, ``threads`` at a time, at most ``2 * threads`` results held."""
    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="streammerge-pack") as pool:
        pending: deque[tuple[Any, concurrent.futures.Future[Any]]] = deque()
        for job in jobs:
            pending.append((job, pool.submit(work, job)))
            if len(pending) >= 2 * threads:
                job0, done = pending.popleft()
                yield job0, done.result()
        while pending:
            job0, done = pending.popleft()
            yield job0, done.result()


def pack_file(
    src: str,
    dest: str,
    *,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    on_chunk: Callable[[int, str], None] | None = None,
) -> int:
    """Pack one safetensors file into ``dest`` (an ``.smz``); returns the packed size.
    ``on_chunk(raw_bytes, tensor)`` is called as each chunk is written."""
    zstd = _zstd()
    threads = threads or os.cpu_count() or 1
    local = threading.local()
    fd = os.open(src, os.O_RDONLY | CLOEXEC)

    def compress(chunk: tuple[int, int, str, int]) -> tuple[int, list[tuple[bytes, str]]]:
        at, n, _, width = chunk
        raw = os.pread(fd, n, at)
        if len(raw) != n:
            raise BadCheckpoint(f"{src}: file shrank while packing")
        if not hasattr(local, "c"):
            local.c = zstd.ZstdCompressor(level=level)
        out = []
        for plane in _planes(raw, width):
            z = local.c.compress(plane)
            out.append((z, "zstd") if len(z) < RAW_IF_ABOVE * len(plane) else (plane, "raw"))
        return zlib.crc32(raw), out

    index: list[dict[str, Any]] = []
    try:
        with open(dest, "wb") as f:
            f.write(MAGIC)
            pos = len(MAGIC)
            for (at, n, tensor, width), (crc, planes) in _ordered(_chunks(src, chunk_bytes), compress, threads):
                entry: dict[str, Any] = {"at": at, "n": n, "tensor": tensor, "width": width, "crc32": crc, "planes": []}
                for data, codec in planes:
                    f.write(data)
                    entry["planes"].append([pos, len(data), codec])
                    pos += len(data)
                index.append(entry)
                if on_chunk is not None:
                    on_chunk(n, tensor)
            text = json.dumps(
                {"format": FORMAT, "file": os.path.basename(src), "size": os.fstat(fd).st_size, "level": level, "chunks": index},
                separators=(",", ":"),
            ).encode("utf-8")
            f.write(text + struct.pack("<Q", len(text)) + TAIL)
            f.flush()
            os.fsync(f.fileno())
            return f.tell()
    finally:
        os.close(fd)


_WIDTHS = (1, 2, 4, 8)


def _int(value: Any, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{value!r} is not an integer in [{low}, {high}]")
    return value


def read_index(path: str) -> dict[str, Any]:
    """The index of an ``.smz`` file, checked field by field; BadCheckpoint naming the file when it is
    not one, or when the index does not describe chunks that cover the file once, in order, with
    planes inside the ``.smz`` and of sizes the chunk can unpack to."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC) + 16 or f.read(len(MAGIC)) != MAGIC:
                raise BadCheckpoint(f"{path}: not a streammerge pack file (no {MAGIC.decode()} at its start)")
            f.seek(size - 16)
            tail = f.read(16)
            (n,) = struct.unpack("<Q", tail[:8])
            if tail[8:] != TAIL or n > size - len(MAGIC) - 16:
                raise BadCheckpoint(f"{path}: pack file is truncated or damaged (no index at its end)")
            f.seek(size - 16 - n)
            index = json.loads(f.read(n))
    except OSError as e:
        raise BadCheckpoint(f"{path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:
        raise BadCheckpoint(f"{path}: pack index is not valid JSON ({e})") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise BadCheckpoint(f"{path}: pack format {index.get('format') if isinstance(index, dict) else None!r}, expected {FORMAT}")
    data_end = size - 16 - n
    covered, where = 0, "the index"
    try:
        total = _int(index.get("size"), 0, 2**62)
        chunks = index.get("chunks")
        if not isinstance(chunks, list):
            raise ValueError("no list of chunks")
        for i, c in enumerate(chunks):
            where = f"chunk {i}"
            if not isinstance(c, dict) or not isinstance(c.get("tensor"), str) or not isinstance(c.get("planes"), list):
                raise ValueError("not an object with a tensor name and planes")
            if c.get("width") not in _WIDTHS:
                raise ValueError(f"width {c.get('width')!r}, expected one of {_WIDTHS}")
            at, length, width = _int(c.get("at"), 0, total), _int(c.get("n"), 1, MAX_CHUNK_BYTES), c["width"]
            _int(c.get("crc32"), 0, 2**32 - 1)
            if at != covered:
                raise ValueError(f"starts at byte {at}, the chunks before end at {covered}")
            if length % width or len(c["planes"]) != width:
                raise ValueError(f"{length} bytes in {len(c['planes'])} planes of width {width}")
            for plane in c["planes"]:
                if not isinstance(plane, list) or len(plane) != 3 or plane[2] not in ("zstd", "raw"):
                    raise ValueError(f"plane {plane!r} is not [offset, length, 'zstd' | 'raw']")
                offset = _int(plane[0], len(MAGIC), data_end)
                _int(plane[1], 1 if plane[2] == "zstd" else length // width, data_end - offset)
                if plane[2] == "raw" and plane[1] != length // width:
                    raise ValueError(f"raw plane of {plane[1]} bytes, expected {length // width}")
            covered += length
        if covered != total:
            raise ValueError(f"chunks cover {covered} bytes, the file had {total}")
    except ValueError as e:
        raise BadCheckpoint(f"{path}: pack index is damaged at {where}: {e}") from e
    return index


def unpack_file(src: str, dest: str, *, threads: int | None = None, on_chunk: Callable[[int, str], None] | None = None) -> dict[str, int]:
    """Restore the safetensors file packed in ``src`` to ``dest``; returns each tensor's CRC-32.

    Every chunk is checked against its CRC-32 (BadCheckpoint naming the tensor when one differs).
    ``on_chunk(raw_bytes, tensor)`` is called as each chunk is restored."""
    zstd = _zstd()
    index = read_index(src)
    threads = threads or os.cpu_count() or 1
    local = threading.local()
    fd = os.open(src, os.O_RDONLY | CLOEXEC)
    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC, 0o644)

    def restore(c: dict[str, Any]) -> bytes:
        if not hasattr(local, "d"):
            local.d = zstd.ZstdDecompressor()
        n, width = c["n"], c["width"]
        planes = []
        for offset, length, codec in c["planes"]:
            data = os.pread(fd, length, offset)
            try:
                if codec == "zstd":
                    # a frame that says how large it is must say n // width; one that does not is held to it
                    if zstd.frame_content_size(data) not in (-1, n // width):
                        raise zstd.ZstdError(f"the frame says {zstd.frame_content_size(data)} bytes, expected {n // width}")
                    data = local.d.decompress(data, max_output_size=n // width)
                planes.append(data)
            except zstd.ZstdError as e:
                raise BadCheckpoint(f"{src}: chunk at byte {c['at']} of {c['tensor'] or 'the header'}: damaged zstd frame ({e})") from e
        if any(len(p) != n // width for p in planes) or len(planes) != width:
            raise BadCheckpoint(f"{src}: chunk at byte {c['at']} ({c['tensor'] or 'header'}) does not unpack to {n} bytes")
        raw = _join(planes, width)
        if zlib.crc32(raw) != c["crc32"]:
            raise BadCheckpoint(f"{src}: chunk at byte {c['at']} of {c['tensor'] or 'the header'} fails its CRC-32 check")
        pwrite_all(out, raw, c["at"])
        return raw

    crcs: dict[str, int] = {}
    spans: dict[str, list[int]] = {}
    try:
        reserve(out, index["size"])
        for c, raw in _ordered(iter(index["chunks"]), restore, threads):
            if c["tensor"]:
                crcs[c["tensor"]] = zlib.crc32(raw, crcs.get(c["tensor"], 0))
                span = spans.setdefault(c["tensor"], [c["at"], 0])
                if span[0] + span[1] != c["at"]:
                    raise BadCheckpoint(f"{src}: tensor {c['tensor']} is in pieces that are not one after another")
                span[1] += c["n"]
            if on_chunk is not None:
                on_chunk(c["n"], c["tensor"])
        os.fsync(out)
    finally:
        os.close(fd)
        os.close(out)
    # the restored header must describe the chunks the index named: the same tensors at the same bytes
    header = read_header(dest)
    described = {t.name: [t.offset, t.nbytes] for t in header.tensors if t.nbytes}
    if described != spans:
        wrong = sorted((set(described) ^ set(spans)) or {k for k in spans if spans[k] != described[k]})
        raise BadCheckpoint(f"{src}: the unpacked header does not match the pack index (tensor {wrong[0]})")
    return {t.name: crcs.get(t.name, 0) for t in header.tensors}  # an empty tensor's CRC-32 is 0


def _safetensors(folder: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".safetensors") and os.path.isfile(os.path.join(folder, n)))


def _fresh(dest: str, overwrite: bool) -> str:
    """Where to write ``dest``: its partial folder, made afresh (refusing an existing ``dest`` unless ``overwrite``)."""
    if os.path.lexists(dest) and not overwrite:
        raise OutputError(f"{dest}: already exists; pass --overwrite to replace it")
    partial = partial_path(dest)
    remove(partial)
    os.makedirs(partial)
    return partial


def _into_place(partial: str, dest: str) -> None:
    fsync_dir(partial)
    if os.path.lexists(dest):
        remove(dest)
    os.rename(partial, dest)
    fsync_dir(os.path.dirname(os.path.abspath(dest)))


def pack(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    level: int = DEFAULT_LEVEL,
    threads: int | None = None,
    chunk_bytes: int = CHUNK_BYTES,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> PackReport:
    """Pack the model folder ``src`` into ``dest`` (default ``SRC.smpack``), atomically.
    ``progress(done, total, tensor)`` (raw bytes of the safetensors files) follows the chunks.

    Example::

        report = pack("./merged")                  # ./merged.smpack/model-*.safetensors.smz + JSON files
        print(f"{report.ratio:.3f}x")
        unpack("./merged.smpack", "./merged-again")  # byte-identical, CRC-checked
    """
    import time

    src, start = os.fspath(src), time.perf_counter()
    dest = os.fspath(dest) if dest is not None else src.rstrip(os.sep) + ".smpack"
    if not os.path.isdir(src):
        raise BadCheckpoint(f"{src}: not a folder")
    _check_apart(src, dest)
    if not 1 <= level <= 22:
        raise StreamMergeError(f"zstd level {level}: expected 1 to 22")
    if threads is not None and threads < 1:
        raise StreamMergeError(f"threads must be at least 1, not {threads}")
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise StreamMergeError(f"chunk size {chunk_bytes} bytes: expected 1 byte to {MAX_CHUNK_BYTES // 2**20} MiB")
    names = _safetensors(src)
    if not names:
        raise BadCheckpoint(f"{src}: no .safetensors files to pack")
    partial = _fresh(dest, overwrite)
    raw = packed = 0
    on_chunk = _tracker(progress, sum(os.path.getsize(os.path.join(src, n)) for n in names))
    try:
        for name in sorted(os.listdir(src)):
            path = os.path.join(src, name)
            if name in names:
                packed += pack_file(
                    path, os.path.join(partial, name + SUFFIX), level=level, threads=threads, chunk_bytes=chunk_bytes, on_chunk=on_chunk
                )
                raw += os.path.getsize(path)
            elif os.path.isfile(path) and not name.startswith("."):
                shutil.copyfile(path, os.path.join(partial, name))
        _into_place(partial, dest)
    except OSError as e:
        remove(partial)
        raise OutputError(f"{partial}: cannot write ({e.strerror or e})") from e
    except BaseException:
        remove(partial)
        raise
    return PackReport(src, dest, raw, packed, time.perf_counter() - start, len(names))


def _expected_crcs(src: str, manifest: dict[str, Any] | None) -> dict[str, tuple[str, int]]:
    """(file, CRC-32) of every tensor the manifest lists, checked to be that."""
    if manifest is None:
        return {}
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        raise BadCheckpoint(f"{os.path.join(src, MANIFEST_FILE)}: the manifest has no tensors")
    expected = {}
    for name, entry in tensors.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or type(entry.get("crc32")) is not int:
            raise BadCheckpoint(f"{os.path.join(src, MANIFEST_FILE)}: tensor {name}: no file and CRC-32")
        expected[name] = (entry["file"], entry["crc32"])
    return expected


def _tracker(progress: Callable[[int, int, str], None] | None, total: int) -> Callable[[int, str], None] | None:
    """A per-chunk callback that adds up the bytes for ``progress(done, total, tensor)``."""
    if progress is None:
        return None
    done = 0

    def on_chunk(n: int, tensor: str) -> None:
        nonlocal done
        done += n
        progress(done, total, tensor or "header")

    return on_chunk


def _check_apart(src: str, dest: str) -> None:
    a, b = os.path.realpath(src), os.path.realpath(dest)
    if a == b or b.startswith(a + os.sep) or a.startswith(b + os.sep):
        raise OutputError(f"{dest}: the output must not be {src}, lie inside it or hold it")


def unpack(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> PackReport:
    """Restore a folder packed by :func:`pack` into ``dest``, atomically: the same bytes, every tensor
    checked against the manifest's CRC-32 (when the folder has a streammerge manifest) and every
    chunk against its own. BadCheckpoint naming the file and tensor on any mismatch.
    ``progress(done, total, tensor)`` (raw bytes restored) follows the chunks."""
    import time

    src, dest, start = os.fspath(src), os.fspath(dest), time.perf_counter()
    if not os.path.isdir(src):
        raise BadCheckpoint(f"{src}: not a folder")
    _check_apart(src, dest)
    if threads is not None and threads < 1:
        raise StreamMergeError(f"threads must be at least 1, not {threads}")
    names = sorted(os.listdir(src))
    packed_names = [n for n in names if n.endswith(".safetensors" + SUFFIX)]
    if not packed_names:
        raise BadCheckpoint(f"{src}: no {SUFFIX} files: not a folder written by streammerge pack")
    for name in names:
        if os.path.islink(os.path.join(src, name)):
            raise BadCheckpoint(f"{os.path.join(src, name)}: a link; streammerge pack writes none")
    expected = _expected_crcs(src, read_manifest(src))
    sizes = {n: read_index(os.path.join(src, n))["size"] for n in packed_names}
    need, free = sum(sizes.values()), shutil.disk_usage(os.path.dirname(os.path.abspath(dest))).free
    if need > free:
        raise OutputError(f"{dest}: unpacking needs {need} bytes, the disk has {free} free")
    partial = _fresh(dest, overwrite)
    raw = packed = 0
    seen: set[str] = set()
    on_chunk = _tracker(progress, need)
    try:
        for name in names:
            path = os.path.join(src, name)
            if name in packed_names:
                target = name[: -len(SUFFIX)]
                crcs = unpack_file(path, os.path.join(partial, target), threads=threads, on_chunk=on_chunk)
                for tensor, crc in crcs.items():
                    if not expected:
                        continue
                    if tensor not in expected:
                        raise BadCheckpoint(f"{path}: tensor {tensor} is not in the manifest")
                    file, want = expected[tensor]
                    if file != target or want != crc:
                        raise BadCheckpoint(
                            f"{path}: tensor {tensor} unpacks to CRC-32 {crc:08x} in {target}, the manifest says {want:08x} in {file}"
                        )
                    seen.add(tensor)
                raw += sizes[name]
                packed += os.path.getsize(path)
            elif os.path.isfile(path):
                shutil.copyfile(path, os.path.join(partial, name))
        missing = set(expected) - seen
        if missing:
            raise BadCheckpoint(f"{src}: {len(missing)} tensors of the manifest are in no packed file, e.g. {min(missing)}")
        _into_place(partial, dest)
    except OSError as e:
        remove(partial)
        raise OutputError(f"{partial}: cannot write ({e.strerror or e})") from e
    except BaseException:
        remove(partial)
        raise
    return PackReport(src, dest, raw, packed, time.perf_counter() - start, len(packed_names), len(seen))


class StreamPacker:
    """Packs a merge's output as the writer writes it (``merge --pack``): every tile the writer
    thread hands to the disk is also split into planes and compressed, on ``threads`` threads,
    into ``NAME.safetensors.smz`` files in ``DEST.partial``; :meth:`finish` adds their indexes,
    the output's small files, and renames ``DEST.partial`` to ``DEST``. The output is never read
    back, except the untouched tensors the kernel copied file to file.

    Chunks land in the ``.smz`` in the order their compression finishes; the index orders them by
    position. At most ``2 * threads`` tiles wait for compression (copies of the writer's buffers),
    on top of the merge's own memory. Used for whole runs only; a resumed or split run packs after.
    """

    def __init__(self, plan: Any, dest: str, *, level: int = DEFAULT_LEVEL, threads: int | None = None, overwrite: bool = False) -> None:
        from streammerge.formats.safetensors import parse_header
        from streammerge.plan.model import shard_header_bytes

        self.dest, self.level = dest, level
        self.threads = threads or os.cpu_count() or 1
        self.partial = _fresh(dest, overwrite)
        self._zstd = _zstd()
        self._local = threading.local()
        self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, thread_name_prefix="streammerge-pack")
        self._room = threading.BoundedSemaphore(2 * self.threads)
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._futures: list[concurrent.futures.Future[None]] = []
        self.files: list[str] = []
        self._fds: list[int] = []
        self._pos: list[int] = []
        self._chunks: list[list[dict[str, Any]]] = []
        self._sizes: list[int] = []
        self._width: list[dict[int, tuple[str, int]]] = []
        """Per shard: tensor start offset -> (name, width)."""
        self._starts: list[list[int]] = []
        for shard in plan.shards:
            raw = shard_header_bytes(shard)
            header = parse_header(raw[8:], path=shard.file, file_size=shard.size)
            self.files.append(shard.file)
            fd = os.open(os.path.join(self.partial, shard.file + SUFFIX), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | CLOEXEC, 0o644)
            self._fds.append(fd)
            pwrite_all(fd, MAGIC, 0)
            self._pos.append(len(MAGIC))
            self._chunks.append([])
            self._sizes.append(shard.size)
            starts = {t.offset: (t.name, _width(t.dtype)) for t in header.tensors if t.nbytes}
            self._width.append(starts)
            self._starts.append(sorted(starts))
            self._submit(len(self.files) - 1, 0, raw, "", 1)

    def _tensor_at(self, shard: int, offset: int) -> tuple[str, int]:
        import bisect

        starts = self._starts[shard]
        i = bisect.bisect_right(starts, offset) - 1
        return self._width[shard][starts[i]] if i >= 0 else ("", 1)

    def add(self, shard: int, offset: int, data: memoryview | bytes) -> None:
        """Pack ``data``, written at ``offset`` of output shard ``shard`` (copied: the caller may reuse it)."""
        if self._error is not None:
            raise self._error
        tensor, width = self._tensor_at(shard, offset)
        for start in range(0, len(data), CHUNK_BYTES):
            piece = bytes(data[start : start + CHUNK_BYTES])
            self._submit(shard, offset + start, piece, tensor, width if len(piece) % width == 0 else 1)

    def add_from_file(self, shard: int, offset: int, path: str, nbytes: int) -> None:
        """Pack ``nbytes`` already in the output file ``path`` at ``offset`` (a tensor the kernel copied)."""
        with open(path, "rb") as f:
            for start in range(0, nbytes, CHUNK_BYTES):
                f.seek(offset + start)
                self.add(shard, offset + start, f.read(min(CHUNK_BYTES, nbytes - start)))

    def _submit(self, shard: int, at: int, raw: bytes, tensor: str, width: int) -> None:
        self._room.acquire()
        self._futures.append(self._pool.submit(self._pack, shard, at, raw, tensor, width))

    def _pack(self, shard: int, at: int, raw: bytes, tensor: str, width: int) -> None:
        try:
            if not hasattr(self._local, "c"):
                self._local.c = self._zstd.ZstdCompressor(level=self.level)
            planes = []
            for plane in _planes(raw, width):
                z = self._local.c.compress(plane)
                planes.append((z, "zstd") if len(z) < RAW_IF_ABOVE * len(plane) else (plane, "raw"))
            entry: dict[str, Any] = {"at": at, "n": len(raw), "tensor": tensor, "width": width, "crc32": zlib.crc32(raw), "planes": []}
            with self._lock:
                for data, codec in planes:
                    pwrite_all(self._fds[shard], data, self._pos[shard])
                    entry["planes"].append([self._pos[shard], len(data), codec])
                    self._pos[shard] += len(data)
                self._chunks[shard].append(entry)
        except BaseException as e:
            self._error = self._error or e
        finally:
            self._room.release()

    def finish(self, out: str) -> PackReport:
        """After the merge renamed its output to ``out``: indexes, small files, rename into place.

        OutputError when the chunks do not cover every shard exactly (the merge wrote something
        this packer did not see): pack the output with :func:`pack` instead."""
        import time

        start = time.perf_counter()
        self._pool.shutdown(wait=True)
        if self._error is not None:
            raise self._error
        packed = 0
        for i, name in enumerate(self.files):
            chunks = sorted(self._chunks[i], key=lambda c: int(c["at"]))
            covered = 0
            for c in chunks:
                if c["at"] != covered:
                    raise OutputError(f"{name}: streamed pack has a gap at byte {covered}; pack it instead: streammerge pack {out}")
                covered += c["n"]
            if covered != self._sizes[i]:
                raise OutputError(
                    f"{name}: streamed pack covers {covered} of {self._sizes[i]} bytes; pack it instead: streammerge pack {out}"
                )
            text = json.dumps(
                {"format": FORMAT, "file": name, "size": self._sizes[i], "level": self.level, "chunks": chunks}, separators=(",", ":")
            ).encode("utf-8")
            pwrite_all(self._fds[i], text + struct.pack("<Q", len(text)) + TAIL, self._pos[i])
            os.fsync(self._fds[i])
            packed += self._pos[i] + len(text) + 16
        self._close()
        for name in sorted(os.listdir(out)):
            path = os.path.join(out, name)
            if name not in self.files and os.path.isfile(path) and not name.startswith("."):
                shutil.copyfile(path, os.path.join(self.partial, name))
        _into_place(self.partial, self.dest)
        return PackReport(out, self.dest, sum(self._sizes), packed, time.perf_counter() - start, len(self.files))

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def abort(self) -> None:
        """Drop the packed files (the merge failed)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._close()
        remove(self.partial)


__all__ = ["MANIFEST_FILE", "PackReport", "StreamPacker", "pack", "pack_file", "read_index", "unpack", "unpack_file"]
