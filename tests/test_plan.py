"""The planner on its own: layout, offsets, JSON round trip, estimate, adapter-to-base mapping."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streammerge
from streammerge.errors import AdapterMismatch, BadAdapter, BadCheckpoint, OutputError, PlanMismatch
from streammerge.formats.safetensors import DTYPE_SIZES, parse_header
from streammerge.plan import Plan, Source, WorkUnit, check_inputs_unchanged, layout_shards, shard_header_bytes
from tests.conftest import make_llama


def spec(name: str, dtype: str, shape: tuple[int, ...]) -> WorkUnit:
    n = 1
    for d in shape:
        n *= d
    src = Source(file="/in/model.safetensors", offset=0, nbytes=n * DTYPE_SIZES[dtype], dtype=dtype, shape=shape)
    return WorkUnit(
        name=name,
        op="copy",
        source=src,
        lora=(),
        out_dtype=dtype,
        base_dtype=dtype,
        shape=shape,
        rows=n,
        row_elems=1,
        tile_rows=n,
        chunk_rows=n,
        work_bytes=0,
    )


shapes = st.lists(st.integers(0, 40), min_size=0, max_size=3).map(tuple)
specs = st.lists(st.tuples(st.sampled_from(["BF16", "F32", "F16", "I64", "U8"]), shapes), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(specs, st.integers(1, 5000))
def test_layout_is_contiguous_and_respects_shard_size(items: list[tuple[str, tuple[int, ...]]], max_shard: int) -> None:
    units, shards = layout_shards([spec(f"t{i}", d, s) for i, (d, s) in enumerate(items)], max_shard)
    assert [u.name for u in units] == [f"t{i}" for i in range(len(items))]  # base order kept
    for index, shard in enumerate(shards):
        members = [u for u in units if u.shard == index]
        assert [u.name for u in members] == list(shard.tensors)
        header = shard_header_bytes(shard)
        assert len(header) % 8 == 0
        parsed = parse_header(header[8:], path=shard.file, file_size=shard.size)
        assert [(t.name, t.offset, t.nbytes) for t in parsed.tensors if t.nbytes] == [
            (u.name, u.offset, u.nbytes) for u in members if u.nbytes
        ]
        data = sum(u.nbytes for u in members)
        assert shard.size == len(header) + data
        assert data <= max_shard or len(members) == 1  # only a lone oversized tensor may exceed
    if len(shards) == 1:
        assert shards[0].file == "model.safetensors"
    else:
        assert [s.file for s in shards] == [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]


def test_plan_round_trips_through_json(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", dtype="bf16", max_shard_size="20KB")
    p.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == p
    obj = json.loads((tmp_path / "plan.json").read_text())
    assert {"peak_host_bytes", "peak_device_bytes", "output_bytes"} <= set(obj["estimate"])
    assert len(p.shards) > 1 and p.dtype == "BF16"
    ops = {u.name: u.op for u in p.units}
    assert ops["model.layers.0.self_attn.q_proj.weight"] == "merge"
    assert ops["model.norm.weight"] == "copy"


def test_plan_reads_headers_only(tmp_path: Path, llama_lora: Path) -> None:
    """Planning must not read tensor data: zero the data sections and the plan is unchanged."""
    base = make_llama(tmp_path / "base")
    before = streammerge.plan(base, [str(llama_lora)], out=tmp_path / "out")
    path = base / "model.safetensors"
    header_len = 8 + int.from_bytes(path.read_bytes()[:8], "little")
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(header_len)
        f.write(b"\0" * (stat.st_size - header_len))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert streammerge.plan(base, [str(llama_lora)], out=tmp_path / "out") == before


def test_estimate_counts_what_it_should(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    p = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", device="cpu")
    e = p.estimate
    assert e.units == {"merge": 14, "copy": 7}
    assert e.peak_device_bytes == 0
    assert e.output_bytes >= sum(s.size for s in p.shards)
    assert e.peak_host_bytes > sum(u.work_bytes for u in p.units if u.name == e.largest_unit)
    assert streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "out", device="auto").estimate.peak_device_bytes > 0


def test_smaller_tiles_lower_the_estimate(llama_base: Path, llama_lora: Path, tmp_path: Path) -> None:
    big = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", tile_size="64MiB").estimate
    small = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", tile_size="4KiB").estimate
    assert small.peak_host_bytes < big.peak_host_bytes


def test_plan_refuses_changed_inputs(tmp_path: Path, llama_lora: Path) -> None:
    base = make_llama(tmp_path / "base")
    p = streammerge.plan(base, [str(llama_lora)], out=tmp_path / "out")
    with open(base / "model.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(PlanMismatch, match="changed since the plan"):
        check_inputs_unchanged(p)


def test_plan_load_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text('{"version": 1, "units": 3}')
    with pytest.raises(PlanMismatch, match="not a streammerge plan"):
        Plan.load(tmp_path / "p.json")
    (tmp_path / "p.json").write_text('{"version": 99}')
    with pytest.raises(PlanMismatch, match="version"):
        Plan.load(tmp_path / "p.json")


def test_adapter_for_another_model_is_refused(tmp_path: Path, llama_lora: Path) -> None:
    other = make_llama(tmp_path / "other", hidden_size=32, intermediate_size=64)
    with pytest.raises(AdapterMismatch, match=r"LoRA gives \(out, in\) = \[\d+, \d+\] but the base tensor is \[32, \d+\]"):
        streammerge.plan(other, [str(llama_lora)], out=tmp_path / "out")


def test_adapter_module_missing_from_base(tmp_path: Path, llama_lora: Path) -> None:
    small = make_llama(tmp_path / "small", num_hidden_layers=1)
    with pytest.raises(AdapterMismatch, match=r"model.layers.1.*does not have"):
        streammerge.plan(small, [str(llama_lora)], out=tmp_path / "out")


def test_rank_disagreeing_with_config_is_refused(tmp_path: Path, llama_base: Path, llama_lora: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(llama_lora, bad)
    config = json.loads((bad / "adapter_config.json").read_text())
    config["r"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(BadAdapter, match=r"rank 8 but adapter_config.json gives r=4"):
        streammerge.plan(llama_base, [str(bad)], out=tmp_path / "out")


def test_output_rules(tmp_path: Path, llama_base: Path, llama_lora: Path) -> None:
    with pytest.raises(OutputError, match="inside input"):
        streammerge.plan(llama_base, [str(llama_lora)], out=llama_base / "merged")
    with pytest.raises(OutputError, match="contains input"):
        streammerge.plan(llama_base, [str(llama_lora)], out=llama_base.parent, overwrite=True)
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "exists")
    streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "exists", overwrite=True)


def test_other_quantization_methods_are_refused(tmp_path: Path, llama_lora: Path) -> None:
    base = make_llama(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (base / "config.json").write_text(json.dumps(config))
    with pytest.raises(BadCheckpoint, match="quantized with gptq"):
        streammerge.plan(base, [str(llama_lora)], out=tmp_path / "out")


def test_a_gpu_build_of_torch_raises_the_host_estimate(
    llama_base: Path, llama_lora: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import importlib.machinery

    probe = importlib.import_module("streammerge.probe")
    estimate = importlib.import_module("streammerge.plan.estimate")

    cpu_build = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cpu").estimate
    (tmp_path / "torch" / "lib").mkdir(parents=True)
    (tmp_path / "torch" / "lib" / "libtorch_cuda.so").touch()
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "torch")]
    monkeypatch.setattr(probe.importlib.util, "find_spec", lambda name: spec if name == "torch" else None)
    assert probe.torch_is_gpu_build()
    gpu_build = streammerge.plan(llama_base, [str(llama_lora)], out=tmp_path / "o", device="cpu").estimate
    assert gpu_build.peak_host_bytes == cpu_build.peak_host_bytes + estimate.TORCH_GPU_BUILD_BYTES
