"""Quantized bases (bitsandbytes 4-bit NF4/FP4 and 8-bit LLM.int8) merged to 16 bit.

The oracle is transformers' ``model.dequantize()`` followed by PEFT ``merge_and_unload``; the
flat-block formula (``tests.quantized_fixtures``, itself checked bit-exact against bitsandbytes)
covers the shapes where bitsandbytes' CPU kernel can be wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge.errors import BadCheckpoint
from tests.conftest import assert_merged_exact, load_folder, lora_factors, make_lora, peak_rss_of, read_json, run_cli
from tests.quantized_fixtures import (
    bnb_cpu_dequant_matches_reference,
    load_dequantized_reference,
    make_llama_4bit,
    make_llama_8bit,
    make_lora_4bit,
    peft_merge_4bit,
    unquantized_source,
)


def merge(base: Path, adapter: Path, out: Path, **kwargs: object) -> dict[str, torch.Tensor]:
    streammerge.run(streammerge.plan(base, str(adapter), out=out, **kwargs))  # type: ignore[arg-type]
    return load_folder(out)


def check_against_reference(ours: dict[str, torch.Tensor], base: Path, adapter: Path, scale: float = 2.0) -> None:
    """Merged weights within 1 ulp of float64 (dequantized W + s*B@A); the rest equal the dequantized base."""
    deq = load_dequantized_reference(base)
    factors = lora_factors(adapter)
    assert sorted(ours) == sorted(deq)
    for name, w in deq.items():
        module = name.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            assert_merged_exact(ours[name], w.double() + scale * (b.double() @ a.double()), name)
        else:
            assert torch.equal(ours[name], w.to(ours[name].dtype)), name


def oracle() -> str:
    """transformers' dequantize() where bitsandbytes' CPU kernel is right on this machine."""
    return "transformers" if bnb_cpu_dequant_matches_reference() else "reference"


@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_4bit_merge_matches_dequantize_then_peft(tmp_path: Path, quant_type: str, double_quant: bool) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type=quant_type, double_quant=double_quant)
    adapter = make_lora_4bit(base, tmp_path / "lora")
    ours = merge(base, adapter, tmp_path / "ours")
    check_against_reference(ours, base, adapter)
    theirs = load_folder(peft_merge_4bit(base, adapter, tmp_path / "peft", dequantizer=oracle()))  # type: ignore[arg-type]
    assert sorted(ours) == sorted(theirs)
    same = sum(int((ours[k] == v).sum()) for k, v in theirs.items())
    assert same / sum(v.numel() for v in theirs.values()) >= 0.999
    config = read_json(tmp_path / "ours" / "config.json")
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_4bit_blocks_that_cross_rows(tmp_path: Path, blocksize: int) -> None:
    """176-wide rows at blocksize 128/256 (and 64x176 weights): blocks run across rows; tiles must not care."""
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True, blocksize=blocksize)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj", "down_proj", "up_proj"])
    whole = merge(base, adapter, tmp_path / "whole")
    check_against_reference(whole, base, adapter)
    tiny = merge(base, adapter, tmp_path / "tiny", tile_size=3000)  # many tiles, each starting on a block
    for name, t in whole.items():
        assert torch.equal(t.view(torch.int16), tiny[name].view(torch.int16)), name


def test_4bit_with_bf16_quant_storage(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True, quant_storage=torch.bfloat16)
    adapter = make_lora_4bit(base, tmp_path / "lora")
    check_against_reference(merge(base, adapter, tmp_path / "ours"), base, adapter)


def test_8bit_merge(tmp_path: Path) -> None:
    base = make_llama_8bit(tmp_path / "base")
    adapter = make_lora(unquantized_source(base), tmp_path / "lora")
    ours = merge(base, adapter, tmp_path / "ours")
    check_against_reference(ours, base, adapter)
    theirs = load_folder(peft_merge_4bit(base, adapter, tmp_path / "peft", dequantizer="transformers"))
    same = sum(int((ours[k] == v).sum()) for k, v in theirs.items())
    assert same / sum(v.numel() for v in theirs.values()) >= 0.999


def test_dtype_override_and_output_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"])
    ours = merge(base, adapter, tmp_path / "ours", dtype="fp32")
    assert {t.dtype for t in ours.values()} == {torch.float32}
    check_against_reference(ours, base, adapter)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert not hasattr(model, "hf_quantizer") or model.hf_quantizer is None
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_plan_reports_quantized_sources_and_rounding_note(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj"])
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "out"))
    assert r.exit_code == 0
    assert "14 nf4 weights are dequantized" in r.output and "dequant 12" in r.output and "merge 2" in r.output
    r = run_cli("merge", str(base), str(adapter), "-o", str(tmp_path / "out"), "-q")
    assert r.exit_code == 0
    notes = [line for line in r.stderr.splitlines() if "quantization rounding" in line]
    assert len(notes) == 1 and "original 16-bit base" in notes[0]


@pytest.mark.parametrize("mode", ["merged_16bit", "merged_4bit"])
def test_4bit_peak_rss_stays_under_the_estimate(tmp_path: Path, mode: str) -> None:
    import sys

    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True, hidden_size=512, intermediate_size=1536, vocab_size=8000)
    adapter = make_lora_4bit(base, tmp_path / "lora", r=16)
    args = [str(base), str(adapter), "-o", str(tmp_path / "out"), "--tile-size", "4MiB", "--mode", mode]
    estimate = json.loads(run_cli("plan", *args, "--json").output)["estimate"]["peak_host_bytes"]
    peak = peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args, "-q"])
    assert 100 * 2**20 < peak <= estimate, (peak, estimate)


def _edit_tensor(path: Path, name: str, entry_change: dict[str, object]) -> None:
    """Rewrite one header entry in place (same header length), keeping the file otherwise intact."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[name].update(entry_change)
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n :])


