"""MoE experts fused in memory (transformers 5) and LoRA on them through target_parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import streammerge
from streammerge.formats.checkpoint import open_checkpoint
from streammerge.plan.naming import table_naming, transformers_naming
from tests.conftest import load_folder


def _mixtral(path: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, **lora: object) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), LoraConfig(**lora))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return path


def _oracle(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload in float64, rounded once to the base's dtype on save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    PeftModel.from_pretrained(model, adapter).merge_and_unload().to(torch.bfloat16).save_pretrained(out)
    return load_folder(out)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _mixtral(tmp_path_factory.mktemp("mixtral"))


@pytest.mark.parametrize(
    "lora",
    [
        {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]},
        {"target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj"], "r": 3, "lora_alpha": 5},
    ],
    ids=["experts", "all-linear+gate_up"],
)
def test_fused_expert_lora_matches_peft(mixtral: Path, tmp_path: Path, lora: dict[str, object]) -> None:
    adapter = _adapter(mixtral, tmp_path / "lora", r=lora.pop("r", 2), lora_alpha=lora.pop("lora_alpha", 4), **lora)
    plan = streammerge.plan(mixtral, [adapter], tmp_path / "out")
    streammerge.run(plan)
    ours, theirs, base = load_folder(tmp_path / "out"), _oracle(mixtral, adapter, tmp_path / "ref"), load_folder(mixtral)
    assert sorted(ours) == sorted(theirs)  # the checkpoint's own per-expert names
    changed = [n for n in ours if not torch.equal(base[n], theirs[n])]
    assert any(".experts.3.w3." in n for n in changed) and any(".experts.0.w1." in n for n in changed)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name
    experts = [c for c in plan.changes if c.module.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts and all(len(c.tensors) >= 4 for c in experts)


def test_naming_table_agrees_with_transformers(mixtral: Path) -> None:
    ckpt = open_checkpoint(mixtral)
    ours, theirs = table_naming(ckpt.tensors, ckpt.config), transformers_naming(ckpt.tensors, ckpt.config, ckpt.root)
    assert ours is not None and not isinstance(theirs, str)
    assert ours.params == theirs.params
    assert {m: p for m, p in ours.module_params.items() if m.endswith("experts")} == {
        m: p for m, p in theirs.module_params.items() if m.endswith("experts")
    }


def test_adapter_for_another_moe_is_refused(mixtral: Path, tmp_path: Path) -> None:
    adapter = _adapter(mixtral, tmp_path / "lora", r=2, lora_alpha=4, target_modules=[], target_parameters=["mlp.experts.down_proj"])
    config = tmp_path / "lora" / "adapter_config.json"
    config.write_text(config.read_text().replace('"mlp.experts.down_proj"', '"mlp.experts.up_proj"'))
    with pytest.raises(streammerge.StreamMergeError, match="experts"):
        streammerge.plan(mixtral, [adapter], tmp_path / "out")
