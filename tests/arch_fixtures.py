"""Tiny transformers models of many families, random LoRA adapters on them, and PEFT's merge as the oracle.

Every builder saves a random bf16 model with ``save_pretrained`` (so the checkpoint has the names and layout
transformers writes, which for MoE models are the per-expert names of the original checkpoints, while the
model in memory holds fused 3-D experts). Sizes are the smallest each config accepts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMALL: dict[str, Any] = dict(
    vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, max_position_embeddings=32,
)  # fmt: skip
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _configs() -> dict[str, tuple[str, Callable[[], Any]]]:
    import transformers as t

    def llava() -> Any:
        text = t.LlamaConfig(**{**SMALL, "vocab_size": 96})
        vision = t.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
            projection_dim=16,
        )  # fmt: skip
        return t.LlavaConfig(vision_config=vision, text_config=text, image_token_index=90)

    def llava_next() -> Any:
        text = t.LlamaConfig(**{**SMALL, "vocab_size": 96})
        vision = t.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
            projection_dim=16,
        )  # fmt: skip
        return t.LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=90, image_grid_pinpoints=[[16, 16]])

    def qwen2_vl() -> Any:
        text = dict(
            vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )  # fmt: skip
        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2)
        return t.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=90, video_token_id=91, vision_start_token_id=92)

    def deepseek_v3() -> Any:
        return t.DeepseekV3Config(
            **{**SMALL, "num_key_value_heads": 2}, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=4, n_group=1, topk_group=1,
        )  # fmt: skip

    def qwen2_5_vl() -> Any:
        text = dict(
            vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )  # fmt: skip
        vision = dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14, spatial_merge_size=2,
            fullatt_block_indexes=[0],
        )  # fmt: skip
        return t.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=90, video_token_id=91, vision_start_token_id=92)

    def mistral3() -> Any:
        vision = t.PixtralVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8, head_dim=8
        )
        text = t.MistralConfig(**{**SMALL, "vocab_size": 96}, head_dim=8)
        return t.Mistral3Config(text_config=text, vision_config=vision, image_token_index=90, spatial_merge_size=1)

    def gemma3() -> Any:
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8)
        return t.Gemma3Config(
            text_config=dict(**{**SMALL, "vocab_size": 300}, head_dim=8), vision_config=vision, mm_tokens_per_image=4,
            image_token_index=290, boi_token_index=291, eoi_token_index=292,
        )  # fmt: skip

    llama4_text = dict(
        **{**SMALL, "vocab_size": 96}, intermediate_size_mlp=24, num_local_experts=4, num_experts_per_tok=1, head_dim=8,
        interleave_moe_layer_step=1,
    )  # fmt: skip

    def qwen3_vl_moe() -> Any:
        text = dict(
            vocab_size=96, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            max_position_embeddings=64, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=16,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True},
        )  # fmt: skip
        vision = dict(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=14, spatial_merge_size=2,
            num_position_embeddings=16, deepstack_visual_indexes=[0],
        )  # fmt: skip
        return t.Qwen3VLMoeConfig(text_config=text, vision_config=vision)

    def llama4() -> Any:
        vision = dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=8,
            vision_output_dim=16, projector_input_dim=16, projector_output_dim=16,
        )  # fmt: skip
        return t.Llama4Config(text_config=llama4_text, vision_config=vision, image_token_index=90)

    moe = dict(num_experts_per_tok=2)
    return {
        "qwen3": ("Qwen3ForCausalLM", lambda: t.Qwen3Config(**SMALL, head_dim=8)),
        "qwen2": ("Qwen2ForCausalLM", lambda: t.Qwen2Config(**SMALL)),
        "mistral": ("MistralForCausalLM", lambda: t.MistralConfig(**SMALL, head_dim=8)),
        "gemma2": ("Gemma2ForCausalLM", lambda: t.Gemma2Config(**SMALL, head_dim=8)),
        "gemma3_text": ("Gemma3ForCausalLM", lambda: t.Gemma3TextConfig(**SMALL, head_dim=8)),
        "phi3": ("Phi3ForCausalLM", lambda: t.Phi3Config(**SMALL, pad_token_id=0)),
        "gpt_neox": (
            "GPTNeoXForCausalLM",
            lambda: t.GPTNeoXConfig(**{k: v for k, v in SMALL.items() if k != "num_key_value_heads"}),
        ),
        "olmo2": ("Olmo2ForCausalLM", lambda: t.Olmo2Config(**SMALL)),
        "starcoder2": ("Starcoder2ForCausalLM", lambda: t.Starcoder2Config(**SMALL)),
        "mixtral": ("MixtralForCausalLM", lambda: t.MixtralConfig(**SMALL, num_local_experts=4, **moe)),
        "qwen3_moe": ("Qwen3MoeForCausalLM", lambda: t.Qwen3MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=8, head_dim=8, **moe)),
        "qwen2_moe": (
            "Qwen2MoeForCausalLM",
            lambda: t.Qwen2MoeConfig(**SMALL, num_experts=4, moe_intermediate_size=8, shared_expert_intermediate_size=12, **moe),
        ),
        "olmoe": ("OlmoeForCausalLM", lambda: t.OlmoeConfig(**SMALL, num_experts=4, **moe)),
        "deepseek_v3": ("DeepseekV3ForCausalLM", deepseek_v3),
        "gpt_oss": (
            "GptOssForCausalLM",
            lambda: t.GptOssConfig(**SMALL, num_local_experts=4, head_dim=8, layer_types=["full_attention", "sliding_attention"], **moe),
        ),
        "gpt_oss_mx": (  # experts' K (hidden, intermediate) a multiple of 32, as MXFP4 needs
            "GptOssForCausalLM",
            lambda: t.GptOssConfig(
                **{**SMALL, "hidden_size": 64, "intermediate_size": 32},
                num_local_experts=4,
                head_dim=16,
                layer_types=["full_attention", "sliding_attention"],
                **moe,
            ),
        ),
        "llama4_text": ("Llama4ForCausalLM", lambda: t.Llama4TextConfig(**llama4_text)),
        "granitemoe": (  # experts fused on disk under other names (input_linear / output_linear)
            "GraniteMoeForCausalLM",
            lambda: t.GraniteMoeConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
        ),
        "ernie4_5_moe": (  # experts per expert on disk, router a parameter (mlp.gate.weight), shared experts
            "Ernie4_5_MoeForCausalLM",
            lambda: t.Ernie4_5_MoeConfig(**SMALL, moe_num_experts=4, moe_k=2, moe_intermediate_size=8, moe_layer_start_index=0),
        ),
        "llava": ("LlavaForConditionalGeneration", llava),
        "llava_next": ("LlavaNextForConditionalGeneration", llava_next),
        "qwen2_vl": ("Qwen2VLForConditionalGeneration", qwen2_vl),
        "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", qwen2_5_vl),
        "mistral3": ("Mistral3ForConditionalGeneration", mistral3),
        "gemma3": ("Gemma3ForConditionalGeneration", gemma3),
        "llama4": ("Llama4ForConditionalGeneration", llama4),
        "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", qwen3_vl_moe),
    }


DENSE = ("qwen3", "qwen2", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "starcoder2")
MOE = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4_text", "ernie4_5_moe", "granitemoe")
VLM = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "mistral3", "gemma3", "llama4", "qwen3_vl_moe")
FAMILIES = DENSE + MOE + VLM


def model_class(family: str) -> Any:
    import transformers

    return getattr(transformers, _configs()[family][0])


def make_model(family: str, path: Path, seed: int = 0) -> Path:
    """A random tiny bf16 model of ``family`` saved to ``path``."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    config = _configs()[family][1]
    torch.manual_seed(seed)
    model_class(family)(config()).to(torch.bfloat16).save_pretrained(path)
    return path


