"""FP8 bases (block-wise fp8 as DeepSeek-V3 / Qwen3-FP8 ship them, compressed-tensors FP8) merged to 16 bit and back to FP8.

Oracles: transformers' own CPU loading of the FP8 checkpoint (it dequantizes on a machine without a GPU),
PEFT ``merge_and_unload`` on that model, the float64 merge of the formula's dequantized weights, and
transformers' ``Fp8Quantize`` for the fixtures' quantizer.
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

import streammerge
from tests.conftest import assert_merged_exact, load_folder, lora_factors, make_lora, read_json, run_cli
from tests.fp8_fixtures import dequant_fp8_reference, load_dequantized_fp8, make_llama_fp8, quantize_fp8_reference, scales_of
from tests.quantized_fixtures import unquantized_source

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def merge(base: Path, adapter: Path, out: Path, **kwargs: object) -> dict[str, torch.Tensor]:
    streammerge.run(streammerge.plan(base, str(adapter), out=out, **kwargs))  # type: ignore[arg-type]
    return load_folder(out)


def reference(base: Path, adapter: Path, block: tuple[int, int] | None, scale: float = 2.0) -> dict[str, torch.Tensor]:
    """float64 merge of the formula-dequantized base (bf16, as transformers loads it); other tensors as dequantized."""
    deq = load_dequantized_fp8(base, block)
    refs = {k: v.double() for k, v in deq.items()}
    for module, (a, b) in lora_factors(adapter).items():
        refs[module + ".weight"] = refs[module + ".weight"] + scale * (b.double() @ a.double())
    return refs


def check_16bit(ours: dict[str, torch.Tensor], base: Path, adapter: Path, block: tuple[int, int] | None) -> None:
    refs = reference(base, adapter, block)
    modules = {m + ".weight" for m in lora_factors(adapter)}
    assert sorted(ours) == sorted(refs)
    for name, ref in refs.items():
        if name in modules:
            assert_merged_exact(ours[name], ref, name)
        else:
            assert torch.equal(ours[name], ref.to(ours[name].dtype)), name


def test_reference_quantizer_is_transformers(tmp_path: Path) -> None:
    """The fixtures' quantizer gives transformers' Fp8Quantize bytes, and transformers loads the fixture (on the CPU,
    dequantizing) exactly as the formula dequantizes it."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    base = make_llama_fp8(tmp_path / "base")
    quantizer = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 128))))
    source, stored = load_folder(unquantized_source(base)), load_folder(base)
    for name in (Q_PROJ, "model.layers.1.mlp.down_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        theirs = quantizer.convert({name: source[name]})
        assert torch.equal(theirs[name].view(torch.uint8), stored[name].view(torch.uint8)), name
        assert torch.equal(theirs[name.removesuffix(".weight") + ".weight_scale_inv"], stored[name + "_scale_inv"]), name
    loaded = AutoModelForCausalLM.from_pretrained(base).state_dict()
    for name, t in load_dequantized_fp8(base, (128, 128)).items():
        assert torch.equal(loaded[name], t), name


def test_block_fp8_merge_matches_transformers_then_peft(tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = make_llama_fp8(tmp_path / "base")
    adapter = make_lora(unquantized_source(base), tmp_path / "lora")
    p = streammerge.plan(base, str(adapter), out=tmp_path / "ours")
    assert any("14 fp8 weights are dequantized" in n for n in p.notes)
    assert p.dtype == "BF16" and all(u.quant is None or u.tile_rows % 128 == 0 or u.tile_rows == u.rows for u in p.units)
    streammerge.run(p)
    ours = load_folder(tmp_path / "ours")
    check_16bit(ours, base, adapter, (128, 128))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    theirs = {k: v for k, v in model.state_dict().items()}
    assert sorted(theirs) == sorted(ours)
    same = sum(int((ours[k] == v).sum()) for k, v in theirs.items())
    assert same / sum(v.numel() for v in theirs.values()) >= 0.999
    config = read_json(tmp_path / "ours" / "config.json")
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert torch.isfinite(reloaded(torch.tensor([[1, 2, 3]])).logits).all()


@pytest.mark.parametrize("block", [(128, 128), (64, 32), None])
def test_partial_edge_blocks_and_small_tiles(tmp_path: Path, block: tuple[int, int] | None) -> None:
    """Shapes that are not multiples of the block (edge blocks partial, as DeepSeek-V3's kv_a_proj 576 rows): the formula
    is the oracle (transformers derives the block from the grid and gets such shapes wrong). Tiles of whole block rows
    give the same bytes as one tile."""
    base = make_llama_fp8(tmp_path / "base", block=block, hidden_size=192, intermediate_size=320)
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj", "down_proj", "up_proj"])
    whole = merge(base, adapter, tmp_path / "whole")
    check_16bit(whole, base, adapter, block)
    p = streammerge.plan(base, str(adapter), out=tmp_path / "tiny", tile_size=20000)
    assert all(u.tile_rows % u.quant.block_rows == 0 or u.tile_rows == u.rows or u.quant.block_rows >= u.rows for u in p.units if u.quant)
    assert any(u.quant and u.tile_rows < u.rows for u in p.units) or block is None
    streammerge.run(p)
    tiny = load_folder(tmp_path / "tiny")
    for name, t in whole.items():
        assert torch.equal(t.view(torch.uint8), tiny[name].view(torch.uint8)), name


def _layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                t = f.get_slice(k)
                out[k] = (t.get_dtype(), tuple(t.get_shape()))
    return out


def requant_error(fp8_out: Path, refs: dict[str, torch.Tensor], names: list[str], block: tuple[int, int] | None) -> tuple[float, float]:
    """(largest error in half steps, RMS error / RMS of the weights) of the FP8 output against the float64 merge
    (the float32 division before the FP8 rounding may add a few float32 ulps).

    Half a step of an e4m3 value v in a block with stored scale s: 2^(floor(log2 |v/s|) - 4) * s for normal codes,
    2^-10 * s for subnormal ones (|v/s| < 2^-6)."""
    stored = load_folder(fp8_out)
    deq = load_dequantized_fp8(fp8_out, block, torch.float32)
    worst, err2, ref2 = 0.0, 0.0, 0.0
    for name in names:
        ref = refs[name]
        s = scales_of(stored, name).double()
        rows, cols = ref.shape
        b = block or (rows, cols)
        if s.numel() == rows and rows > 1:
            b = (1, cols)
        elif s.numel() == 1:
            b = (rows, cols)
        grid = (math.ceil(rows / b[0]), math.ceil(cols / b[1]))
        s_full = s.reshape(grid).repeat_interleave(b[0], 0)[:rows].repeat_interleave(b[1], 1)[:, :cols]
        mag = (ref / s_full).abs().clamp_min(2.0**-6)
        half_step = torch.pow(2.0, torch.floor(torch.log2(mag)) - 4) * s_full
        err = (deq[name].double() - ref).abs()
        worst = max(worst, float((err / half_step).max()))
        err2 += float((err**2).sum())
        ref2 += float((ref**2).sum())
    return worst, math.sqrt(err2 / ref2)


@pytest.mark.parametrize(("block", "intermediate"), [((128, 128), 384), ((128, 128), 320), ((64, 32), 320)])
def test_merged_fp8_keeps_the_base_format_and_loads(tmp_path: Path, block: tuple[int, int], intermediate: int) -> None:
    """merged_fp8: the base's keys, dtypes, shapes and quantization_config; each merged weight within half an FP8 step
    of the float64 merge. transformers loads the output as it loads the base (it cannot load partial edge blocks)."""
    from transformers import AutoModelForCausalLM

    base = make_llama_fp8(tmp_path / "base", block=block, intermediate_size=intermediate)
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    p = streammerge.plan(base, str(adapter), out=tmp_path / "m8", mode="merged_fp8")
    assert any("re-quantized to FP8 e4m3" in n for n in p.notes) and any("copied with their scales, bit for bit" in n for n in p.notes)
    streammerge.run(p)
    assert _layout(tmp_path / "m8") == _layout(base)  # same keys, dtypes and shapes: the base's size
    assert read_json(tmp_path / "m8" / "config.json")["quantization_config"] == read_json(base / "config.json")["quantization_config"]
    ours, original = load_folder(tmp_path / "m8"), load_folder(base)
    merged = {m + ".weight" for m in lora_factors(adapter)}
    for name, t in original.items():  # untouched weights and their scales bit for bit
        if name.removesuffix("_scale_inv") not in merged:
            assert torch.equal(
                t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                ours[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else ours[name],
            ), name
    refs = reference(base, adapter, block)
    for name in merged:  # the codes are the reference quantizer's of the float64 merge rounded to float32
        codes, scale = quantize_fp8_reference(refs[name].float(), block)
        assert torch.equal(scale, ours[name + "_scale_inv"]), name
        assert float((codes.view(torch.uint8) == ours[name].view(torch.uint8)).double().mean()) >= 0.999, name
    worst, rms = requant_error(tmp_path / "m8", refs, sorted(merged), block)
    m16 = merge(base, adapter, tmp_path / "m16")
    rms16 = math.sqrt(
        sum(float(((m16[n].double() - refs[n]) ** 2).sum()) for n in merged) / sum(float((refs[n] ** 2).sum()) for n in merged)
    )
    print(f"merged_fp8 {block}: worst {worst:.3f} half steps, RMS error {rms:.4%} of RMS (merged_16bit: {rms16:.4%})")
    assert worst <= 1.0 + 1e-5
    assert rms < 0.04 and rms16 < 0.005
    if intermediate % block[0] or intermediate % block[1]:
        return
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m8")  # as it loads the base (on the CPU: dequantized)
    sd = model.state_dict()
    for name in merged:
        assert torch.equal(sd[name], dequant_fp8_reference(ours[name], ours[name + "_scale_inv"], block)), name


def _edit_header(path: Path, name: str, change: dict[str, object]) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header[name].update(change)
    body = json.dumps(header, separators=(",", ":")).encode()
    assert len(body) <= n
    path.write_bytes(raw[:8] + body + b" " * (n - len(body)) + raw[8 + n :])


def _set_scale(path: Path, name: str, value: float) -> None:
    """Overwrite the first float32 of tensor ``name`` in place."""
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    begin, _ = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    raw[8 + n + begin : 8 + n + begin + 4] = torch.tensor([value], dtype=torch.float32).numpy().tobytes()
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 0.0, -1.0])
def test_hostile_scale_values_exit_2_naming_file_and_tensor(tmp_path: Path, value: float) -> None:
    base = make_llama_fp8(tmp_path / "base")
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj"])
    scale = "model.layers.1.mlp.up_proj.weight_scale_inv"
    _set_scale(base / "model.safetensors", scale, value)
    for mode in ("merged_16bit", "merged_fp8"):
        r = run_cli("merge", str(base), str(adapter), "-o", str(tmp_path / mode), "--mode", mode, "-q")
        if mode == "merged_fp8":  # untouched weights are copied as they are: their scales never enter a computation
            assert r.exit_code == 0, r.stderr
            continue
        assert r.exit_code == 2, r.stderr
        errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("streammerge: note:")]
        assert len(errors) == 1, r.stderr
        assert str(base / "model.safetensors") in errors[0] and scale in errors[0] and "not finite and positive" in errors[0]
        assert not (tmp_path / mode).exists()


