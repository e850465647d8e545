"""The writer on its own: state machine, offsets, atomic finish, abort, full disk."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import write, writequeue
from streammerge.errors import OutputError
from streammerge.geometry import ALIGN, aligned_start
from streammerge.journal import partial_path
from streammerge.write import Writer, WriterState
from tests.conftest import load_folder


def test_writer_puts_bytes_at_planned_offsets_and_finishes_atomically(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", max_shard_size="30KB")
    w = Writer(p)
    with pytest.raises(RuntimeError, match="expected open"):
        w.write(0, 0, b"x")
    w.open()
    assert os.path.isdir(partial_path(p.out)) and not os.path.exists(p.out)
    with pytest.raises(AssertionError, match="not done"):
        w.finish()
    for i, u in enumerate(p.units):  # a recognisable pattern per tensor instead of merged values
        w.write(u.shard, u.offset, bytes([len(u.name) % 251]) * u.nbytes)
        w.commit([(i, {u.name: 0})])
    w.finish()
    assert w.state is WriterState.FINISHED and not os.path.exists(partial_path(p.out))
    tensors = load_folder(Path(p.out))  # the safetensors library accepts every shard
    for u in p.units:
        assert tensors[u.name].reshape(-1).view(torch.uint8).unique().tolist() in ([len(u.name) % 251], [])
    assert sorted(os.listdir(p.out)) == sorted(
        [s.file for s in p.shards] + ["config.json", "generation_config.json", "model.safetensors.index.json", "streammerge-manifest.json"]
    )


def test_abort_removes_partial_output(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    w = Writer(p)
    w.open()
    w.abort()
    assert not os.path.exists(partial_path(p.out)) and not os.path.exists(p.out)
    w.abort()  # idempotent


def test_failed_run_leaves_nothing_that_looks_complete(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streammerge import execute

    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    calls = {"n": 0}
    real = execute.merge_rows

    def failing(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(execute, "merge_rows", failing)
    with pytest.raises(
        OutputError, match=r"No space left on device; the finished part is kept in .*out.partial: run the same command with --resume"
    ):
        streammerge.run(p)
    assert sorted(os.listdir(tmp_path)) == ["out.partial"]  # clearly named, never mistaken for the output
    streammerge.run(p, resume=True)  # the fault is gone: resume finishes the job
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_disk_full_while_writing_is_a_clear_error_and_resumable(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    real = os.pwrite
    state = {"n": 0}

    def pwrite(fd: int, data: object, offset: int) -> int:
        state["n"] += 1
        if state["n"] > 12:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(OutputError, match=r"model.safetensors: cannot write \(disk full\).*--resume"):
        streammerge.run(p)
    assert not os.path.exists(p.out) and os.path.isdir(partial_path(p.out))
    monkeypatch.undo()  # space freed
    streammerge.run(p, resume=True)
    fresh = streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "fresh"))
    assert (Path(p.out) / "model.safetensors").read_bytes() == (Path(fresh.out) / "model.safetensors").read_bytes()


def test_copy_fallback_without_copy_file_range(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(*args: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", unsupported)
    a = streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "a", tile_size=1000))
    monkeypatch.undo()
    b = streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "b"))
    assert (Path(a.out) / "model.safetensors").read_bytes() == (Path(b.out) / "model.safetensors").read_bytes()


def test_overwrite_replaces_existing_output(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=out, overwrite=True))
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_inputs_are_never_modified(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    def snapshot() -> dict[str, tuple[bytes, int]]:
        return {str(f): (f.read_bytes(), f.stat().st_mtime_ns) for root in (llama_base, llama_lora) for f in root.iterdir()}

    before = snapshot()
    streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", dtype="fp32"))
    assert snapshot() == before


def _direct_io_supported(folder: Path) -> bool:
    probe = folder / "direct-probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


def _aligned_copy(data: bytes, offset: int) -> tuple[mmap.mmap, int]:
    """``data`` in a page-aligned buffer, starting at the file offset's block alignment (as the executor fills them)."""
    start = aligned_start(offset)
    buf = mmap.mmap(-1, len(data) + ALIGN)
    buf[start : start + len(data)] = data
    return buf, start


