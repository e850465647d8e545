"""GGUF output against llama.cpp's own converter.

The oracle: PEFT's ``merge_and_unload`` of a tiny model + LoRA (built here, tokenizer trained here),
saved with ``save_pretrained`` beside the base's tokenizer files, then llama.cpp's
``convert_hf_to_gguf.py --outtype X`` (from the llama-cpp-python sdist ``make install`` unpacks into
``.cache/sdist/llama.cpp``, with its own gguf-py). streammerge's file must equal the converter's
byte for byte; on a difference, the comparison names the first differing metadata key or tensor.

No metadata key is excluded: the keys derived from the folder name (general.name, general.basename)
agree because the oracle folder is named like the base folder. The one thing patched in the
converter is ``TextModel.get_vocab_base_pre`` (tiny BPE tokenizers match none of its known hashes): it
returns the name streammerge is given with ``--gguf-pre`` (:mod:`tests.gguf_convert`).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import streammerge
from streammerge.plan import Plan
from streammerge.write import STOP_AFTER_ENV
from tests.arch_fixtures import make_adapter, peft_merged
from tests.conftest import run_cli

REPO = Path(__file__).parents[1]
LLAMA_CPP = REPO / ".cache" / "sdist" / "llama.cpp"
PRE = "llama-bpe"
needs_converter = pytest.mark.skipif(
    not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file(),
    reason=f"llama.cpp's convert_hf_to_gguf.py is not in {LLAMA_CPP} (make install fetches it from the llama-cpp-python sdist)",
)
TEXT = [
    "hello world this is a tiny tokenizer for streammerge tests",
    "the quick brown fox jumps over the lazy dog while llamas graze",
    "GGUF files hold metadata and tensors for llama.cpp and Ollama",
] * 30
CHAT = "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>{% endfor %}"
SHAPE: dict[str, Any] = dict(
    vocab_size=320, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
)  # fmt: skip
"""Rows of 64 (Q8_0 blocks) and of 80 (not a multiple of 32: the converter falls back to F16)."""


def bpe_tokenizer(path: Path, byte_level_post: bool = False) -> None:
    """A byte-level BPE tokenizer.json (as Llama 3 / Qwen ship) with special tokens and a chat template; with
    ``byte_level_post`` a ByteLevel post-processor (as Qwen 2 ships) and an ``add_bos_token`` it overrides."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin|>", "<|finish|>", "<|start|>", "<|end|>"]
    tok.train_from_iterator(
        TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|finish|>")
    fast.add_tokens(["streammerge"])  # an added, non-special token (USER_DEFINED)
    fast.chat_template = CHAT
    if byte_level_post:
        fast.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    fast.save_pretrained(path)
    if byte_level_post:
        config = json.loads((path / "tokenizer_config.json").read_text())
        (path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))


