"""Fixtures for bitsandbytes-quantized bases (4-bit NF4/FP4 and 8-bit LLM.int8), built by code, never downloaded.

Everything runs on CPU with HF_HUB_OFFLINE=1. Checked against torch 2.13 (CPU), transformers 5.24, peft 0.21.2,
bitsandbytes 0.50.2, safetensors 0.8 (see ``python -m tests.quantized_fixtures`` for the self-test).

Builders
    ``make_llama_4bit`` / ``make_llama_8bit`` write a *pre-quantized* checkpoint exactly as transformers'
    ``save_pretrained`` writes one (the unquantized bf16 source is kept beside it, see ``unquantized_source``).
    transformers 5.24 cannot choose the 4-bit blocksize (``BitsAndBytesConfig`` has no such field and
    ``replace_with_bnb_linear`` builds ``bnb.nn.Linear4bit`` without one, so it is always 64); with
    ``blocksize=`` the quantized tensors are re-quantized here with ``bitsandbytes.functional.quantize_4bit`` and
    serialised with ``QuantState.as_dict(packed=True)`` into the very key layout transformers wrote (same names,
    same dtypes, same shard of every key). With ``blocksize=64`` this path is bit-identical to transformers' own.

Reference dequantizers (plain torch, no bitsandbytes)
    ``dequant_4bit_reference`` (flat-block formula of FORMATS.md), ``dequant_8bit_reference`` and
    ``load_dequantized_reference`` (a whole checkpoint, read with safetensors).

Oracles
    ``make_lora_4bit`` (an adapter made the QLoRA way, on the 4-bit model) and ``peft_merge_4bit``
    (4-bit checkpoint -> ``model.dequantize()`` -> PEFT ``merge_and_unload`` -> 16-bit ``save_pretrained``).

Layout of one 4-bit linear ``X`` of logical shape (out, in), n = out*in elements, as transformers saves it:
    ``X.weight``                       U8 (ceil(n/2), 1); with bnb_4bit_quant_storage=bf16/f16: that dtype, (ceil(n/2)/2, 1)
    ``X.weight.absmax``                F32 (ceil(n/blocksize),); U8 of the same shape with double quant
    ``X.weight.quant_map``             F32 (16,)
    ``X.weight.nested_absmax``         F32 (ceil(n_blocks/256),)   double quant only
    ``X.weight.nested_quant_map``      F32 (256,)                  double quant only
    ``X.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``)  U8 (len,) UTF-8 JSON, e.g.
        {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 176],
         "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.05188959464430809}
In a sharded checkpoint transformers may put ``X.weight`` and its statistics in *different* shards.

8-bit linear ``X``: ``X.weight`` I8 (out, in), ``X.SCB`` F32 (out,), ``X.weight_format`` U8 () == 0.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=UserWarning)

QuantType = Literal["nf4", "fp4"]

#: Suffixes (after ``X.weight``) of the statistics tensors transformers saves next to a 4-bit weight.
BNB4_STAT_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
#: Marker of a 4-bit weight: ``X.weight`` + this + quant_type. Detect 4-bit weights by it, never by dtype.
BNB4_QUANT_STATE = ".quant_state.bitsandbytes__"
#: Blocksizes bitsandbytes accepts for 4-bit quantization.
BNB4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: float32 1/127, the factor of LLM.int8 dequantization (bitsandbytes writes it as 7.874015718698502e-3).
INT8_RECIPROCAL = torch.tensor(1 / 127, dtype=torch.float32)


def _quiet() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------


def unquantized_source(path: Path) -> Path:
    """The folder beside ``path`` where ``make_llama_4bit``/``make_llama_8bit`` keep the bf16 model they quantized."""
    return path.parent / f"{path.name}-unquantized"


def make_llama_source(path: Path, *, dtype: torch.dtype = torch.bfloat16, tie: bool = False, seed: int = 0, **cfg: Any) -> Path:
    """The unquantized model a 4/8-bit fixture starts from: ``tests.conftest.make_llama`` (same defaults, same
    seed -> bit-identical tensors), saved unsharded."""
    from tests.conftest import make_llama

    return make_llama(path, dtype=dtype, tie=tie, seed=seed, **cfg)


def make_llama_4bit(
    path: Path,
    *,
    quant_type: QuantType = "nf4",
    double_quant: bool = True,
    blocksize: int | None = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    quant_storage: torch.dtype = torch.uint8,
    dtype: torch.dtype = torch.bfloat16,
    shard: str | None = None,
    tie: bool = False,
    seed: int = 0,
    **cfg: Any,
) -> Path:
    """A tiny Llama saved pre-quantized in bitsandbytes 4-bit, as transformers' ``save_pretrained`` writes it.

    The bf16 (``dtype``) model is first saved unquantized to ``unquantized_source(path)`` (kept: tests can measure
    quantization error against it), then loaded on CPU with ``BitsAndBytesConfig(load_in_4bit=True, ...)`` and
    saved to ``path`` (``shard`` e.g. "20KB" gives a sharded checkpoint). Every ``nn.Linear`` of the decoder layers
    is quantized; embeddings, norms and ``lm_head`` stay ``dtype``. The quant-state JSON's ``"dtype"`` is ``dtype``.

    ``blocksize`` (one of ``BNB4_BLOCKSIZES``): transformers always quantizes with 64, so with a blocksize each
    quantized weight is re-quantized from the source with ``bitsandbytes.functional.quantize_4bit`` and its group of
    keys replaced in place (same names, dtypes and shards; only the lengths of ``absmax``/``nested_absmax`` and the
    JSON change); the index's ``total_size`` is recomputed. transformers loads such checkpoints (it reads the
    blocksize from the JSON). Shapes whose last dim is not a multiple of the blocksize are fine: blocks are runs
    of the flattened weight (the default 64x176 ``down_proj`` already is such a shape at blocksize 64).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if blocksize is not None and blocksize not in BNB4_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BNB4_BLOCKSIZES}, got {blocksize}")
    source = make_llama_source(unquantized_source(path), dtype=dtype, tie=tie, seed=seed, **cfg)
    _quiet()
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=qc, device_map="cpu", dtype=dtype)
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    del model
    if blocksize is not None:
        requantize_4bit_checkpoint(path, source, blocksize=blocksize)
    return path


