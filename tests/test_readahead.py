"""The readahead thread: WILLNEED requests in plan order, in pieces the kernel honours, inside the window."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import streammerge
from streammerge.inputs.readahead import Readahead


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, advice: calls.append((offset, n)))
    return calls


def _settle(calls: list[tuple[int, int]]) -> None:
    """Wait until the thread stops making requests (it blocks at the window's edge)."""
    seen = -1
    while seen != len(calls):
        seen = len(calls)
        time.sleep(0.05)


def test_requests_stay_inside_the_window_in_small_pieces(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    total = sum(u.read_bytes for u in plan.units)
    calls = _record(monkeypatch)
    chunk, window = 1000, 20_000
    ahead = Readahead(plan, window_bytes=window, start_bytes=2 * window, chunk_bytes=chunk)
    ahead.start()
    _settle(calls)
    first = sum(n for _, n in calls)
    assert 2 * window <= first < 2 * window + chunk  # the larger first window, no further
    assert all(0 < n <= chunk for _, n in calls)
    for consumed in range(window // 2, total + window // 2, window // 2):  # a merge moving along, unit by unit
        ahead.advance(min(consumed, total))
        _settle(calls)
        edge = max(2 * window, min(consumed, total) + window)  # the window never shrinks back
        assert min(total, edge) <= sum(n for _, n in calls) < edge + chunk
    ahead.close()
    ahead.close()  # idempotent
    assert sum(n for _, n in calls) == total  # every byte requested once, none skipped: the window kept ahead


def test_resumed_run_skips_what_is_already_merged(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    total = sum(u.read_bytes for u in plan.units)
    calls = _record(monkeypatch)
    ahead = Readahead(plan, window_bytes=10_000, chunk_bytes=4096)
    ahead.advance(total - 5000)  # as a resumed run does after skipping the journaled units
    ahead.start()
    _settle(calls)
    ahead.close()
    assert 0 < sum(n for _, n in calls) <= 5000 + 4096


def test_with_direct_reads_the_base_tiles_are_not_requested(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base tiles read with O_DIRECT bypass the page cache: requesting them would read them twice."""
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    calls = _record(monkeypatch)
    ahead = Readahead(plan, window_bytes=10**9, chunk_bytes=4096, skip_tiles=True)
    ahead.start()
    _settle(calls)
    ahead.close()
    tiles = sum(u.source.nbytes for u in plan.units if u.op != "copy")
    rest = sum(u.read_bytes for u in plan.units) - tiles
    assert tiles and rest
    assert sum(n for _, n in calls) == rest


def test_quantization_statistics_are_requested_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-bit unit's block scales and quant maps are read ahead like its weight, not faulted in by the merge."""
    from tests.quantized_fixtures import make_llama_4bit, make_lora_4bit

    base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
    plan = streammerge.plan(base, [str(make_lora_4bit(base, tmp_path / "lora"))], out=tmp_path / "out")
    stats = [s for u in plan.units if u.quant for s in (u.quant.absmax, u.quant.quant_map, u.quant.nested_absmax) if s is not None]
    assert stats
    calls = _record(monkeypatch)
    ahead = Readahead(plan, window_bytes=10**9, chunk_bytes=4096, skip_tiles=True)
    ahead.start()
    _settle(calls)
    ahead.close()
    requested = set(calls)
    assert all((s.offset, min(4096, s.nbytes)) in requested for s in stats)