def test_bad_quantized_inputs_exit_2_naming_the_tensor(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=False)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj"])
    shard = base / "model.safetensors"
    original = shard.read_bytes()

    # a quant state whose shape disagrees with the packed weight's size
    header_len = int.from_bytes(original[:8], "little")
    header = json.loads(original[8 : 8 + header_len])
    state_key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    begin, end = header[state_key]["data_offsets"]
    start = 8 + header_len
    state = original[start + begin : start + end]
    bad = state.replace(b'"shape": [64, 64]', b'"shape": [64, 32]')
    assert bad != state and len(bad) == len(state)
    shard.write_bytes(original[: start + begin] + bad + original[start + end :])
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "model.layers.0.self_attn.q_proj.weight" in r.stderr and "quant state says" in r.stderr

    # an unknown quant type
    shard.write_bytes(original.replace(b"quant_state.bitsandbytes__nf4", b"quant_state.bitsandbytes__nf5", 1))
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "unknown 4-bit quant type 'nf5'" in r.stderr

    # a missing companion (absmax renamed away)
    shard.write_bytes(original.replace(b"q_proj.weight.absmax", b"q_proj.weight.absmin", 1))
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "q_proj.weight.absmax" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

    # block scales of the wrong dtype (same byte count)
    shard.write_bytes(original)
    _edit_tensor(shard, "model.layers.1.mlp.up_proj.weight.absmax", {"dtype": "U8", "shape": [math.ceil(176 * 64 / 64) * 4]})
    with pytest.raises(BadCheckpoint, match=r"up_proj.weight.absmax.*expected F32"):
        streammerge.plan(base, str(adapter), out=tmp_path / "o")


# ---------------------------------------------------------------------------------------------
# --mode merged_4bit and --mode lora


def _header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_slice(k)
                out[k] = (t.get_dtype(), tuple(t.get_shape()))
    return out


def _within_one_step(four_bit: Path, merged16: dict[str, torch.Tensor], names: list[str]) -> None:
    """Dequantized 4-bit weights within one quantization step (largest code gap x block scale) of the 16-bit merge."""
    from tests.quantized_fixtures import read_quant_state

    deq = load_dequantized_reference(four_bit)
    stored = load_folder(four_bit)
    for name in names:
        state = read_quant_state(stored, name)
        code = stored[name + ".quant_map"].sort().values
        step = float((code[1:] - code[:-1]).max())
        w = merged16[name].float().reshape(-1)
        bs = state["blocksize"]
        pad = (-w.numel()) % bs
        scale = torch.nn.functional.pad(w.abs(), (0, pad)).view(-1, bs).amax(dim=1).repeat_interleave(bs)[: w.numel()]
        err = (deq[name].float().reshape(-1) - w).abs()
        assert bool((err <= step * scale * 1.02 + 1e-6).all()), (name, float((err / scale.clamp_min(1e-12)).max()), step)


