"""Fixtures built by code, never downloaded: tiny transformers models and PEFT adapters.

transformers + peft are the oracle: ``peft_merge`` runs ``PeftModel.from_pretrained(...)
.merge_and_unload().save_pretrained(...)`` on the same inputs streammerge merges.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=UserWarning)

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def make_llama(
    path: Path, *, dtype: torch.dtype = torch.bfloat16, tie: bool = False, shard: str | None = None, seed: int = 0, **cfg: Any
) -> Path:
    """A tiny Llama saved with save_pretrained (sharded when ``shard`` is e.g. "100KB").

    Shapes: vocab 128, hidden 64, intermediate 176, 2 layers, 4 heads, 2 kv heads, each overridable
    through ``cfg`` with its ``LlamaConfig`` name (as is any other field). Norms are perturbed away from 1.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=cfg.pop("vocab_size", 128),
        hidden_size=cfg.pop("hidden_size", 64),
        intermediate_size=cfg.pop("intermediate_size", 176),
        num_hidden_layers=cfg.pop("num_hidden_layers", 2),
        num_attention_heads=cfg.pop("num_attention_heads", 4),
        num_key_value_heads=cfg.pop("num_key_value_heads", 2),
        max_position_embeddings=cfg.pop("max_position_embeddings", 64),
        tie_word_embeddings=tie,
        **cfg,
    )
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # norms away from 1 so a wrong copy would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    return path


def make_gpt2(path: Path, *, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny GPT-2: its Conv1D layers store weights as (in, out), so LoRA needs fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).to(dtype).save_pretrained(path)
    return path


def make_lora(base: Path, path: Path, *, adapter_dtype: torch.dtype = torch.float32, seed: int = 1, **lora: Any) -> Path:
    """A PEFT LoRA adapter for ``base`` with random (non-zero) A and B, saved with save_pretrained."""
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = random_lora(model, seed, **lora)
    peft_model.to(adapter_dtype)
    peft_model.save_pretrained(path)
    return path


def random_lora(model: Any, seed: int, **lora: Any) -> Any:
    """``get_peft_model`` with LoRA defaults (all Llama linears, r=8, alpha=16) and random non-zero factors."""
    from peft import LoraConfig, get_peft_model

    lora.setdefault("target_modules", LLAMA_LINEAR)
    lora.setdefault("r", 8)
    lora.setdefault("lora_alpha", 16)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return peft_model


def peft_merge(base: Path, adapters: list[Path], out: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The oracle: transformers + PEFT load, merge_and_unload, save_pretrained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model, adapters[0])
    peft_model.merge_and_unload().save_pretrained(out)
    return out


def load_folder(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read with the safetensors library (an independent reader)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def lora_factors(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (A, B) from an adapter folder, read with the safetensors library."""
    from safetensors.torch import load_file

    raw = load_file(adapter / "adapter_model.safetensors")
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in raw:
        if ".lora_A" in key:
            module = key.removeprefix("base_model.model.").split(".lora_A")[0]
            out[module] = (raw[key], raw[key.replace("lora_A", "lora_B")])
    return out


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of each element of ``x`` (in x's dtype), as float64."""
    mantissa_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[x.dtype]
    min_exp = {torch.bfloat16: -126, torch.float16: -14, torch.float32: -126}[x.dtype]
    _, exponent = torch.frexp(x.double().abs())
    exponent = (exponent - 1).clamp_min(min_exp)
    return torch.pow(2.0, (exponent - mantissa_bits).double())


def assert_merged_exact(got: torch.Tensor, ref64: torch.Tensor, name: str, min_identical: float = 0.9999) -> float:
    """``got`` within one ulp of ``ref64`` rounded once, and identical to it in most elements."""
    ref = ref64.to(got.dtype)
    err = (got.double() - ref.double()).abs()
    bad = err > ulp(ref)
    assert not bool(bad.any()), f"{name}: {int(bad.sum())} elements more than 1 ulp from float64 (max err {float(err.max())})"
    identical = float((got == ref).double().mean())
    assert identical >= min_identical, f"{name}: only {identical:.6%} identical to float64 rounded once"
    return identical


def reference_merge(
    base: dict[str, torch.Tensor], adapters: list[tuple[Path, float]], fan_in_fan_out: bool = False
) -> dict[str, torch.Tensor]:
    """float64 W + sum(scale * B @ A) for every adapted tensor (scale given per adapter)."""
    refs: dict[str, torch.Tensor] = {}
    for adapter, scale in adapters:
        for module, (a, b) in lora_factors(adapter).items():
            name = module + ".weight"
            delta = scale * (b.double() @ a.double())
            refs[name] = refs.get(name, base[name].double()) + (delta.T if fan_in_fan_out else delta)
    return refs


def peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS in bytes (ru_maxrss) of a command, run through a small launcher process.

    A child forked straight from this (large) pytest process would report the parent's RSS as its
    own peak, since Linux carries the pre-exec high-water mark over.
    """
    import subprocess
    import sys

    launcher = (
        "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))}
    return int(subprocess.run([sys.executable, "-c", launcher, *cmd], check=True, env=env, capture_output=True, text=True).stdout)


def run_cli(*args: str) -> Any:
    """Run the click CLI in-process; returns click's Result (exit_code, output, stderr)."""
    from click.testing import CliRunner

    from streammerge.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_lora(llama_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_lora(llama_base, tmp_path_factory.mktemp("lora") / "lora")


@pytest.fixture
def cli() -> Callable[..., Any]:
    return run_cli


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())
