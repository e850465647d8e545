"""Every LoRA flavour PEFT users train, each against PEFT's own merge (and the float64 math)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import streammerge
from tests.conftest import assert_merged_exact, load_folder, make_llama, make_lora, read_json


def merge(base: Path, adapters: list[Path], out: Path, **kwargs: Any) -> dict[str, torch.Tensor]:
    streammerge.run(streammerge.plan(base, [str(a) for a in adapters], out=out, **kwargs))
    return load_folder(out)


def adapter_tensors(adapter: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k.removeprefix("base_model.model."): v for k, v in load_file(adapter / "adapter_model.safetensors").items()}


def peft_merged(
    base: Path, adapters: list[Path], out: Path, *, weights: list[float] | None = None, combination: str = "cat", resize: int | None = None
) -> dict[str, torch.Tensor]:
    """PEFT's merge of the same inputs (several adapters through add_weighted_adapter)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if resize is not None:
        model.resize_token_embeddings(resize)
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    if len(adapters) > 1:
        names = [f"a{i}" for i in range(len(adapters))]
        for name, adapter in zip(names[1:], adapters[1:], strict=True):
            peft_model.load_adapter(adapter, adapter_name=name)
        peft_model.add_weighted_adapter(names, weights or [1.0] * len(adapters), "combined", combination_type=combination)
        peft_model.set_adapter("combined")
    peft_model.merge_and_unload().save_pretrained(out)
    return load_folder(out)


def identical(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> float:
    assert sorted(ours) == sorted(theirs)
    for k, t in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (t.dtype, t.shape), k
    return sum(int((ours[k] == t).sum()) for k, t in theirs.items()) / sum(t.numel() for t in theirs.values())


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("flavours") / "base", attention_bias=True)