def _direct_writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Direct writes on from the first byte (DIRECT_MIN_BYTES 0); returns the (offset, bytes written) of each."""
    monkeypatch.setattr(write, "DIRECT_MIN_BYTES", 0)
    writes: list[tuple[int, int]] = []
    real = Writer._pwrite_direct

    def spy(self: Writer, shard: int, fd: int, view: memoryview, at: int) -> int:
        n = real(self, shard, fd, view, at)
        writes.append((at, n))
        return n

    monkeypatch.setattr(Writer, "_pwrite_direct", spy)
    return writes


@pytest.mark.parametrize(
    ("offset", "length"),
    [(3 * ALIGN + 100, 2 * ALIGN + 50), (5 * ALIGN, 4 * ALIGN), (2 * ALIGN + 10, 100), (7, 3 * ALIGN - 7), (ALIGN - 1, ALIGN + 2)],
)
def test_direct_write_splits_at_block_edges(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, length: int
) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    direct = _direct_writes(monkeypatch)
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    assert p.shards[0].size >= offset + length + 2 * ALIGN
    w = Writer(p)
    w.open()
    before = os.urandom(length + 2 * ALIGN)  # neighbours written through the page cache first
    w.write(0, offset - offset % ALIGN, before[: offset % ALIGN])
    data = os.urandom(length)
    buf, start = _aligned_copy(data, offset)
    w.write(0, offset, memoryview(buf)[start : start + length], aligned=True)
    w.write(0, offset + length, before[:ALIGN])
    with open(os.path.join(w.partial, p.shards[0].file), "rb") as f:
        f.seek(offset - offset % ALIGN)
        assert f.read(offset % ALIGN + length + ALIGN) == before[: offset % ALIGN] + data + before[:ALIGN]
    body = [(at, n) for at, n in direct if n]
    assert all(at % ALIGN == 0 and n % ALIGN == 0 for at, n in body)
    whole_blocks = (offset + length) // ALIGN - -(-offset // ALIGN)
    assert sum(n for _, n in body) == max(whole_blocks, 0) * ALIGN
    w.abort()


def test_direct_write_refused_falls_back_to_the_page_cache(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    monkeypatch.setattr(write, "DIRECT_MIN_BYTES", 0)
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    w = Writer(p)
    w.open()
    refused = {fd for fd in w._direct if fd is not None}
    assert refused
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, at: int) -> int:
        if fd in refused:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, at)

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = os.urandom(3 * ALIGN)
    buf, start = _aligned_copy(data, 100)
    w.write(0, 100, memoryview(buf)[start : start + len(data)], aligned=True)
    assert w._direct[0] is None
    with open(os.path.join(w.partial, p.shards[0].file), "rb") as f:
        f.seek(100)
        assert f.read(len(data)) == data
    w.abort()


def test_merge_with_direct_writes_is_byte_identical_to_page_cache_writes(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _direct_io_supported(tmp_path):
        pytest.skip("no O_DIRECT on this filesystem")
    sent = _direct_writes(monkeypatch)
    direct = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "direct", max_shard_size="40KB")
    streammerge.run(direct)
    assert sum(n for _, n in sent) > 0
    monkeypatch.setenv("STREAMMERGE_NO_DIRECT", "1")
    buffered = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "buffered", max_shard_size="40KB")
    streammerge.run(buffered)
    assert len(direct.shards) > 1
    for shard in direct.shards:
        assert (tmp_path / "direct" / shard.file).read_bytes() == (tmp_path / "buffered" / shard.file).read_bytes()


def test_journal_batches_wait_for_both_the_bytes_and_the_seconds(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batches: list[int] = []
    real = Writer.commit

    def spy(self: Writer, finished: list[tuple[int, dict[str, int]]]) -> None:
        batches.append(len(finished))
        real(self, finished)

    monkeypatch.setattr(Writer, "commit", spy)
    monkeypatch.setattr(writequeue, "COMMIT_BYTES", 1)
    monkeypatch.setattr(writequeue, "COMMIT_SECONDS", 3600.0)  # bytes are due after every unit, seconds never
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    streammerge.run(p)
    assert batches == [len(p.units)]  # one fsync + journal batch, at the end
    batches.clear()
    monkeypatch.setattr(writequeue, "COMMIT_SECONDS", 0.0)
    streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", overwrite=True))
    assert len(batches) == len(p.units) and set(batches) == {1}
