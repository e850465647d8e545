"""One test per architecture family: dense, MoE with fused-parameter LoRA, MoE with per-expert LoRA, VLMs, 4-bit MoE.

Each builds a tiny random transformers model, a LoRA adapter made by peft on it, and checks streammerge's
output against PEFT's merge_and_unload (done in float64, rounded once): the same tensor names (the
checkpoint's own, not the in-memory ones), bit-identical values, and logits of the output loaded by
transformers close to those of the unmerged PEFT model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge.formats.checkpoint import open_checkpoint
from streammerge.plan.naming import FAMILIES as TABLE
from streammerge.plan.naming import table_naming, transformers_naming
from tests.arch_fixtures import EXPERTS, FAMILIES, logits, make_adapter, make_model, peft_merged, write_per_expert_adapter
from tests.conftest import load_folder

#: What each family's adapter targets: all linears, plus the fused experts (and a router) through target_parameters.
LLAMA4_EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]
TARGETS: dict[str, list[str]] = {
    "mixtral": EXPERTS,
    "qwen3_moe": [*EXPERTS, "mlp.gate.weight"],
    "qwen2_moe": EXPERTS,
    "olmoe": EXPERTS,
    "deepseek_v3": EXPERTS,
    "gpt_oss": EXPERTS,  # stored fused on disk, (experts, in, out)
    "llama4_text": LLAMA4_EXPERTS,  # stored fused on disk
    "llama4": LLAMA4_EXPERTS,
    "ernie4_5_moe": [*EXPERTS, "mlp.gate.weight"],
    "qwen3_vl_moe": EXPERTS,  # stored fused on disk
    "granitemoe": ["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"],  # renamed on load
}
#: PEFT cannot run these unmerged (Llama 4's router is a Linear that returns a tuple), so no logits oracle.
NO_UNMERGED_FORWARD = {"llama4_text", "llama4"}


@pytest.fixture(scope="module")
def base_of(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_model(family, tmp_path_factory.mktemp(family) / "base")
        return built[family]

    return get


def _check_exact(ours: Path, theirs: Path, base: Path) -> list[str]:
    """Our output equals the oracle's, name for name and bit for bit; returns the names the adapter changed."""
    got, want, before = load_folder(ours), load_folder(theirs), load_folder(base)
    assert sorted(got) == sorted(want) == sorted(before)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    return [n for n in want if not torch.equal(before[n], want[n])]


def _check_logits(out: Path, base: Path, adapter: Path) -> None:
    """The merged model's logits are within bf16 rounding of the unmerged adapter's, and the adapter matters."""
    merged, peft, plain = logits(out), logits(base, adapter), logits(base)
    effect, error = (peft - plain).abs().max().item(), (merged - peft).abs().max().item()
    assert effect > 1e-3 and error < 0.1 * effect, (effect, error)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_merges_like_peft(family: str, base_of: Callable[[str], Path], tmp_path: Path) -> None:
    base = base_of(family)
    adapter = make_adapter(base, tmp_path / "lora", target_modules="all-linear", target_parameters=TARGETS.get(family))
    plan = streammerge.plan(base, [adapter], tmp_path / "out")
    streammerge.run(plan)
    changed = _check_exact(tmp_path / "out", peft_merged(base, adapter, tmp_path / "ref"), base)
    assert {t for c in plan.changes for t in c.tensors} == set(changed)
    if family in TARGETS:
        assert any(".experts." in n or "_linear." in n for n in changed)  # granitemoe: input_linear / output_linear
    if "mlp.gate.weight" in TARGETS.get(family, []):
        assert any(n.endswith("mlp.gate.weight") for n in changed)
    if family in NO_UNMERGED_FORWARD:
        logits(tmp_path / "out")  # loads with no missing or unexpected keys, and runs
    else:
        _check_logits(tmp_path / "out", base, adapter)


