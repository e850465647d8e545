"""The prefetch thread: maps tiles in ahead of the merge, in order, and never leaves the merge waiting forever."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from streammerge.inputs.mapped import Prefetcher, SourceFiles


class _Files(SourceFiles):
    def __init__(self, fail: BaseException | None = None) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int, str]] = []
        self.fail = fail

    def populate(self, path: str, offset: int, nbytes: int) -> None:
        self.calls.append((path, offset, nbytes, threading.current_thread().name))
        if self.fail is not None and threading.current_thread().name == "streammerge-prefetch":
            raise self.fail


RANGES = [("a", 0, 10), ("a", 10, 10), ("b", 0, 5)]


def test_tiles_are_mapped_on_the_thread_in_order() -> None:
    files = _Files()
    prefetch = Prefetcher(files, RANGES, ahead=1)
    for r in RANGES:
        prefetch.ready(*r)
    prefetch.close()
    prefetch.close()
    assert [c[:3] for c in files.calls] == RANGES
    assert {c[3] for c in files.calls} == {"streammerge-prefetch"}


def test_out_of_order_tile_is_a_bug_not_a_hang() -> None:
    prefetch = Prefetcher(_Files(), RANGES)
    with pytest.raises(AssertionError, match="prefetch order"):
        prefetch.ready("b", 0, 5)
    prefetch.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_thread_leaves_the_merge_to_map_tiles_itself() -> None:
    files = _Files(fail=RuntimeError("boom"))
    prefetch = Prefetcher(files, RANGES)
    for r in RANGES:
        prefetch.ready(*r)  # returns: the tile is mapped by the caller instead
    prefetch.close()
    assert [c[:3] for c in files.calls if c[3] != "streammerge-prefetch"] == RANGES


def test_without_libc_madvise_the_stdlib_call_does_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where libc cannot be loaded through ctypes, ``mmap.madvise`` (which holds the GIL) is used instead."""
    from streammerge.inputs import mapped

    data = bytes(range(256)) * 64 * 1024  # 16 MiB
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    monkeypatch.setattr(mapped, "_MADVISE", None)
    files = SourceFiles()
    try:
        files.populate(str(path), 4096 * 3 + 5, 8 * 2**20)
        assert files._populate_ok  # MADV_POPULATE_READ worked (Linux 5.14+)
        assert bytes(files.raw(str(path), 100, 1000).numpy()) == data[100:1100]
        files.release(str(path), 0, len(data))  # pages dropped, bytes still there
        assert bytes(files.raw(str(path), len(data) - 10, 10).numpy()) == data[-10:]
        assert not files._advise(str(path), 0, 4096, 12345)  # an advice the kernel refuses: False, not an error
    finally:
        files.close()


def test_merge_without_libc_madvise_is_byte_identical(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streammerge
    from streammerge.inputs import mapped

    first = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "ctypes")
    streammerge.run(first)
    monkeypatch.setattr(mapped, "_MADVISE", None)
    second = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "stdlib")
    streammerge.run(second)
    assert (tmp_path / "ctypes" / "model.safetensors").read_bytes() == (tmp_path / "stdlib" / "model.safetensors").read_bytes()
