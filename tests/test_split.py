"""Two merging threads on the CPU: each large tile's rows are split between them.

The split must not change a single output byte, whatever the base (16-bit, 4-bit with blocks that
cross rows, 8-bit) or the adapter (plain, DoRA, LoRA bias), and a failure in the helper thread
must fail the run like any other.
"""

from __future__ import annotations

import filecmp
from pathlib import Path
from typing import Any

import pytest

import streammerge
from streammerge import execute
from streammerge.plan import WorkUnit
from tests.conftest import make_lora
from tests.quantized_fixtures import make_llama_4bit, make_llama_8bit, make_lora_4bit


def _unit(rows: int, row_elems: int, quant: Any = None) -> WorkUnit:
    class Fake:  # only the fields split_rows reads
        pass

    u = Fake()
    u.row_elems, u.quant = row_elems, quant  # type: ignore[attr-defined]
    return u  # type: ignore[return-value]


def test_split_rows_halves_large_tiles_on_block_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    class Q:
        kind, blocksize = "nf4", 64

    monkeypatch.setattr(execute, "SPLIT_MIN_ELEMS", 100)
    assert execute.split_rows(_unit(10, 20), 10) == 5
    assert execute.split_rows(_unit(11, 20), 11) == 5
    assert execute.split_rows(_unit(4, 20), 4) == 0  # 80 elements: not worth a thread
    # rows of 48 elements, blocks of 64: a half must start on a multiple of 4 rows (192 elements)
    assert execute.split_rows(_unit(22, 48, Q()), 22) == 8
    assert execute.split_rows(_unit(6, 48, Q()), 6) == 0  # no block boundary strictly inside
    Q.kind = "int8"  # one scale per row: any row will do
    assert execute.split_rows(_unit(22, 48, Q()), 22) == 11


def _merge(base: Path, adapter: Path, out: Path, **kw: Any) -> None:
    streammerge.run(streammerge.plan(base, [str(adapter)], out=out, device="cpu", **kw))


def _same(a: Path, b: Path) -> None:
    files = sorted(x.name for x in a.iterdir() if x.suffix == ".safetensors")
    assert files
    _, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("flavour", ["plain", "dora", "bias", "nf4", "fp4-blocks-across-rows", "int8"])
def test_two_merging_threads_write_the_same_bytes_as_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flavour: str) -> None:
    from tests.conftest import make_llama

    if flavour == "nf4":
        base = make_llama_4bit(tmp_path / "base", quant_type="nf4", double_quant=True)
        adapter = make_lora_4bit(base, tmp_path / "lora")
    elif flavour == "fp4-blocks-across-rows":  # 64-element rows, 128-element blocks
        base = make_llama_4bit(tmp_path / "base", quant_type="fp4", double_quant=False, blocksize=128)
        adapter = make_lora_4bit(base, tmp_path / "lora")
    elif flavour == "int8":
        base = make_llama_8bit(tmp_path / "base")
        adapter = make_lora(base, tmp_path / "lora")
    else:
        base = make_llama(tmp_path / "base", attention_bias=flavour == "bias")
        extra = {"dora": {"use_dora": True}, "bias": {"lora_bias": True, "target_modules": ["q_proj", "k_proj"]}}.get(flavour, {})
        adapter = make_lora(base, tmp_path / "lora", **extra)
    monkeypatch.setattr(execute, "MERGE_THREADS", 1)
    _merge(base, adapter, tmp_path / "one", tile_size="8KiB")
    monkeypatch.setattr(execute, "MERGE_THREADS", 2)
    monkeypatch.setattr(execute, "SPLIT_MIN_ELEMS", 1)  # split every tile of these tiny tensors
    calls = {"n": 0}
    real = execute.split_rows

    def counted(unit: WorkUnit, rows: int) -> int:
        half = real(unit, rows)
        calls["n"] += bool(half)
        return half

    monkeypatch.setattr(execute, "split_rows", counted)
    _merge(base, adapter, tmp_path / "two", tile_size="8KiB")
    assert calls["n"] >= 4  # tiles were split
    _same(tmp_path / "one", tmp_path / "two")


def test_a_failure_in_the_helper_thread_fails_the_run(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    monkeypatch.setattr(execute, "MERGE_THREADS", 2)
    monkeypatch.setattr(execute, "SPLIT_MIN_ELEMS", 1)
    real = execute._compute

    def failing(*args: Any) -> None:
        if threading.current_thread().name.startswith("streammerge-merge"):
            raise MemoryError("helper thread out of memory")
        real(*args)

    monkeypatch.setattr(execute, "_compute", failing)
    with pytest.raises(MemoryError, match="helper thread"):
        _merge(llama_base, llama_lora, tmp_path / "o")
    assert not (tmp_path / "o").exists()