def test_hostile_scale_shapes_and_configs_exit_2(tmp_path: Path) -> None:
    base = make_llama_fp8(tmp_path / "base")
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj"])
    shard = base / "model.safetensors"
    original, config = shard.read_bytes(), (base / "config.json").read_text()

    def plan_fails(*needles: str) -> None:
        r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        for needle in needles:
            assert needle in r.stderr, (needle, r.stderr)

    _edit_header(shard, Q_PROJ + "_scale_inv", {"shape": [4, 1]})  # same bytes, wrong grid
    plan_fails(Q_PROJ + "_scale_inv", "expected F32/BF16/F16 [2, 2]", str(shard))
    shard.write_bytes(original)
    _edit_header(shard, Q_PROJ + "_scale_inv", {"dtype": "I32"})
    plan_fails(Q_PROJ + "_scale_inv", "is I32")
    shard.write_bytes(original)
    _edit_header(shard, Q_PROJ, {"dtype": "U8"})  # FP8 scales beside a weight that is not FP8
    plan_fails(Q_PROJ, "not a 2-D F8_E4M3 weight")
    shard.write_bytes(original.replace(b"q_proj.weight_scale_inv", b"q_proj.weight_scale_inx"))  # FP8 weight without its scales
    r = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "o"))
    assert r.exit_code == 2 and "F8_E4M3" in r.stderr and Q_PROJ in r.stderr, r.stderr
    other = make_lora(unquantized_source(base), tmp_path / "lora_v", target_modules=["v_proj"])  # q_proj untouched
    r = run_cli("plan", str(base), str(other), "-o", str(tmp_path / "o"))  # would copy its raw codes into a 16-bit model
    assert r.exit_code == 2 and f"{Q_PROJ}' has no '{Q_PROJ}_scale_inv'" in r.stderr and str(shard) in r.stderr, r.stderr
    shard.write_bytes(original)
    (base / "config.json").write_text(config.replace('"weight_block_size": [\n      128,\n      128\n    ]', '"weight_block_size": [128]'))
    plan_fails("weight_block_size")
    (base / "config.json").write_text(config.replace('"quant_method": "fp8"', '"quant_method": "fp8", "x": 1').replace('"fp8"', '"awq"'))
    plan_fails("quantized with awq")


