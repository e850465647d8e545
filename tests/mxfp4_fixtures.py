"""Tiny gpt-oss checkpoints with MXFP4 experts, built by code (transformers quantizes MXFP4 only on a GPU).

``make_gpt_oss_mxfp4`` saves a random bf16 gpt-oss, then rewrites every fused expert parameter
``X`` (``...experts.gate_up_proj`` (E, hidden, 2 * intermediate), ``...experts.down_proj``) as the
OpenAI checkpoints store it: ``X_blocks`` U8 (E, N, K / 32, 16) (two e2m1 codes a byte, the low
nibble first, along K of the transposed (E, N, K)) and ``X_scales`` (E, N, K / 32) E8M0 exponents,
with ``quantization_config = {"quant_method": "mxfp4", ...}``. The quantizer here is plain torch
(round to the nearest e2m1 value after scaling by the power of two that fits the group's amax);
the oracle that reads the result back is transformers' own ``Mxfp4Config(dequantize=True)`` load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.arch_fixtures import make_model

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def quantize_mxfp4(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of a (E, K, N) parameter, K a multiple of 32."""
    x = p.float().transpose(1, 2).contiguous()  # (E, N, K)
    e, n, k = x.shape
    groups = x.view(e, n, k // 32, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0**-120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exp)[..., None]
    code = (scaled.abs()[..., None] - E2M1).abs().argmin(-1) | (scaled < 0).to(torch.int64) << 3
    pairs = code.to(torch.uint8).view(e, n, k // 32, 16, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4), (exp + 127).to(torch.uint8)


def make_gpt_oss_mxfp4(path: Path, src: Path | None = None, scale_dtype: str = "U8") -> Path:
    """A tiny MXFP4 gpt-oss in ``path`` (the bf16 model it came from in ``src``, default ``path``-bf16)."""
    from safetensors.torch import load_file, save_file

    src = src or path.with_name(path.name + "-bf16")
    if not (src / "config.json").exists():
        make_model("gpt_oss_mx", src)
    tensors = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = quantize_mxfp4(t)
            out[name + "_blocks"] = blocks
            out[name + "_scales"] = scales.view(torch.float8_e8m0fnu) if scale_dtype == "F8_E8M0" else scales
        else:
            out[name] = t
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"],
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def load_dequantized(path: Path, dtype: torch.dtype = torch.bfloat16) -> object:
    """transformers' own reading of an MXFP4 checkpoint on the CPU: ``Mxfp4Config(dequantize=True)``."""
    from transformers import GptOssForCausalLM, Mxfp4Config

    return GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=dtype, device_map="cpu")
