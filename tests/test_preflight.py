"""Preflight: fail before any byte is written, saying what is needed versus what is there."""

from __future__ import annotations

import os
import re
import sys
from collections import namedtuple
from pathlib import Path

import pytest

import streammerge
from streammerge.errors import BudgetTooSmall, OutputError
from tests.conftest import make_llama, make_lora, peak_rss_of, run_cli


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mid")
    base = make_llama(root / "base", hidden_size=512, intermediate_size=1536, num_hidden_layers=2, vocab_size=16000)
    return base, make_lora(base, root / "lora", r=16)


def test_max_ram_shrinks_tiles_to_fit(mid_model: tuple[Path, Path], tmp_path: Path) -> None:
    base, lora = mid_model
    free = streammerge.plan(base, [str(lora)], out=tmp_path / "o", tile_size="64MiB")
    budget = free.estimate.peak_host_bytes - 1
    fitted = streammerge.plan(base, [str(lora)], out=tmp_path / "o", tile_size="64MiB", max_ram=budget)
    assert fitted.estimate.peak_host_bytes <= budget < free.estimate.peak_host_bytes
    assert fitted.estimate.tile_bytes < free.estimate.tile_bytes


def test_max_ram_too_small_is_refused_clearly(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    r = run_cli("plan", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--max-ram", "100MiB")
    assert r.exit_code == 2 and "needs at least" in r.stderr and "of RAM" in r.stderr and "budget is 100.0 MiB" in r.stderr
    assert re.search(r"needs at least \d+\.\d MiB of RAM even with 64\.0 KiB tiles", r.stderr), r.stderr  # human units, not raw bytes


def test_max_ram_floor_is_honest_for_a_tiny_model(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """A ~1 MiB model merges in ~250 MiB of RSS (torch's import is most of it): 350 MiB must be enough."""
    from streammerge.probe import torch_is_gpu_build

    if torch_is_gpu_build():
        pytest.skip("a CUDA build of torch needs more at import")
    budget = 350 * 2**20
    assert streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", max_ram=budget).estimate.peak_host_bytes <= budget
    args = [str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--max-ram", "350MiB", "--device", "cpu", "-q"]
    assert peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args]) <= budget


def test_time_estimate_of_a_tiny_merge_is_not_seconds(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    """The estimate covers the run as its report measures it (after torch has started): well under a second here."""
    e = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o").estimate
    assert e.seconds < 1.0
    r = run_cli("plan", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"))
    assert r.exit_code == 0 and re.search(r"^time\s+about (under 0\.1 s|0\.\d s) .*after 1-3 s to start torch$", r.stdout, re.M), r.stdout


def test_format_seconds() -> None:
    from streammerge.sizes import format_seconds

    assert [format_seconds(s) for s in (0.04, 7.25, 42.4, 95, 4000)] == ["under 0.1 s", "7.2 s", "42 s", "1 min 35 s", "1 h 6 min"]


def test_max_ram_run_stays_under_the_budget(mid_model: tuple[Path, Path], tmp_path: Path) -> None:
    from streammerge.plan.estimate import TORCH_GPU_BUILD_BYTES
    from streammerge.probe import torch_is_gpu_build

    base, lora = mid_model
    # A CUDA build of torch costs more at import (the estimate knows); 480 MiB is for the CPU build.
    budget = 480 * 2**20 + (TORCH_GPU_BUILD_BYTES if torch_is_gpu_build() else 0)
    # On the CPU: a GPU run's CUDA runtime alone takes more (tests/test_cuda.py bounds that one).
    args = [str(base), str(lora), "-o", str(tmp_path / "out"), "--max-ram", str(budget), "--device", "cpu"]
    peak = peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args, "-q"])
    assert peak <= budget


def test_not_enough_disk_fails_before_writing(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    usage = namedtuple("usage", "total used free percent")
    monkeypatch.setattr(psutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000, 99.9))
    with pytest.raises(OutputError, match=r"needs .* of disk, only 1000 B is free"):
        streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o"))
    assert os.listdir(tmp_path) == []


def test_not_enough_ram_fails_before_writing(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class Memory:
        available = 0

    class Proc:
        def memory_info(self) -> object:
            return namedtuple("mem", "rss")(10 * 2**20)

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    monkeypatch.setattr(psutil, "Process", Proc)
    with pytest.raises(BudgetTooSmall, match=r"needs up to .* of RAM, 10.0 MiB is available; plan with --max-ram"):
        streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o"))
    assert os.listdir(tmp_path) == []


def test_unwritable_output_folder(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(OutputError, match="no permission to write"):
        streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o"))
