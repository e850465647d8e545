"""Dry runs at scale: 70B- and 405B-shaped checkpoints (sparse files with real headers) plan in seconds.

The planner reads headers only, so sparse files whose data sections are holes are enough.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import streammerge
from streammerge.formats.safetensors import OutputTensor, build_header
from streammerge.geometry import STAGING_SLOTS, in_tile_bytes
from streammerge.plan.estimate import CUDA_RUNTIME_BYTES

SHAPES = {
    # hidden, intermediate, layers, kv heads x head dim, vocab
    "70b": (8192, 28672, 80, 1024, 128256),
    "405b": (16384, 53248, 126, 1024, 128256),
}
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_tensors(hidden: int, inter: int, layers: int, kv: int, vocab: int) -> list[OutputTensor]:
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden)}
    shapes |= {
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    tensors = [OutputTensor("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    for i in range(layers):
        tensors += [OutputTensor(f"model.layers.{i}.{m}.weight", "BF16", s) for m, s in shapes.items()]
        tensors += [
            OutputTensor(f"model.layers.{i}.{n}.weight", "BF16", (hidden,)) for n in ("input_layernorm", "post_attention_layernorm")
        ]
    return [*tensors, OutputTensor("model.norm.weight", "BF16", (hidden,)), OutputTensor("lm_head.weight", "BF16", (vocab, hidden))]


def sparse_file(path: Path, tensors: list[OutputTensor]) -> None:
    head, _ = build_header(tensors, {"format": "pt"})
    size = len(head) + sum(2 * (t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1)) for t in tensors)
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)


def sparse_model(root: Path, size: str) -> tuple[Path, Path]:
    hidden, inter, layers, kv, vocab = SHAPES[size]
    base, lora = root / "base", root / "lora"
    base.mkdir()
    lora.mkdir()
    tensors = llama_tensors(hidden, inter, layers, kv, vocab)
    weight_map, shard, shard_bytes, shards = {}, [], 0, []
    for t in tensors:
        n = 2 * t.shape[0] * (t.shape[1] if len(t.shape) > 1 else 1)
        if shard and shard_bytes + n > 5 * 10**9:
            shards.append(shard)
            shard, shard_bytes = [], 0
        shard.append(t)
        shard_bytes += n
    shards.append(shard)
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        sparse_file(base / name, group)
        weight_map |= {t.name: name for t in group}
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False, "dtype": "bfloat16"}))
    factors = []
    for t in tensors:
        module = t.name.removesuffix(".weight")
        if module.endswith(LINEAR):
            factors += [
                OutputTensor(f"base_model.model.{module}.lora_A.weight", "F32", (16, t.shape[1])),
                OutputTensor(f"base_model.model.{module}.lora_B.weight", "F32", (t.shape[0], 16)),
            ]
    head, _ = build_header(factors, {"format": "pt"})
    with open(lora / "adapter_model.safetensors", "wb") as f:
        f.write(head)
        f.truncate(len(head) + sum(4 * t.shape[0] * t.shape[1] for t in factors))
    (lora / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": list(LINEAR)}))
    return base, lora


@pytest.mark.parametrize(("size", "params"), [("70b", 70.5e9), ("405b", 405e9)])
def test_dry_run_at_scale_is_fast_and_bounded(tmp_path: Path, size: str, params: float) -> None:
    base, lora = sparse_model(tmp_path, size)
    start = time.perf_counter()
    p = streammerge.plan(base, [str(lora)], out=tmp_path / "out", dtype="bf16", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"planning a {size} model took {elapsed:.1f} s"
    e = p.estimate
    total = sum(u.shape[0] * (u.shape[1] if len(u.shape) > 1 else 1) for u in p.units)
    assert abs(total - params) / params < 0.02
    assert e.units["merge"] == 7 * SHAPES[size][2]
    assert e.peak_host_bytes < 1 * 2**30  # bounded by a tile, not by a 2 GB (or 4 GB) tensor
    gpu = streammerge.plan(base, [str(lora)], out=tmp_path / "out", dtype="bf16", device="cuda").estimate
    staging = STAGING_SLOTS * in_tile_bytes(p.units)
    assert gpu.peak_host_bytes == e.peak_host_bytes + CUDA_RUNTIME_BYTES + staging  # the CUDA runtime and the pinned slots
    assert 0 < gpu.peak_device_bytes < 256 * 2**20  # a few tiles on the GPU, whatever the model
    assert e.output_bytes > 2 * params and e.seconds > 100
    assert len(p.shards) == pytest.approx(2 * params / 5e9, rel=0.2)
    # the plan itself stays small enough to save and reload
    p.save(tmp_path / "plan.json")
    assert os.path.getsize(tmp_path / "plan.json") < 64 * 2**20
    assert streammerge.Plan.load(tmp_path / "plan.json") == p
