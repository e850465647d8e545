"""The prefetch thread: maps tiles in ahead of the merge, in order, and never leaves the merge waiting forever."""

from __future__ import annotations

import threading

import pytest

from streammerge.execute import Prefetcher, SourceFiles


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
