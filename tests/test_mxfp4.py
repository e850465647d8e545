"""MXFP4 bases (gpt-oss experts as ``*_blocks`` + ``*_scales``): dequantized exactly, merged, written 16-bit.

The oracle is transformers' own MXFP4 reading (``Mxfp4Config(dequantize=True)``, on the CPU) followed by
PEFT's merge_and_unload in float64, rounded once; and ``convert_moe_packed_tensors`` for the bare values.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import BadCheckpoint
from streammerge.kernels import quant_mxfp4
from tests.arch_fixtures import EXPERTS, make_model
from tests.conftest import load_folder, read_json, run_cli
from tests.mxfp4_fixtures import load_dequantized, make_gpt_oss_mxfp4


@pytest.fixture(scope="module")
def bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model("gpt_oss_mx", tmp_path_factory.mktemp("gpt-oss") / "bf16")


@pytest.fixture(scope="module")
def mxfp4(bf16: Path) -> Path:
    return make_gpt_oss_mxfp4(bf16.with_name("mxfp4"), bf16)


def _adapter(base: Path, path: Path, **lora: object) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_dequantized(base, torch.float32), LoraConfig(r=2, lora_alpha=4, **lora))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return path


def _oracle(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    PeftModel.from_pretrained(load_dequantized(base, torch.float64), adapter).merge_and_unload().to(torch.bfloat16).save_pretrained(out)
    return load_folder(out)


@pytest.mark.parametrize(
    ("lora", "tile"),
    [
        ({"target_modules": "all-linear", "target_parameters": EXPERTS}, "64MiB"),
        ({"target_modules": [], "target_parameters": ["mlp.experts.down_proj"]}, "64KiB"),  # tiles of whole experts, not all
        ({"target_modules": ["q_proj"]}, "64MiB"),  # experts only dequantized
    ],
    ids=["all", "down-tiled", "dequant-only"],
)
def test_mxfp4_base_merges_like_transformers_and_peft(mxfp4: Path, tmp_path: Path, lora: dict[str, object], tile: str) -> None:
    adapter = _adapter(mxfp4, tmp_path / "lora", **lora)
    plan = streammerge.plan(mxfp4, [adapter], tmp_path / "out", tile_size=tile)
    experts = [u for u in plan.units if u.name.endswith("experts.down_proj")]
    assert experts and all(u.quant is not None and u.quant.kind == "mxfp4" for u in experts)
    if tile == "64KiB":
        assert all(u.tile_rows < u.rows and u.tile_rows % u.quant.block_rows == 0 for u in experts if u.quant)
    assert any("mxfp4" in n for n in plan.notes)
    streammerge.run(plan)
    ours, theirs = load_folder(tmp_path / "out"), _oracle(mxfp4, adapter, tmp_path / "ref")
    assert sorted(ours) == sorted(theirs)  # gate_up_proj, not gate_up_proj_blocks / _scales
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    config = read_json(tmp_path / "out" / "config.json")
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert run_cli("verify", str(tmp_path / "out"), "--recompute").exit_code == 0


def test_mxfp4_values_match_transformers_convert(mxfp4: Path, tmp_path: Path) -> None:
    """Every dequantized expert equals transformers' convert_moe_packed_tensors; F8_E8M0 scales read the same."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    e8m0 = make_gpt_oss_mxfp4(tmp_path / "e8m0", mxfp4.with_name("bf16"), scale_dtype="F8_E8M0")
    adapter = _adapter(mxfp4, tmp_path / "lora", target_modules=["q_proj"])
    streammerge.run(streammerge.plan(e8m0, [adapter], tmp_path / "out"))
    stored, ours = load_file(str(mxfp4 / "model.safetensors")), load_folder(tmp_path / "out")
    for name in [n.removesuffix("_blocks") for n in stored if n.endswith("_blocks")]:
        want = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.bfloat16)
        assert torch.equal(ours[name], want), name


def _rewrite(src: Path, dest: Path, change: dict[str, torch.Tensor | None]) -> Path:
    tensors = load_file(str(src / "model.safetensors"))
    for k, v in change.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    dest.mkdir()
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    (dest / "config.json").write_text((src / "config.json").read_text())
    return dest


