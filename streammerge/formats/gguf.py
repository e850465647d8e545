"""GGUF metadata as llama.cpp's ``convert_hf_to_gguf.py`` writes it: architecture, hyperparameters, tokenizer.

The byte layout, key names, tensor names and the special-token / chat-template reading all come from
the ``gguf`` package (:class:`gguf.GGUFWriter`, :func:`gguf.get_tensor_name_map`,
:class:`gguf.SpecialVocab`, :class:`gguf.Metadata`); this module decides, per model family, which
keys the converter writes and in which order, from ``config.json`` and the tokenizer files. It
reads small files only (the transformers tokenizer for ``tokenizer.json`` vocabularies, sentencepiece
for ``tokenizer.model``); it never touches tensor data.

Families (the converter's model classes): Llama and Mistral (``llama``, q/k rows un-permuted, Llama 3.1
rope factors), Qwen2 (``qwen2``), Qwen3 (``qwen3``), Gemma (``gemma``, ``gemma2``, ``gemma3`` text: norm
weights + 1, no ``lm_head``). Everything else is refused.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from streammerge.errors import BadCheckpoint, StreamMergeError

OUTTYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
"""``--outtype`` names, as the converter spells them ("auto" picks bf16 or f16 from the weights)."""
FILE_QTYPES = {
    gguf.LlamaFileType.ALL_F32: gguf.GGMLQuantizationType.F32,
    gguf.LlamaFileType.MOSTLY_F16: gguf.GGMLQuantizationType.F16,
    gguf.LlamaFileType.MOSTLY_BF16: gguf.GGMLQuantizationType.BF16,
    gguf.LlamaFileType.MOSTLY_Q8_0: gguf.GGMLQuantizationType.Q8_0,
}
"""The tensor type of the weights a file type quantizes (1-D tensors, norms and biases stay F32)."""
_SKIPPED_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
"""Checkpoint tensors the converter drops."""
_F32_KEYS = (
    gguf.MODEL_TENSOR.FFN_GATE_INP,
    gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP,
    gguf.MODEL_TENSOR.POS_EMBD,
    gguf.MODEL_TENSOR.TOKEN_TYPES,
)
"""Tensor kinds the converter always keeps in F32 (of those the supported families can have)."""


@dataclass(frozen=True)
class Family:
    """How the converter treats one Hugging Face architecture."""

    arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    """Llama's ``undo_permute``: q/k rows reordered from HF's rotate-half layout back to interleaved pairs."""
    norm_shift: float = 0.0
    """Added to every ``*norm.weight`` (Gemma stores ``weight - 1``)."""
    skip_lm_head: bool = False
    """``lm_head.weight`` is dropped (Gemma: llama.cpp ties the output to the embedding)."""
    trim_embedding: bool = False
    """Gemma 3: ``embed_tokens`` keeps only the tokenizer's rows."""


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": Family(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Family(gguf.MODEL_ARCH.QWEN2),
    "Qwen3ForCausalLM": Family(gguf.MODEL_ARCH.QWEN3),
    "GemmaForCausalLM": Family(gguf.MODEL_ARCH.GEMMA, norm_shift=1.0, skip_lm_head=True),
    "Gemma2ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA2, norm_shift=1.0, skip_lm_head=True),
    "Gemma3ForCausalLM": Family(gguf.MODEL_ARCH.GEMMA3, norm_shift=1.0, trim_embedding=True),
}


def family_of(config: dict[str, Any] | None, where: str) -> tuple[str, Family]:
    """The config's architecture and how the converter treats it; anything else is refused."""
    archs = (config or {}).get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch not in FAMILIES:
        raise StreamMergeError(
            f"{where}: GGUF output supports {', '.join(sorted(FAMILIES))}; this model is {arch or 'of no known architecture'} "
            "(merge to safetensors and convert with llama.cpp's convert_hf_to_gguf.py)"
        )
    return arch, FAMILIES[arch]