def test_fp8_peak_rss_stays_under_the_estimate(tmp_path: Path) -> None:
    import sys

    from tests.conftest import peak_rss_of

    base = make_llama_fp8(tmp_path / "base", hidden_size=1024, intermediate_size=2816, vocab_size=4000)
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", r=16)
    for mode in ("merged_16bit", "merged_fp8"):
        args = [str(base), str(adapter), "-o", str(tmp_path / mode), "--tile-size", "2MiB", "--mode", mode]
        estimate = json.loads(run_cli("plan", *args, "--json").output)["estimate"]["peak_host_bytes"]
        peak = peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args, "-q"])
        assert 100 * 2**20 < peak <= estimate, (mode, peak, estimate)


def test_fp8_plan_round_trips_and_old_plans_load(tmp_path: Path) -> None:
    base = make_llama_fp8(tmp_path / "base")
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj"])
    p = streammerge.plan(base, str(adapter), out=tmp_path / "o", mode="merged_fp8")
    p.save(tmp_path / "p.json")
    assert streammerge.Plan.load(tmp_path / "p.json") == p
    assert any(u.requant and u.requant.quant_type == "fp8" and u.extra for u in p.units)
    # a plan written before FP8 support: no FP8 fields in its quant/requant records
    from tests.quantized_fixtures import make_llama_4bit

    b4 = make_llama_4bit(tmp_path / "b4")
    p4 = streammerge.plan(b4, str(make_lora(unquantized_source(b4), tmp_path / "l4")), out=tmp_path / "o4", mode="merged_4bit")
    old = json.loads(p4.to_json())
    for u in old["units"]:
        for key in ("scale", "scale_name", "block_rows", "block_cols"):
            (u["quant"] or {}).pop(key, None)
        for key in ("block_rows", "block_cols", "scale_name", "scale_dtype", "scale_shape", "scale_fmt"):
            (u["requant"] or {}).pop(key, None)
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert streammerge.Plan.load(tmp_path / "old.json") == p4


