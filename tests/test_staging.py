"""The GPU staging path: ordering of deferred writes, and whole merges through it.

Without CUDA, :class:`~streammerge.staging.Staging` runs with plain buffers, so the executor's
staged path (the one GPU runs take) is checked here on the CPU: its output must equal the direct
path's byte for byte. ``tests/test_cuda.py`` runs it on a real GPU when there is one.
"""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import pytest
import torch

import streammerge
from streammerge import device, execute
from streammerge.staging import Staging
from tests.quantized_fixtures import make_llama_4bit, make_lora_4bit


class _Event:
    def __init__(self, log: list[str], name: str) -> None:
        self.done, self.log, self.name = False, log, name

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append(f"sync {self.name}")
        self.done = True


class _Recorder:
    """A sink that records what reaches it, in order."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def acquire(self) -> bytearray:
        self.log.append("acquire")
        return bytearray(16)

    def write(self, shard: int, offset: int, tensor: str, buffer: Any, nbytes: int, start: int = 0) -> None:
        self.log.append(f"write {tensor}@{offset}")

    def write_bytes(self, shard: int, offset: int, tensor: str, data: bytes) -> None:
        self.log.append(f"bytes {tensor}")

    def copy(self, shard: int, offset: int, tensor: str, src_fd: int, src_offset: int, nbytes: int) -> None:
        self.log.append(f"copy {tensor}")

    def commit(self, unit: Any, index: int) -> None:
        self.log.append(f"commit {index}")


def test_deferred_writes_reach_the_sink_in_order_and_only_after_their_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[str] = []
    sink = _Recorder(log)
    stage = Staging(sink, torch.device("cpu"), in_bytes=16, keep=2)
    events = iter([_Event(log, "t0"), _Event(log, "t1"), _Event(log, "t2")])
    monkeypatch.setattr(stage, "_event", lambda: next(events))
    host = torch.zeros(4, dtype=torch.uint8)

    buf = stage.acquire()
    stage.write_from_device(host, host, 0, 0, "w", buf, 0)  # t0 pending
    stage.copy(0, 100, "untouched", 0, 0, 4)  # queued behind t0, not before it
    stage.commit(None, 0)
    assert log == ["acquire"]
    buf = stage.acquire()  # one tile on its way: a second may join it (keep=2)
    stage.write_from_device(host, host, 0, 4, "w", buf, 0)  # t1 pending
    assert log == ["acquire", "acquire"]
    stage.acquire()  # a third buffer: the oldest tile must land first, then what queued behind it
    assert log == ["acquire", "acquire", "sync t0", "write w@0", "copy untouched", "commit 0", "acquire"]
    stage.flush()
    assert log[-2:] == ["sync t1", "write w@4"]
    stage.flush()  # nothing left: no-op
    assert log[-1] == "write w@4"


def test_finished_copies_pass_through_without_waiting() -> None:
    log: list[str] = []
    stage = Staging(_Recorder(log), torch.device("cpu"), in_bytes=16)
    host = torch.zeros(4, dtype=torch.uint8)
    stage.write_from_device(host, host, 0, 0, "w", stage.acquire(), 0)  # CPU staging: its event is done
    stage.commit(None, 3)
    assert log == ["acquire", "write w@0", "commit 3"]


def test_to_device_goes_through_the_slots_and_grows_when_needed() -> None:
    stage = Staging(_Recorder([]), torch.device("cpu"), in_bytes=4, slots=2)
    out = torch.empty(6, dtype=torch.uint8)
    raw = torch.arange(6, dtype=torch.uint8)
    assert stage.to_device(raw, out).tolist() == list(range(6))  # larger than a slot
    assert stage.to_device(raw[:3], out[:3]).tolist() == [0, 1, 2]


def _merge(base: Path, adapter: Path, out: Path, reads: str = "auto", **kw: Any) -> None:
    p = streammerge.plan(base, [str(adapter)], out=out, device="cpu", **kw)
    streammerge.run(p, reads=reads)


def _same_folders(a: Path, b: Path) -> None:
    files = sorted(x.name for x in a.iterdir() if x.suffix == ".safetensors")
    assert files and files == sorted(x.name for x in b.iterdir() if x.suffix == ".safetensors")
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize(("tile_size", "reads"), [("64MiB", "mmap"), ("2KiB", "mmap"), ("2KiB", "direct")])
def test_staged_run_writes_the_same_bytes_as_the_direct_path(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tile_size: str, reads: str
) -> None:
    """Staged (the GPU path, here on the CPU) against merged in place, with tiles mapped or read with O_DIRECT."""
    _merge(llama_base, llama_lora, tmp_path / "direct", tile_size=tile_size, max_shard_size="40KB")
    monkeypatch.setattr(execute, "_staged", lambda device: True)
    _merge(llama_base, llama_lora, tmp_path / "staged", reads=reads, tile_size=tile_size, max_shard_size="40KB")
    _same_folders(tmp_path / "direct", tmp_path / "staged")


def test_staged_run_from_a_4bit_base_and_back_to_4bit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_llama_4bit(tmp_path / "base4", quant_type="nf4", double_quant=True)
    adapter = make_lora_4bit(base, tmp_path / "lora")
    for mode in ("merged_16bit", "merged_4bit"):
        _merge(base, adapter, tmp_path / f"direct-{mode}", tile_size="4KiB", mode=mode)
    monkeypatch.setattr(execute, "_staged", lambda device: True)
    for mode in ("merged_16bit", "merged_4bit"):
        _merge(base, adapter, tmp_path / f"staged-{mode}", tile_size="4KiB", mode=mode)
        _same_folders(tmp_path / f"direct-{mode}", tmp_path / f"staged-{mode}")


def test_staged_compute_unit_matches_the_run(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cpu", tile_size="2KiB")
    index = next(i for i, u in enumerate(p.units) if u.op == "merge")
    direct = execute.compute_unit(p, index)
    monkeypatch.setattr(execute, "_staged", lambda device: True)
    assert execute.compute_unit(p, index) == direct


def test_auto_falls_back_to_the_cpu_with_a_note_when_cuda_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> tuple[int, int]:
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", broken)
    device, note = execute.resolve_device("auto")
    assert device.type == "cpu"
    assert (
        note
        == "no usable GPU (CUDA does not start: CUDA error: no kernel image is available for execution on the device): merged on the CPU"
    )
    with pytest.raises(streammerge.StreamMergeError, match=r"device 'cuda' was asked for but CUDA does not start: .*; use --device cpu"):
        execute.resolve_device("cuda")
    assert execute.resolve_device("cpu") == (torch.device("cpu"), None)


def test_auto_on_a_machine_without_a_gpu_says_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(device, "nvidia_device_node", lambda: False)
    assert execute.resolve_device("auto") == (torch.device("cpu"), None)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build of torch that finds no GPU: worth a word
    _, note = execute.resolve_device("auto")
    assert note is not None and note.startswith("no usable GPU (torch ") and note.endswith("sees no CUDA device): merged on the CPU")


def test_cli_device_cuda_without_a_gpu_is_a_one_line_error(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import run_cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"), "--device", "cuda", "-q")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "device 'cuda' was asked for but torch" in result.stderr
    assert not (tmp_path / "o").exists()


def test_vram_cap_checks_the_plan_holds_the_allocator_to_the_budget_and_restores_it(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls a GPU run makes on torch's allocator, with the allocator faked (runs on any machine)."""
    gib = 2**30
    calls: list[object] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 4 * gib)  # what the caller already held
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 5 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 0.5, raising=False)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f: calls.append(f))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: calls.append("reset"))
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cuda")

    with pytest.raises(streammerge.BudgetTooSmall, match=r"needs \d+ bytes of GPU memory, the budget is 1000 \(64424509440 free\)"):
        device.VramCap(p, 1000)
    cap = device.VramCap(p, None)
    assert cap.budget == int(60 * gib * device.VRAM_FRACTION) and calls == []  # checking takes nothing
    cap.lift()  # before apply: nothing to restore
    assert calls == []
    cap.apply()
    assert calls == [(4 * gib + cap.budget) / (80 * gib), "reset"]
    assert cap.peak() == 1 * gib  # beyond what the caller held
    cap.lift()
    cap.lift()
    assert calls[2:] == [0.5]


def test_cli_reports_the_peak_vram_against_the_budget(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.conftest import run_cli

    def gpu_run(plan: Any, **kw: Any) -> execute.Report:  # what a GPU run reports, without a GPU
        return execute.Report(
            plan.out, "cuda", 1.0, 2**20, {"merge": 1}, 2**28, (), peak_device_bytes=98 * 2**20, device_budget_bytes=2**31, reads="direct"
        )

    monkeypatch.setattr(streammerge, "run", gpu_run)
    result = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "o"))
    assert result.exit_code == 0
    assert "on cuda (peak VRAM 98.0 MiB of a 2.0 GiB budget), base read with O_DIRECT;" in result.stderr