def make_llama_8bit(
    path: Path,
    *,
    threshold: float = 6.0,
    dtype: torch.dtype = torch.bfloat16,
    shard: str | None = None,
    tie: bool = False,
    seed: int = 0,
    **cfg: Any,
) -> Path:
    """A tiny Llama saved pre-quantized in bitsandbytes LLM.int8 (``load_in_8bit=True``), as transformers saves it.

    Source kept at ``unquantized_source(path)``. Per quantized linear ``X`` the checkpoint holds
    ``X.weight`` I8 (out, in) (row-wise absmax quantization), ``X.SCB`` F32 (out,) (per-row absmax of the source
    weight, in float32) and ``X.weight_format`` U8 0-d, value 0 (row-major). Other tensors stay ``dtype``.
    Dequantize as ``(int8 * SCB[:, None]) * float32(1/127)`` in float32 (``dequant_8bit_reference``).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    source = make_llama_source(unquantized_source(path), dtype=dtype, tie=tie, seed=seed, **cfg)
    _quiet()
    qc = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold)
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=qc, device_map="cpu", dtype=dtype)
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    return path


def quantize_4bit_tensors(
    name: str,
    weight: torch.Tensor,
    *,
    blocksize: int = 64,
    quant_type: QuantType = "nf4",
    double_quant: bool = True,
    quant_storage: torch.dtype = torch.uint8,
) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of one 4-bit weight ``name`` (e.g. ``"model.layers.0.mlp.down_proj.weight"``).

    ``bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant, ...)`` then
    ``QuantState.as_dict(packed=True)`` with every key prefixed by ``name + "."`` -- exactly what
    ``bnb.nn.Linear4bit._save_to_state_dict`` does for transformers. The quant-state JSON records
    ``weight.dtype`` as the dequantized dtype and ``weight.shape`` as the logical shape.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage
    )
    out = {name: packed}
    for key, value in state.as_dict(packed=True).items():
        out[f"{name}.{key}"] = value.contiguous()
    return out


def requantize_4bit_checkpoint(path: Path, source: Path, *, blocksize: int) -> None:
    """Re-quantize, in place, every 4-bit weight of the transformers-saved checkpoint ``path`` at ``blocksize``.

    Each weight is re-quantized from the same tensor of the unquantized checkpoint ``source`` with the quant type,
    double-quant flag and storage dtype it already has; its new keys go to the shard that held the old ones.
    """
    from safetensors.torch import load_file, save_file

    src = _read_folder(source)
    files = sorted(path.glob("*.safetensors"))
    shards = {f.name: load_file(f) for f in files}
    where = {key: fname for fname, tensors in shards.items() for key in tensors}
    for key in list(where):
        if BNB4_QUANT_STATE not in key:
            continue
        weight_name, quant_type = key.split(BNB4_QUANT_STATE)
        old = shards[where[weight_name]][weight_name]
        new = quantize_4bit_tensors(
            weight_name,
            src[weight_name],
            blocksize=blocksize,
            quant_type=quant_type,  # type: ignore[arg-type]
            double_quant=f"{weight_name}.nested_absmax" in where,
            quant_storage=old.dtype,
        )
        if set(new) != {k for k in where if k == weight_name or k.startswith(weight_name + ".")}:
            raise AssertionError(f"{weight_name}: re-quantized key set differs from transformers'")
        for new_key, tensor in new.items():
            shards[where[new_key]][new_key] = tensor
    for fname, tensors in shards.items():
        save_file(tensors, path / fname, metadata={"format": "pt"})
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["metadata"]["total_size"] = sum(t.numel() * t.element_size() for tensors in shards.values() for t in tensors.values())
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Reference dequantization (plain torch)
# ---------------------------------------------------------------------------------------------------------------


def dequant_nested_absmax(
    absmax_u8: torch.Tensor, nested_absmax: torch.Tensor, nested_quant_map: torch.Tensor, nested_blocksize: int, nested_offset: float
) -> torch.Tensor:
    """Double quant: per-block float32 scales ``nested_quant_map[q[j]] * nested_absmax[j // nested_blocksize] + offset``.

    All float32, product rounded before the offset is added (no FMA), as bitsandbytes' CPU kernel does.
    ``nested_offset`` is the JSON float; it is the exact float32 value bitsandbytes used.
    """
    n = absmax_u8.numel()
    if nested_absmax.numel() != math.ceil(n / nested_blocksize):
        raise ValueError(f"nested_absmax has {nested_absmax.numel()} values for {n} scales at nested blocksize {nested_blocksize}")
    idx = torch.arange(n) // nested_blocksize
    scaled = nested_quant_map.float()[absmax_u8.reshape(-1).long()] * nested_absmax.float()[idx]
    return scaled + torch.tensor(nested_offset, dtype=torch.float32)


def dequant_4bit_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    *,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_blocksize: int = 256,
    nested_offset: float | None = None,
) -> torch.Tensor:
    """Dequantize one bitsandbytes 4-bit weight with the flat-block formula, in float32, cast once to ``dtype``.

    ``packed``: the saved ``X.weight`` in any storage dtype (its bytes are reinterpreted as uint8, C order).
    Element i of the C-order-flattened logical tensor is the high nibble of byte i//2 when i is even, the low
    nibble when odd; its block is i // blocksize (blocks run across rows; the last one may be short).
    ``absmax``: F32 per-block scales, or U8 codes when double-quantized (then ``nested_*`` are required).
    ``value[i] = quant_map[code[i]] * absmax_f32[i // blocksize]``.
    """
    n = math.prod(shape)
    data = packed.contiguous().reshape(-1).view(torch.uint8)
    if data.numel() < math.ceil(n / 2):
        raise ValueError(f"packed holds {data.numel()} bytes, {math.ceil(n / 2)} needed for shape {tuple(shape)}")
    if absmax.numel() != math.ceil(n / blocksize):
        raise ValueError(f"absmax has {absmax.numel()} values, {math.ceil(n / blocksize)} blocks of {blocksize} in shape {tuple(shape)}")
    if quant_map.numel() != 16:
        raise ValueError(f"quant_map has {quant_map.numel()} entries, expected 16")
    if absmax.dtype == torch.uint8:
        if nested_absmax is None or nested_quant_map is None or nested_offset is None:
            raise ValueError("uint8 absmax (double quant) needs nested_absmax, nested_quant_map and nested_offset")
        scales = dequant_nested_absmax(absmax, nested_absmax, nested_quant_map, nested_blocksize, nested_offset)
    else:
        scales = absmax.reshape(-1).float()
    codes = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[:n].long()
    values = quant_map.float()[codes] * scales[torch.arange(n) // blocksize]
    return values.reshape(tuple(shape)).to(dtype)


def dequant_8bit_reference(weight: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """LLM.int8: ``(int8 * SCB[:, None]) * float32(1/127)`` in float32 (bit-exact with ``int8_vectorwise_dequant``), cast once."""
    if weight.dtype != torch.int8 or weight.dim() != 2 or scb.shape != (weight.shape[0],):
        raise ValueError(f"expected int8 (out, in) weight and (out,) SCB, got {weight.dtype} {tuple(weight.shape)} / {tuple(scb.shape)}")
    return ((weight.float() * scb.float()[:, None]) * INT8_RECIPROCAL).to(dtype)


def read_quant_state(tensors: Mapping[str, torch.Tensor], weight_name: str) -> dict[str, Any]:
    """The parsed ``quant_state.bitsandbytes__nf4|fp4`` JSON of 4-bit weight ``weight_name`` (e.g. ``"...q_proj.weight"``)."""
    for quant_type in ("nf4", "fp4"):
        key = f"{weight_name}{BNB4_QUANT_STATE}{quant_type}"
        if key in tensors:
            state: dict[str, Any] = json.loads(tensors[key].numpy().tobytes().decode("utf-8"))
            if state.get("quant_type") != quant_type:
                raise ValueError(f"{key}: JSON quant_type {state.get('quant_type')!r} disagrees with the key")
            return state
    raise KeyError(f"{weight_name} has no quant_state tensor")


def dequant_4bit_from_tensors(tensors: Mapping[str, torch.Tensor], weight_name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``dequant_4bit_reference`` on the saved tensors of ``weight_name``; ``dtype`` defaults to the JSON's ``"dtype"``."""
    state = read_quant_state(tensors, weight_name)
    nested = f"{weight_name}.nested_absmax" in tensors
    return dequant_4bit_reference(
        tensors[weight_name],
        tensors[f"{weight_name}.absmax"],
        tensors[f"{weight_name}.quant_map"],
        blocksize=int(state["blocksize"]),
        shape=state["shape"],
        dtype=dtype or getattr(torch, state["dtype"]),
        nested_absmax=tensors[f"{weight_name}.nested_absmax"] if nested else None,
        nested_quant_map=tensors[f"{weight_name}.nested_quant_map"] if nested else None,
        nested_blocksize=int(state.get("nested_blocksize", 256)),
        nested_offset=float(state["nested_offset"]) if nested else None,
    )


def quantized_weight_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, Literal["4bit", "8bit"]]:
    """Every quantized weight of a checkpoint: ``X.weight`` -> "4bit" (has a quant_state sibling) or "8bit" (has ``X.SCB``)."""
    found: dict[str, Literal["4bit", "8bit"]] = {}
    for key in tensors:
        if BNB4_QUANT_STATE in key:
            found[key.split(BNB4_QUANT_STATE)[0]] = "4bit"
        elif key.endswith(".SCB") and tensors.get(key[: -len(".SCB")] + ".weight", torch.empty(0)).dtype == torch.int8:
            found[key[: -len(".SCB")] + ".weight"] = "8bit"
    return found


def load_dequantized_reference(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a bitsandbytes 4-bit or 8-bit checkpoint folder, quantized weights dequantized in plain torch.

    Read with the safetensors library (all shards). The result has the key set of the unquantized model: the
    statistics keys (``.absmax``, ``.quant_map``, ``.nested_*``, ``.quant_state.*``, ``.SCB``, ``.weight_format``) are
    dropped, non-quantized tensors are returned unchanged. ``dtype`` (default: 4-bit -> the quant-state JSON's
    ``"dtype"``; 8-bit -> config.json's ``dtype``/``torch_dtype``, else bfloat16) is the dtype of the dequantized
    weights, rounded once from float32. Pass ``torch.float32`` for the unrounded values.
    """
    tensors = _read_folder(path)
    found = quantized_weight_names(tensors)
    out: dict[str, torch.Tensor] = {}
    drop: set[str] = set()
    int8_dtype = dtype or _config_dtype(path)
    for name, kind in found.items():
        if kind == "4bit":
            out[name] = dequant_4bit_from_tensors(tensors, name, dtype)
            drop.update(k for k in tensors if k.startswith(name + ".") and (k.endswith(BNB4_STAT_SUFFIXES) or BNB4_QUANT_STATE in k))
        else:
            module = name[: -len(".weight")]
            out[name] = dequant_8bit_reference(tensors[name], tensors[module + ".SCB"], int8_dtype)
            drop.update({module + ".SCB", module + ".weight_format"})
    for key, value in tensors.items():
        if key not in out and key not in drop:
            out[key] = value
    return out


def bnb_dequantize_4bit(tensors: Mapping[str, torch.Tensor], weight_name: str) -> torch.Tensor:
    """bitsandbytes' own CPU dequantization of a saved 4-bit weight (``QuantState.from_dict`` + ``dequantize_4bit``).

    Wrong on CPUs with AVX-512 when the last dim is a multiple of 16 but not of the blocksize (row-blocked kernel,
    see ``emulate_bnb_avx512_dequant``); right on AVX2-only CPUs. FP4 code 8 comes back as -0.0 (native kernel)
    where the saved quant_map holds +0.0.
    """
    import bitsandbytes.functional as bnbf

    stats = {k: v for k, v in tensors.items() if k.startswith(weight_name + ".")}
    state = bnbf.QuantState.from_dict(stats, device=torch.device("cpu"))
    return bnbf.dequantize_4bit(tensors[weight_name], state)


def emulate_bnb_avx512_dequant(
    packed: torch.Tensor, scales_f32: torch.Tensor, quant_map: torch.Tensor, *, blocksize: int, shape: Sequence[int], dtype: torch.dtype
) -> torch.Tensor:
    """What bitsandbytes 0.50.2's AVX-512 CPU kernel computes (used when ``has_avx512f()`` and ``shape[-1] % 16 == 0``).

    It assumes blocks never cross rows: element (r, c) gets ``scales[r * (cols // blocksize) + c // blocksize]``
    (cols // blocksize rounds down), right only when cols % blocksize == 0. For documenting the bug; never an oracle.
    """
    rows, cols = math.prod(shape[:-1]), shape[-1]
    data = packed.contiguous().reshape(-1).view(torch.uint8)
    codes = torch.stack([data >> 4, data & 0x0F], dim=1).reshape(-1)[: rows * cols].long().reshape(rows, cols)
    idx = torch.arange(rows)[:, None] * (cols // blocksize) + torch.arange(cols)[None, :] // blocksize
    idx = idx.clamp_max(scales_f32.numel() - 1)  # the kernel reads past the end; clamp instead
    return (quant_map.float()[codes] * scales_f32.float()[idx]).reshape(tuple(shape)).to(dtype)


def bnb_cpu_dequant_matches_reference(shape: Sequence[int] = (64, 176), blocksize: int = 64) -> bool:
    """Whether this machine's bitsandbytes CPU 4-bit dequantization agrees with the flat-block formula for ``shape``.

    False on AVX-512 CPUs for shapes like the default (64, 176) at blocksize 64 (the fixture's ``down_proj``). Tests that use transformers'
    ``model.dequantize()`` as the oracle on such shapes can skip on False, or use ``peft_merge_4bit(dequantizer="reference")``.
    """
    import bitsandbytes.functional as bnbf

    w = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    got = bnbf.dequantize_4bit(packed, state)
    ref = dequant_4bit_reference(packed, state.absmax, state.code, blocksize=blocksize, shape=shape, dtype=torch.bfloat16)
    return torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------------------------
# Adapters and the PEFT oracle
# ---------------------------------------------------------------------------------------------------------------


def make_lora_4bit(
    base4: Path, path: Path, *, adapter_dtype: torch.dtype = torch.float32, seed: int = 1, prepare: bool = True, **lora: Any
) -> Path:
    """A LoRA adapter made the QLoRA way: on the 4-bit model, random non-zero A and B, ``save_pretrained``.

    Loads ``base4`` (a pre-quantized checkpoint) on CPU, optionally ``prepare_model_for_kbit_training`` (what QLoRA
    scripts call), ``get_peft_model`` with ``LoraConfig(**lora)`` (defaults: all 7 Llama linears, r=8, alpha=16),
    fills every ``lora_*`` parameter with ``randn * 0.1`` after ``torch.manual_seed(seed)``. The saved adapter has the
    same keys, shapes and dtype as one made on the bf16 base (``tests.conftest.make_lora``); with the same seed and
    settings even the same values.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from tests.conftest import random_lora

    _quiet()
    model = AutoModelForCausalLM.from_pretrained(base4, device_map="cpu")
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_model = random_lora(model, seed, **lora)
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(adapter_dtype)
    peft_model.save_pretrained(path)
    return path


def write_dequantized_checkpoint(base: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """``load_dequantized_reference(base)`` saved as an ordinary (unquantized) checkpoint folder ``out``.

    config.json loses ``quantization_config`` and gets ``dtype`` (the dtype of the dequantized weights);
    generation_config.json is copied. One ``model.safetensors``.
    """
    from safetensors.torch import save_file

    tensors = load_dequantized_reference(base, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((base / "config.json").read_text())
    config.pop("quantization_config", None)
    weight_dtypes = {str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if k.endswith("proj.weight")}
    if len(weight_dtypes) == 1:
        config["dtype"] = weight_dtypes.pop()
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if (base / "generation_config.json").exists():
        shutil.copy(base / "generation_config.json", out / "generation_config.json")
    return out


def peft_merge_4bit(
    base4: Path,
    adapter: Path,
    out: Path,
    *,
    dequantizer: Literal["transformers", "reference"] = "transformers",
    dtype: torch.dtype | None = None,
    check: bool = True,
) -> Path:
    """The oracle for a quantized base (4-bit or 8-bit): dequantize, PEFT ``merge_and_unload``, ``save_pretrained``.

    ``dequantizer="transformers"``: ``AutoModelForCausalLM.from_pretrained(base4, device_map="cpu").dequantize(dtype)``.
    Works on CPU in transformers 5.24, 4-bit and 8-bit, as long as ``dtype`` is a ``torch.dtype`` or None (a string
    such as "bfloat16" crashes: ``Invalid device string``). dtype None -> ``model.config.dtype`` (bf16 here, also the
    quant-state JSON dtype): the whole dequantized model is bf16. It relies on bitsandbytes' CPU kernel, which is
    wrong on AVX-512 machines for shapes whose last dim is a multiple of 16 but not of the blocksize -- the default
    64x176 ``down_proj`` at blocksize 64 is one. With ``check`` the dequantized weights are compared with
    ``load_dequantized_reference`` first and a RuntimeError says so instead of handing back a wrong oracle.
    ``dequantizer="reference"``: the base is dequantized with ``load_dequantized_reference`` (right for every shape),
    written as a plain checkpoint in a temp folder, then merged like ``tests.conftest.peft_merge``.
    Either way the output is an ordinary 16-bit checkpoint whose config.json has no ``quantization_config``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _quiet()
    if dequantizer == "reference":
        with tempfile.TemporaryDirectory(prefix="dequantized-") as tmp:
            plain = write_dequantized_checkpoint(base4, Path(tmp) / "base", dtype)
            model = AutoModelForCausalLM.from_pretrained(plain, dtype=dtype or "auto")
            PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
        return out
    model = AutoModelForCausalLM.from_pretrained(base4, device_map="cpu")
    model = model.dequantize(dtype=dtype)
    if check:
        kinds = quantized_weight_names(_read_folder(base4))
        ref = load_dequantized_reference(base4, torch.float32 if "8bit" in kinds.values() else None)
        state = model.state_dict()
        wrong = [k for k in kinds if not torch.equal(state[k], ref[k].to(state[k].dtype))]
        if wrong:
            raise RuntimeError(
                f"model.dequantize() disagrees with the reference dequantizer on {wrong} (bitsandbytes' AVX-512 CPU kernel "
                "mis-indexes blocks when the last dim is not a multiple of the blocksize); use dequantizer='reference'"
            )
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _read_folder(path: Path) -> dict[str, torch.Tensor]:
    from tests.conftest import load_folder

    return load_folder(path)


def _config_dtype(path: Path) -> torch.dtype:
    config = json.loads((path / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    dtype = getattr(torch, str(name).removeprefix("torch."))
    assert isinstance(dtype, torch.dtype)
    return dtype


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor as an integer tensor (so -0.0 != +0.0 and NaNs compare by payload)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (stricter than ``torch.equal``, which treats -0.0 and +0.0 as equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# ---------------------------------------------------------------------------------------------------------------
# Self-test: python -m tests.quantized_fixtures   (from the repository root)
# ---------------------------------------------------------------------------------------------------------------


def _selftest(root: Path) -> None:
    import bitsandbytes.functional as bnbf
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from tests.conftest import load_folder, lora_factors, make_llama, make_lora

    def say(*args: object) -> None:
        print(*args, flush=True)

    # 1. formula vs bitsandbytes on many shapes (this machine's kernel), nf4/fp4 x double quant, 3 dtypes
    say("== 1. dequant_4bit_reference vs bitsandbytes.functional.dequantize_4bit (CPU, random weights)")
    say(f"   CPU capability {torch.backends.cpu.get_cpu_capability()}, avx512bf16 {bnbf.has_avx512bf16()}")
    gen = torch.Generator().manual_seed(0)
    counts = {"bit-exact": 0, "equal up to sign of zero": 0, "different": 0}
    for shape in [(64, 64), (64, 128), (96, 192), (64, 176), (176, 64), (128, 96), (7, 33), (3, 5), (2, 4096)]:
        for blocksize in (32, 64, 128, 256):
            for quant_type in ("nf4", "fp4"):
                for dq in (False, True):
                    for dt in (torch.bfloat16, torch.float16, torch.float32):
                        w = torch.randn(shape, generator=gen).to(dt)
                        packed, st = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=dq)
                        got = bnbf.dequantize_4bit(packed, st)
                        ref = dequant_4bit_reference(
                            packed,
                            st.absmax,
                            st.code,
                            blocksize=blocksize,
                            shape=shape,
                            dtype=dt,
                            nested_absmax=st.state2.absmax if dq else None,
                            nested_quant_map=st.state2.code if dq else None,
                            nested_offset=float(st.offset.item()) if dq else None,
                        )
                        if bit_equal(got, ref):
                            counts["bit-exact"] += 1
                        elif torch.equal(got, ref):
                            counts["equal up to sign of zero"] += 1
                            assert quant_type == "fp4"
                        else:
                            counts["different"] += 1
                            err = (got.float() - ref.float()).abs().max().item()
                            say(f"   DIFF {shape} bs{blocksize} {quant_type} dq={dq} {dt}: max |bnb - ref| {err}")
    say("  ", counts)

    # 2. the AVX-512 kernel's row-blocked indexing, emulated, on the FORMATS example (96, 192) at blocksize 128
    say("== 2. emulated AVX-512 kernel (row-blocked scales) on shapes with cols % blocksize != 0")
    for shape, blocksize in [((96, 192), 128), ((64, 176), 64), ((176, 64), 128), ((64, 176), 128)]:
        w = torch.randn(shape, generator=gen).to(torch.bfloat16)
        packed, st = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
        ref = dequant_4bit_reference(packed, st.absmax, st.code, blocksize=blocksize, shape=shape, dtype=torch.bfloat16)
        emu = emulate_bnb_avx512_dequant(packed, st.absmax, st.code, blocksize=blocksize, shape=shape, dtype=torch.bfloat16)
        kernel_used = shape[-1] % 16 == 0 and blocksize >= 16
        say(
            f"   {shape} bs{blocksize}: |ref - w| max {(ref.float() - w.float()).abs().max():.4f}; "
            f"emulated AVX-512 |emu - w| max {(emu.float() - w.float()).abs().max():.4f}, "
            f"{int((emu != ref).sum())}/{ref.numel()} elements differ (AVX-512 path taken: {kernel_used})"
        )
    say(f"   bnb_cpu_dequant_matches_reference() on this machine: {bnb_cpu_dequant_matches_reference()}")

    # 3. checkpoints written by transformers, and by our re-quantizer at blocksize 64 -> identical
    say("== 3. make_llama_4bit: transformers' checkpoint vs our re-quantized one")
    plain = make_llama(root / "conftest_llama")
    for quant_type in ("nf4", "fp4"):
        for dq in (False, True):
            for storage in (torch.uint8, torch.bfloat16):
                tag = f"{quant_type}-dq{int(dq)}-{str(storage).removeprefix('torch.')}"
                hf = make_llama_4bit(root / f"hf-{tag}", quant_type=quant_type, double_quant=dq, quant_storage=storage)
                ours = make_llama_4bit(root / f"ours64-{tag}", quant_type=quant_type, double_quant=dq, quant_storage=storage, blocksize=64)
                a, b = load_folder(hf), load_folder(ours)
                assert a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a), tag
                src = load_folder(unquantized_source(hf))
                assert all(bit_equal(src[k], v) for k, v in load_folder(plain).items()), "make_llama_source != conftest.make_llama"
                ref = load_dequantized_reference(hf)
                assert ref.keys() == src.keys(), tag
                names = quantized_weight_names(a)
                for name in names:
                    got = bnb_dequantize_4bit(a, name)
                    assert torch.equal(got, ref[name]), f"{tag} {name}: bnb != reference"
                    bound = _max_quant_error(src[name], a, name)
                    assert (ref[name].float() - src[name].float()).abs().max() <= bound, f"{tag} {name}"
                model = AutoModelForCausalLM.from_pretrained(hf, device_map="cpu").dequantize()
                sd = model.state_dict()
                dtypes = {str(v.dtype) for v in sd.values()}
                assert all(torch.equal(sd[k], ref[k]) for k in ref) and sd.keys() == ref.keys(), tag
                say(
                    f"   {tag}: {len(names)} quantized weights; ours@64 bit-identical to transformers'; model.dequantize() == reference; dtypes {dtypes}"
                )

    # 4. other blocksizes, and a sharded checkpoint whose weight/statistics sit in different shards
    say("== 4. blocksizes transformers cannot choose, loaded back by transformers")
    for blocksize, dq, extra in [
        (128, True, {}),
        (32, False, {}),
        (256, True, {"intermediate_size": 200}),
        (4096, True, {}),
        (128, True, {"shard": "20KB"}),
    ]:
        p = make_llama_4bit(root / f"bs{blocksize}-{len(extra)}", double_quant=dq, blocksize=blocksize, **extra)  # type: ignore[arg-type]
        t = load_folder(p)
        ref = load_dequantized_reference(p)
        src = load_folder(unquantized_source(p))
        model = AutoModelForCausalLM.from_pretrained(p, device_map="cpu")
        assert model.model.layers[0].mlp.down_proj.weight.quant_state.blocksize == blocksize
        sd = model.dequantize().state_dict()
        ok = all(torch.equal(sd[k], ref[k]) for k in ref)
        worst = max(
            (ref[k].float() - src[k].float()).abs().max().item() / _max_quant_error(src[k], t, k) for k in quantized_weight_names(t)
        )
        say(
            f"   bs{blocksize} dq={dq} {extra}: down_proj absmax {tuple(t['model.layers.0.mlp.down_proj.weight.absmax'].shape)}, "
            f"model.dequantize() == reference: {ok}, worst error / bound {worst:.3f}"
        )
        assert ok and worst <= 1.0

    # 5. 8-bit
    say("== 5. make_llama_8bit")
    p8 = make_llama_8bit(root / "int8")
    t8 = load_folder(p8)
    src8 = load_folder(unquantized_source(p8))
    ref8 = load_dequantized_reference(p8, torch.float32)
    assert ref8.keys() == src8.keys()
    for name in quantized_weight_names(t8):
        module = name.removesuffix(".weight")
        assert bit_equal(ref8[name], bnbf.int8_vectorwise_dequant(t8[name], t8[module + ".SCB"]))
        assert int(t8[module + ".weight_format"]) == 0
        assert torch.equal(t8[module + ".SCB"], src8[name].float().abs().amax(dim=1))
    rel = max(((ref8[k] - src8[k].float()).norm() / src8[k].float().norm()).item() for k in quantized_weight_names(t8))
    say(f"   reference == int8_vectorwise_dequant bit for bit; SCB == row absmax of the source; worst relative error {rel:.4f}")
    sd8 = AutoModelForCausalLM.from_pretrained(p8, device_map="cpu").dequantize().state_dict()
    assert all(torch.equal(sd8[k], ref8[k].to(sd8[k].dtype)) for k in quantized_weight_names(t8))
    say(f"   model.dequantize() on 8-bit works on CPU: dtypes {sorted({str(v.dtype) for v in sd8.values()})}, == reference rounded once")
    for q, folder in (("8-bit", p8), ("4-bit", root / "hf-nf4-dq1-uint8")):
        try:
            AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").dequantize("bfloat16")
            say(f"   {q} model.dequantize('bfloat16'): works")
        except RuntimeError as exc:
            say(f"   {q} model.dequantize('bfloat16') (a string dtype): RuntimeError: {exc}")

    # 6. adapters and the oracle
    say("== 6. QLoRA adapter and peft_merge_4bit")
    base4 = root / "hf-nf4-dq1-uint8"
    qlora = make_lora_4bit(base4, root / "qlora")
    plain_lora = make_lora(unquantized_source(base4), root / "plain_lora")
    qa, pa = load_folder(qlora), load_folder(plain_lora)
    assert qa.keys() == pa.keys() and all(qa[k].dtype == pa[k].dtype and qa[k].shape == pa[k].shape for k in qa)
    say(f"   QLoRA adapter keys/dtypes/shapes == bf16-base adapter's; values identical: {all(torch.equal(qa[k], pa[k]) for k in qa)}")
    merged_t = peft_merge_4bit(base4, qlora, root / "merged_t")
    merged_r = peft_merge_4bit(base4, qlora, root / "merged_r", dequantizer="reference")
    mt, mr = load_folder(merged_t), load_folder(merged_r)
    cfg = json.loads((merged_t / "config.json").read_text())
    assert mt.keys() == mr.keys() and all(bit_equal(mt[k], mr[k]) for k in mt)
    ref = load_dequantized_reference(base4)
    factors = lora_factors(qlora)
    identical = []
    for module, (a_, b_) in factors.items():
        name = module + ".weight"
        exact = (ref[name].double() + 2.0 * (b_.double() @ a_.double())).to(torch.bfloat16)
        identical.append(float((mt[name] == exact).double().mean()))
    say(
        f"   merged dtypes {sorted({str(v.dtype) for v in mt.values()})}, 'quantization_config' in config: {'quantization_config' in cfg}, "
        f"config dtype {cfg.get('dtype')}; transformers == reference dequantizer bit for bit; "
        f"identical to float64 W+s*BA rounded once: min {min(identical):.5%}"
    )
    lora8 = make_lora(unquantized_source(p8), root / "lora8")
    m8t = load_folder(peft_merge_4bit(p8, lora8, root / "merged8t"))
    m8r = load_folder(peft_merge_4bit(p8, lora8, root / "merged8r", dequantizer="reference"))
    assert m8t.keys() == m8r.keys() and all(bit_equal(m8t[k], m8r[k]) for k in m8t)
    say(f"   8-bit: merge through model.dequantize() == through the reference dequantizer, bit for bit ({len(m8t)} tensors)")

    # 7. what a checkpoint looks like
    say("== 7. layout of model.layers.0.mlp.down_proj in a few checkpoints")
    for folder in ("hf-nf4-dq1-uint8", "hf-nf4-dq0-uint8", "hf-fp4-dq1-bfloat16", "bs128-0", "int8"):
        say(f"   {folder}: quantization_config = {json.loads((root / folder / 'config.json').read_text()).get('quantization_config')}")
        for file in sorted((root / folder).glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if key.startswith("model.layers.0.mlp.down_proj."):
                        tensor = f.get_tensor(key)
                        extra = f" {tensor.numpy().tobytes().decode()}" if ".quant_state." in key else ""
                        say(f"      {key:62s} {tensor.dtype!s:15s} {tuple(tensor.shape)}{extra}")


def _max_quant_error(source: torch.Tensor, tensors: Mapping[str, torch.Tensor], name: str) -> float:
    """A loose bound on |dequantized - source| for 4-bit weight ``name`` (a sanity check, not a spec).

    Half the widest gap of the code table times the largest |source| value, plus, with double quant, half the widest
    gap of the nested table times the largest nested scale (error of a block scale), plus bf16 rounding.
    """
    code = tensors[f"{name}.quant_map"].float().sort().values
    absmax = source.float().abs().max().item()
    scale_err = 0.0
    if f"{name}.nested_absmax" in tensors:
        nested = tensors[f"{name}.nested_quant_map"].float().sort().values
        scale_err = float((nested[1:] - nested[:-1]).max()) / 2 * float(tensors[f"{name}.nested_absmax"].abs().max())
    return (float((code[1:] - code[:-1]).max()) / 2 * absmax + scale_err + (absmax + scale_err) * 2.0**-8) * 1.01


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="quantized-fixtures-") as tmp:
        _selftest(Path(tmp))
    print("quantized_fixtures self-test: OK")