def spm_tokenizer(path: Path) -> None:
    """A sentencepiece tokenizer.model (as Llama 2 / Gemma ship) with tokenizer_config.json's added tokens and template."""
    import json

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT), model_writer=model, vocab_size=300, model_type="bpe", minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], byte_fallback=True,
    )  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    config = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT, "added_tokens_decoder": {"3": {"content": "<start_of_turn>", "special": True}},
    }  # fmt: skip
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def hf_tokenizer(path: Path) -> None:
    """A sentencepiece vocabulary as transformers saves it: tokenizer.json only (BPE, byte fallback), no tokenizer.model,
    as many Llama 2 derivatives ship; the converter reads it through gguf's LlamaHfVocab, which (unlike the
    tokenizer.model path) does not pad the vocabulary to vocab_size: the model has the tokenizer's 300 rows."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        spm_tokenizer(Path(tmp))
        AutoTokenizer.from_pretrained(tmp).save_pretrained(path)
    assert not (path / "tokenizer.model").exists() and (path / "tokenizer.json").is_file()


def _configs() -> dict[str, tuple[Any, str, torch.dtype]]:
    """family -> (config, tokenizer kind, model dtype)."""
    import transformers as t

    rope31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}  # fmt: skip
    return {
        "llama": (t.LlamaConfig(**SHAPE, bos_token_id=0, eos_token_id=1), "bpe", torch.bfloat16),
        "llama_spm": (t.LlamaConfig(**SHAPE, bos_token_id=1, eos_token_id=2), "spm", torch.bfloat16),
        "llama_hf": (t.LlamaConfig(**{**SHAPE, "vocab_size": 300}, bos_token_id=1, eos_token_id=2), "hf", torch.bfloat16),
        "llama31": (t.LlamaConfig(**SHAPE, rope_scaling=rope31, tie_word_embeddings=True), "bpe", torch.bfloat16),
        "mistral": (t.MistralConfig(**SHAPE, head_dim=16), "spm", torch.float16),
        "qwen2": (t.Qwen2Config(**SHAPE), "bpe", torch.bfloat16),
        "qwen2_post": (t.Qwen2Config(**SHAPE), "bpe_post", torch.bfloat16),
        "qwen3": (t.Qwen3Config(**SHAPE, head_dim=16), "bpe", torch.bfloat16),
        "gemma": (t.GemmaConfig(**SHAPE, head_dim=16), "spm", torch.bfloat16),
        "gemma2": (t.Gemma2Config(**SHAPE, head_dim=16), "spm", torch.float16),
        "gemma3_text": (t.Gemma3TextConfig(**SHAPE, head_dim=16), "spm", torch.bfloat16),
        "gemma3_bpe": (t.Gemma3TextConfig(**SHAPE, head_dim=16), "bpe", torch.bfloat16),
        "llama_bias": (t.LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True), "bpe", torch.float32),
    }


CASES = [
    ("llama", "bf16"), ("llama", "f16"), ("llama", "q8_0"), ("llama_spm", "bf16"), ("llama_hf", "f16"), ("llama31", "q8_0"), ("mistral", "auto"),
    ("qwen2", "bf16"), ("qwen2", "q8_0"), ("qwen2_post", "q8_0"), ("qwen3", "f16"), ("gemma", "bf16"), ("gemma2", "auto"), ("gemma3_text", "q8_0"),
    ("gemma3_bpe", "bf16"), ("llama_bias", "q8_0"), ("llama_bias", "auto"),
]  # fmt: skip
"""Besides the outtypes and tokenizers: Qwen2 with a ByteLevel post-processor (the converter's gguf-py, newer than
gguf 0.19, writes add_bos/add_eos False for it, over tokenizer_config.json's add_bos_token); Gemma 3 with a tokenizer.json smaller than its vocabulary (embed_tokens trimmed
to the tokenizer's rows), and a float32 Llama with q/k/v/o and MLP biases (1-D q/k biases un-permuted, biases F32)."""
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def make_family(family: str, root: Path) -> Path:
    """A random tiny model of ``family`` in ``root/family`` (norms away from their init), with its tokenizer."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    config, kind, dtype = _configs()[family]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    path = root / family
    model.save_pretrained(path)
    tokenizers = {
        "bpe": bpe_tokenizer,
        "bpe_post": lambda p: bpe_tokenizer(p, byte_level_post=True),
        "spm": spm_tokenizer,
        "hf": hf_tokenizer,
    }
    tokenizers[kind](path)
    return path


def tokenizer_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)


def convert(jobs: list[list[str]]) -> None:
    """Run the converter once per job (model dir + arguments), all in one process."""
    args = [a for job in jobs for a in ["::", *job]][1:]
    r = subprocess.run(
        [sys.executable, str(REPO / "tests" / "gguf_convert.py"), str(LLAMA_CPP), PRE, *args], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-4000:]


def assert_same_gguf(ours: Path, theirs: Path) -> None:
    """Every metadata key (in order, type and bytes) and every tensor (name, type, shape, offset, bytes) equal; then the files."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    assert list(a.fields) == list(b.fields), "metadata keys differ"
    for key, field in a.fields.items():
        other = b.fields[key]
        assert field.types == other.types and [p.tobytes() for p in field.parts] == [p.tobytes() for p in other.parts], (
            f"{key}: {field.contents()!r:.200} vs {other.contents()!r:.200}"
        )
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert (x.tensor_type, list(x.shape), x.data_offset) == (y.tensor_type, list(y.shape), y.data_offset), x.name
        assert x.data.tobytes() == y.data.tobytes(), f"{x.name}: tensor bytes differ"
    assert ours.read_bytes() == theirs.read_bytes()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Bases, adapters and the converter's files for every case (one converter process for all)."""
    if not (LLAMA_CPP / "convert_hf_to_gguf.py").is_file():
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py is not in {LLAMA_CPP} (make install fetches it)")
    root = tmp_path_factory.mktemp("gguf")
    bases, adapters, files = {}, {}, {}
    jobs = []
    for family in dict.fromkeys(f for f, _ in CASES):
        base = bases[family] = make_family(family, root / "bases")
        adapters[family] = make_adapter(base, root / "adapters" / family, target_modules=TARGETS)
        merged = peft_merged(base, adapters[family], root / "oracle" / family, dtype=_configs()[family][2])
        tokenizer_files(base, merged)
    for family, outtype in CASES:
        files[family, outtype] = root / "converted" / f"{family}-{outtype}.gguf"
        jobs.append([str(root / "oracle" / family), "--outtype", outtype, "--outfile", str(files[family, outtype])])
    split = root / "converted" / "split" / "model.gguf"
    split.parent.mkdir(parents=True)
    jobs.append([str(root / "oracle" / "llama"), "--outtype", "bf16", "--outfile", str(split), "--split-max-size", "60K"])
    convert(jobs)
    return {"bases": bases, "adapters": adapters, "files": files, "split": split.parent}


@needs_converter
@pytest.mark.parametrize(("family", "outtype"), CASES)
def test_gguf_equals_converter_on_peft_merge(oracle: dict[str, Any], tmp_path: Path, family: str, outtype: str) -> None:
    out = tmp_path / f"{family}.gguf"
    p = streammerge.plan(oracle["bases"][family], [oracle["adapters"][family]], out, outtype=outtype, gguf_pre=PRE)
    assert p.format == "gguf" and len(p.shards) == 1
    # Gemma 3 with a 305-token tokenizer.json: the converter trims embed_tokens to 305 rows but pads the token list to
    # vocab_size (320), so llama.cpp refuses its file, and streammerge's (the same) comes with a warning.
    warned = [n for n in p.notes if n.startswith("warning")]
    assert len(warned) == (family == "gemma3_bpe") and all("320 tokens but model.embed_tokens.weight has 305 rows" in n for n in warned)
    streammerge.run(p)
    assert_same_gguf(out, oracle["files"][family, outtype])
    assert sorted(os.listdir(tmp_path)) == [out.name]  # no partial folder, no config or tokenizer files


@needs_converter
def test_split_files_equal_converter_split(oracle: dict[str, Any], tmp_path: Path) -> None:
    """--max-shard-size: gguf-split's names and split.* keys, the same files as the converter's --split-max-size."""
    out = tmp_path / "model.gguf"
    r = run_cli("merge", str(oracle["bases"]["llama"]), str(oracle["adapters"]["llama"]), "-o", str(out), "--outtype", "bf16",
                "--gguf-pre", PRE, "--max-shard-size", "60000", "-q")  # fmt: skip
    assert r.exit_code == 0, r.stderr
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(os.listdir(oracle["split"])) and len(names) > 2 and names[0] == f"model-00001-of-{len(names):05d}.gguf"
    for name in names:
        assert_same_gguf(tmp_path / name, oracle["split"] / name)


@needs_converter
def test_saved_plan_and_resume_give_the_same_bytes(oracle: dict[str, Any], tmp_path: Path) -> None:
    base, lora = oracle["bases"]["qwen2"], oracle["adapters"]["qwen2"]
    args = [str(base), str(lora), "--outtype", "q8_0", "--gguf-pre", PRE, "-q"]
    plan_file = tmp_path / "plan.json"
    r = run_cli("plan", *args[:-1], "-o", str(tmp_path / "a.gguf"), "--save", str(plan_file))
    assert r.exit_code == 0, r.stderr
    p = Plan.load(plan_file)
    assert p == streammerge.plan(base, [lora], tmp_path / "a.gguf", outtype="q8_0", gguf_pre=PRE) and p.format == "gguf"
    assert run_cli("run", str(plan_file), "-q").exit_code == 0
    expected = oracle["files"]["qwen2", "q8_0"].read_bytes()
    assert (tmp_path / "a.gguf").read_bytes() == expected
    # killed after 5 tensors: no .gguf appears, the partial folder is continued with --resume
    out = tmp_path / "b.gguf"
    env = {**os.environ, "PYTHONPATH": str(REPO), STOP_AFTER_ENV: "5"}
    proc = subprocess.run([sys.executable, "-m", "streammerge", "merge", *args, "-o", str(out)], env=env, capture_output=True)
    assert proc.returncode == 137
    assert not out.exists() and (tmp_path / "b.gguf.partial").is_dir()
    r = run_cli("merge", *args, "-o", str(out), "--resume")
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == expected and not (tmp_path / "b.gguf.partial").exists()


@needs_converter
def test_from_a_4bit_base(tmp_path: Path) -> None:
    """A bitsandbytes NF4 base: dequantized, merged, converted; equals the converter on streammerge's safetensors merge
    of it (which tests/test_quantized.py checks against dequantize + PEFT)."""
    from tests.quantized_fixtures import make_llama_4bit, make_lora_4bit

    base = make_llama_4bit(tmp_path / "b" / "llama4", vocab_size=320)
    bpe_tokenizer(base)
    lora = make_lora_4bit(base, tmp_path / "lora", target_modules=["q_proj", "k_proj", "down_proj"])
    merged = tmp_path / "st" / "llama4"
    merged.parent.mkdir()
    streammerge.run(streammerge.plan(base, [lora], merged))
    convert([[str(merged), "--outtype", "q8_0", "--outfile", str(tmp_path / "theirs.gguf")]])
    out = tmp_path / "ours.gguf"
    streammerge.run(streammerge.plan(base, [lora], out, outtype="q8_0", gguf_pre=PRE))
    assert_same_gguf(out, tmp_path / "theirs.gguf")


@pytest.mark.parametrize("head_rows", [0, 4])
def test_bf16_rows_equal_gguf_quants_for_every_bit_pattern(head_rows: int) -> None:
    """The bfloat16 shortcut (no float32 round trip) against gguf's own BF16 rounding, for all 65536 values
    (NaNs, infinities, subnormals); and the general path for F16, F32 and Q8_0."""
    import gguf
    import numpy as np

    from streammerge.kernels import gguf_rows

    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(-1, 64)
    for qtype in ("BF16", "F16", "F32", "Q8_0"):
        want = x.float()
        if head_rows:
            want = want.reshape(-1, 2, head_rows // 2, 64).transpose(1, 2).reshape(-1, 64)
        with np.errstate(all="ignore"):
            expected = gguf.quants.quantize(want.numpy(), gguf.GGMLQuantizationType[qtype]).tobytes()
            assert gguf_rows(x, qtype, head_rows=head_rows) == expected, qtype


def test_refusals(tmp_path: Path) -> None:
    """Unsupported families, modes and options: one line, exit 2, nothing written."""
    from tests.arch_fixtures import make_model

    neox = make_model("gpt_neox", tmp_path / "neox")
    lora = make_adapter(neox, tmp_path / "neox-lora", target_modules=["query_key_value"])
    r = run_cli("merge", str(neox), str(lora), "-o", str(tmp_path / "x.gguf"))
    assert r.exit_code == 2 and "GGUF output supports" in r.stderr and "GPTNeoXForCausalLM" in r.stderr
    base = make_family("llama", tmp_path)
    lora = make_adapter(base, tmp_path / "lora", target_modules=["q_proj"])
    out = str(tmp_path / "x.gguf")
    for extra, words in [
        ([], "--gguf-pre"),
        (["--mode", "merged_4bit"], "--mode merged_4bit is for safetensors"),
        (["--gguf-pre", PRE, "--dtype", "bf16"], "drop --dtype"),
        (["--gguf-pre", PRE, "--verify"], "--verify"),
        (["--gguf-pre", PRE, "--pack"], "--pack"),
    ]:
        r = run_cli("merge", str(base), str(lora), "-o", out, *extra)
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
    r = run_cli("merge", str(base), str(lora), "-o", str(tmp_path / "folder"), "--outtype", "q8_0")
    assert r.exit_code == 2 and "--outtype and --gguf-pre are for GGUF output" in r.stderr
    for name, junk in (("tokenizer.json", "{not json"), ("tokenizer_config.json", "[1, 2]")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(base, broken)
        (broken / name).write_text(junk)
        r = run_cli("merge", str(broken), str(lora), "-o", out, "--gguf-pre", PRE)
        assert r.exit_code == 2 and "tokenizer" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    r = run_cli("verify", out)
    assert r.exit_code == 2 and "a GGUF file; verify checks safetensors output folders" in r.stderr
    (tmp_path / "x.gguf").write_bytes(b"keep")
    r = run_cli("merge", str(base), str(lora), "-o", out, "--gguf-pre", PRE)
    assert r.exit_code == 2 and "already exists" in r.stderr and (tmp_path / "x.gguf").read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")) == []


@needs_converter
def test_peak_rss_within_the_estimate(oracle: dict[str, Any], tmp_path: Path) -> None:
    """The plan's peak estimate bounds the run's RSS (transformers' tokenizer read included), with small tiles."""
    from tests.conftest import peak_rss_of

    args = [str(oracle["bases"]["llama"]), str(oracle["adapters"]["llama"]), "-o", str(tmp_path / "m.gguf"), "--outtype", "q8_0",
            "--gguf-pre", PRE, "--tile-size", "64KiB"]  # fmt: skip
    p = streammerge.plan(*args[:2], tmp_path / "m.gguf", outtype="q8_0", gguf_pre=PRE, tile_size="64KiB")
    assert peak_rss_of([sys.executable, "-m", "streammerge", "merge", *args, "-q"]) <= p.estimate.peak_host_bytes
    assert (tmp_path / "m.gguf").read_bytes() == oracle["files"]["llama", "q8_0"].read_bytes()


def test_70b_gguf_plan_is_fast_bounded_and_split(tmp_path: Path) -> None:
    """A 70B-shaped Llama 3.1 (sparse files, real headers): the GGUF plan, with a 128k-token vocabulary in its header,
    is made in seconds, splits as gguf-split would, keeps peak RAM to tiles, and round-trips through JSON."""
    import json

    from tests.test_scale import sparse_model

    base, lora = sparse_model(tmp_path, "70b")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "dtype": "bfloat16",
    }  # fmt: skip
    (base / "config.json").write_text(json.dumps(config))
    bpe_tokenizer(base)
    p = streammerge.plan(base, [lora], tmp_path / "llama.gguf", outtype="q8_0", gguf_pre=PRE, max_shard_size="20GB", device="cpu")
    names = [s.file for s in p.shards]
    assert names == [f"llama-{i:05d}-of-{len(names):05d}.gguf" for i in range(1, len(names) + 1)] and len(names) == 4
    assert p.estimate.peak_host_bytes < 1 * 2**30
    assert sum(s.size for s in p.shards) == pytest.approx(70.5e9 * 34 / 32, rel=0.02)  # Q8_0: 34 bytes per 32 weights
    assert {u.out_dtype for u in p.units} == {"Q8_0", "F32"} and "rope_freqs.weight" in p.shards[0].tensors
    p.save(tmp_path / "plan.json")
    assert os.path.getsize(tmp_path / "plan.json") < 64 * 2**20 and Plan.load(tmp_path / "plan.json") == p


@needs_converter
def test_tokenizer_shorter_than_the_embedding_is_warned_of(oracle: dict[str, Any], tmp_path: Path) -> None:
    """A tokenizer.json-only vocabulary (300 tokens) beside a 320-row embedding: the converter writes a file llama.cpp
    refuses (its LlamaHfVocab path does not pad); streammerge writes the same file but says so in the plan, naming the tensor."""
    base = tmp_path / "llama"
    shutil.copytree(oracle["bases"]["llama_spm"], base)
    (base / "tokenizer.model").unlink()
    tokenizer_files(oracle["bases"]["llama_hf"], base)
    p = streammerge.plan(base, [oracle["adapters"]["llama_spm"]], tmp_path / "m.gguf")
    warning = [n for n in p.notes if n.startswith("warning")]
    assert len(warning) == 1 and "300 tokens but model.embed_tokens.weight has 320 rows; llama.cpp will refuse" in warning[0]
    r = run_cli("plan", str(base), str(oracle["adapters"]["llama_spm"]), "-o", str(tmp_path / "m.gguf"))
    assert r.exit_code == 0 and "300 tokens but model.embed_tokens.weight has 320 rows" in r.output + r.stderr


@needs_converter
def test_adapter_tokenizer_and_resized_vocabulary(oracle: dict[str, Any], tmp_path: Path) -> None:
    """An adapter that added tokens (its own tokenizer files) and resized the vocabulary (embed_tokens and lm_head saved
    whole): the GGUF is converted from the merged folder's view (the adapter's tokenizer, config.json with the new
    vocab_size), so it equals the converter run on streammerge's safetensors merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = oracle["bases"]["llama"]
    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(["<|tool|>", "llamerge"], special_tokens=False)
    tok.add_special_tokens({"additional_special_tokens": ["<|call|>"]})
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.resize_token_embeddings(336)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj"], modules_to_save=["embed_tokens", "lm_head"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    merged = tmp_path / "st" / base.name
    merged.parent.mkdir()
    streammerge.run(streammerge.plan(base, [adapter], merged))
    convert([[str(merged), "--outtype", "bf16", "--outfile", str(tmp_path / "theirs.gguf")]])
    out = tmp_path / "ours.gguf"
    streammerge.run(streammerge.plan(base, [adapter], out, outtype="bf16", gguf_pre=PRE))
    assert_same_gguf(out, tmp_path / "theirs.gguf")
    import gguf

    fields = gguf.GGUFReader(out).fields
    assert fields["llama.vocab_size"].contents() == 336 and "<|call|>" in fields["tokenizer.ggml.tokens"].contents()
