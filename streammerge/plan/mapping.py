"""Adapter to base: which base tensor each adapter tensor changes, and how.

Maps PEFT's module names onto the checkpoint's tensor names, checks every shape, and collects
per base tensor the LoRA terms, replacements (modules_to_save, trained biases), DoRA magnitudes
and added vectors, plus the config edits that follow (tied embeddings, a resized vocabulary).
This is where architecture-specific naming lives. Pure functions of headers and configs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from streammerge.errors import AdapterMismatch, UnsupportedAdapter
from streammerge.formats.checkpoint import Checkpoint
from streammerge.formats.peft import PEFT_PREFIX, Adapter, LoraPair, TokenRows
from streammerge.formats.safetensors import FLOAT_DTYPES, Source, TensorInfo
from streammerge.plan.model import AddTerm, Change, LoraTerm, RowsTerm
from streammerge.plan.naming import Naming
from streammerge.plan.resolve import Names, param_terms


@dataclass(frozen=True)
class BaseUpdate:
    """What the adapters do to one base tensor."""

    terms: tuple[LoraTerm, ...] = ()
    source: TensorInfo | None = None
    """A full tensor saved with an adapter that replaces the base's (modules_to_save, trained bias, saved base layer)."""
    magnitude: Source | None = None
    """DoRA magnitude: rows of W + delta are rescaled to it."""
    adds: tuple[AddTerm, ...] = ()
    """Vectors added times a scale (lora_bias)."""
    token_rows: tuple[RowsTerm, ...] = ()
    """Rows written over the merged weight (trainable tokens)."""


INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
OUTPUT_EMBEDDING = "lm_head.weight"


@dataclass(frozen=True)
class Updates:
    """Everything the adapters change, by base tensor name, plus the config edits that follow."""

    by_name: dict[str, BaseUpdate]
    extra_tensors: tuple[TensorInfo, ...]
    """Tensors the output needs that the base does not store (an untied lm_head)."""
    config_edits: dict[str, Any]
    notes: tuple[str, ...]
    changes: tuple[Change, ...] = ()
    imported_transformers: bool = False
    """Planning imported transformers to name the checkpoint's keys: its memory stays in this process."""
    """Per adapter module, the base tensors it changes (for ``plan`` / ``inspect``)."""


def _input_embedding(ckpt: Checkpoint) -> TensorInfo | None:
    found = [t for name, t in ckpt.tensors.items() if name.endswith(INPUT_EMBEDDING_SUFFIXES) and len(t.shape) == 2]
    return found[0] if len(found) == 1 else None


