"""What a checkpoint, a single safetensors file or an adapter folder holds, as plain data.

Headers and JSON only; used by ``streammerge inspect``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

from streammerge.errors import StreamMergeError
from streammerge.formats.checkpoint import is_quantized, open_checkpoint
from streammerge.formats.peft import CONFIG_NAME as ADAPTER_CONFIG
from streammerge.formats.peft import open_adapter
from streammerge.formats.safetensors import TensorInfo, read_header
from streammerge.plan.model import Change

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def _tensor_rows(tensors: list[TensorInfo]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": os.path.basename(t.path)} for t in tensors
    ]


def _totals(tensors: list[TensorInfo]) -> dict[str, Any]:
    by_dtype: Counter[str] = Counter()
    for t in tensors:
        by_dtype[t.dtype] += t.nbytes
    return {
        "tensors": len(tensors),
        "parameters": sum(math.prod(t.shape) for t in tensors),
        "bytes": sum(t.nbytes for t in tensors),
        "bytes_by_dtype": dict(by_dtype.most_common()),
    }


def pattern(name: str) -> str:
    """A name with its layer and expert numbers replaced by ``*``: ``model.layers.*.mlp.experts.*.w1.weight``."""
    return _INDEX.sub("*", name)


def change_summary(changes: Sequence[Change]) -> list[dict[str, Any]]:
    """Which base tensors each adapter module changes, with layer and expert numbers folded into ``*``.

    One row per adapter and module pattern, in plan order: ``modules`` (how many modules it stands for),
    ``tensors`` (the base tensor patterns they change) and ``tensor_count``.
    """
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    for c in changes:
        row = rows.setdefault((c.adapter, pattern(c.module)), {"adapter": c.adapter, "module": pattern(c.module), "modules": 0})
        row["modules"] += 1
        row.setdefault("_tensors", {}).update(dict.fromkeys(pattern(t) for t in c.tensors))
        row["tensor_count"] = row.get("tensor_count", 0) + len(c.tensors)
    return [{**{k: v for k, v in r.items() if k != "_tensors"}, "tensors": list(r["_tensors"])} for r in rows.values()]


def adapter_changes(adapter_path: str | os.PathLike[str], base: str | os.PathLike[str]) -> list[Change]:
    """What the adapter at ``adapter_path`` changes in ``base`` (headers only; the planner's own mapping)."""
    from streammerge.plan.mapping import map_updates

    adapter = open_adapter(os.fspath(adapter_path))
    return list(map_updates(open_checkpoint(os.fspath(base)), [adapter], [1.0], "linear").changes)


def describe(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Describe a model folder, an adapter folder or one .safetensors file.

    For an adapter with ``base``, ``changes`` lists which base tensors each of its modules changes
    (see :func:`change_summary`; ``change_list`` has every module).

    Example::

        info = describe("./my-lora")
        print(info["kind"], info["modules"], info["flavours"])
    """
    path = os.path.abspath(os.fspath(path))
    if base is not None and not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        raise StreamMergeError(f"{path}: --base goes with an adapter folder (one with {ADAPTER_CONFIG}), to show what it changes there")
    if os.path.isfile(path):
        header = read_header(path)
        tensors = list(header.tensors)
        return {
            "kind": "safetensors file",
            "path": path,
            "metadata": header.metadata,
            **_totals(tensors),
            "tensor_list": _tensor_rows(tensors),
        }
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        adapter = open_adapter(path)
        cfg = adapter.config
        tensors = [t for p in adapter.pairs for t in (p.a, p.b)]
        changes = adapter_changes(path, base) if base is not None else None
        return {
            "kind": "LoRA adapter",
            "path": path,
            "flavours": list(adapter.flavours),
            "r": cfg.get("r"),
            "lora_alpha": cfg.get("lora_alpha"),
            "modules": len(adapter.pairs),
            "ranks": sorted({p.rank for p in adapter.pairs}),
            "scales": sorted({round(p.scale, 6) for p in adapter.pairs}),
            "target_modules": cfg.get("target_modules"),
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
            **_totals(tensors),
            **({"changes": change_summary(changes), "change_list": [_change_row(c) for c in changes]} if changes is not None else {}),
            "tensor_list": _tensor_rows(tensors),
        }
    if not os.path.isdir(path):
        raise StreamMergeError(f"{path}: no such file or folder")
    ckpt = open_checkpoint(path)
    tensors = ckpt.ordered()
    config = ckpt.config or {}
    return {
        "kind": "model",
        "path": path,
        "shards": [os.path.basename(h.path) for h in ckpt.headers],
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "config_dtype": config.get("dtype", config.get("torch_dtype")),
        "quantization": is_quantized(ckpt),
        "tie_word_embeddings": config.get("tie_word_embeddings"),
        **_totals(tensors),
        "tensor_list": _tensor_rows(tensors),
    }


def _change_row(c: Change) -> dict[str, Any]:
    return {"adapter": c.adapter, "module": c.module, "tensors": list(c.tensors)}