@pytest.mark.parametrize(
    ("family", "lora"),
    [
        ("mixtral", {"target_modules": "all-linear"}),
        ("qwen3_moe", {"target_modules": "all-linear"}),
        ("ernie4_5_moe", {"target_modules": "all-linear"}),
        ("mixtral", {"target_modules": r".*\.(q_proj|v_proj)", "target_parameters": ["gate_up_proj", "down_proj"]}),
    ],
    ids=["mixtral", "qwen3_moe", "ernie4_5_moe", "mixtral-regex-modules"],
)
def test_bare_target_parameters_merge_like_peft(
    family: str, lora: dict[str, object], base_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """PEFT 0.21 turns ``all-linear`` on an MoE model into bare target_parameters (``gate_up_proj``, ``down_proj``,
    ``gate.weight``) whose LoRA keys look like a layer's (``mlp.experts.lora_A.weight``, experts x r rows)."""
    base = base_of(family)
    adapter = make_adapter(base, tmp_path / "lora", **lora)
    targets = json.loads((adapter / "adapter_config.json").read_text()).get("target_parameters") or []
    assert "down_proj" in targets  # bare names, as PEFT writes them
    streammerge.run(streammerge.plan(base, [adapter], tmp_path / "out"))
    changed = _check_exact(tmp_path / "out", peft_merged(base, adapter, tmp_path / "ref"), base)
    assert any(".experts." in n and "shared" not in n for n in changed)


@pytest.mark.parametrize(
    ("family", "experts", "modules"),
    [("mixtral", ["w1", "w2", "w3"], ["q_proj"]), ("qwen3_moe", ["gate_proj", "up_proj", "down_proj"], ["o_proj"])],
)
def test_per_expert_adapter_merges_like_peft(
    family: str, experts: list[str], modules: list[str], base_of: Callable[[str], Path], tmp_path: Path
) -> None:
    """Adapters saved before experts were fused (one LoRA per expert module) still merge, onto the same tensors."""
    base = base_of(family)
    adapter = write_per_expert_adapter(base, tmp_path / "lora", experts, modules)
    plan = streammerge.plan(base, [adapter], tmp_path / "out")
    streammerge.run(plan)
    changed = _check_exact(tmp_path / "out", peft_merged(base, adapter, tmp_path / "ref"), base)  # PEFT fuses them on load
    assert sum(".experts." in n for n in changed) == 2 * 4 * len(experts)


def test_4bit_moe_base(base_of: Callable[[str], Path], tmp_path: Path) -> None:
    """A QLoRA on a bitsandbytes NF4 Mixtral (attention 4-bit, experts kept 16-bit by transformers) and fused-expert LoRA."""
    from transformers import BitsAndBytesConfig, MixtralForCausalLM

    from tests.quantized_fixtures import write_dequantized_checkpoint

    q = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16
    )
    MixtralForCausalLM.from_pretrained(base_of("mixtral"), quantization_config=q, device_map="cpu").save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    assert any(".absmax" in k for k in open_checkpoint(base).tensors)
    adapter = make_adapter(base, tmp_path / "lora", load={"device_map": "cpu"}, target_modules="all-linear", target_parameters=EXPERTS)
    streammerge.run(streammerge.plan(base, [adapter], tmp_path / "out"))
    plain = write_dequantized_checkpoint(base, tmp_path / "plain")  # bitsandbytes' dequantization, as a 16-bit checkpoint
    changed = _check_exact(tmp_path / "out", peft_merged(plain, adapter, tmp_path / "ref"), plain)
    assert any(".experts." in n for n in changed) and any("self_attn.q_proj" in n for n in changed)


@pytest.mark.parametrize("family", [f for f in FAMILIES if any(f in t.model_types for t in TABLE)])
def test_built_in_table_agrees_with_transformers(family: str, base_of: Callable[[str], Path]) -> None:
    """Planning without transformers (the built-in table) maps every checkpoint key as transformers does."""
    ckpt = open_checkpoint(base_of(family))
    table, theirs = table_naming(ckpt.tensors, ckpt.config), transformers_naming(ckpt.tensors, ckpt.config, ckpt.root)
    assert table is not None and not isinstance(theirs, str), theirs
    assert table.params == theirs.params
    assert table.transposed_experts == theirs.transposed_experts
    experts = {m for m in theirs.module_params if m.endswith("experts")}
    assert {m: table.module_params.get(m) for m in experts} == {m: theirs.module_params[m] for m in experts}


def test_plan_and_inspect_show_what_each_module_changes(base_of: Callable[[str], Path], tmp_path: Path) -> None:
    import json

    from tests.conftest import run_cli

    base = base_of("mixtral")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=["q_proj"], target_parameters=EXPERTS)
    folded = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "out"))
    assert folded.exit_code == 0, folded.output
    lines = [line.split(None, 1)[1] for line in folded.output.splitlines() if line.startswith("changes")]
    assert sorted(lines) == [
        "model.layers.*.mlp.experts.down_proj (x2, 8 tensors) -> model.layers.*.block_sparse_moe.experts.*.w2.weight",
        "model.layers.*.mlp.experts.gate_up_proj (x2, 16 tensors) -> "
        "model.layers.*.block_sparse_moe.experts.*.w1.weight, model.layers.*.block_sparse_moe.experts.*.w3.weight",
        "model.layers.*.self_attn.q_proj (x2, 2 tensors) -> model.layers.*.self_attn.q_proj.weight",
    ]
    full = run_cli("plan", str(base), str(adapter), "-o", str(tmp_path / "out"), "--changes")
    assert (
        "model.layers.1.mlp.experts.down_proj -> " + ", ".join(f"model.layers.1.block_sparse_moe.experts.{e}.w2.weight" for e in range(4))
        in full.output
    )
    info = json.loads(run_cli("inspect", str(adapter), "--base", str(base), "--json").output)
    assert sorted((r["module"], r["tensor_count"]) for r in info["changes"]) == [
        ("model.layers.*.mlp.experts.down_proj", 8), ("model.layers.*.mlp.experts.gate_up_proj", 16), ("model.layers.*.self_attn.q_proj", 2)
    ]  # fmt: skip
    assert len(info["change_list"]) == 6
    wrong = run_cli("inspect", str(base), "--base", str(base))
    assert wrong.exit_code == 2 and "--base goes with an adapter folder" in wrong.output


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "llava"])
def test_without_transformers_the_table_gives_the_same_output(
    family: str, base_of: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    resolve = importlib.import_module("streammerge.plan.resolve")  # streammerge.plan is also the function
    base = base_of(family)
    adapter = make_adapter(base, tmp_path / "lora", target_modules="all-linear", target_parameters=TARGETS.get(family))
    streammerge.run(streammerge.plan(base, [adapter], tmp_path / "with"))
    monkeypatch.setattr(resolve, "transformers_naming", lambda *a: "transformers is not usable here (test)")
    plan = streammerge.plan(base, [adapter], tmp_path / "without")
    assert any("built-in" in n for n in plan.notes), plan.notes
    streammerge.run(plan)
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "with" / f).read_bytes() == (tmp_path / "without" / f).read_bytes()