def hparams_of(config: dict[str, Any]) -> dict[str, Any]:
    """config.json as the converter reads it: ``text_config`` moved to the root."""
    h = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(h.get("text_config"), dict):
        h = {**h, **h["text_config"]}
    return h


def _find(h: dict[str, Any], keys: Iterable[str]) -> Any:
    return next((h[k] for k in keys if k in h), None)


def block_count(h: dict[str, Any]) -> int:
    n = _find(h, ["n_layers", "num_hidden_layers", "n_layer", "num_layers"])
    if not isinstance(n, int):
        raise BadCheckpoint("config.json: no layer count (num_hidden_layers)")
    return n


def rope_parameters(h: dict[str, Any]) -> dict[str, Any]:
    """The rope settings, with the global ones mirrored in, as the converter's TextModel gathers them."""
    rope = dict(h.get("rope_parameters", h.get("rope_scaling")) or {})
    theta = _find(h, ["global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"])
    local = _find(h, ["local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta", "rope_local_base_freq"])
    partial = _find(h, ["partial_rotary_factor", "rope_pct", "rope_percent"])
    orig = _find(h, ["original_max_position_embeddings"])
    if "full_attention" not in rope and "sliding_attention" not in rope:
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and orig is not None:
            rope["original_max_position_embeddings"] = orig
    return rope


def head_dim(h: dict[str, Any]) -> int:
    d = h.get("head_dim")
    return int(d) if d is not None else int(h["hidden_size"]) // int(h["num_attention_heads"])


def llama3_rope_factors(h: dict[str, Any]) -> list[float] | None:
    """Llama 3.1's ``rope_freqs.weight`` (F32), computed as the converter computes it; None without llama3 rope scaling."""
    params = rope_parameters(h)
    params = params.get("full_attention", params)
    if not params or str(params.get("rope_type", "")).lower() != "llama3":
        return None
    import torch  # as the converter: float32 frequencies, Python float arithmetic per factor

    base = params.get("rope_theta", 10000.0)
    dim = head_dim(h)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = params.get("factor", 8.0)
    low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old = params.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out: list[float] = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return [float(x) for x in torch.tensor(out, dtype=torch.float32)]


# --- tensors -----------------------------------------------------------------------------------


def block_id(name: str) -> int | None:
    """The converter's block id: the first all-digit part of the name."""
    return next((int(p) for p in name.split(".") if p.isdecimal()), None)


def gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    """The GGUF name of a checkpoint tensor (``language_model.`` dropped, as the converter does)."""
    name = hf_name.replace("language_model.", "")
    new = names.get_name(key=name, try_suffixes=(".weight", ".bias"))
    if new is None:
        raise BadCheckpoint(f"{hf_name}: no GGUF name for this tensor (gguf's tensor map has none)")
    return new


def is_skipped(family: Family, hf_name: str) -> bool:
    return hf_name.endswith(_SKIPPED_SUFFIXES) or (family.skip_lm_head and hf_name == "lm_head.weight")


def _matches(arch: gguf.MODEL_ARCH, name: str, key: gguf.MODEL_TENSOR, bid: int | None) -> bool:
    if key not in gguf.MODEL_TENSORS[arch]:
        return False
    pattern = gguf.TENSOR_NAMES[key]
    if "{bid}" in pattern:
        if bid is None:
            return False
        pattern = pattern.format(bid=bid)
    elif bid is not None:
        return False
    return name == pattern + ".weight"