def make_adapter(base: Path, path: Path, *, seed: int = 3, load: dict[str, Any] | None = None, **lora: Any) -> Path:
    """``get_peft_model`` on the model loaded from ``base`` (float32), random non-zero LoRA factors, saved to ``path``."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("r", 2)
    lora.setdefault("lora_alpha", 4)
    model = _load(base, torch.float32, **(load or {}))
    peft_model = get_peft_model(model, LoraConfig(**lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.save_pretrained(path)
    return path


def peft_merged(base: Path, adapter: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """PEFT's merge_and_unload done in float64, rounded once to ``dtype`` and saved (the oracle)."""
    from peft import PeftModel

    PeftModel.from_pretrained(_load(base, torch.float64), adapter).merge_and_unload().to(dtype).save_pretrained(out)
    return out


def _load(path: Path, dtype: torch.dtype, **kwargs: Any) -> Any:
    arch = json.loads((path / "config.json").read_text())["architectures"][0]
    import transformers

    return getattr(transformers, arch).from_pretrained(path, dtype=dtype, **kwargs)


def logits(model_dir: Path, adapter: Path | None = None, tokens: int = 8) -> torch.Tensor:
    """Float32 logits (MoE kernels take no float64) of a short prompt: the model in ``model_dir``, with ``adapter`` applied unmerged when given.

    Loading refuses missing or unexpected keys, so this also checks that a merged output loads as its base does.
    """
    from peft import PeftModel

    model, info = _load(model_dir, torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"{model_dir}: {bad}"
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.arange(1, tokens + 1).unsqueeze(0) * 7 % 60 + 1
    with torch.no_grad():
        return model(input_ids=ids).logits.double()  # type: ignore[no-any-return]


def write_per_expert_adapter(base: Path, path: Path, experts: list[str], modules: list[str], r: int = 2) -> Path:
    """An adapter as transformers-4-era PEFT saved one for an MoE model: one LoRA per expert module on disk.

    ``experts`` are the per-expert module names (e.g. ``w1``): every checkpoint tensor ``...experts.N.<name>.weight``
    gets a random pair; ``modules`` are further plain Linear modules (by last name).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            module, _, leaf = key.rpartition(".")
            short = module.rpartition(".")[2]
            if leaf != "weight" or (short not in experts and short not in modules) or (short in experts and ".experts." not in key):
                continue
            out_f, in_f = f.get_slice(key).get_shape()
            state[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.1
            state[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.1
    path.mkdir(parents=True)
    save_file(state, path / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r, "target_modules": [*experts, *modules],
        "base_model_name_or_path": str(base), "bias": "none", "fan_in_fan_out": False, "lora_dropout": 0.0,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
    }  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path