def test_fused_experts_stream_in_tiles_that_cut_across_experts(tmp_path: Path) -> None:
    """gpt-oss experts stored fused: a tile boundary inside an expert's band of rows changes nothing."""
    import transformers

    cfg = transformers.GptOssConfig(
        vocab_size=64, hidden_size=48, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        head_dim=8, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.GptOssForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    base = tmp_path / "base"
    adapter = make_adapter(base, tmp_path / "lora", r=3, lora_alpha=6, target_modules=[], target_parameters=EXPERTS)
    plan = streammerge.plan(base, [adapter], tmp_path / "out", tile_size="64KiB")
    fused = next(u for u in plan.units if u.name.endswith("experts.gate_up_proj"))
    assert fused.rows == 4 * 48 and fused.tile_rows < fused.rows and fused.tile_rows % 48 != 0
    streammerge.run(plan)
    _check_exact(tmp_path / "out", peft_merged(base, adapter, tmp_path / "ref"), base)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_merged_4bit_moe_leaves_routers_and_experts_16bit_and_loads(family: str, base_of: Callable[[str], Path], tmp_path: Path) -> None:
    """transformers quantizes only nn.Linear layers: routers (raw parameters in transformers 5) stay 16-bit."""
    from transformers import AutoModelForCausalLM

    base = base_of(family)
    adapter = make_adapter(base, tmp_path / "lora", target_modules="all-linear", target_parameters=TARGETS[family])
    streammerge.run(streammerge.plan(base, [adapter], tmp_path / "out", mode="merged_4bit"))
    names = open_checkpoint(tmp_path / "out").tensors
    assert any(n.endswith("q_proj.weight.absmax") for n in names)
    assert not any(".gate.weight." in n or (".experts." in n and n.endswith(".absmax")) for n in names)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu", output_loading_info=True)
    assert not any(info.values()), info


def test_experts_stored_transposed_merge_like_peft(base_of: Callable[[str], Path], tmp_path: Path) -> None:
    """Qwen3-VL-MoE checkpoints on the Hub store experts (experts, in, out); transformers transposes them on load
    (its ``Transpose(1, 2)`` conversion). The merge keeps the checkpoint's layout and equals PEFT's in memory."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import save_file

    from tests.arch_fixtures import _load

    base = tmp_path / "base"
    shutil.copytree(base_of("qwen3_vl_moe"), base)
    tensors = load_folder(base)
    experts = [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    for n in experts:
        tensors[n] = tensors[n].transpose(1, 2).contiguous()
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter = make_adapter(base, tmp_path / "lora", target_modules="all-linear", target_parameters=EXPERTS)
    plan = streammerge.plan(base, [adapter], tmp_path / "out")
    streammerge.run(plan)
    got = load_folder(tmp_path / "out")
    assert all(got[n].shape == tensors[n].shape for n in experts)  # the checkpoint's own layout
    assert set(experts) <= {t for c in plan.changes for t in c.tensors}
    ours = _load(tmp_path / "out", torch.bfloat16).state_dict()
    theirs = PeftModel.from_pretrained(_load(base, torch.float64), adapter).merge_and_unload().to(torch.bfloat16).state_dict()
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert torch.equal(ours[name], t), name


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_vl_moe"])
def test_peak_rss_with_transformers_naming_stays_under_the_estimate(family: str, base_of: Callable[[str], Path], tmp_path: Path) -> None:
    """Naming MoE/VLM keys imports transformers into the merging process; the plan's bound counts it."""
    import sys

    from tests.conftest import peak_rss_of, run_cli

    base = base_of(family)
    adapter = make_adapter(base, tmp_path / "lora", target_modules="all-linear", target_parameters=TARGETS[family])
    args = [str(base), str(adapter), "-o", str(tmp_path / "out")]
    planned = json.loads(run_cli("plan", *args, "--json").output)
    peak = peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args, "-q"])
    assert 100 * 2**20 < peak <= planned["estimate"]["peak_host_bytes"], (peak, planned["estimate"]["peak_host_bytes"])