def tensor_qtype(
    family: Family, name: str, bid: int | None, ndim: int, last_dim: int, ftype: gguf.LlamaFileType
) -> gguf.GGMLQuantizationType:
    """The type the converter stores a tensor in: F32 for 1-D tensors, norms, biases and a few kinds;
    the file type's otherwise; F16 where Q8_0 cannot quantize the rows (not a multiple of 32)."""
    if ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if any(_matches(family.arch, name, key, bid) for key in _F32_KEYS) or name[-7:] not in (".weight", ".lora_a", ".lora_b"):
        return gguf.GGMLQuantizationType.F32
    qtype = FILE_QTYPES[ftype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if last_dim % block == 0 else gguf.GGMLQuantizationType.F16


# --- metadata ------------------------------------------------------------------------------------


def add_metadata(
    w: gguf.GGUFWriter,
    arch: str,
    family: Family,
    config: dict[str, Any],
    ftype: gguf.LlamaFileType,
    card_dir: str,
    tokenizer_dir: str,
    pre: str | None,
) -> None:
    """Every key the converter writes after ``general.architecture``, in its order: type, the model
    card's general.* keys, hyperparameters, quantization version, tokenizer. ``w`` must hold the tensor
    infos already (general.size_label counts their parameters)."""
    h = hparams_of(config)
    w.add_type(gguf.GGUFType.MODEL)
    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, Path(card_dir), None, total)
    if meta.name is None:
        meta.name = Path(card_dir).name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    meta.set_gguf_meta_model(w)
    try:
        _PARAMS[family.arch](w, h, ftype)
    except (KeyError, TypeError, ValueError) as e:
        raise BadCheckpoint(f"{card_dir}/config.json: {arch} needs {e} for its GGUF hyperparameters (missing or malformed)") from e
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    try:
        _VOCABS[family.arch](w, h, Path(tokenizer_dir), pre)
    except StreamMergeError:
        raise
    except Exception as e:  # a tokenizer library's own error on a malformed file: one line naming the folder
        raise BadCheckpoint(f"{tokenizer_dir}: cannot read the tokenizer for GGUF ({type(e).__name__}: {e})") from e


