"""``plan()``: base + adapters in, a :class:`~streammerge.plan.model.Plan` out, from headers alone.

The steps, each in its own module: open the checkpoint and adapters (:mod:`streammerge.formats`),
map adapter tensors onto base tensors (:mod:`.mapping`), choose what quantized weights become
(:mod:`.quant`), make one unit per output tensor and lay them out in shards (:mod:`.layout`),
estimate the run (:mod:`.estimate`), shrinking tiles until the estimate fits the budgets.
"""

from __future__ import annotations

import importlib.util
import math
import os

from streammerge.errors import BadCheckpoint, BudgetTooSmall, StreamMergeError
from streammerge.formats.bnb import Quant4bit
from streammerge.formats.checkpoint import CONFIG_NAME, INDEX_NAME, SINGLE_NAME, Checkpoint, is_quantized, open_checkpoint
from streammerge.formats.fp8 import FP8_METHODS, FP8Weight
from streammerge.formats.mxfp4 import MXFP4_METHOD, MXFP4Weight
from streammerge.formats.peft import CONFIG_NAME as ADAPTER_CONFIG
from streammerge.formats.peft import WEIGHTS_NAME as ADAPTER_WEIGHTS_NAME
from streammerge.formats.peft import Adapter, open_adapter
from streammerge.formats.quantized import find_quantized, stored
from streammerge.formats.safetensors import TensorInfo
from streammerge.geometry import WRITE_BUFFERS
from streammerge.hub import resolve
from streammerge.plan.estimate import estimate_run
from streammerge.plan.gguf import OUTTYPE_CHOICES, GGUFOptions, check_gguf_output, gguf_layout
from streammerge.plan.layout import adapter_files, check_output, files_to_copy, fingerprints, layout_shards, make_unit, output_config
from streammerge.plan.mapping import BaseUpdate, adapter_tensors, map_updates
from streammerge.plan.model import MODES, PLAN_VERSION, Plan, Shard, WorkUnit
from streammerge.plan.quant import (
    fp8_notes,
    fp8_requant_choices,
    logical_view,
    mxfp4_notes,
    mxfp4_requant_choices,
    quantized_default_dtype,
    quantized_notes,
    requant_choices,
    requant_config,
)
from streammerge.plan.resolve import Names
from streammerge.sizes import format_bytes, parse_dtype, parse_size

DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
DEFAULT_TILE_BYTES = 64 * 2**20
MIN_TILE_BYTES = 64 * 2**10
COMBINATIONS = ("cat", "linear")


def _fused_in_memory(ckpt: Checkpoint) -> frozenset[str]:
    """Checkpoint tensors that transformers stacks into 3-D parameters (MoE experts): not linear layers,
    so ``merged_4bit`` leaves them 16-bit as transformers' own 4-bit loading does."""
    if not any(".experts." in name for name in ckpt.tensors):
        return frozenset()
    naming = Names(ckpt).naming
    params = naming.params.values() if naming else ()
    return frozenset(piece.tensor for p in params if len(p.shape) == 3 for piece in p.pieces)