def map_updates(ckpt: Checkpoint, adapters: list[Adapter], weights: list[float], combination: str, naming: Naming | None = None) -> Updates:
    """Map every adapter tensor to the base tensor it changes, checking shapes.

    Tied embeddings: when the base stores no ``lm_head.weight`` (or says ``tie_word_embeddings``)
    and an adapter changes either side, both tensors are written, each with its own changes, and
    the config unties them: more correct than merging one side's delta into the shared tensor.

    Names the checkpoint does not have are looked up in its in-memory naming (``naming``, else
    worked out on first need: see :mod:`streammerge.plan.naming`).
    """
    embed = _input_embedding(ckpt)
    tied_config = bool((ckpt.config or {}).get("tie_word_embeddings", False))
    virtual_head = None
    if (
        embed is not None
        and OUTPUT_EMBEDDING not in ckpt.tensors
        and (tied_config or ckpt.config is None or "tie_word_embeddings" not in ckpt.config)
    ):
        virtual_head = dataclasses.replace(embed, name=OUTPUT_EMBEDDING)
    lookup = dict(ckpt.tensors)
    if virtual_head is not None:
        lookup[OUTPUT_EMBEDDING] = virtual_head
    view = dataclasses.replace(ckpt, tensors=lookup)
    names = Names(view, naming)

    terms: dict[str, list[LoraTerm]] = {}
    changes: list[Change] = []
    sources: dict[str, TensorInfo] = {}
    magnitudes: dict[str, Source] = {}
    adds: dict[str, list[AddTerm]] = {}
    edits: dict[str, Any] = {}
    for adapter in adapters:  # every replacement first: LoRA shapes are checked against the final tensors
        for name, saved in adapter.replacements.items():
            target = view.tensors.get(name) or names.tensor(name.rsplit(".", 1)[0], name.rsplit(".", 1)[1])
            if target is None:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {saved.name!r} replaces {name!r}, which the base {ckpt.root} does not have"
                )
            if target.name in sources:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {saved.name!r} replaces {target.name!r}, which another adapter replaces too"
                )
            if saved.shape != target.shape:
                resizable = target is virtual_head or target is embed or target.name == OUTPUT_EMBEDDING
                if not (resizable and len(saved.shape) == 2 and saved.shape[1] == target.shape[1]):
                    raise AdapterMismatch(
                        f"{adapter.weights_path}: tensor {saved.name!r} has shape {list(saved.shape)} but base tensor {target.name!r} is {list(target.shape)}"
                    )
                edits["vocab_size"] = saved.shape[0]  # the vocabulary was resized during training
            sources[target.name] = saved
    for index, (adapter, weight) in enumerate(zip(adapters, weights, strict=True)):
        for pair in adapter.pairs:
            if pair.param_depth is not None:
                param, found = param_terms(names, adapter, pair, weight, index)
                for target, term in found:
                    terms.setdefault(target.name, []).append(term)
                changes.append(Change(index, param, tuple(dict.fromkeys(t.name for t, _ in found))))
                continue
            target = names.tensor(pair.module)
            if target is None:
                raise AdapterMismatch(
                    f"{adapter.weights_path}: tensor {pair.a.name!r} adapts {pair.module + '.weight'!r}, which the base {ckpt.root} does not have"
                    f" (looked for {names.looked_for(pair.module)}){_targeting_hint(adapter, pair.module)}"
                )
            changes.append(Change(index, pair.module, (target.name,)))
            shape = sources[target.name].shape if target.name in sources else target.shape
            transpose = pair.embedding or adapter.fan_in_fan_out
            _check_pair_shape(adapter, pair, target, shape, transpose)
            terms.setdefault(target.name, []).append(
                LoraTerm(a=Source.of(pair.a), b=Source.of(pair.b), scale=weight * pair.scale, transpose=transpose, adapter=index)
            )
            if pair.magnitude is not None:
                if transpose:
                    raise UnsupportedAdapter(
                        f"{adapter.weights_path}: tensor {pair.magnitude.name!r}: DoRA on a fan_in_fan_out (Conv1D) layer is not supported"
                    )
                magnitudes[target.name] = Source.of(pair.magnitude)
            if pair.bias is not None:
                bias_name = target.name.removesuffix(".weight") + ".bias"
                bias = view.tensors.get(bias_name)
                if bias is None or bias.shape != pair.bias.shape:
                    raise AdapterMismatch(
                        f"{adapter.weights_path}: tensor {pair.bias.name!r} (lora_bias) needs a base bias {bias_name!r} of {list(pair.bias.shape)}"
                    )
                adds.setdefault(bias_name, []).append(AddTerm(Source.of(pair.bias), weight * pair.scale))
    tokens = _token_rows(ckpt, names, adapters, weights, terms, sources)
    for name in magnitudes:
        if len(terms[name]) > 1:
            raise UnsupportedAdapter(
                f"{ckpt.root}: tensor {name!r} has a DoRA adapter and other adapters; DoRA cannot be combined with them"
            )
    if combination == "linear":
        for name, ts in terms.items():
            if len({t.a.shape[0] for t in ts}) > 1:
                raise AdapterMismatch(
                    f"tensor {name!r}: --combination linear needs equal ranks, found {sorted({t.a.shape[0] for t in ts})}; use cat"
                )

    if "vocab_size" in edits:  # a resized vocabulary must be resized on both sides
        sides = [n for n in (embed.name if embed is not None else None, OUTPUT_EMBEDDING) if n and (n in lookup)]
        rows = {n: (sources[n].shape[0] if n in sources else lookup[n].shape[0]) for n in sides}
        if len(set(rows.values())) > 1:
            raise AdapterMismatch(
                f"{ckpt.root}: the adapters resize the vocabulary to {edits['vocab_size']} but leave "
                + ", ".join(f"{n} at {r} rows" for n, r in rows.items() if r != edits["vocab_size"])
                + "; both embeddings must be saved with the adapter (modules_to_save)"
            )
    changed = set(terms) | set(sources) | set(adds)
    extra: tuple[TensorInfo, ...] = ()
    notes: list[str] = []
    heads = {OUTPUT_EMBEDDING, embed.name if embed is not None else ""}
    if changed & heads and (virtual_head is not None or tied_config):
        edits["tie_word_embeddings"] = False
        notes.append("the adapter changes one side of tied input/output embeddings: both are written and the config unties them")
        if virtual_head is not None:
            extra = (virtual_head,)
    tied_head = virtual_head is not None or tied_config
    if embed is not None and embed.name in tokens and tied_head and changed & heads:
        raise UnsupportedAdapter(
            f"{ckpt.root}: the adapters put trainable tokens on tied embeddings {embed.name!r} and also change "
            f"{sorted(changed & heads)[0]!r} (LoRA or a saved copy); PEFT's result of that mix depends on its wrapping order "
            "and streammerge does not guess it"
        )
    if embed is not None and embed.name in tokens and tied_head and OUTPUT_EMBEDDING in ckpt.tensors:
        # PEFT ties the output layer's tokens to the input's: the same rows go to lm_head wherever it is written
        tokens.setdefault(OUTPUT_EMBEDDING, []).extend(tokens[embed.name])
    for index, adapter in enumerate(adapters):
        for token_rows in adapter.tokens:
            written = [n for n, found in tokens.items() if any(r is token_rows for r, _ in found)]
            changes.append(Change(index, token_rows.module, tuple(sorted(written))))
    touched = set(terms) | set(sources) | set(magnitudes) | set(adds) | set(tokens)
    updates = {
        n: BaseUpdate(
            tuple(terms.get(n, ())), sources.get(n), magnitudes.get(n), tuple(adds.get(n, ())), tuple(r for _, r in tokens.get(n, ()))
        )
        for n in touched
    }
    if names.used is not None:
        notes.append(f"adapter names resolved through the {names.used.source}")
    return Updates(updates, extra, edits, tuple(notes), tuple(changes), names.asked_transformers)