# ---------------------------------------------------------------------------------------------
# compressed-tensors FP8 (llm-compressor's FP8 / FP8-dynamic checkpoints)

CT_CASES = [("channel", torch.bfloat16, False), ("tensor", torch.float32, True), ("block", torch.float32, False)]


def _ct_block(strategy: str) -> tuple[int, int] | None:
    return (128, 128) if strategy == "block" else None


@pytest.mark.parametrize(("strategy", "scale_dtype", "input_scale"), CT_CASES)
def test_compressed_tensors_fixture_is_the_library_format(
    tmp_path: Path, strategy: str, scale_dtype: torch.dtype, input_scale: bool
) -> None:
    """The fixture's codes are compressed-tensors' own quantize() of the source (float32 math) with the stored scales,
    and its dequantize() is the formula."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    base = make_llama_fp8(tmp_path / "base", fmt="compressed-tensors", strategy=strategy, scale_dtype=scale_dtype, input_scale=input_scale)
    source, stored = load_folder(unquantized_source(base)), load_folder(base)
    args = QuantizationArgs(
        num_bits=8, type="float", strategy=strategy, symmetric=True, block_structure=[128, 128] if strategy == "block" else None
    )
    for name in (Q_PROJ, "model.layers.1.mlp.down_proj.weight"):
        scale = stored[name + "_scale"]
        rows, cols = source[name].shape
        full = scale if strategy != "block" else scale.float().repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        codes = quantize(source[name].float(), full.float(), None, args, dtype=torch.float8_e4m3fn) if strategy != "block" else None
        if codes is not None:
            assert torch.equal(codes.view(torch.uint8), stored[name].view(torch.uint8)), name
        theirs = dequantize(stored[name], scale, None, args, dtype=torch.bfloat16)
        assert torch.equal(theirs.to(torch.bfloat16), load_dequantized_fp8(base, _ct_block(strategy))[name]), (
            name
        )  # tensor strategy: float32


@pytest.mark.parametrize(("strategy", "scale_dtype", "input_scale"), CT_CASES)
def test_compressed_tensors_merge_16bit_and_fp8(tmp_path: Path, strategy: str, scale_dtype: torch.dtype, input_scale: bool) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    base = make_llama_fp8(tmp_path / "base", fmt="compressed-tensors", strategy=strategy, scale_dtype=scale_dtype, input_scale=input_scale)
    adapter = make_lora(unquantized_source(base), tmp_path / "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    block = _ct_block(strategy)
    ours = merge(base, adapter, tmp_path / "m16")
    check_16bit(ours, base, adapter, block)
    assert not any(k.endswith(("_scale", ".input_scale")) for k in ours)
    decompress = CompressedTensorsConfig(run_compressed=False)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=decompress)
    theirs = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    assert sorted(theirs) == sorted(ours)
    same = sum(int((ours[k] == v).sum()) for k, v in theirs.items())
    assert same / sum(v.numel() for v in theirs.values()) >= 0.999

    merge(base, adapter, tmp_path / "m8", mode="merged_fp8")
    assert _layout(tmp_path / "m8") == _layout(base)
    assert read_json(tmp_path / "m8" / "config.json")["quantization_config"] == read_json(base / "config.json")["quantization_config"]
    m8, original = load_folder(tmp_path / "m8"), load_folder(base)
    if input_scale:
        assert all(torch.equal(m8[k], v) for k, v in original.items() if k.endswith(".input_scale"))
    refs = reference(base, adapter, block)
    merged = sorted(m + ".weight" for m in lora_factors(adapter))
    worst, rms = requant_error(tmp_path / "m8", refs, merged, block)
    print(f"merged_fp8 compressed-tensors {strategy}: worst {worst:.3f} half steps, RMS error {rms:.4%}")
    assert worst <= 1.0 + 1e-5 and rms < 0.04
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m8", quantization_config=decompress).state_dict()
    for name, t in load_dequantized_fp8(tmp_path / "m8", block).items():
        assert torch.equal(loaded[name], t), name
