"""MXFP4 bases (gpt-oss experts as ``*_blocks`` + ``*_scales``): dequantized exactly, merged, written 16-bit.

The oracle is transformers' own MXFP4 reading (``Mxfp4Config(dequantize=True)``, on the CPU) followed by
PEFT's merge_and_unload in float64, rounded once; and ``convert_moe_packed_tensors`` for the bare values.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import streammerge
from streammerge.errors import BadCheckpoint
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