def _token_rows(
    ckpt: Checkpoint,
    names: Names,
    adapters: list[Adapter],
    weights: list[float],
    terms: dict[str, list[LoraTerm]],
    sources: dict[str, TensorInfo],
) -> dict[str, list[tuple[TokenRows, RowsTerm]]]:
    """Base tensor -> the trainable-tokens rows written over it, checked against the base."""
    out: dict[str, list[tuple[TokenRows, RowsTerm]]] = {}
    for adapter, weight in zip(adapters, weights, strict=True):
        for rows in adapter.tokens:
            where = f"{adapter.weights_path}: tensor {rows.delta.name!r}"
            target = names.tensor(rows.module)
            if target is None:
                raise AdapterMismatch(
                    f"{where} (trainable tokens) replaces rows of {rows.module + '.weight'!r}, which the base {ckpt.root} does not have"
                )
            if weight != 1.0:
                raise UnsupportedAdapter(f"{where}: trainable tokens replace rows and cannot be weighted (weight {weight:g}); use weight 1")
            if target.name in terms or target.name in sources:
                raise UnsupportedAdapter(
                    f"{where}: {target.name!r} takes trainable tokens and also LoRA or a saved copy; streammerge merges only one of them"
                )
            width = sources[target.name].shape if target.name in sources else target.shape
            if len(width) != 2 or rows.delta.shape[1] != width[1] or max(rows.indices) >= width[0]:
                raise AdapterMismatch(
                    f"{where} (trainable tokens {list(rows.delta.shape)}, token ids up to {max(rows.indices)}) does not fit "
                    f"base tensor {target.name!r} of {list(width)}"
                )
            for other, _ in out.get(target.name, ()):
                shared = sorted(set(other.indices) & set(rows.indices))
                if shared:
                    raise AdapterMismatch(f"{where}: token ids {shared[:8]} are also trained by another adapter on {target.name!r}")
            term = RowsTerm(Source.of(rows.delta), rows.indices)
            out.setdefault(target.name, []).append((rows, term))
    return out


def _targeting_hint(adapter: Adapter, module: str) -> str:
    cfg = adapter.config
    parts = [f"{k}={cfg[k]!r}" for k in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern") if cfg.get(k)]
    base = cfg.get("base_model_name_or_path")
    hint = f" (adapter config: {', '.join(parts)})" if parts else ""
    return hint + (f"; the adapter was trained on {base!r}" if base else "") + " (different model?)"


def _check_pair_shape(adapter: Adapter, pair: LoraPair, target: TensorInfo, shape: tuple[int, ...], transpose: bool) -> None:
    where = f"{adapter.weights_path}: tensor {pair.a.name!r} for base tensor {target.name!r}"
    if target.dtype not in FLOAT_DTYPES:
        raise AdapterMismatch(f"{where}: base tensor has dtype {target.dtype}; only F16/BF16/F32/F64 weights can take a LoRA delta")
    out_features, in_features = pair.b.shape[0], pair.a.shape[1]
    expected = (in_features, out_features) if transpose else (out_features, in_features)
    if shape != expected:
        layout = "(vocab, hidden)" if pair.embedding else "(in, out) as fan_in_fan_out=true says" if transpose else "(out, in)"
        hint = " (the base looks transposed: check fan_in_fan_out)" if shape == expected[::-1] and not pair.embedding else ""
        raise AdapterMismatch(f"{where}: LoRA gives {layout} = {list(expected)} but the base tensor is {list(shape)}{hint}")


def adapter_tensors(adapter: Adapter) -> list[TensorInfo]:
    """The adapter's tensors under PEFT's normalised key names (no adapter name), in file order (``--mode lora``)."""
    named: dict[str, str] = {t.name: t.name for t in adapter.replacements.values()}
    for p in adapter.pairs:
        a, b = ("lora_embedding_A", "lora_embedding_B") if p.embedding else ("lora_A.weight", "lora_B.weight")
        named[p.a.name], named[p.b.name] = f"{PEFT_PREFIX}{p.key_module}.{a}", f"{PEFT_PREFIX}{p.key_module}.{b}"
        if p.magnitude is not None:
            named[p.magnitude.name] = f"{PEFT_PREFIX}{p.module}.lora_magnitude_vector"
        if p.bias is not None:
            named[p.bias.name] = f"{PEFT_PREFIX}{p.module}.lora_B.bias"
    everything = [t for p in adapter.pairs for t in (p.a, p.b, p.magnitude, p.bias) if t is not None]
    tensors = sorted([*everything, *adapter.replacements.values()], key=lambda t: t.offset)
    return [dataclasses.replace(t, name=named[t.name]) for t in tensors]