def test_dora(base: Path, tmp_path: Path) -> None:
    adapter = make_lora(base, tmp_path / "lora", use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = merge(base, [adapter], tmp_path / "ours")
    assert identical(ours, peft_merged(base, [adapter], tmp_path / "peft")) >= 0.999
    w, t = load_folder(base), adapter_tensors(adapter)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        v = w[module + ".weight"].double() + 2.0 * (t[module + ".lora_B.weight"].double() @ t[module + ".lora_A.weight"].double())
        m = t[module + ".lora_magnitude_vector"].double()
        assert_merged_exact(ours[module + ".weight"], (m / torch.linalg.vector_norm(v, dim=1))[:, None] * v, module)
    p = streammerge.plan(base, [str(adapter)], out=tmp_path / "x")
    assert "dora" in streammerge.formats.peft.open_adapter(adapter).flavours and any(u.magnitude for u in p.units)


def test_dora_with_tiny_tiles_is_identical(base: Path, tmp_path: Path) -> None:
    adapter = make_lora(base, tmp_path / "lora", use_dora=True, target_modules=["up_proj"])
    a = merge(base, [adapter], tmp_path / "a")
    b = merge(base, [adapter], tmp_path / "b", tile_size=2000)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_lora(base: Path, tmp_path: Path) -> None:
    adapter = make_lora(base, tmp_path / "lora", target_modules=["embed_tokens", "q_proj"])
    ours = merge(base, [adapter], tmp_path / "ours")
    theirs = peft_merged(base, [adapter], tmp_path / "peft")
    t = adapter_tensors(adapter)
    ref = (
        load_folder(base)["model.embed_tokens.weight"].double()
        + 2.0 * (t["model.embed_tokens.lora_embedding_B"].double() @ t["model.embed_tokens.lora_embedding_A"].double()).T
    )
    assert_merged_exact(ours["model.embed_tokens.weight"], ref, "embed_tokens")
    # PEFT rounds the embedding delta to bf16 before adding it (FORMATS.md): close, not identical
    assert identical(ours, theirs) >= 0.95
    assert torch.equal(ours["model.layers.0.self_attn.k_proj.weight"], theirs["model.layers.0.self_attn.k_proj.weight"])


def test_modules_to_save(base: Path, tmp_path: Path) -> None:
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj"], modules_to_save=["lm_head"])
    with torch.no_grad():  # make the saved lm_head differ from the base's
        from safetensors.torch import load_file, save_file

        tensors = load_file(adapter / "adapter_model.safetensors")
        tensors["base_model.model.lm_head.weight"] += 0.25
        save_file(tensors, adapter / "adapter_model.safetensors")
    ours = merge(base, [adapter], tmp_path / "ours")
    assert identical(ours, peft_merged(base, [adapter], tmp_path / "peft")) >= 0.999
    assert torch.equal(ours["lm_head.weight"], tensors["base_model.model.lm_head.weight"].to(torch.bfloat16))


def test_modules_to_save_with_resized_vocabulary(base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(136)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(tmp_path / "lora")
    ours = merge(base, [tmp_path / "lora"], tmp_path / "ours")
    assert ours["model.embed_tokens.weight"].shape == (136, 64) and ours["lm_head.weight"].shape == (136, 64)
    assert read_json(tmp_path / "ours" / "config.json")["vocab_size"] == 136
    assert identical(ours, peft_merged(base, [tmp_path / "lora"], tmp_path / "peft", resize=136)) >= 0.999
    AutoModelForCausalLM.from_pretrained(tmp_path / "ours")  # loads without resizing by hand


@pytest.mark.parametrize("side", ["lm_head", "embed_tokens"])
def test_tied_embeddings_are_untied_when_one_side_changes(tmp_path: Path, side: str) -> None:
    from transformers import AutoModelForCausalLM

    base = make_llama(tmp_path / "base", tie=True)
    assert "lm_head.weight" not in load_folder(base)
    adapter = make_lora(base, tmp_path / "lora", target_modules=[side, "q_proj"])  # PEFT merges it into the shared tensor
    ours = merge(base, [adapter], tmp_path / "ours")
    config = read_json(tmp_path / "ours" / "config.json")
    assert config["tie_word_embeddings"] is False
    embed = load_folder(base)["model.embed_tokens.weight"]
    t = adapter_tensors(adapter)
    if side == "lm_head":
        ref = embed.double() + 2.0 * (t["lm_head.lora_B.weight"].double() @ t["lm_head.lora_A.weight"].double())
        assert_merged_exact(ours["lm_head.weight"], ref, "lm_head")
        assert torch.equal(ours["model.embed_tokens.weight"], embed)
    else:
        ref = (
            embed.double() + 2.0 * (t["model.embed_tokens.lora_embedding_B"].double() @ t["model.embed_tokens.lora_embedding_A"].double()).T
        )
        assert_merged_exact(ours["model.embed_tokens.weight"], ref, "embed_tokens")
        assert torch.equal(ours["lm_head.weight"], embed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16)
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, ours["lm_head.weight"])


def test_tied_base_untouched_stays_tied(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", tie=True)
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj"])
    ours = merge(base, [adapter], tmp_path / "ours")
    assert "lm_head.weight" not in ours and read_json(tmp_path / "ours" / "config.json")["tie_word_embeddings"] is True


def test_lora_bias(base: Path, tmp_path: Path) -> None:
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj", "k_proj"], lora_bias=True)
    ours = merge(base, [adapter], tmp_path / "ours")
    assert identical(ours, peft_merged(base, [adapter], tmp_path / "peft")) >= 0.999
    t = adapter_tensors(adapter)
    ref = (
        load_folder(base)["model.layers.0.self_attn.q_proj.bias"].double() + 2.0 * t["model.layers.0.self_attn.q_proj.lora_B.bias"].double()
    )
    assert_merged_exact(ours["model.layers.0.self_attn.q_proj.bias"], ref, "q_proj.bias")


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_biases(base: Path, tmp_path: Path, bias: str) -> None:
    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj"], bias=bias)
    ours = merge(base, [adapter], tmp_path / "ours")
    assert identical(ours, peft_merged(base, [adapter], tmp_path / "peft")) >= 0.999


@pytest.mark.parametrize(("weights", "combination"), [([0.7, 0.3], "cat"), ([1.0, -0.5], "cat"), ([0.7, 0.3], "linear")])
def test_several_adapters(base: Path, tmp_path: Path, weights: list[float], combination: str) -> None:
    from tests.conftest import ulp

    first = make_lora(base, tmp_path / "a", r=8, lora_alpha=16, seed=1)
    rank = 8 if combination == "linear" else 4
    second = make_lora(base, tmp_path / "b", r=rank, lora_alpha=4, target_modules=["q_proj", "up_proj", "o_proj"], seed=2)
    ours = merge(base, [first, second], tmp_path / "ours", weights=weights, combination=combination)
    theirs = peft_merged(base, [first, second], tmp_path / "peft", weights=weights, combination=combination)
    w = load_folder(base)
    terms = [(adapter_tensors(first), weights[0] * 2.0), (adapter_tensors(second), weights[1] * 4 / rank)]
    for name in theirs:
        module = name.removesuffix(".weight")
        present = [
            (t[module + ".lora_A.weight"].double(), t[module + ".lora_B.weight"].double(), ws)
            for t, ws in terms
            if module + ".lora_A.weight" in t
        ]
        if not present:
            assert torch.equal(ours[name], theirs[name]), name
            continue
        if combination == "cat":  # exact: sum_i w_i s_i B_i A_i
            ref = w[name].double() + sum(ws * (b @ a) for a, b, ws in present)
            size = sum(abs(ws) * (b.abs() @ a.abs()) for a, b, ws in present)
        else:  # PEFT's linear: (sum sqrt|ws| B_i) @ (sum sign(ws) sqrt|ws| A_i), cross terms included
            a_sum = sum((1 if ws >= 0 else -1) * abs(ws) ** 0.5 * a for a, _, ws in present)
            b_sum = sum(abs(ws) ** 0.5 * b for _, b, ws in present)
            ref = w[name].double() + b_sum @ a_sum
            size = sum(abs(ws) ** 0.5 * b.abs() for _, b, ws in present) @ sum(abs(ws) ** 0.5 * a.abs() for a, _, ws in present)
        assert_merged_exact(ours[name], ref, name)
        # PEFT stores the combined adapter in the base's dtype (bf16): its factors carry a 2^-8 rounding
        gap = (ours[name].double() - theirs[name].double()).abs()
        assert bool((gap <= 2.0**-7 * size + ulp(theirs[name]) + ulp(ours[name])).all()), name


def test_linear_combination_needs_equal_ranks(base: Path, tmp_path: Path) -> None:
    first = make_lora(base, tmp_path / "a", r=8)
    second = make_lora(base, tmp_path / "b", r=4, lora_alpha=4)
    with pytest.raises(streammerge.AdapterMismatch, match="equal ranks"):
        streammerge.plan(base, [str(first), str(second)], out=tmp_path / "o", combination="linear")


def test_no_target_message_explains_the_adapter_config(tmp_path: Path) -> None:
    big = make_llama(tmp_path / "big", num_hidden_layers=3)
    adapter = make_lora(big, tmp_path / "lora", target_modules=["q_proj"], layers_to_transform=[2])
    small = make_llama(tmp_path / "small")
    with pytest.raises(streammerge.AdapterMismatch, match=r"layers\.2.*layers_to_transform=\[2\]"):
        streammerge.plan(small, [str(adapter)], out=tmp_path / "o")


def test_cli_weights_and_flavours_in_dry_run(base: Path, tmp_path: Path) -> None:
    from tests.conftest import run_cli

    first = make_lora(base, tmp_path / "a", use_dora=True, target_modules=["q_proj"])
    second = make_lora(base, tmp_path / "b", target_modules=["k_proj"], modules_to_save=["lm_head"])
    r = run_cli("plan", str(base), str(first), str(second), "-o", str(tmp_path / "o"), "--weights", "0.7,0.3")
    assert r.exit_code == 0, r.stderr
    lines = [line for line in r.output.splitlines() if line.startswith("adapter")]
    assert "dora" in lines[0] and "weight 0.7" in lines[0] and "modules_to_save" in lines[1] and "weight 0.3" in lines[1]
    r = run_cli("merge", str(base), str(first), str(second), "-o", str(tmp_path / "o"), "--weights", "0.7")
    assert r.exit_code == 2 and "one finite weight per adapter" in r.stderr
    r = run_cli("merge", str(base), str(first), str(second), "-o", str(tmp_path / "o"), "--weights", "a,b")
    assert r.exit_code == 2 and "--weights" in r.stderr


def test_vocabulary_resized_on_one_side_only_is_refused(base: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(136)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["embed_tokens"])).save_pretrained(
        tmp_path / "lora"
    )
    path = tmp_path / "lora" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "lm_head" not in k}, path)  # as a tool that saves one side would
    with pytest.raises(streammerge.AdapterMismatch, match=r"resize the vocabulary to 136 but leave lm_head.weight at 128 rows"):
        streammerge.plan(base, [str(tmp_path / "lora")], out=tmp_path / "o")


