"""``streammerge demo``: a small Llama-shaped model and LoRA adapter, built here, merged, checked.

Nothing is downloaded. The base (bf16, two shards with an index) and the adapter (fp32, rank 8
on every linear layer, as PEFT saves it) are written with streammerge's own safetensors layout
code. The check compares every merged tensor with a float64 reference rounded once; when
transformers and peft are installed it also compares with PEFT's ``merge_and_unload``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import torch

import streammerge
from streammerge.formats.safetensors import OutputTensor, build_header, read_header
from streammerge.kernels import TORCH_DTYPES, as_bytes

DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 2048,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "dtype": "bfloat16",
    "torch_dtype": "bfloat16",
}


def write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` as one safetensors file with streammerge's own header layout."""
    layout = [OutputTensor(name, DTYPE_NAMES[t.dtype], tuple(t.shape)) for name, t in tensors.items()]
    head, offsets = build_header(layout, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(head)
        for (_, t), offset in zip(tensors.items(), offsets, strict=True):
            assert f.tell() == offset
            f.write(as_bytes(t))


def read_tensor(path: str, name: str) -> torch.Tensor:
    """Read one tensor from a safetensors file (a copy)."""
    info = read_header(path).by_name()[name]
    with open(path, "rb") as f:
        f.seek(info.offset)
        data = bytearray(f.read(info.nbytes))
    return torch.frombuffer(data, dtype=TORCH_DTYPES[info.dtype]).view(info.shape) if data else torch.empty(info.shape)


def base_weights(cfg: dict[str, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    h, inter, vocab, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_key_value_heads"]
    head_dim = h // cfg["num_attention_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv * head_dim, h), "self_attn.v_proj": (kv * head_dim, h)}
    shapes |= {"self_attn.o_proj": (h, h), "mlp.gate_proj": (inter, h), "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(vocab, h, generator=generator)}
    for i in range(cfg["num_hidden_layers"]):
        for mod, shape in shapes.items():
            w[f"model.layers.{i}.{mod}.weight"] = torch.randn(shape, generator=generator) * 0.05
        w[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(h)
        w[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    w["lm_head.weight"] = torch.randn(vocab, h, generator=generator) * 0.05
    return {k: v.to(torch.bfloat16) for k, v in w.items()}


def build(workdir: str) -> tuple[str, str, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Write the base (two shards + index) and the adapter; return their folders and tensors."""
    g = torch.Generator().manual_seed(0)
    base, lora = os.path.join(workdir, "base"), os.path.join(workdir, "lora")
    os.makedirs(base)
    os.makedirs(lora)
    weights = base_weights(CONFIG, g)  # type: ignore[arg-type]
    names = list(weights)
    half = len(names) // 2
    weight_map: dict[str, str] = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        write_safetensors(os.path.join(base, file), {n: weights[n] for n in part})
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with open(os.path.join(base, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    with open(os.path.join(base, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)

    r, alpha = 8, 16
    factors: dict[str, torch.Tensor] = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if module.endswith(LINEAR):
            factors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, w.shape[1], generator=g) * 0.05
            factors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(w.shape[0], r, generator=g) * 0.05
    write_safetensors(os.path.join(lora, "adapter_model.safetensors"), factors)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r, "lora_alpha": alpha,
        "target_modules": sorted({m.split(".")[-1] for m in LINEAR}), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "inference_mode": True,
    }  # fmt: skip
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2)
    return base, lora, weights, factors


def check_against_reference(
    out: str, weights: dict[str, torch.Tensor], factors: dict[str, torch.Tensor], scale: float
) -> tuple[int, float]:
    """Every tensor of ``out`` against float64 math rounded once; returns (tensors, identical fraction)."""
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)["weight_map"]
    same = total = 0
    for name, w in weights.items():
        got = read_tensor(os.path.join(out, index[name]), name)
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".lora_A.weight" not in factors:
            if not torch.equal(got.view(torch.int16), w.view(torch.int16)):
                raise AssertionError(f"{name}: untouched tensor is not bit-identical to the base")
            continue
        a, b = factors[prefix + ".lora_A.weight"].double(), factors[prefix + ".lora_B.weight"].double()
        ref64 = w.double() + scale * (b @ a)
        ref = ref64.to(torch.bfloat16)
        ulp = (ref.float().abs() * 2.0**-7).clamp_min(2.0**-133)
        err = (got.double() - ref64).abs()
        if bool((err > ulp.double()).any()):
            raise AssertionError(f"{name}: merged values are off by more than one unit in the last place")
        same += int((got == ref).sum())
        total += ref.numel()
    return len(weights), same / max(total, 1)


def check_against_peft(base: str, lora: str, out: str) -> str:
    """Compare with transformers + PEFT merge_and_unload when both are installed."""
    # peft imports bitsandbytes, which warns on some CPUs that an optional hub kernel is missing:
    # noise for a check that never runs a 4-bit matmul.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        return "transformers/peft not installed: PEFT comparison skipped (pip install 'streammerge[test]')"
    import warnings

    from transformers.utils import logging as hf_logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    warnings.filterwarnings("ignore", category=FutureWarning)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    ref = PeftModel.from_pretrained(model, lora).merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).state_dict()
    same = total = 0
    for name, t in ref.items():
        same += int((ours[name] == t).sum())
        total += t.numel()
    if set(ref) != set(ours):
        raise AssertionError("tensor names differ from PEFT's merge")
    if same / total < 0.9999:
        raise AssertionError(f"only {same / total:.6%} of elements equal PEFT's merge_and_unload")
    return f"transformers loads the output; {same / total:.5%} of {total:,} elements equal PEFT merge_and_unload"


def run_demo(workdir: str | None, echo: Callable[[str], None] = print) -> bool:
    """Build, plan, merge, check. Returns True when every check passes."""
    keep = workdir is not None
    root = os.path.abspath(workdir) if workdir else tempfile.mkdtemp(prefix="streammerge-demo-")
    if keep:
        if os.path.exists(root) and os.listdir(root):
            raise streammerge.OutputError(f"{root}: demo folder exists and is not empty; choose a new one")
        os.makedirs(root, exist_ok=True)
    try:
        base, lora, weights, factors = build(root)
        out = os.path.join(root, "merged")
        echo(f"built a Llama-shaped base ({len(weights)} tensors, bf16, 2 shards) and a rank-8 LoRA in {root}")
        p = streammerge.plan(base, [lora], out=out, dtype="bfloat16", max_shard_size="4MB")
        echo(f"plan: {p.estimate.units} units, {len(p.shards)} output shards, peak RAM bound {p.estimate.peak_host_bytes / 2**20:.0f} MiB")
        report = streammerge.run(p)
        echo(f"merged in {report.seconds:.2f} s, {report.bytes_written:,} bytes, peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB")
        n, identical = check_against_reference(out, weights, factors, scale=16 / 8)
        echo(f"check: {n} tensors; merged ones within 1 ulp of float64, {identical:.4%} identical to it rounded once; others bit-identical")
        echo(f"check: {check_against_peft(base, lora, out)}")
        echo("demo OK" + (f"; files kept in {root}" if keep else ""))
        return True
    except AssertionError as e:
        echo(f"demo FAILED: {e}")
        return False
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