def test_hostile_mxfp4_inputs_are_one_line_errors(mxfp4: Path, tmp_path: Path) -> None:
    adapter = _adapter(mxfp4, tmp_path / "lora", target_modules=["q_proj"])
    key = "model.layers.0.mlp.experts.down_proj"
    scales = load_file(str(mxfp4 / "model.safetensors"))[key + "_scales"]
    nan = scales.clone()
    nan[1, 2, 0] = 255
    cases = {
        "no_scales": ({key + "_scales": None}, "has no E8M0 scales"),
        "wrong_shape": ({key + "_scales": scales[:, :-1].contiguous()}, "(MXFP4 scales) is U8"),
        "orphan": ({key + "_blocks": None}, "looks like MXFP4 scales but has no"),
        "nan": ({key + "_scales": nan}, "E8M0's NaN"),
    }
    for name, (change, message) in cases.items():
        bad = _rewrite(mxfp4, tmp_path / name, change)
        r = run_cli("merge", str(bad), str(adapter), "-o", str(tmp_path / f"out-{name}"), "-q")
        assert r.exit_code == 2, (name, r.output)
        errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("streammerge: note:")]
        assert len(errors) == 1 and message in errors[0] and key in errors[0] and str(bad) in errors[0], (name, r.stderr)
        assert not (tmp_path / f"out-{name}").exists()
    config = json.loads((mxfp4 / "config.json").read_text())
    plain = _rewrite(mxfp4.with_name("bf16"), tmp_path / "no-blocks", {})
    (plain / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadCheckpoint, match="says mxfp4 but no tensor is MXFP4"):
        streammerge.plan(plain, [adapter], tmp_path / "x")
    r = run_cli("merge", str(mxfp4), str(adapter), "-o", str(tmp_path / "fp8"), "--mode", "merged_fp8")
    assert r.exit_code == 2 and "FP8 base" in r.output


# ---------------------------------------------------------------------------------------------
# --mode merged_mxfp4: the merged experts re-quantized into the base's own *_blocks + *_scales

_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _f32_bits(v: float) -> int:
    return int(struct.unpack("<I", struct.pack("<f", v))[0])


def _reference_group(values: list[float]) -> tuple[list[int], int]:
    """The rule of triton_kernels' ``downcast_to_mxfp_torch`` (ROUND_UP), restated one group at a time in plain
    Python on float32 bit patterns: the E8M0 byte is the biased exponent of float32(amax / 6) rounded up to a power of
    two, each value times 2^(127 - s) goes to the nearest e2m1 magnitude (ties away from zero, 6 at most), sign kept."""
    f32 = [struct.unpack("<f", struct.pack("<f", v))[0] for v in values]
    amax = max(abs(v) for v in f32)
    bits = _f32_bits(struct.unpack("<f", struct.pack("<f", amax / 6.0))[0])
    s = (bits >> 23) + (1 if bits & 0x7FFFFF else 0)
    codes = []
    for v in f32:
        q = abs(v) * 2.0 ** (127 - s) if s else 0.0
        code = sum(q >= m for m in _MIDPOINTS)
        codes.append(code | (8 if math.copysign(1.0, v) < 0 else 0))
    return codes, s


