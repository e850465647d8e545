"""Hugging Face model folders: find the safetensors files, read their headers, check the index.

A base is a folder holding ``model.safetensors``, or shards plus ``model.safetensors.index.json``
whose ``weight_map`` is authoritative. Every file name the index gives must be a plain name inside
the folder. Pickle weights (``*.bin``) are never opened: streammerge reads safetensors only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from streammerge.errors import BadCheckpoint
from streammerge.formats.safetensors import Header, TensorInfo, read_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".h5", ".msgpack", ".onnx", *PICKLE_SUFFIXES)
BNB_4BIT_SUFFIXES = (".quant_state.bitsandbytes__nf4", ".quant_state.bitsandbytes__fp4")


@dataclass(frozen=True)
class Checkpoint:
    """A base model folder: its shard headers in read order and every tensor by name."""

    root: str
    headers: tuple[Header, ...]
    tensors: dict[str, TensorInfo]
    config: dict[str, Any] | None
    ignored: tuple[str, ...]
    """Tensors present in a shard but absent from the index (the index wins; they are not loaded)."""
    order: tuple[TensorInfo, ...] | None = None
    """Read order when it is not the headers' (a view of the checkpoint with tensors replaced)."""

    def ordered(self) -> list[TensorInfo]:
        """Tensors in read order: shard by shard, each in byte order (sequential disk reads)."""
        if self.order is not None:
            return list(self.order)
        keep = self.tensors
        return [t for h in self.headers for t in h.tensors if keep.get(t.name) is t]


def load_json_object(path: str, what: str) -> dict[str, Any]:
    """Read a small JSON file that must hold an object; refuse anything else with a clear error."""
    try:
        with open(path, "rb") as f:
            raw = f.read(64 * 1024 * 1024 + 1)
    except OSError as e:
        raise BadCheckpoint(f"{path}: cannot read {what} ({e.strerror or e})") from e
    if len(raw) > 64 * 1024 * 1024:
        raise BadCheckpoint(f"{path}: {what} is larger than 64 MiB; not a {what}?")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadCheckpoint(f"{path}: {what} is not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise BadCheckpoint(f"{path}: {what} must be a JSON object, found {type(obj).__name__}")
    return obj


def check_inside(root: str, path: str) -> str:
    """``path`` (a file of the folder ``root``) must resolve inside ``root``; return it.

    A symlink leading out of the folder is refused, except in a Hugging Face cache snapshot
    (``models--org--name/snapshots/<rev>/file -> ../../blobs/<sha>``), whose files all live in
    the repository's ``blobs`` folder by design.
    """
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real.startswith(real_root + os.sep):
        return path
    snapshots = os.path.dirname(os.path.abspath(root))
    repo = os.path.dirname(snapshots)
    in_hf_cache = os.path.basename(snapshots) == "snapshots" and os.path.basename(repo).startswith(("models--", "datasets--"))
    if in_hf_cache and real.startswith(os.path.join(os.path.realpath(repo), "blobs") + os.sep):
        return path
    raise BadCheckpoint(f"{path}: is a link to {real}, outside {root}; copy the file into the folder instead")


def check_plain_name(root: str, name: object, where: str) -> str:
    """A file name from an index must name a file directly inside ``root``; return its path."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise BadCheckpoint(f"{where}: file name {name!r} is not a plain file name inside {root}")
    return os.path.join(root, name)


def open_checkpoint(root: str | os.PathLike[str]) -> Checkpoint:
    """Read every header of the base model in ``root`` (no tensor data) and validate them.

    Example::

        ckpt = open_checkpoint("./Llama-3.1-8B")
        print(len(ckpt.tensors), sum(t.nbytes for t in ckpt.tensors.values()))
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        what = "is a file; give the model folder" if os.path.exists(root) else "does not exist"
        raise BadCheckpoint(f"{root}: base model folder {what}")
    index_path = os.path.join(root, INDEX_NAME)
    single_path = os.path.join(root, SINGLE_NAME)
    if os.path.exists(index_path):
        headers, tensors, ignored = _open_sharded(root, index_path)
    elif os.path.exists(single_path):
        header = read_header(check_inside(root, single_path))
        headers, tensors, ignored = (header,), header.by_name(), ()
    else:
        raise BadCheckpoint(f"{root}: {_missing_weights_reason(root)}")
    config_path = os.path.join(root, CONFIG_NAME)
    config = load_json_object(check_inside(root, config_path), "config.json") if os.path.exists(config_path) else None
    return Checkpoint(root=root, headers=headers, tensors=tensors, config=config, ignored=ignored)


def _missing_weights_reason(root: str) -> str:
    names = sorted(os.listdir(root))
    if any(n.endswith(PICKLE_SUFFIXES) for n in names) and not any(n.endswith(".safetensors") for n in names):
        return "holds only pickle weights (*.bin/*.pt); streammerge reads safetensors only (convert the model to safetensors first)"
    if any(n.endswith(".safetensors") for n in names):
        return f"has .safetensors files but neither {SINGLE_NAME} nor {INDEX_NAME}"
    return f"no {SINGLE_NAME} or {INDEX_NAME} found; is this a Hugging Face model folder?"


def _open_sharded(root: str, index_path: str) -> tuple[tuple[Header, ...], dict[str, TensorInfo], tuple[str, ...]]:
    index = load_json_object(check_inside(root, index_path), "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BadCheckpoint(f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> file name")
    for name, file in weight_map.items():
        check_plain_name(root, file, f"{index_path}: tensor {name!r}")
    files = sorted(set(weight_map.values()))
    headers: list[Header] = []
    owner: dict[str, str] = {}
    tensors: dict[str, TensorInfo] = {}
    ignored: list[str] = []
    for file in files:
        path = os.path.join(root, file)
        if not os.path.isfile(path):
            raise BadCheckpoint(f"{index_path}: names shard {file!r}, which is missing from {root}")
        check_inside(root, path)
        header = read_header(path)
        headers.append(header)
        for t in header.tensors:
            if t.name in owner:
                raise BadCheckpoint(f"{path}: tensor {t.name!r} is also stored in {owner[t.name]}; duplicate tensor names across shards")
            owner[t.name] = file
            if weight_map.get(t.name) == file:
                tensors[t.name] = t
            elif t.name not in weight_map:
                ignored.append(t.name)
    for name, file in weight_map.items():
        if name not in tensors:
            where = f"but {owner[name]} holds it" if name in owner else "but no shard holds it"
            raise BadCheckpoint(f"{index_path}: tensor {name!r} is mapped to {file} {where}")
    return tuple(headers), tensors, tuple(ignored)


def is_quantized(ckpt: Checkpoint) -> str | None:
    """Name the quantization scheme of a base if it has one (bitsandbytes 4/8-bit), else None."""
    qc = (ckpt.config or {}).get("quantization_config")
    if isinstance(qc, dict):
        return str(qc.get("quant_method", "an unknown quantization method"))
    for name in ckpt.tensors:
        if name.endswith(BNB_4BIT_SUFFIXES):
            return "bitsandbytes 4-bit"
        if name.endswith(".SCB"):
            return "bitsandbytes 8-bit"
    return None