def _text_params(w: gguf.GGUFWriter, h: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    """The converter's TextModel.set_gguf_parameters, for the keys dense decoder families can have."""
    w.add_block_count(block_count(h))
    if (
        n_ctx := _find(h, ["max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length", "model_max_length"])
    ) is not None:
        w.add_context_length(n_ctx)
    if (n_embd := _find(h, ["hidden_size", "n_embd", "dim"])) is not None:
        w.add_embedding_length(n_embd)
    if (
        n_ff := _find(h, ["prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner", "hidden_dim"])
    ) is not None:
        w.add_feed_forward_length(n_ff)
    if (n_head := _find(h, ["num_attention_heads", "n_head", "n_heads"])) is not None:
        w.add_head_count(n_head)
    if (n_head_kv := _find(h, ["num_key_value_heads", "n_kv_heads"])) is not None:
        w.add_head_count_kv(n_head_kv)
    if h.get("is_causal") is False:
        w.add_causal_attention(False)
    rope_all = rope_parameters(h)
    rope = rope_all.get("full_attention", rope_all)
    if (rope_type := rope.get("rope_type")) is not None:
        factor = rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(factor)
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(factor)
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            if (v := rope.get("extrapolation_factor")) is not None:
                w.add_rope_scaling_yarn_ext_factor(v)
            if (v := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
                w.add_rope_scaling_yarn_attn_factor(v)
            if (v := rope.get("beta_fast")) is not None:
                w.add_rope_scaling_yarn_beta_fast(v)
            if (v := rope.get("beta_slow")) is not None:
                w.add_rope_scaling_yarn_beta_slow(v)
        elif rope_type in ("su", "longrope"):
            w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if "mrope_section" in rope_all:
        sections = list(rope_all["mrope_section"])
        w.add_rope_dimension_sections([*sections, 0, 0, 0, 0][:4])
    if (theta := rope.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := _find(h, ["rms_norm_eps", "norm_eps"])) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _find(h, ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"])) is not None:
        w.add_layer_norm_eps(eps)
    if (hd := h.get("head_dim")) is not None:
        w.add_key_length(hd)
        w.add_value_length(hd)
    w.add_file_type(ftype)


def _llama_params(w: gguf.GGUFWriter, h: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    _text_params(w, h, ftype)
    w.add_vocab_size(h["vocab_size"])
    w.add_rope_dimension_count(head_dim(h))


def _gemma_params(w: gguf.GGUFWriter, h: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    w.add_context_length(h["max_position_embeddings"])
    w.add_embedding_length(h["hidden_size"])
    w.add_block_count(block_count(h))
    w.add_feed_forward_length(h["intermediate_size"])
    w.add_head_count(h["num_attention_heads"])
    w.add_head_count_kv(h.get("num_key_value_heads", h["num_attention_heads"]))
    w.add_layer_norm_rms_eps(h["rms_norm_eps"])
    w.add_key_length(h["head_dim"])
    w.add_value_length(h["head_dim"])
    w.add_file_type(ftype)


def _gemma2_params(w: gguf.GGUFWriter, h: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    _gemma_params(w, h, ftype)
    w.add_attn_logit_softcapping(h["attn_logit_softcapping"])
    w.add_final_logit_softcapping(h["final_logit_softcapping"])
    w.add_sliding_window(h["sliding_window"])


def _gemma3_params(w: gguf.GGUFWriter, h: dict[str, Any], ftype: gguf.LlamaFileType) -> None:
    _text_params(w, h, ftype)
    rope = rope_parameters(h)
    w.add_context_length(h.get("max_position_embeddings", 131072))
    w.add_head_count(h.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(h.get("rms_norm_eps", 1e-6))
    w.add_key_length(h.get("head_dim", 256))
    w.add_value_length(h.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if h.get("attn_logit_softcapping") is not None:
        raise BadCheckpoint("config.json: Gemma 3 with attn_logit_softcapping (the converter refuses it too)")
    if final := h.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(final)
    if h.get("sliding_window_pattern") != 1:
        w.add_sliding_window(h["sliding_window"])
    w.add_head_count_kv(h.get("num_key_value_heads", 4))


_PARAMS: dict[gguf.MODEL_ARCH, Callable[[gguf.GGUFWriter, dict[str, Any], gguf.LlamaFileType], None]] = {
    gguf.MODEL_ARCH.LLAMA: _llama_params,
    gguf.MODEL_ARCH.QWEN2: _text_params,
    gguf.MODEL_ARCH.QWEN3: _text_params,
    gguf.MODEL_ARCH.GEMMA: _gemma_params,
    gguf.MODEL_ARCH.GEMMA2: _gemma2_params,
    gguf.MODEL_ARCH.GEMMA3: _gemma3_params,
}


# --- tokenizer ------------------------------------------------------------------------------------


class SpecialVocab(gguf.SpecialVocab):
    """gguf 0.19's SpecialVocab, with the rule llama.cpp's converter has since adopted for ``add_bos``/``add_eos``:
    what tokenizer.json's post-processor says wins over tokenizer_config.json's ``add_*_token``, and a ``ByteLevel``
    post-processor (Qwen 2, Llama 3) means no BOS/EOS is added unless a template in the same post-processor adds it."""

    def _try_load_from_tokenizer_json(self, path: Path) -> bool:
        tokenizer_json, config_json = path / "tokenizer.json", path / "tokenizer_config.json"
        if not tokenizer_json.is_file():
            return bool(super()._try_load_from_tokenizer_json(path))
        config = _json(config_json) if config_json.is_file() else {}
        said = {t: v for t in self.special_token_types if isinstance(v := config.get(f"add_{t}_token"), bool)}
        post = _json(tokenizer_json).get("post_processor") or {}
        processors = post.get("processors", [post]) if isinstance(post, dict) else []
        with tempfile.TemporaryDirectory(prefix="streammerge-vocab-") as tmp:
            # what the post-processor alone says: the same folder, tokenizer_config.json without its add_*_token keys
            for name in os.listdir(path):
                if name != config_json.name:
                    os.symlink(os.path.join(path, name), os.path.join(tmp, name))
            if config_json.is_file():
                kept = {k: v for k, v in config.items() if not (k.startswith("add_") and k.endswith("_token"))}
                with open(os.path.join(tmp, config_json.name), "w", encoding="utf-8") as f:
                    json.dump(kept or {"_": None}, f)  # a config there stays a non-empty one, as gguf tests it
            loaded = bool(super()._try_load_from_tokenizer_json(Path(tmp)))
        if any(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in processors):
            self.add_special_token.setdefault("bos", False)
            self.add_special_token.setdefault("eos", False)
        for kind, value in said.items():
            self.add_special_token.setdefault(kind, value)
        return loaded


def _looks_special(token: str) -> bool:
    """The converter's does_token_look_special: added tokens it marks CONTROL although not special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))  # noqa: RUF001 - deepseek-coder's full-width bars
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _bpe_vocab(h: dict[str, Any], d: Path) -> tuple[list[str], list[int]]:
    """Tokens and types of a tokenizer.json vocabulary, as the converter's get_vocab_base reads it (with transformers)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise StreamMergeError(
            "GGUF output reads tokenizer.json with transformers, which is not installed: pip install transformers"
        ) from e
    tok = AutoTokenizer.from_pretrained(d)
    vocab: dict[str, int] = tok.vocab
    size = h.get("vocab_size", len(vocab))
    if max(vocab.values()) >= size:
        raise BadCheckpoint(f"{d}: the tokenizer has ids up to {max(vocab.values())}, config.json's vocab_size is {size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = str(tok.decode(tok.encode(token, add_special_tokens=False)))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _set_gpt2(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    tokens, types = _bpe_vocab(h, d)
    if not pre:
        raise StreamMergeError(
            f"{d}: a BPE tokenizer (tokenizer.json): pass --gguf-pre NAME, llama.cpp's name of its pre-tokenizer "
            "(e.g. llama-bpe for Llama 3, qwen2 for Qwen 2/3; what convert_hf_to_gguf.py writes as tokenizer.ggml.pre)"
        )
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    SpecialVocab(d, load_merges=True).add_to_gguf(w, quiet=True)


def _sentencepiece_vocab(h: dict[str, Any], d: Path) -> tuple[list[bytes], list[float], list[int]]:
    """The converter's _create_vocab_sentencepiece: tokenizer.model, then added_tokens.json and tokenizer_config.json's added tokens."""
    path = d / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:
        raise StreamMergeError(
            "GGUF output reads tokenizer.model with sentencepiece, which is not installed: pip install sentencepiece"
        ) from e
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise BadCheckpoint(f"{path}: not a sentencepiece model ({e})") from e
    size = _find(h, ["vocab_size_per_layer_input", "vocab_size"]) or sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(size)]
    scores = [-10000.0] * size
    types = [gguf.TokenType.UNUSED] * size
    for i in range(min(sp.vocab_size(), size)):
        kind = gguf.TokenType.NORMAL
        if sp.IsUnknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.IsControl(i):
            kind = gguf.TokenType.CONTROL
        elif sp.IsUnused(i):
            kind = gguf.TokenType.UNUSED
        elif sp.IsByte(i):
            kind = gguf.TokenType.BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode("utf-8"), sp.GetScore(i), kind
    if (d / "added_tokens.json").is_file():
        for key, i in _json(d / "added_tokens.json").items():
            if isinstance(i, int) and 0 <= i < size:
                tokens[i], scores[i], types[i] = key.encode("utf-8"), -1000.0, gguf.TokenType.USER_DEFINED
    if (d / "tokenizer_config.json").is_file():
        for key, data in (_json(d / "tokenizer_config.json").get("added_tokens_decoder") or {}).items():
            i, token = int(key), data["content"]
            if i >= size:
                continue
            if data.get("special") or _looks_special(token):
                types[i] = gguf.TokenType.CONTROL
            else:
                token = token.replace("\u2581", " ")
                types[i] = gguf.TokenType.USER_DEFINED
            scores[i], tokens[i] = -1000.0, token.encode("utf-8")
    return tokens, scores, [int(t) for t in types]


def _set_sentencepiece(w: gguf.GGUFWriter, h: dict[str, Any], d: Path) -> None:
    tokens, scores, types = _sentencepiece_vocab(h, d)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _set_llama_hf(w: gguf.GGUFWriter, d: Path) -> None:
    vocab = gguf.LlamaHfVocab(d)
    tokens, scores, types = zip(*vocab.all_tokens(), strict=True) if vocab.vocab_size else ((), (), ())
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types(list(types))
    SpecialVocab(d, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def _llama_vocab(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    if (d / "tekken.json").is_file() and not (d / "tokenizer.json").is_file():
        raise StreamMergeError(f"{d}: a Mistral tekken tokenizer; GGUF output reads tokenizer.json or tokenizer.model")
    if (d / "tokenizer_config.json").is_file():
        tc = _json(d / "tokenizer_config.json")
        if (prefix := tc.get("add_prefix_space")) is not None:
            w.add_add_space_prefix(prefix)
    try:
        _set_sentencepiece(w, h, d)
    except FileNotFoundError:
        try:
            _set_llama_hf(w, d)
        except (FileNotFoundError, TypeError):
            _set_gpt2(w, h, d, pre)  # Llama 3
    if h.get("vocab_size", 32000) == 32016:  # CodeLlama's infill tokens
        sv = SpecialVocab(d, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"])
        for kind, i in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            sv._set_special_token(kind, i)
        sv.add_to_gguf(w, quiet=True)
    if h.get("vocab_size", 32000) == 49152:  # granite small models
        w.add_add_bos_token(False)


def _qwen_vocab(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    try:
        _set_sentencepiece(w, h, d)
    except FileNotFoundError:
        _set_gpt2(w, h, d, pre)


def _gemma_vocab(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    _need_sentencepiece(d)
    _set_sentencepiece(w, h, d)
    sv = SpecialVocab(d, load_merges=False, special_token_types=["prefix", "suffix", "middle", "fsep", "eot"])
    for kind, i in (("prefix", 67), ("suffix", 69), ("middle", 68), ("fsep", 70), ("eot", 107)):
        sv._set_special_token(kind, i)
    sv.chat_template = None
    sv.add_to_gguf(w, quiet=True)
    w.add_add_space_prefix(False)


def _gemma2_vocab(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    _need_sentencepiece(d)
    _set_sentencepiece(w, h, d)
    w.add_add_space_prefix(False)


def _gemma3_vocab(w: gguf.GGUFWriter, h: dict[str, Any], d: Path, pre: str | None) -> None:
    if (d / "tokenizer.model").is_file():
        _set_sentencepiece(w, h, d)
        w.add_add_space_prefix(False)
    else:
        _set_gpt2(w, h, d, pre)


def _need_sentencepiece(d: Path) -> None:
    if not (d / "tokenizer.model").is_file():
        raise BadCheckpoint(f"{d}: Gemma's GGUF vocabulary comes from tokenizer.model, which is missing")


_VOCABS: dict[gguf.MODEL_ARCH, Callable[[gguf.GGUFWriter, dict[str, Any], Path, str | None], None]] = {
    gguf.MODEL_ARCH.LLAMA: _llama_vocab,
    gguf.MODEL_ARCH.QWEN2: _qwen_vocab,
    gguf.MODEL_ARCH.QWEN3: _qwen_vocab,
    gguf.MODEL_ARCH.GEMMA: _gemma_vocab,
    gguf.MODEL_ARCH.GEMMA2: _gemma2_vocab,
    gguf.MODEL_ARCH.GEMMA3: _gemma3_vocab,
}


def embedding_rows(d: str, h: dict[str, Any]) -> int:
    """Gemma 3: the rows of ``embed_tokens`` the converter keeps (the tokenizer's size)."""
    p = Path(d)
    if (p / "tokenizer.model").is_file():
        return len(_sentencepiece_vocab(h, p)[0])
    tj = _json(p / "tokenizer.json")
    return len(tj["model"]["vocab"]) + len(tj["added_tokens"])


def _json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise BadCheckpoint(f"{path}: cannot read ({e})") from e
    if not isinstance(obj, dict):
        raise BadCheckpoint(f"{path}: not a JSON object")
    return obj
