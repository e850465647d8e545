"""What a checkpoint, a single safetensors file or an adapter folder holds, as plain data.

Headers and JSON only; used by ``streammerge inspect``.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

from streammerge.errors import StreamMergeError
from streammerge.formats.checkpoint import is_quantized, open_checkpoint
from streammerge.formats.peft import CONFIG_NAME as ADAPTER_CONFIG
from streammerge.formats.peft import open_adapter
from streammerge.formats.safetensors import TensorInfo, read_header


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


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a model folder, an adapter folder or one .safetensors file.

    Example::

        info = describe("./my-lora")
        print(info["kind"], info["modules"], info["flavours"])
    """
    path = os.path.abspath(os.fspath(path))
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
