"""Fixtures for FP8 bases (block-wise ``fp8`` as DeepSeek-V3 / Qwen3-FP8 ship them, and compressed-tensors FP8),
built by code from a tiny transformers Llama, never downloaded.

``quantize_fp8_reference`` is the quantizer: for whole blocks it is bit-identical to transformers'
``Fp8Quantize`` (checked by ``test_reference_quantizer_is_transformers``); edge blocks (shapes that are not
multiples of the block) take the amax of the elements they hold, as DeepSeek's checkpoints do. The
reference dequantizer ``dequant_fp8_reference`` is the plain formula with torch's float8 dtype.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from tests.quantized_fixtures import make_llama_source, unquantized_source

FP8_MAX = torch.finfo(torch.float8_e4m3fn).max
LINEAR_SUFFIXES = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "gate_proj.weight",
    "up_proj.weight",
    "down_proj.weight",
)


def _expand(scale: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    rows, cols = shape
    return scale.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def quantize_fp8_reference(
    w: torch.Tensor, block: tuple[int, int], fmt: str = "inverse", scale_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn codes, scales) of a 2-D weight, one scale per ``block`` (edge blocks partial).

    "inverse": transformers/DeepSeek (``s = 448 / amax``, codes ``x * s``, stored ``1 / s``); "divide":
    compressed-tensors (``scale = amax / 448`` in ``scale_dtype``, codes ``x / scale``)."""
    rows, cols = w.shape
    bm, bn = block
    gr, gc = math.ceil(rows / bm), math.ceil(cols / bn)
    x = w.float()
    padded = torch.zeros(gr * bm, gc * bn)
    padded[:rows, :cols] = x.abs()
    amax = padded.view(gr, bm, gc, bn).amax(dim=(1, 3))
    if fmt == "divide":
        stored = (amax / FP8_MAX).to(scale_dtype)
        stored = torch.where(stored > 0, stored, torch.ones_like(stored))
        q = (x / _expand(stored, block, (rows, cols))).clamp(-FP8_MAX, FP8_MAX)
        return q.to(torch.float8_e4m3fn), stored
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    scale = torch.where(amax > 0, FP8_MAX / safe, torch.ones_like(amax))
    inverse = (1.0 / scale).to(torch.float32)
    q = (x * _expand(scale, block, (rows, cols))).clamp(-FP8_MAX, FP8_MAX)
    return q.to(torch.float8_e4m3fn), inverse.to(scale_dtype)


def dequant_fp8_reference(
    codes: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """float32(code) * float32(scale of its block), rounded once to ``dtype``."""
    shape = (codes.shape[0], codes.shape[1])
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    return (codes.float() * _expand(scale.reshape(grid), block, shape)).to(dtype)


def make_llama_fp8(
    path: Path,
    *,
    block: tuple[int, int] | None = (128, 128),
    fmt: str = "fp8",
    strategy: str = "block",
    scale_dtype: torch.dtype = torch.float32,
    input_scale: bool = False,
    seed: int = 0,
    **cfg: Any,
) -> Path:
    """A tiny Llama saved as a pre-quantized FP8 checkpoint (the bf16 source kept at ``unquantized_source(path)``).

    ``fmt="fp8"``: every decoder linear ``X.weight`` F8_E4M3 with ``X.weight_scale_inv`` per ``block`` (None: one per
    tensor), config ``quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic",
    "weight_block_size": block}`` (what DeepSeek-V3 and Qwen3-FP8 ship). ``fmt="compressed-tensors"``: ``X.weight_scale``
    per ``strategy`` ("channel": (out, 1), "tensor": (1,), "block": grid), ``X.input_scale`` (1,) when ``input_scale``,
    and the config llm-compressor writes. Defaults: hidden 256, intermediate 384, 4 heads, 2 kv heads (k/v 128 rows),
    so 128x128 blocks tile every weight; pass e.g. intermediate_size=320 for partial edge blocks.
    """
    from safetensors.torch import load_file, save_file

    cfg = {"hidden_size": 256, "intermediate_size": 384, "vocab_size": 256, **cfg}
    source = make_llama_source(unquantized_source(path), seed=seed, **cfg)
    tensors = load_file(source / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not name.endswith(LINEAR_SUFFIXES):
            out[name] = w
            continue
        rows, cols = w.shape
        if fmt == "fp8":
            b = block or (rows, cols)
            codes, scale = quantize_fp8_reference(w, b, "inverse", scale_dtype)
            out[name], out[name + "_scale_inv"] = codes, (scale if block else scale.reshape(()))
        else:
            b = {"channel": (1, cols), "tensor": (rows, cols), "block": block or (128, 128)}[strategy]
            codes, scale = quantize_fp8_reference(w, b, "divide", scale_dtype)
            out[name] = codes
            out[name + "_scale"] = scale.reshape(rows, 1) if strategy == "channel" else scale.reshape(1) if strategy == "tensor" else scale
            if input_scale:
                out[name.removesuffix(".weight") + ".input_scale"] = torch.tensor([0.02], dtype=scale_dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    if fmt == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8",
            "activation_scheme": "dynamic",
            "weight_block_size": list(block) if block else None,
        }
    else:
        weights: dict[str, Any] = {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "dynamic": False,
            "strategy": strategy,
            "observer": "minmax",
        }
        if strategy == "block":
            weights["block_structure"] = list(block or (128, 128))
        group: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
        group["input_activations"] = (
            {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"} if input_scale else None
        )
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": group},
            "ignore": ["lm_head"],
        }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json",):
        if (source / extra).exists():
            (path / extra).write_text((source / extra).read_text())
    return path


def scales_of(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return tensors.get(name + "_scale_inv", tensors.get(name + "_scale"))  # type: ignore[return-value]


def load_dequantized_fp8(path: Path, block: tuple[int, int] | None, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The logical model of an FP8 checkpoint (scales and activation scales gone), dequantized by the formula."""
    from tests.conftest import load_folder

    raw = load_folder(path)
    out: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if name.endswith(("_scale_inv", "_scale", ".input_scale")):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = scales_of(raw, name)
            b = block or (t.shape[0], t.shape[1])
            if s.numel() == t.shape[0] and s.numel() > 1:  # per channel
                b = (1, t.shape[1])
            elif s.numel() == 1:
                b = (t.shape[0], t.shape[1])
            out[name] = dequant_fp8_reference(t, s, b, dtype)
        else:
            out[name] = t
    return out