def test_empty_lora_factors_are_refused(base: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    adapter = make_lora(base, tmp_path / "lora", target_modules=["q_proj"])
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    save_file({k: (v[:, :0].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}, path)
    with pytest.raises(streammerge.BadAdapter, match="empty"):
        streammerge.plan(base, [str(adapter)], out=tmp_path / "o")


def _tokens_adapter(base: Path, path: Path, seed: int = 5, **lora: Any) -> Path:
    """PEFT's trainable tokens (and LoRA) with random deltas: PEFT starts them at the base's rows."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import random_lora

    peft_model = random_lora(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), seed, **lora)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.copy_(torch.randn_like(p))
    peft_model.save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("tie", "indices"),
    [(False, [3, 5, 120]), (True, [0, 7, 127]), (False, {"embed_tokens": [2, 64]})],
    ids=["untied", "tied", "dict-form"],
)
def test_trainable_tokens(tmp_path: Path, tie: bool, indices: Any) -> None:
    base = make_llama(tmp_path / "base", tie=tie)
    adapter = _tokens_adapter(base, tmp_path / "lora", target_modules=["q_proj", "v_proj"], trainable_token_indices=indices)
    plan = streammerge.plan(base, [str(adapter)], out=tmp_path / "ours", tile_size=4096)  # tiles cut across the token rows
    assert "trainable tokens" in plan.flavours[0]
    plan.save(tmp_path / "plan.json")
    assert streammerge.Plan.load(tmp_path / "plan.json") == plan and any(u.token_rows for u in plan.units)
    ours = merge(base, [adapter], tmp_path / "ours", tile_size=4096)
    theirs = peft_merged(base, [adapter], tmp_path / "theirs")
    assert identical(ours, theirs) == 1.0
    before = load_folder(base)["model.embed_tokens.weight"]
    rows = indices if isinstance(indices, list) else indices["embed_tokens"]
    changed = (ours["model.embed_tokens.weight"] != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(rows)
    assert read_json(tmp_path / "ours" / "config.json")["tie_word_embeddings"] is tie  # tokens alone keep the tie


def test_trainable_tokens_on_tied_embeddings_with_lm_head_lora_is_refused(tmp_path: Path) -> None:
    """PEFT cannot even save that merge (shared tensors); streammerge refuses it in one line."""
    from tests.conftest import run_cli
    from tests.test_cli import assert_one_line_error

    base = make_llama(tmp_path / "base", tie=True)
    adapter = _tokens_adapter(base, tmp_path / "lora", target_modules=["lm_head", "q_proj"], trainable_token_indices=[4, 9])
    assert_one_line_error(run_cli("merge", str(base), str(adapter), "-o", str(tmp_path / "o")), "trainable tokens on tied embeddings")


def test_trainable_tokens_bad_inputs_are_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tests.conftest import run_cli
    from tests.test_cli import assert_one_line_error

    base = make_llama(tmp_path / "base")
    good = _tokens_adapter(base, tmp_path / "good", target_modules=["q_proj"], trainable_token_indices=[1, 2])
    cases: list[tuple[dict[str, Any], dict[str, torch.Tensor] | None, str]] = [
        ({"trainable_token_indices": [1, 2, 3]}, None, "3 rows"),
        ({"trainable_token_indices": [1, 1]}, None, "lists a token twice"),
        ({"trainable_token_indices": [1, 500]}, None, "token ids up to 500"),
        ({"trainable_token_indices": None}, None, "gives no trainable_token_indices"),
        ({"trainable_token_indices": {"lm_head": [1, 2]}}, None, "names none"),
        ({}, {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": torch.zeros(2, 5)}, "does not fit"),
    ]
    for i, (edit, tensors, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(good, bad)
        config = read_json(bad / "adapter_config.json")
        (bad / "adapter_config.json").write_text(json.dumps({**config, **edit}))
        if tensors is not None:
            save_file({**load_file(bad / "adapter_model.safetensors"), **tensors}, bad / "adapter_model.safetensors")
        assert_one_line_error(run_cli("merge", str(base), str(bad), "-o", str(tmp_path / "o")), message)
        assert not (tmp_path / "o").exists()
    shutil.copytree(good, tmp_path / "again")
    r = run_cli("merge", str(base), str(good), str(tmp_path / "again"), "-o", str(tmp_path / "o"))
    assert_one_line_error(r, "also trained by another adapter")
    r = run_cli("merge", str(base), str(good), "-o", str(tmp_path / "o"), "--weights", "0.5")
    assert_one_line_error(r, "cannot be weighted")
