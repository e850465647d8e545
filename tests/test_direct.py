"""Direct reads: base tiles read with O_DIRECT into a ring of reused buffers, past the page cache.

The ring must hand out exactly the bytes asked for (whatever their alignment), never read further
ahead than it has room for, and leave a tile it cannot read directly to the mmap path. A merge
must write the same bytes whichever way it reads, and ``--read`` must say clearly when it cannot
do what was asked.
"""

from __future__ import annotations

import errno
import filecmp
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import streammerge
from streammerge import execute
from streammerge.errors import StreamMergeError
from streammerge.geometry import ALIGN, tile_ranges
from streammerge.inputs import direct, mapped
from streammerge.inputs.direct import DirectTiles, direct_problem, use_direct
from streammerge.osio import NO_DIRECT_ENV
from tests.conftest import make_llama, make_lora, run_cli
from tests.quantized_fixtures import make_llama_4bit, make_llama_8bit, make_lora_4bit

pytestmark = pytest.mark.skipif(direct_problem(__file__) is not None, reason="this filesystem refuses O_DIRECT")


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(5 * ALIGN + 123)  # ends off a block boundary
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def _read_all(tiles: DirectTiles, ranges: list[tuple[str, int, int]]) -> list[bytes | None]:
    got: list[bytes | None] = []
    for r in ranges:
        if tiles.ready(*r):
            found = tiles.view(*r)
            assert found is not None
            buffer, at = found
            got.append(bytes(buffer[at : at + r[2]]))
        else:
            got.append(None)
        tiles.release(*r)
    return got