def plan(
    base: str | os.PathLike[str],
    adapters: str | os.PathLike[str] | list[str] | list[os.PathLike[str]] | tuple[str, ...],
    out: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    max_shard_size: int | str | None = None,
    tile_size: int | str = DEFAULT_TILE_BYTES,
    device: str = "auto",
    overwrite: bool = False,
    mode: str = "merged_16bit",
    weights: list[float] | tuple[float, ...] | None = None,
    combination: str = "cat",
    max_ram: int | str | None = None,
    vram_budget: int | str | None = None,
    format: str = "auto",
    outtype: str = "auto",
    gguf_pre: str | None = None,
) -> Plan:
    """Plan merging LoRA ``adapters`` into the safetensors model ``base``, writing to ``out``.

    Reads headers and JSON only. ``dtype`` is "auto" (keep each tensor's dtype; for a quantized
    base its compute dtype) or one of bfloat16/bf16, float16/fp16, float32/fp32; sizes accept ints
    or strings like "5GB", "512MiB". ``mode`` is one of :data:`MODES`. Several adapters are
    combined with ``weights`` (default 1 each): ``combination="cat"`` adds ``sum_i w_i s_i B_i @ A_i``
    (PEFT's ``add_weighted_adapter(..., combination_type="cat")``, exact, any ranks);
    ``"linear"`` reproduces PEFT's ``linear`` (weighted sums of the A's and of the B's, equal ranks).
    ``max_ram`` / ``vram_budget`` shrink the tiles until the estimate fits, or refuse with
    :class:`BudgetTooSmall` when even the smallest tiles do not.

    ``format`` "gguf" (or "auto" with an ``out`` ending in ``.gguf``) writes the file ``out`` as
    llama.cpp's convert_hf_to_gguf.py would convert the merged model: ``outtype`` bf16, f16, q8_0,
    f32 or auto; ``gguf_pre`` names the pre-tokenizer of a tokenizer.json BPE vocabulary;
    ``max_shard_size`` (default: one file) splits it as gguf-split does. ``max_shard_size`` for
    safetensors defaults to 5GB.

    Example::

        p = streammerge.plan("./base", ["./my-lora"], out="./merged", dtype="bfloat16")
        print(p.estimate.peak_host_bytes, p.estimate.output_bytes)
        p.save("plan.json")
    """
    out_dtype = parse_dtype(dtype)
    as_gguf = _wants_gguf(format, out, mode, out_dtype, outtype, gguf_pre)
    default_shard = 0 if as_gguf else DEFAULT_MAX_SHARD_BYTES
    max_shard_bytes = default_shard if max_shard_size is None else parse_size(max_shard_size, "max shard size")
    tile_bytes = parse_size(tile_size, "tile size")
    if device not in ("auto", "cpu", "cuda"):
        raise StreamMergeError(f"device must be auto, cpu or cuda, not {device!r}")
    if mode not in MODES:
        raise StreamMergeError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [os.fspath(adapters)]
    if not adapters:
        raise StreamMergeError("give at least one adapter folder")
    base = resolve(base, "model")
    adapters = [resolve(a, "adapter") for a in adapters]
    ckpt = _open_base(os.fspath(base), [os.fspath(a) for a in adapters])
    method = is_quantized(ckpt)
    if method not in (None, "bitsandbytes", "bitsandbytes 4-bit", "bitsandbytes 8-bit", MXFP4_METHOD, *FP8_METHODS):
        raise BadCheckpoint(
            f"{ckpt.root}: base is quantized with {method}; streammerge reads bitsandbytes 4/8-bit, FP8 (fp8, compressed-tensors), "
            "MXFP4 (gpt-oss) and unquantized bases"
        )
    model_dtype = quantized_default_dtype({k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}, {})
    quantized = find_quantized(ckpt.tensors, ckpt.config, model_dtype, ckpt.root)
    fp8 = {n: q for n, q in quantized.items() if isinstance(q, FP8Weight)}
    if method == MXFP4_METHOD and not any(isinstance(q, MXFP4Weight) for q in quantized.values()):
        raise BadCheckpoint(
            f"{ckpt.root}: config.json says mxfp4 but no tensor is MXFP4 blocks (*_blocks with *_scales); checkpoint incomplete?"
        )
    if method in FP8_METHODS and not fp8:
        raise BadCheckpoint(f"{ckpt.root}: config.json says {method} but no weight has FP8 scales beside it; checkpoint incomplete?")
    if mode == "merged_fp8" and not fp8:
        raise StreamMergeError(f"{ckpt.root}: --mode merged_fp8 re-quantizes an FP8 base into its own format; this base has no FP8 weights")
    if mode == "merged_mxfp4" and not any(isinstance(q, MXFP4Weight) for q in quantized.values()):
        raise StreamMergeError(
            f"{ckpt.root}: --mode merged_mxfp4 re-quantizes an MXFP4 base (gpt-oss experts) into its own format; "
            "this base has no MXFP4 weights"
        )
    if out_dtype == "auto" and (quantized or mode == "merged_4bit") and mode != "lora":
        out_dtype = quantized_default_dtype(ckpt.config, quantized)
    raw_tensors = ckpt.tensors
    ckpt = logical_view(ckpt, quantized)
    opened = [_open_adapter(a, os.fspath(base)) for a in adapters]
    out_path = os.path.abspath(os.fspath(out))
    check_output(out_path, [ckpt.root, *(a.root for a in opened)], overwrite)

    adapter_weights = _check_weights(weights, len(opened))
    repeated = _repeated_adapters(opened)
    if repeated and weights is None:
        raise StreamMergeError(
            f"{repeated[0]}: this adapter is given more than once and would be merged once per mention; "
            "give it once, or pass --weights to mean it"
        )
    if combination not in COMBINATIONS:
        raise StreamMergeError(f"combination must be one of {', '.join(COMBINATIONS)}, not {combination!r}")
    updates = map_updates(ckpt, opened, adapter_weights, combination)
    notes = [f"{len(ckpt.ignored)} tensors stored in shards but absent from the index are not written (the index is authoritative)"] * bool(
        ckpt.ignored
    )
    notes += updates.notes
    notes += [f"adapter {root} is given more than once: each time with its own weight, as --weights says" for root in repeated]
    if mode == "lora" and len(opened) > 1:
        raise StreamMergeError("--mode lora writes one adapter; give exactly one")
    requant = requant_choices(ckpt, quantized, out_dtype, _fused_in_memory(ckpt)) if mode == "merged_4bit" else {}
    if mode == "merged_fp8":
        requant = fp8_requant_choices(quantized, ckpt.config)
    if mode == "merged_mxfp4":
        requant = mxfp4_requant_choices(quantized)
    # merged_4bit from a 4-bit base (merged_fp8 from an FP8 one, merged_mxfp4 from MXFP4): weights no adapter
    # touches keep their packed bytes and statistics exactly (a dequantize/re-quantize round trip would move
    # ~2% of their values).
    untouched = {
        n: q
        for n, q in quantized.items()
        if isinstance(q, (Quant4bit, FP8Weight, MXFP4Weight)) and n in requant and n not in updates.by_name
    }
    for name in untouched:
        del requant[name]

    def raw_copies(t: TensorInfo) -> list[TensorInfo]:
        q = untouched[t.name]
        return [raw_tensors[stored(q).name], *sorted(q.companions(), key=lambda c: c.name)]

    def kept_activation_scales(t: TensorInfo) -> list[TensorInfo]:
        """merged_fp8: a re-quantized weight's static activation scales, copied as they are."""
        q = quantized.get(t.name)
        return list(q.activation) if isinstance(q, FP8Weight) and t.name in requant else []

    if mode == "merged_4bit" and requant and importlib.util.find_spec("bitsandbytes") is None:
        raise StreamMergeError("--mode merged_4bit quantizes with bitsandbytes, which is not installed: pip install 'streammerge[quant]'")

    def lay_out(tile: int) -> tuple[list[WorkUnit], list[Shard]]:
        if mode == "lora":
            specs = [make_unit(t, BaseUpdate(), out_dtype, tile) for t in adapter_tensors(opened[0])]
            return layout_shards(specs, max_shard_bytes, single_name=ADAPTER_WEIGHTS_NAME)
        specs = []
        for t in [*ckpt.ordered(), *updates.extra_tensors]:
            if t.name in untouched:
                specs += [make_unit(raw, BaseUpdate(), "auto", tile) for raw in raw_copies(t)]
            else:
                update = updates.by_name.get(t.name, BaseUpdate())
                specs.append(make_unit(t, update, out_dtype, tile, quantized.get(t.name), requant.get(t.name), combination))
                specs += [make_unit(a, BaseUpdate(), "auto", tile) for a in kept_activation_scales(t)]
        if as_gguf:
            placed, gguf_shards, gguf_notes[:] = gguf_layout(
                specs, config, GGUFOptions(outtype, gguf_pre), out_path, max_shard_bytes, tile, ckpt.root, copy_files
            )
            return placed, gguf_shards
        return layout_shards(specs, max_shard_bytes)

    gguf_notes: list[str] = []

    if mode == "lora":
        copy_files, config = adapter_files(opened[0].root), None
    else:
        copy_files = files_to_copy(ckpt.root, [a.root for a in opened])
        quantization = None
        if mode in ("merged_fp8", "merged_mxfp4"):
            quantization = (ckpt.config or {}).get("quantization_config")
        elif requant or untouched:
            quantization = requant_config(ckpt.config, quantized, out_dtype)
        config = output_config(ckpt.config, out_dtype, quantization)
        if config is not None:
            config.update(updates.config_edits)
    # Tiles shrink (halving) until the estimate fits --max-ram / --vram-budget.
    ram_budget = None if max_ram is None else parse_size(max_ram, "max RAM")
    vram = None if vram_budget is None else parse_size(vram_budget, "VRAM budget")
    while True:
        units, shards = lay_out(tile_bytes)
        estimate = estimate_run(units, shards, copy_files, config, tile_bytes, device, updates.imported_transformers)
        over_ram = ram_budget is not None and estimate.peak_host_bytes > ram_budget
        over_vram = vram is not None and estimate.peak_device_bytes > vram
        if not (over_ram or over_vram):
            break
        if tile_bytes <= MIN_TILE_BYTES:
            what, need, have = ("RAM", estimate.peak_host_bytes, ram_budget) if over_ram else ("VRAM", estimate.peak_device_bytes, vram)
            raise BudgetTooSmall(
                f"{ckpt.root}: needs at least {format_bytes(need)} of {what} even with {format_bytes(MIN_TILE_BYTES)} tiles "
                f"(largest unit {estimate.largest_unit}); the budget is {format_bytes(have or 0)}. Raise the budget."
            )
        tile_bytes = max(MIN_TILE_BYTES, tile_bytes // 2)
    if mode != "lora":
        notes += quantized_notes(quantized, any(u.op == "merge" and u.quant for u in units), units)
        dora = [u for u in units if u.magnitude is not None]
        if dora:
            notes.append(
                f"DoRA on {len(dora)} weights: each row's norm is taken within its tile (tiles hold whole rows), "
                "so one pass suffices; the magnitudes add "
                f"{sum(u.rows * 16 for u in dora) >> 10} KiB"
            )
        if requant and mode == "merged_fp8":
            notes += fp8_notes(requant)
        elif requant and mode == "merged_mxfp4":
            notes += mxfp4_notes(requant)
        elif requant:
            notes.append(f"{len(requant)} weights are re-quantized to 4 bit ({next(iter(requant.values())).quant_type}) after merging")
        if untouched:
            kind = {
                "merged_fp8": "FP8 weights no adapter touches are copied with their scales",
                "merged_mxfp4": "MXFP4 expert weights no adapter touches are copied with their scales",
            }.get(mode, "4-bit weights no adapter touches are copied packed")
            notes.append(f"{len(untouched)} {kind}, bit for bit")
    inputs = fingerprints(ckpt, opened, copy_files)
    if as_gguf:  # the tokenizer files are inputs of the header (fingerprinted), not copied
        check_gguf_output(out_path, [s.file for s in shards], overwrite)
        notes += gguf_notes
        copy_files, config = [], None
    return Plan(
        version=PLAN_VERSION,
        base=ckpt.root,
        adapters=tuple(a.root for a in opened),
        out=out_path,
        dtype=out_dtype,
        device=device,
        overwrite=overwrite,
        mode=mode,
        flavours=tuple(a.flavours for a in opened),
        weights=tuple(adapter_weights),
        combination=combination,
        max_shard_bytes=max_shard_bytes,
        write_buffers=WRITE_BUFFERS,
        units=tuple(units),
        shards=tuple(shards),
        copy_files=tuple(copy_files),
        config=config,
        inputs=inputs,
        estimate=estimate,
        notes=tuple(notes),
        changes=updates.changes,
        format="gguf" if as_gguf else "safetensors",
    )


def _wants_gguf(format: str, out: str | os.PathLike[str], mode: str, out_dtype: str, outtype: str, pre: str | None) -> bool:
    """Whether the output is GGUF (``--format gguf``, or a ``.gguf`` output with the default ``--format auto``);
    refuses GGUF options for safetensors output and options GGUF output cannot honour."""
    if format not in ("auto", "safetensors", "gguf"):
        raise StreamMergeError(f"format must be auto, safetensors or gguf, not {format!r}")
    as_gguf = format == "gguf" or (format == "auto" and os.fspath(out).endswith(".gguf"))
    if not as_gguf:
        if outtype != "auto" or pre:
            raise StreamMergeError("--outtype and --gguf-pre are for GGUF output (-o MODEL.gguf or --format gguf)")
        return False
    if mode != "merged_16bit":
        raise StreamMergeError(f"GGUF output is converted from the 16-bit merge; --mode {mode} is for safetensors output")
    if out_dtype != "auto":
        raise StreamMergeError("GGUF output merges in the model's dtype and converts as --outtype says; drop --dtype")
    if outtype not in OUTTYPE_CHOICES:
        raise StreamMergeError(f"outtype must be one of {', '.join(OUTTYPE_CHOICES)}, not {outtype!r}")
    return True


def _open_base(base: str, adapters: list[str]) -> Checkpoint:
    """The base checkpoint, with a hint when BASE and ADAPTER look swapped."""
    try:
        return open_checkpoint(base)
    except BadCheckpoint as e:
        if os.path.isfile(os.path.join(base, ADAPTER_CONFIG)):
            swapped = " (did you swap BASE and ADAPTER? the base comes first)" if adapters and _looks_like_model(adapters[0]) else ""
            raise BadCheckpoint(f"{base}: is a LoRA adapter folder (it has {ADAPTER_CONFIG}), not a base model{swapped}") from e
        raise


def _open_adapter(path: str, base: str) -> Adapter:
    try:
        return open_adapter(path)
    except StreamMergeError as e:
        if _looks_like_model(path) and not os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            raise type(e)(f"{e} ({path} looks like a model, not an adapter: did you swap BASE and ADAPTER? the base comes first)") from e
        raise


def _looks_like_model(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and any(os.path.isfile(os.path.join(path, n)) for n in (SINGLE_NAME, INDEX_NAME))


def _repeated_adapters(opened: list[Adapter]) -> list[str]:
    """Adapters given more than once (by real path), in order."""
    seen: dict[str, int] = {}
    for a in opened:
        key = os.path.realpath(a.root)
        seen[key] = seen.get(key, 0) + 1
    return [root for root, n in seen.items() if n > 1]


def _check_weights(weights: list[float] | tuple[float, ...] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    values = list(weights)
    if len(values) != count or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in values):
        raise StreamMergeError(f"give one finite weight per adapter: {count} adapters, weights {values}")
    return [float(w) for w in values]
