"""llama.cpp itself runs the GGUF files streammerge writes: its logits against transformers'.

The second oracle of issue 17 (the first, tests/test_gguf.py, compares every byte with llama.cpp's own
converter). llama.cpp comes from llama-cpp-python, which ``make test`` builds from its sdist (the
``llama-cpp`` step of the Makefile; ``make demo`` does not need it). Where it is not installed these
tests are skipped and say why.

The reference is transformers in float32 on the PEFT-merged model (merged in the model's dtype, as the
GGUF was). With f32 tensors and an F32 KV cache llama.cpp agrees to float32 rounding of a different
summation order; with f16/bf16/q8_0 tensors its CPU kernels also round the activations to that type,
hence the looser bounds.
Every case also checks that the adapter moves the logits by much more than the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import streammerge
from tests.arch_fixtures import make_adapter, peft_merged
from tests.test_gguf import PRE, TARGETS, make_family

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test builds it from its sdist)")

CASES = [
    ("llama", "f32"), ("llama", "bf16"), ("llama", "q8_0"), ("llama_hf", "f16"), ("llama31", "f16"), ("mistral", "f32"),
    ("qwen2", "f32"),
    ("qwen2", "q8_0"), ("qwen3", "bf16"), ("gemma", "f32"), ("gemma2", "f32"), ("gemma3_text", "f16"),
]  # fmt: skip
TOLERANCE = {"f32": 1e-5, "f16": 2e-2, "bf16": 4e-2, "q8_0": 4e-2}
"""max |llama.cpp - transformers| over max |transformers| of the logits (measured: f32 3e-7 to 5e-7, f16 4e-4,
bf16 4e-3 to 5e-3, q8_0 1.7e-2 to 2.4e-2)."""
GELU_F32 = 3e-3
"""Gemma's f32 bound: llama.cpp's CPU GELU reads a float16 table (measured 1.2e-5 Gemma, 1.3e-3 Gemma 2)."""
TOKENS = [5, 17, 42, 99, 150, 220, 7, 260, 33, 64]


def llama_cpp_logits(path: Path) -> torch.Tensor:
    # an F32 KV cache (type 0): llama.cpp's default F16 cache would round every key and value
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=32, n_batch=32, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(TOKENS)
    logits = torch.tensor(np.array(llm.scores[: len(TOKENS)]), dtype=torch.float32)
    llm.close()
    return logits


def transformers_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0]


def _as_released(configs: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """The test configs with Gemma 2/3's ``query_pre_attn_scalar`` equal to ``head_dim``, as in the released
    models llama.cpp reads it from (it does not read the key: 1/sqrt(head_dim), 27B special-cased); the tiny
    configs' default of 256 would make llama.cpp and transformers differ by 15-100% whatever the file says."""

    def patched() -> dict[str, Any]:
        found = configs()
        for family in ("gemma2", "gemma3_text"):
            found[family][0].query_pre_attn_scalar = found[family][0].head_dim
        return found

    return patched


@pytest.mark.parametrize(("family", "outtype"), CASES)
def test_llama_cpp_runs_the_gguf_like_transformers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, outtype: str) -> None:
    import tests.test_gguf

    monkeypatch.setattr(tests.test_gguf, "_configs", _as_released(tests.test_gguf._configs))
    base = make_family(family, tmp_path / "bases")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=TARGETS)
    out = tmp_path / "model.gguf"
    streammerge.run(streammerge.plan(base, [adapter], out, outtype=outtype, gguf_pre=PRE))
    got = llama_cpp_logits(out)
    want = transformers_logits(peft_merged(base, adapter, tmp_path / "merged", dtype=tests.test_gguf._configs()[family][2]))
    assert got.shape == want.shape
    scale = want.abs().max().item()
    error = (got - want).abs().max().item() / scale
    effect = (transformers_logits(base) - want).abs().max().item() / scale
    print(f"{family} {outtype}: relative error {error:.2e}, adapter effect {effect:.2e}")
    bound = GELU_F32 if outtype == "f32" and family.startswith("gemma") else TOLERANCE[outtype]
    assert error < bound, (error, effect)
    assert effect > 10 * bound, (error, effect)  # the adapter is visible through llama.cpp


def test_llama_cpp_loads_split_files_like_one(tmp_path: Path) -> None:
    """--max-shard-size: llama.cpp opens the first of the split files and finds the rest; same logits as unsplit."""
    base = make_family("llama", tmp_path / "bases")
    adapter = make_adapter(base, tmp_path / "lora", target_modules=TARGETS)
    (tmp_path / "one").mkdir()
    (tmp_path / "split").mkdir()
    streammerge.run(streammerge.plan(base, [adapter], tmp_path / "one" / "model.gguf", outtype="f32", gguf_pre=PRE))
    plan = streammerge.plan(base, [adapter], tmp_path / "split" / "model.gguf", outtype="f32", gguf_pre=PRE, max_shard_size="60K")
    streammerge.run(plan)
    files = sorted(p.name for p in (tmp_path / "split").iterdir())
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.gguf"
    assert torch.equal(llama_cpp_logits(tmp_path / "split" / files[0]), llama_cpp_logits(tmp_path / "one" / "model.gguf"))
