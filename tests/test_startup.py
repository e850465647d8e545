"""The start of a run, before torch is imported: checks, output opened, untouched tensors copied.

The copies made while torch loads must end up journaled and in the output like any other unit,
and a run that stops before the executor starts (no usable GPU, Ctrl-C during the import, a
budget that does not fit) must leave nothing behind: no output, no ``OUT.partial``.
"""

from __future__ import annotations

import dataclasses
import filecmp
from pathlib import Path
from typing import Any

import pytest

import streammerge
from streammerge import execute
from streammerge.errors import StreamMergeError
from streammerge.startup import Startup
from streammerge.write import WriteQueue, Writer, partial_path


def _same(a: Path, b: Path) -> None:
    files = sorted(x.name for x in a.iterdir() if x.suffix == ".safetensors")
    assert files
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors


def test_untouched_tensors_are_copied_before_the_executor_runs(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    copies = [i for i, u in enumerate(plan.units) if u.op == "copy"]
    assert copies  # embeddings and norms
    seen: dict[str, Any] = {}
    real = execute.run

    def spy(p: Any, **kw: Any) -> Any:
        startup = kw["startup"]
        seen["copied"] = startup.copied
        seen["partial"] = Path(partial_path(str(p.out))).is_dir()
        return real(p, **kw)

    monkeypatch.setattr(execute, "run", spy)
    streammerge.run(plan, reads="mmap")
    assert seen == {"copied": tuple(copies), "partial": True}
    reference = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "ref")
    monkeypatch.setattr(execute, "run", real)
    execute.run(reference)  # the executor on its own: copies in plan order
    _same(tmp_path / "out", tmp_path / "ref")
    assert not Path(partial_path(str(tmp_path / "out"))).exists()


@pytest.mark.parametrize("failure", ["no-gpu", "interrupt"])
def test_a_run_that_stops_before_the_executor_leaves_nothing(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    out = tmp_path / "out"
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=out)
    if failure == "no-gpu":
        monkeypatch.setattr(execute, "_cuda_problem", lambda: "torch sees no CUDA device")
        with pytest.raises(StreamMergeError, match="device 'cuda' was asked for"):
            streammerge.run(plan, device="cuda")
    else:

        def interrupted(*args: Any, **kw: Any) -> Any:
            raise KeyboardInterrupt  # as Ctrl-C during the torch import would

        monkeypatch.setattr(execute, "run", interrupted)
        with pytest.raises(KeyboardInterrupt):
            streammerge.run(plan)
    assert not out.exists()
    assert not Path(partial_path(str(out))).exists()
    monkeypatch.undo()
    streammerge.run(plan)  # and the same command then works from scratch
    assert (out / "model.safetensors").is_file()


def test_startup_checks_come_first_and_abort_is_safe_twice(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "elsewhere")
    startup = Startup(dataclasses.replace(plan, out=str(out)))
    with pytest.raises(StreamMergeError, match="exists"):
        startup.begin()
    assert startup.abort() is False
    assert startup.abort() is False
    startup.close()
    assert out.is_dir() and not any(out.iterdir())  # the existing folder is untouched
    assert not Path(partial_path(str(out))).exists()


def test_write_pool_allocator_can_change_only_before_the_first_buffer(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    plan = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    writer = Writer(plan)
    writer.open()
    queue = WriteQueue(writer, 2, 4096)
    made: list[int] = []

    def allocate(n: int) -> bytearray:
        made.append(n)
        return bytearray(n)

    queue.use_allocator(allocate)
    queue.acquire()
    assert made == [4096 + 4096]
    with pytest.raises(AssertionError, match="already has buffers"):
        queue.use_allocator(allocate)
    queue.cancel()
    writer.abort()