def test_mxfp4_quantizer_follows_the_triton_rule() -> None:
    """Ties, zeros (and -0.0), all-zero groups, tiny and huge magnitudes, exact powers of two as amax."""
    g = torch.Generator().manual_seed(5)
    k, n, experts = 64, 7, 3
    x = torch.randn(experts, k, n, generator=g) * torch.exp2(torch.randint(-60, 60, (experts, 1, n), generator=g).float())
    x[0, :32, 0] = 0.0  # an all-zero group
    x[0, 32:64, 0] = torch.tensor([0.25, -0.75, 1.25, -1.75, 2.5, -3.5, 5.0, 6.0, -0.0, 0.0] * 2 + [0.1] * 11 + [-6.0])  # ties, amax 6
    x[1, :32, 1] = torch.tensor([3.0] * 31 + [12.0])  # amax / 6 an exact power of two: no rounding up
    x[1, 32:, 1] = torch.tensor([1e-40] * 16 + [-3e-39] * 16)  # float32 subnormals
    x[2, :32, 2] = torch.tensor([7.0] + [3.5] * 31)  # 7/6 rounds up to 2: 3.5 -> 1.75 -> 2.0 (tie away)
    blocks, exponents = quant_mxfp4(x.reshape(experts * k, n), k)
    assert blocks.shape == (experts, n, k // 32, 16) and exponents.shape == (experts, n, k // 32)
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).reshape(experts, n, k)
    for e in range(experts):
        for col in range(n):
            for grp in range(k // 32):
                want, s = _reference_group(x[e, grp * 32 : (grp + 1) * 32, col].tolist())
                assert int(exponents[e, col, grp]) == s, (e, col, grp)
                assert codes[e, col, grp * 32 : (grp + 1) * 32].tolist() == want, (e, col, grp)
    assert int(exponents[0, 0, 0]) == 0 and int(exponents[0, 0, 1]) == 127 and int(exponents[1, 1, 0]) == 128
    # read back by transformers' own decoder, the codes give the rounded values
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    back = convert_moe_packed_tensors(blocks, exponents, dtype=torch.float32)
    assert back[0, 32:40, 0].tolist() == [0.5, -1.0, 1.5, -2.0, 3.0, -4.0, 6.0, 6.0]
    assert back[2, :2, 2].tolist() == [8.0, 4.0]


def test_mxfp4_requantizing_dequantized_experts_keeps_their_values(mxfp4: Path) -> None:
    """With no delta, re-quantizing loses nothing: every dequantized MXFP4 group is on the grid of its own (or half) scale."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    stored = load_file(str(mxfp4 / "model.safetensors"))
    for name in [n.removesuffix("_blocks") for n in stored if n.endswith("_blocks")]:
        values = convert_moe_packed_tensors(stored[name + "_blocks"], stored[name + "_scales"], dtype=torch.float32)
        blocks, scales = quant_mxfp4(values.reshape(-1, values.shape[-1]), values.shape[1])
        assert torch.equal(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32), values), name


def _half_steps(deq: torch.Tensor, ref: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """|deq - ref| in half e2m1 steps of ``ref``'s magnitude (0.25, 0.5 or 1 times its group's scale below 2, 4, 6)."""
    scale = torch.exp2(scales.double() - 127).transpose(1, 2).repeat_interleave(32, dim=1)  # (E, K, N)
    mag = (ref / scale).abs()
    half = torch.where(mag < 2, 0.25, torch.where(mag < 4, 0.5, 1.0)) * scale
    return (deq.double() - ref).abs() / half


def test_merged_mxfp4_keeps_the_base_format_and_loads(mxfp4: Path, tmp_path: Path) -> None:
    """merged_mxfp4: the base's keys, dtypes, shapes and quantization_config; merged experts as the rule quantizes the
    float64 merge (within half an e2m1 step of it), untouched ones bit for bit, the rest as merged_16bit writes it;
    transformers reads the output (Mxfp4Config(dequantize=True), CPU) as the dequantized values of our codes."""
    from peft import PeftModel
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    adapter = _adapter(mxfp4, tmp_path / "lora", target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"])
    p = streammerge.plan(mxfp4, [adapter], tmp_path / "m4", mode="merged_mxfp4", tile_size="64KiB")
    requant = [u for u in p.units if u.requant is not None]
    assert requant and all(u.name.endswith("down_proj_blocks") and u.tile_rows < u.rows for u in requant)
    assert any("re-quantized to MXFP4" in n for n in p.notes) and any("copied with their scales, bit for bit" in n for n in p.notes)
    p.save(tmp_path / "p.json")
    assert streammerge.Plan.load(tmp_path / "p.json") == p
    streammerge.run(p)
    base, ours = load_file(str(mxfp4 / "model.safetensors")), load_folder(tmp_path / "m4")
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert read_json(tmp_path / "m4" / "config.json")["quantization_config"] == read_json(mxfp4 / "config.json")["quantization_config"]
    sizes = [sum(f.stat().st_size for f in d.glob("*.safetensors")) for d in (mxfp4, tmp_path / "m4")]
    assert abs(sizes[0] - sizes[1]) < 4096, sizes
    m16 = load_folder(_run(mxfp4, adapter, tmp_path / "m16"))
    for name, t in ours.items():  # gate_up untouched: bit for bit; attention, router, norms: as merged_16bit
        if "gate_up_proj" in name:
            assert torch.equal(t, base[name]), name
        elif "down_proj" not in name:
            assert torch.equal(t, m16[name]), name
    ref_model = PeftModel.from_pretrained(load_dequantized(mxfp4, torch.float64), adapter).merge_and_unload()
    refs = {k: v for k, v in ref_model.state_dict().items() if k.endswith("experts.down_proj")}
    loaded = load_dequantized(tmp_path / "m4", torch.float32).state_dict()  # type: ignore[attr-defined]
    err2 = ref2 = err16 = worst = 0.0
    same = []
    for name, ref in refs.items():
        blocks, scales = ours[name + "_blocks"], ours[name + "_scales"]
        want_blocks, want_scales = quant_mxfp4(ref.float().reshape(-1, ref.shape[-1]), ref.shape[1])
        assert torch.equal(scales, want_scales), name
        same.append(float((blocks == want_blocks).double().mean()))
        assert same[-1] >= 0.999, name
        deq = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        assert torch.equal(loaded[name], deq), name  # transformers reads exactly our codes
        worst = max(worst, float(_half_steps(deq, ref, scales).max()))
        assert not torch.equal(blocks, base[name + "_blocks"]), name  # the merge moved codes
        err2 += float(((deq.double() - ref) ** 2).sum())
        err16 += float(((m16[name].double() - ref) ** 2).sum())
        ref2 += float((ref**2).sum())
    rms, rms16 = math.sqrt(err2 / ref2), math.sqrt(err16 / ref2)
    print(f"merged_mxfp4: worst {worst:.3f} half steps, RMS error {rms:.4%} of RMS (merged_16bit: {rms16:.4%}), codes as the rule {same}")
    assert worst <= 1.0 + 1e-5
    assert rms < 0.15 and rms16 < 0.005
    assert run_cli("verify", str(tmp_path / "m4"), "--recompute").exit_code == 0


def _run(base: Path, adapter: Path, out: Path, **kwargs: object) -> Path:
    streammerge.run(streammerge.plan(base, [adapter], out, **kwargs))  # type: ignore[arg-type]
    return out


def test_merged_mxfp4_all_experts_with_e8m0_scales(mxfp4: Path, tmp_path: Path) -> None:
    """F8_E8M0 scales stay F8_E8M0; both fused expert weights re-quantized, through the CLI."""
    e8m0 = make_gpt_oss_mxfp4(tmp_path / "e8m0", mxfp4.with_name("bf16"), scale_dtype="F8_E8M0")
    adapter = _adapter(e8m0, tmp_path / "lora", target_modules="all-linear", target_parameters=EXPERTS)
    r = run_cli("merge", str(e8m0), str(adapter), "-o", str(tmp_path / "out"), "--mode", "merged_mxfp4", "-q")
    assert r.exit_code == 0, r.output
    ours, base = load_folder(tmp_path / "out"), load_file(str(e8m0 / "model.safetensors"))
    assert {k: (v.dtype, v.shape) for k, v in ours.items()} == {k: (v.dtype, v.shape) for k, v in base.items()}
    assert ours["model.layers.0.mlp.experts.gate_up_proj_scales"].dtype == torch.float8_e8m0fnu
    for name in [k for k in ours if k.endswith("_blocks")]:
        assert not torch.equal(ours[name], base[name]), name


def test_merged_mxfp4_refuses_other_bases(mxfp4: Path, tmp_path: Path) -> None:
    bf16 = mxfp4.with_name("bf16")
    adapter = _adapter(mxfp4, tmp_path / "lora", target_modules=["q_proj"])
    r = run_cli("merge", str(bf16), str(adapter), "-o", str(tmp_path / "out"), "--mode", "merged_mxfp4")
    assert r.exit_code == 2, r.output
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("streammerge: note:")]
    assert len(errors) == 1 and "merged_mxfp4" in errors[0] and "no MXFP4 weights" in errors[0], r.stderr
    assert not (tmp_path / "out").exists()
    # a NaN in the adapter poisons its experts' merged values: no E8M0 scale exists for them
    nan = _adapter(mxfp4, tmp_path / "lora-nan", target_modules=[], target_parameters=["mlp.experts.down_proj"])
    tensors = load_file(str(nan / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(nan / "adapter_model.safetensors"), metadata={"format": "pt"})
    r = run_cli("merge", str(mxfp4), str(nan), "-o", str(tmp_path / "out-nan"), "--mode", "merged_mxfp4", "-q")
    errors = [line for line in r.stderr.strip().splitlines() if not line.startswith("streammerge: note:")]
    assert r.exit_code == 2 and len(errors) == 1 and "down_proj_blocks" in errors[0] and "MXFP4 has no scale" in errors[0], r.stderr
