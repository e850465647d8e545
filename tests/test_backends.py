"""The two compute backends (numpy, torch) and how a run picks between them, unit by unit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streammerge
from streammerge import execute
from streammerge.errors import StreamMergeError
from tests.conftest import make_gpt2, make_llama, make_lora
from tests.quantized_fixtures import make_llama_4bit, make_lora_4bit


def merged_bytes(base: Path, adapters: list[Path], out: Path, backend: str, monkeypatch: pytest.MonkeyPatch, **kwargs: object) -> bytes:
    monkeypatch.setenv(execute.BACKEND_ENV, backend)
    p = streammerge.plan(base, [str(a) for a in adapters], out=out, **kwargs)  # type: ignore[arg-type]
    streammerge.run(p)
    return b"".join((Path(p.out) / s.file).read_bytes() for s in p.shards)


@pytest.mark.parametrize(
    "case",
    ["plain", "fp16-out", "fp32-out", "fan_in_fan_out", "dora", "linear-combination", "tiny-tiles"],
)
def test_numpy_and_torch_write_the_same_bytes(case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case == "fan_in_fan_out":
        base = make_gpt2(tmp_path / "base")
        adapters = [make_lora(base, tmp_path / "a", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)]
    else:
        base = make_llama(tmp_path / "base", dtype=torch.float16 if case == "fp32-out" else torch.bfloat16)
        adapters = [make_lora(base, tmp_path / "a", use_dora=case == "dora")]
        if case == "linear-combination":
            adapters.append(make_lora(base, tmp_path / "b", seed=5))
    kwargs: dict[str, object] = {
        "fp16-out": {"dtype": "fp16"},
        "fp32-out": {"dtype": "fp32"},
        "linear-combination": {"combination": "linear", "weights": [0.7, -0.4]},
        "tiny-tiles": {"tile_size": 3000},
    }.get(case, {})
    by_numpy = merged_bytes(base, adapters, tmp_path / "numpy", "numpy", monkeypatch, **kwargs)
    by_torch = merged_bytes(base, adapters, tmp_path / "torch", "torch", monkeypatch, **kwargs)
    assert by_numpy == by_torch


class _Loader:
    """A stand-in for the background torch import: loaded after ``after`` questions."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.asked = 0

    def ready(self) -> bool:
        self.asked += 1
        return self.asked > self.after


def test_auto_merges_with_numpy_until_torch_is_loaded_then_with_torch(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from streammerge.compute_numpy import NumpyBackend
    from streammerge.compute_torch import TorchBackend

    monkeypatch.setenv(execute.BACKEND_ENV, "auto")
    monkeypatch.setattr(execute, "_TorchLoader", lambda: _Loader(after=3))
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out")
    backends = execute._Backends(p, "cpu", None)
    computed = [u for u in p.units if u.op != "copy"]
    kinds = [type(backends.for_unit(u)) for u in computed]
    backends.close()
    assert kinds == [NumpyBackend] * 3 + [TorchBackend] * (len(computed) - 3)


def test_auto_output_is_the_same_whenever_torch_arrives(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = merged_bytes(llama_base, [llama_lora], tmp_path / "torch", "torch", monkeypatch)
    monkeypatch.setattr(execute, "_TorchLoader", lambda: _Loader(after=5))
    assert merged_bytes(llama_base, [llama_lora], tmp_path / "auto", "auto", monkeypatch) == reference


def test_without_torch_numpy_merges_everything(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch import that fails on the loader thread only means numpy keeps merging."""
    reference = merged_bytes(llama_base, [llama_lora], tmp_path / "torch", "torch", monkeypatch)
    monkeypatch.setitem(sys.modules, "streammerge.compute_torch", None)  # import raises ImportError
    interval = sys.getswitchinterval()
    assert merged_bytes(llama_base, [llama_lora], tmp_path / "auto", "auto", monkeypatch) == reference
    assert sys.getswitchinterval() == interval  # restored by the loader thread


def test_plans_that_need_torch_use_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 4-bit base, written as float32 (its norms and embeddings are cast): auto gives torch every
    unit; numpy computes the casts and leaves the 4-bit weights to torch."""
    from streammerge.compute_numpy import NumpyBackend
    from streammerge.compute_torch import TorchBackend

    base = make_llama_4bit(tmp_path / "base4")
    lora = make_lora_4bit(base, tmp_path / "lora")
    p = streammerge.plan(base, [str(lora)], out=tmp_path / "out", dtype="fp32")
    computed = [u for u in p.units if u.op != "copy"]
    assert any(u.quant for u in computed) and any(not u.quant for u in computed)
    monkeypatch.setenv(execute.BACKEND_ENV, "auto")
    backends = execute._Backends(p, "cpu", None)
    assert {type(backends.for_unit(u)) for u in computed} == {TorchBackend}
    monkeypatch.setenv(execute.BACKEND_ENV, "numpy")
    backends = execute._Backends(p, "cpu", None)
    assert all(isinstance(backends.for_unit(u), TorchBackend if u.quant else NumpyBackend) for u in computed)
    assert merged_bytes(base, [lora], tmp_path / "n", "numpy", monkeypatch) == merged_bytes(
        base, [lora], tmp_path / "t", "torch", monkeypatch
    )


def test_unknown_backend_is_a_clear_error(llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(execute.BACKEND_ENV, "jax")
    with pytest.raises(StreamMergeError, match="STREAMMERGE_BACKEND='jax': use numpy, torch or auto"):
        streammerge.run(streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out"))


def test_a_numpy_run_never_imports_torch(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    code = (
        "import sys, streammerge; "
        f"streammerge.run(streammerge.plan({str(llama_base)!r}, [{str(llama_lora)!r}], out={str(tmp_path / 'out')!r})); "
        "print('torch' in sys.modules)"
    )
    env = {**os.environ, execute.BACKEND_ENV: "numpy"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
