"""The GPU path on a real GPU (skipped without CUDA; CI has none).

Every other test file merges with ``device="auto"``, so on a machine with a GPU they all run this
path against PEFT too. These add what only a GPU can show: the CUDA output against the CPU's,
tile by tile, for every base kind; the VRAM budget respected (the caching allocator's peak, not
only live tensors); the host RSS of a GPU run still under the plan's estimate.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import streammerge
from streammerge.errors import BudgetTooSmall
from tests.conftest import load_folder, make_llama, make_lora, peak_rss_of, ulp
from tests.quantized_fixtures import make_llama_4bit, make_llama_8bit, make_lora_4bit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _merge(base: Path, adapter: Path, out: Path, device: str, reads: str = "auto", **kw: Any) -> streammerge.Report:
    p = streammerge.plan(base, [str(adapter)], out=out, device=device, **kw)
    return streammerge.run(p, reads=reads)


def _assert_close_to_cpu(gpu: Path, cpu: Path) -> None:
    """Within one ulp of the CPU's result everywhere (float64 sums may be ordered differently), and
    identical in at least 99.99% of elements; untouched tensors identical."""
    g, c = load_folder(gpu), load_folder(cpu)
    assert sorted(g) == sorted(c)
    for name, want in c.items():
        got = g[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        if not want.is_floating_point():
            assert torch.equal(got, want), name
            continue
        err = (got.double() - want.double()).abs()
        assert not bool((err > ulp(want)).any()), f"{name}: more than one ulp from the CPU merge"
        assert float((got == want).double().mean()) >= 0.9999, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_merge_matches_the_cpu_merge(tmp_path: Path, dtype: torch.dtype) -> None:
    base = make_llama(tmp_path / "base", dtype=dtype)
    adapter = make_lora(base, tmp_path / "lora", adapter_dtype=torch.bfloat16 if dtype == torch.float32 else torch.float32)
    report = _merge(base, adapter, tmp_path / "gpu", "cuda", tile_size="4KiB")  # many tiles per tensor
    assert report.device.startswith("cuda")
    _merge(base, adapter, tmp_path / "cpu", "cpu", tile_size="4KiB")
    _assert_close_to_cpu(tmp_path / "gpu", tmp_path / "cpu")


@pytest.mark.parametrize("kind", ["nf4", "fp4-single", "int8"])
def test_cuda_dequantizes_like_the_cpu(tmp_path: Path, kind: str) -> None:
    if kind == "int8":
        base = make_llama_8bit(tmp_path / "base")
    else:
        base = make_llama_4bit(tmp_path / "base", quant_type=kind[:3], double_quant=kind == "nf4")  # type: ignore[arg-type]
    adapter = make_lora_4bit(base, tmp_path / "lora") if kind != "int8" else make_lora(base, tmp_path / "lora")
    # fresh fixtures are in the page cache, so auto would map them: read with O_DIRECT here
    report = _merge(base, adapter, tmp_path / "gpu", "cuda", reads="direct", tile_size="4KiB")
    assert report.reads == "direct"
    _merge(base, adapter, tmp_path / "cpu", "cpu", tile_size="4KiB")
    _assert_close_to_cpu(tmp_path / "gpu", tmp_path / "cpu")


def test_cuda_run_stays_within_the_vram_budget(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", hidden_size=512, intermediate_size=1536, vocab_size=4096)
    adapter = make_lora(base, tmp_path / "lora", r=16, lora_alpha=32)
    budget = 80 * 2**20
    p = streammerge.plan(base, [str(adapter)], out=tmp_path / "o", device="cuda", vram_budget=budget, tile_size="256KiB")
    assert p.estimate.peak_device_bytes <= budget
    assert max(u.rows // u.tile_rows for u in p.units if u.op == "merge") >= 2
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_reserved()
    report = streammerge.run(p, vram_budget=budget)
    reserved = torch.cuda.max_memory_reserved() - before
    allocated = torch.cuda.max_memory_allocated()
    print(f"vram: budget {budget}, estimate {p.estimate.peak_device_bytes}, peak allocated {allocated}, peak reserved {reserved}")
    assert allocated <= p.estimate.peak_device_bytes
    assert reserved <= budget
    assert (report.peak_device_bytes, report.device_budget_bytes) == (reserved, budget)
    _merge(base, adapter, tmp_path / "cpu", "cpu")
    _assert_close_to_cpu(tmp_path / "o", tmp_path / "cpu")


def test_cuda_refuses_a_plan_over_the_budget(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cuda")
    with pytest.raises(BudgetTooSmall, match="bytes of GPU memory, the budget is 1000"):
        streammerge.run(p, vram_budget=1000)
    assert not (tmp_path / "o").exists()


def test_cuda_run_peak_rss_is_under_the_estimate(tmp_path: Path) -> None:
    base = make_llama(tmp_path / "base", hidden_size=512, intermediate_size=1536, vocab_size=4096)
    adapter = make_lora(base, tmp_path / "lora")
    p = streammerge.plan(base, [str(adapter)], out=tmp_path / "o", device="cuda")
    peak = peak_rss_of(
        [sys.executable, "-m", "streammerge", "merge", str(base), str(adapter), "-o", str(tmp_path / "o"), "--device", "cuda", "-q"]
    )
    print(f"host: peak RSS {peak}, estimate {p.estimate.peak_host_bytes}")
    assert peak <= p.estimate.peak_host_bytes


def test_running_out_of_the_budget_mid_run_is_a_clear_error(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streammerge import execute

    def out_of_memory(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(execute, "merge_rows", out_of_memory)
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cuda")
    with pytest.raises(  # an OutputError when units finished before it: the partial output is kept for --resume
        streammerge.StreamMergeError,
        match=r"the GPU memory budget \(\d+ bytes\) ran out at model\..*, above the plan's estimate of \d+; plan with a smaller --tile-size",
    ):
        streammerge.run(p)
    assert not (tmp_path / "o").exists()