def test_tiles_hold_exactly_their_bytes_at_any_alignment(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    p = str(path)
    ranges = [
        (p, 0, ALIGN),
        (p, ALIGN + 7, 3 * ALIGN - 20),
        (p, 4 * ALIGN - 13, 1),
        (p, 4 * ALIGN + 5, ALIGN + 118),
    ]  # the last runs to EOF
    tiles = DirectTiles(ranges, ahead=1)
    tiles.start()
    assert _read_all(tiles, ranges) == [data[o : o + n] for _, o, n in ranges]
    tiles.close()
    tiles.close()  # idempotent


def test_views_of_rows_inside_the_tile_and_nothing_outside(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    p = str(path)
    tile = (p, 100, 2 * ALIGN)
    tiles = DirectTiles([tile])
    tiles.start()
    assert tiles.view(*tile) is None  # not handed out yet
    assert tiles.ready(*tile)
    found = tiles.view(p, 100 + ALIGN, 50)  # the second half's rows, as the helper thread asks
    assert found is not None
    assert bytes(found[0][found[1] : found[1] + 50]) == data[100 + ALIGN : 150 + ALIGN]
    assert tiles.view(p, 99, 10) is None  # starts before the tile
    assert tiles.view(p, 100 + 2 * ALIGN - 5, 10) is None  # runs past it
    assert tiles.view(p + "x", 100, 10) is None  # another file
    tiles.release(*tile)
    assert tiles.view(*tile) is None  # released
    tiles.close()


def test_the_thread_never_reads_further_ahead_than_the_ring(data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = data_file
    ranges = [(str(path), i * ALIGN, ALIGN) for i in range(5)]
    released = 0
    seen: list[tuple[int, int]] = []
    real = DirectTiles._read

    def spy(self: DirectTiles, index: int) -> int | None:
        seen.append((index, released))
        return real(self, index)

    monkeypatch.setattr(DirectTiles, "_read", spy)
    tiles = DirectTiles(ranges, ahead=2)
    tiles.start()
    for r in ranges:
        assert tiles.ready(*r)
        tiles.release(*r)
        released += 1
    tiles.close()
    assert [i for i, _ in seen] == list(range(5))
    assert all(index < done + 3 for index, done in seen)  # ahead=2: three buffers, never a fourth tile in flight


def test_out_of_order_tile_is_a_bug_not_a_hang(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    tiles = DirectTiles([(str(path), 0, 10), (str(path), 10, 10)])
    tiles.start()
    with pytest.raises(AssertionError, match="direct read order"):
        tiles.ready(str(path), 10, 10)
    tiles.close()


def test_a_file_that_refuses_o_direct_is_left_to_the_mapping(data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = data_file

    def refuse(p: str) -> int:
        raise OSError(errno.EINVAL, "Invalid argument", p)

    monkeypatch.setattr(direct, "open_direct", refuse)
    tiles = DirectTiles([(str(path), 0, 100)])
    tiles.start()
    assert _read_all(tiles, [(str(path), 0, 100)]) == [None]
    tiles.close()
    # the executor's adapter then maps the tile in and serves it from the mapping
    files = mapped.SourceFiles()
    tiles = DirectTiles([(str(path), 0, 100)])
    tiles.start()
    source = mapped.DirectInput(files, tiles)
    source.ready(str(path), 0, 100)
    assert bytes(source.raw(str(path), 10, 20).numpy()) == data[10:30]
    source.release(str(path), 0, 100)
    source.close()
    files.close()


def test_a_read_error_is_left_to_the_mapping(data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = data_file

    def fail(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", fail)
    tiles = DirectTiles([(str(path), 0, 100), (str(path), ALIGN, 100)])
    tiles.start()
    assert _read_all(tiles, [(str(path), 0, 100), (str(path), ALIGN, 100)]) == [None, None]
    tiles.close()


def test_close_while_the_thread_waits_for_a_free_buffer(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    tiles = DirectTiles([(str(path), i * ALIGN, ALIGN) for i in range(5)], ahead=1)
    tiles.start()
    assert tiles.ready(str(path), 0, ALIGN)  # never released: the thread stops at the ring's edge
    closer = threading.Thread(target=tiles.close)
    closer.start()
    closer.join(timeout=10)
    assert not closer.is_alive()


def test_read_modes(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    monkeypatch.setattr(direct, "cached_fraction", lambda ranges: 0.0)  # a cold model: straight from the disk
    assert use_direct(plan, "auto") and use_direct(plan, "direct")
    assert not use_direct(plan, "mmap")
    monkeypatch.setattr(direct, "cached_fraction", lambda ranges: 0.9)  # mostly cached: from memory
    assert not use_direct(plan, "auto")
    assert use_direct(plan, "direct")
    with pytest.raises(StreamMergeError, match="read mode 'fast' must be one of auto, direct, mmap"):
        use_direct(plan, "fast")
    monkeypatch.setattr(direct, "direct_problem", lambda path: f"{path}: Invalid argument")
    assert not use_direct(plan, "auto")  # quietly the page cache
    with pytest.raises(StreamMergeError, match=r"--read direct: .*model\.safetensors: Invalid argument; use --read mmap"):
        use_direct(plan, "direct")


def test_cli_read_direct_where_the_filesystem_refuses_it(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(direct, "direct_problem", lambda path: f"{path}: Invalid argument")
    result = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--read", "direct")
    assert result.exit_code == 2
    assert "--read direct:" in result.output and "Invalid argument" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    ok = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--read", "auto", "--quiet")
    assert ok.exit_code == 0, ok.output


def _same(a: Path, b: Path) -> None:
    files = sorted(x.name for x in a.iterdir() if x.suffix == ".safetensors")
    assert files
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("flavour", ["bf16", "nf4", "int8"])
def test_direct_and_mapped_reads_write_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    if flavour == "nf4":
        base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
        adapter = make_lora_4bit(base, tmp_path / "lora")
    elif flavour == "int8":
        base = make_llama_8bit(tmp_path / "base")
        adapter = make_lora(base, tmp_path / "lora")
    else:
        base = make_llama(tmp_path / "base")
        adapter = make_lora(base, tmp_path / "lora")
    reads: list[int] = []
    real = DirectTiles._read

    def count(self: DirectTiles, index: int) -> int | None:
        reads.append(index)
        return real(self, index)

    monkeypatch.setattr(DirectTiles, "_read", count)
    monkeypatch.setattr(execute, "SPLIT_MIN_ELEMS", 1)  # the helper thread reads rows in the middle of each tile
    for mode in ("mmap", "direct"):  # small tiles: many of them, rows split between both threads
        plan = streammerge.plan(base, [str(adapter)], out=tmp_path / mode, device="cpu", tile_size="8KiB")
        streammerge.run(plan, reads=mode)
        if mode == "mmap":
            assert not reads
    assert len(reads) > 10  # the direct run did read its tiles directly
    _same(tmp_path / "mmap", tmp_path / "direct")


def test_a_resumed_direct_run_reads_only_the_tiles_left(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streammerge.errors import OutputError

    out = tmp_path / "out"
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=out, tile_size="8KiB")
    real = execute._run_unit
    calls = {"n": 0}

    def fail_late(*args: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == len(plan.units) - 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args, **kw)

    monkeypatch.setattr(execute, "_run_unit", fail_late)
    monkeypatch.setattr("streammerge.writequeue.COMMIT_SECONDS", 0.0)
    monkeypatch.setattr("streammerge.writequeue.COMMIT_BYTES", 1)
    with pytest.raises(OutputError):
        streammerge.run(plan, reads="direct")
    monkeypatch.setattr(execute, "_run_unit", real)
    seen: list[tuple[str, int, int]] = []
    real_init = DirectTiles.__init__

    def record(self: DirectTiles, ranges: Any, ahead: int = 1) -> None:
        seen.extend(ranges)
        real_init(self, ranges, ahead)

    monkeypatch.setattr(DirectTiles, "__init__", record)
    streammerge.run(plan, resume=True, reads="direct")
    fresh = tmp_path / "fresh"
    streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=fresh, tile_size="8KiB"), reads="mmap")
    _same(out, fresh)
    assert seen and len(seen) < len(tile_ranges(list(plan.units)))


def test_no_direct_env_turns_direct_reads_off(data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = data_file
    monkeypatch.setenv(NO_DIRECT_ENV, "1")
    assert direct_problem(str(path)) == "STREAMMERGE_NO_DIRECT is set"


def test_cached_fraction_sees_the_page_cache(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(os.urandom(64 * ALIGN))
    ranges = [(str(path), i * 4 * ALIGN, 4 * ALIGN) for i in range(16)]
    assert direct.cached_fraction(ranges) > 0.9  # just written: every page is in the cache
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert direct.cached_fraction(ranges) < 0.5
    assert direct.cached_fraction([]) == 0.0
    assert direct.cached_fraction([(str(tmp_path / "gone"), 0, 10)]) == 0.0


@pytest.mark.parametrize(("reads", "said"), [("direct", "base read with O_DIRECT"), ("mmap", "base mapped")])
def test_cli_says_how_the_base_was_read(llama_base: Path, llama_lora: Path, tmp_path: Path, reads: str, said: str) -> None:
    result = run_cli("merge", str(llama_base), str(llama_lora), "-o", str(tmp_path / "out"), "--read", reads)
    assert result.exit_code == 0, result.output
    assert said in result.output
