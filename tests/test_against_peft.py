"""streammerge's output against transformers + PEFT ``merge_and_unload`` on the same inputs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import streammerge
from tests.conftest import (
    assert_merged_exact,
    load_folder,
    make_gpt2,
    make_llama,
    make_lora,
    peft_merge,
    read_json,
    reference_merge,
)


def merge(base: Path, adapters: list[Path], out: Path, **kwargs: object) -> streammerge.Plan:
    p = streammerge.plan(base, [str(a) for a in adapters], out=out, **kwargs)  # type: ignore[arg-type]
    streammerge.run(p)
    return p


def compare_with_peft(
    base: Path, adapter: Path, tmp_path: Path, scale: float, dtype: torch.dtype = torch.bfloat16, fifo: bool = False
) -> None:
    """The full check: names, shapes, dtypes as PEFT; merged within 1 ulp; others bit-identical."""
    ours = load_folder(Path(merge(base, [adapter], tmp_path / "ours").out))
    theirs = load_folder(peft_merge(base, [adapter], tmp_path / "peft", dtype=dtype))
    base_t = load_folder(base)
    assert sorted(ours) == sorted(theirs)
    refs = reference_merge(base_t, [(adapter, scale)], fan_in_fan_out=fifo)
    assert refs, "the adapter adapts nothing"
    same = ours_exact = peft_exact = total = 0
    for name, t in theirs.items():
        got = ours[name]
        assert (got.dtype, got.shape) == (t.dtype, t.shape), name
        if name in refs:
            assert_merged_exact(got, refs[name], name)
            rounded = refs[name].to(got.dtype)
            same += int((got == t).sum())
            ours_exact += int((got == rounded).sum())
            peft_exact += int((t == rounded).sum())
            total += t.numel()
        else:
            assert torch.equal(got.view(torch.uint8), base_t[name].view(torch.uint8)), f"{name} is not bit-identical to the base"
    # PEFT rounds in float32, so on a few elements it misses the float64 result that we hit.
    assert same / total >= 0.999, f"only {same / total:.6%} identical to PEFT"
    assert ours_exact >= peft_exact, f"PEFT is closer to float64 than streammerge ({peft_exact} vs {ours_exact} of {total})"


def test_plain_lora_matches_peft(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    compare_with_peft(llama_base, llama_lora, tmp_path, scale=16 / 8)


def test_output_loads_and_runs_like_peft_merge(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    merge(llama_base, [llama_lora], tmp_path / "ours")
    peft_merge(llama_base, [llama_lora], tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32)(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "peft", dtype=torch.float32)(ids).logits
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)
    config = read_json(tmp_path / "ours" / "config.json")
    assert "quantization_config" not in config


def test_rslora(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_lora(llama_base, tmp_path / "lora", r=4, lora_alpha=8, use_rslora=True)
    compare_with_peft(llama_base, adapter, tmp_path, scale=8 / math.sqrt(4))


def test_rank_and_alpha_pattern(llama_base: Path, tmp_path: Path) -> None:
    adapter = make_lora(
        llama_base, tmp_path / "lora", r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "down_proj": 2}, alpha_pattern={"v_proj": 3}
    )
    ours_plan = streammerge.plan(llama_base, [str(adapter)], out=tmp_path / "x")
    scales = {u.name.split(".")[-2]: u.lora[0].scale for u in ours_plan.units if u.lora}
    assert scales == {
        "q_proj": 16 / 4,
        "down_proj": 16 / 2,
        "v_proj": 3 / 8,
        "k_proj": 2.0,
        "o_proj": 2.0,
        "gate_proj": 2.0,
        "up_proj": 2.0,
    }
    ours = load_folder(Path(merge(llama_base, [adapter], tmp_path / "ours").out))
    theirs = load_folder(peft_merge(llama_base, [adapter], tmp_path / "peft"))
    assert identical_fraction(ours, theirs) >= 0.9999


def identical_fraction(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    """Fraction of all elements (over every tensor) that are equal in both checkpoints."""
    assert sorted(ours) == sorted(theirs)
    same = sum(int((ours[n] == t).sum()) for n, t in theirs.items())
    return same / sum(t.numel() for t in theirs.values())


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_adapters(llama_base: Path, tmp_path: Path, adapter_dtype: torch.dtype) -> None:
    adapter = make_lora(llama_base, tmp_path / "lora", adapter_dtype=adapter_dtype)
    assert {t.dtype for t in load_folder_adapter(adapter)} == {adapter_dtype}
    compare_with_peft(llama_base, adapter, tmp_path, scale=2.0)


def load_folder_adapter(adapter: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    return list(load_file(adapter / "adapter_model.safetensors").values())


def test_fp16_base(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", dtype=torch.float16)
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "down_proj"])
    compare_with_peft(base, adapter, tmp_path, scale=2.0, dtype=torch.float16)


def test_fan_in_fan_out_gpt2(tmp_path: Path) -> None:
    base = make_gpt2(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    assert read_json(adapter / "adapter_config.json")["fan_in_fan_out"] is True
    compare_with_peft(base, adapter, tmp_path, scale=2.0, fifo=True)


def test_sharded_base_and_output(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", shard="60KB", num_hidden_layers=3)
    assert (base / "model.safetensors.index.json").exists()
    adapter = make_lora(base, tmp_path / "lora")
    p = merge(base, [adapter], tmp_path / "ours", max_shard_size="50KB")
    out = Path(p.out)
    index = read_json(out / "model.safetensors.index.json")
    files = sorted(f.name for f in out.glob("*.safetensors"))
    assert files == sorted(set(index["weight_map"].values())) and len(files) == len(p.shards) > 1
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    tensors = load_folder(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    theirs = load_folder(peft_merge(base, [adapter], tmp_path / "peft"))
    assert sorted(tensors) == sorted(index["weight_map"])
    assert identical_fraction(tensors, theirs) >= 0.9999


def test_tied_embeddings_untouched(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", tie=True)
    assert "lm_head.weight" not in load_folder(base)
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    compare_with_peft(base, adapter, tmp_path, scale=2.0)
    assert "lm_head.weight" not in load_folder(tmp_path / "ours")


@pytest.mark.parametrize("dtype", ["float32", "fp16"])
def test_dtype_conversion_rounds_once(llama_base: Path, llama_lora: Path, tmp_path: Path, dtype: str) -> None:
    out_dtype = {"float32": torch.float32, "fp16": torch.float16}[dtype]
    p = merge(llama_base, [llama_lora], tmp_path / "ours", dtype=dtype)
    ours = load_folder(Path(p.out))
    base_t = load_folder(llama_base)
    refs = reference_merge(base_t, [(llama_lora, 2.0)])
    for name, t in ours.items():
        assert t.dtype == out_dtype, name
        if name in refs:
            assert_merged_exact(t, refs[name], name)
        else:
            assert torch.equal(t, base_t[name].to(out_dtype)), name
    config = read_json(Path(p.out) / "config.json")
    assert config["dtype"] == config["torch_dtype"] == {"float32": "float32", "fp16": "float16"}[dtype]


def test_two_adapters_are_summed(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    second = make_lora(llama_base, tmp_path / "lora2", r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], seed=7)
    ours = load_folder(Path(merge(llama_base, [llama_lora, second], tmp_path / "ours").out))
    refs = reference_merge(load_folder(llama_base), [(llama_lora, 2.0), (second, 1.0)])
    for name, ref in refs.items():
        assert_merged_exact(ours[name], ref, name)


def test_tiling_does_not_change_the_result(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    whole = merge(llama_base, [llama_lora], tmp_path / "whole")
    tiny = merge(llama_base, [llama_lora], tmp_path / "tiny", tile_size=1000)
    assert max(u.tile_rows for u in tiny.units if u.op == "merge") < max(u.tile_rows for u in whole.units if u.op == "merge")
    assert (Path(whole.out) / "model.safetensors").read_bytes() == (Path(tiny.out) / "model.safetensors").read_bytes()


def test_lora_on_lm_head_with_saved_base_layer(tmp_path: Path) -> None:
    """PEFT saves lm_head's own weight with the adapter (save_embedding_layers) and loads it back."""
    base = make_llama(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "lm_head"])
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        assert "base_model.model.lm_head.base_layer.weight" in set(f.keys())
    compare_with_peft(base, adapter, tmp_path, scale=2.0)