def test_merged_4bit_from_4bit_base_loads_and_stays_within_one_step(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = make_llama_4bit(tmp_path / "base", quant_type="fp4", double_quant=True)
    adapter = make_lora_4bit(base, tmp_path / "lora")
    merged16 = merge(base, adapter, tmp_path / "m16")
    merge(base, adapter, tmp_path / "m4", mode="merged_4bit")

    def layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:  # quant-state JSON is padded to a planned length
        return {k: (d, () if ".quant_state." in k else s) for k, (d, s) in _header(path).items()}

    assert layout(tmp_path / "m4") == layout(base)  # same keys, dtypes and shapes as the 4-bit base
    config = read_json(tmp_path / "m4" / "config.json")
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    names = [n for n in merged16 if n.endswith("proj.weight")]
    _within_one_step(tmp_path / "m4", merged16, names)


def test_merged_4bit_from_16bit_base(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.conftest import make_llama

    base = make_llama(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "down_proj"])
    merged16 = merge(base, adapter, tmp_path / "m16")
    merge(base, adapter, tmp_path / "m4", mode="merged_4bit", max_shard_size="60KB")
    header = _header(tmp_path / "m4")
    quantized = sorted(n.split(".quant_state")[0] for n in header if ".quant_state.bitsandbytes__nf4" in n)
    assert quantized == sorted(n for n in merged16 if n.endswith("proj.weight"))  # every linear, not embeddings/norms/lm_head
    assert header["lm_head.weight"] == ("BF16", (128, 64))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu")
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    for module in model.modules():
        # bitsandbytes 0.50's AVX512-BF16 CPU path repacks weights and asserts out_features % 32 == 0,
        # which this tiny model's k/v projections (16 rows) fail; the generic path runs any shape.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    _within_one_step(tmp_path / "m4", merged16, quantized)


def test_plan_with_requantized_units_round_trips(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=False)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj"])
    p = streammerge.plan(base, str(adapter), out=tmp_path / "o", mode="merged_4bit")
    p.save(tmp_path / "p.json")
    assert streammerge.Plan.load(tmp_path / "p.json") == p
    assert any(u.requant and u.extra for u in p.units)


@pytest.mark.parametrize("dtype", ["auto", "bf16"])
def test_lora_mode_round_trips(tmp_path: Path, dtype: str) -> None:
    from safetensors.torch import load_file

    from tests.conftest import make_llama

    base = make_llama(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "lm_head"])
    r = run_cli("merge", str(base), str(adapter), "-o", str(tmp_path / "norm"), "--mode", "lora", "--dtype", dtype, "-q")
    assert r.exit_code == 0, r.stderr
    out = tmp_path / "norm"
    assert (out / "adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    original, normalised = load_file(adapter / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert sorted(original) == sorted(normalised)
    for name, t in original.items():
        want = t if dtype == "auto" else t.to(torch.bfloat16)
        assert normalised[name].dtype == want.dtype and torch.equal(normalised[name], want), name
    # the normalised adapter merges like the original
    a = merge(base, adapter, tmp_path / "a", dtype="bf16")
    b = merge(base, out, tmp_path / "b", dtype="bf16")
    if dtype == "auto":
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_mode_checks_the_adapter_against_the_base(tmp_path: Path) -> None:
    from tests.conftest import make_llama

    adapter = make_lora(make_llama(tmp_path / "base"), tmp_path / "lora")
    other = make_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    r = run_cli("plan", str(other), str(adapter), "-o", str(tmp_path / "o"), "--mode", "lora")
    assert r.exit_code == 2 and "base tensor is [32" in r.stderr


def test_merged_4bit_without_bitsandbytes_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tests.conftest import make_llama

    base = make_llama(tmp_path / "base")
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"), "--mode", "merged_4bit")
    assert r.exit_code == 2 and "pip install 'streammerge[quant]'" in r.stderr


def test_merged_4bit_copies_untouched_4bit_weights_bit_for_bit(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj"])
    p = streammerge.plan(base, str(adapter), out=tmp_path / "m4", mode="merged_4bit")
    assert any("copied packed, bit for bit" in n for n in p.notes)
    streammerge.run(p)
    ours, original = load_folder(tmp_path / "m4"), load_folder(base)
    for name, t in original.items():
        if "q_proj" not in name:
            assert torch.equal(ours[name], t), name
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"], original["model.layers.0.self_attn.q_proj.weight"])


def test_blocksize_must_be_a_power_of_two(tmp_path: Path) -> None:
    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=False)
    adapter = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj"])
    shard = base / "model.safetensors"
    raw = shard.read_bytes()
    shard.write_bytes(raw.replace(b'"blocksize": 64', b'"blocksize": 63', 1))
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "not a power of two" in r.stderr
